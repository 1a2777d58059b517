"""The building aggregate: one sum per period, only over every meter at once, and its place in the site file."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gateway.aggregate import BuildingAggregate
from gateway.config.site import BuildingAggregateConfig, load_site
from gateway.errors import ConfigError
from gateway.model import Quality, Sample

NS = 1_000_000_000
T0 = 1_793_577_600 * NS  # on the 15-minute grid
PERIOD = 900 * NS
METERS = ("apt1.energy_kwh", "apt2.energy_kwh", "apt3.energy_kwh")
REPO = Path(__file__).resolve().parents[2]


def aggregate(**config: object) -> BuildingAggregate:
    return BuildingAggregate(BuildingAggregateConfig.model_validate(config), METERS)


def reads(ts: int, *values: float) -> list[Sample]:
    return [Sample(meter, value, ts, Quality.GOOD) for meter, value in zip(METERS, values, strict=True)]


def test_one_sum_per_period_stamped_with_the_boundary() -> None:
    agg = aggregate()
    assert agg.tick(T0 + 5 * NS) == []  # start: the first full period is awaited
    agg.update(reads(T0 + 100 * NS, 100.5, 200.25, 300.125))
    agg.update([Sample("main.energy_kwh", 99999.0, T0 + 100 * NS, Quality.GOOD)])  # not a member
    assert agg.tick(T0 + 600 * NS) == []
    agg.update(reads(T0 + 899 * NS, 101.0, 200.5, 300.5))
    assert agg.tick(T0 + PERIOD + NS // 2) == [Sample("building.energy_kwh_total", 602.0, T0 + PERIOD, Quality.GOOD)]
    agg.update(reads(T0 + PERIOD + 2 * NS, 101.1, 200.6, 300.6))  # after a single reading: nothing new is sent
    assert agg.tick(T0 + PERIOD + 3 * NS) == []
    assert agg.tick(T0 + 2 * PERIOD) == [Sample("building.energy_kwh_total", 602.3, T0 + 2 * PERIOD, Quality.GOOD)]


def test_never_sent_over_fewer_meters_and_logged_once_per_pause(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gateway.aggregate")
    agg = aggregate(every="1min")
    agg.tick(T0)
    agg.update(reads(T0 + 30 * NS, 1.0, 2.0, 3.0))
    agg.update([Sample(METERS[1], None, T0 + 40 * NS, Quality.BAD)])
    assert agg.tick(T0 + 60 * NS) == []
    agg.update([Sample(METERS[1], 2.5, T0 + 70 * NS, Quality.UNCERTAIN)])  # not good: still missing
    assert agg.tick(T0 + 120 * NS) == []
    assert agg.skipped == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "building aggregate building.energy_kwh_total not sent: apt2.energy_kwh has no good reading in the last 60s "
        "(the sum is sent only when all 3 meters report)"
    ]
    agg.update(reads(T0 + 150 * NS, 1.1, 2.1, 3.1))
    assert agg.tick(T0 + 180 * NS)[0].value == 6.3
    assert "sent again: all 3 meters report" in caplog.records[-1].getMessage()


def test_a_stale_meter_stops_the_sum() -> None:
    agg = aggregate(every="1min", max_age="2min")
    agg.tick(T0)
    agg.update(reads(T0, 1.0, 2.0, 3.0))
    assert agg.tick(T0 + 60 * NS)[0].value == 6.0
    assert agg.tick(T0 + 120 * NS)[0].value == 6.0  # within max_age
    assert agg.tick(T0 + 180 * NS) == []  # the readings are three minutes old


def test_non_numbers_are_not_summed() -> None:
    agg = aggregate(every="1min")
    agg.tick(T0)
    agg.update(reads(T0 + NS, 1.0, 2.0, 3.0))
    agg.update([Sample(METERS[0], True, T0 + 2 * NS, Quality.GOOD)])
    agg.update([Sample(METERS[2], float("nan"), T0 + 2 * NS, Quality.GOOD)])
    assert agg.tick(T0 + 60 * NS) == []


def _site(tmp_path: Path, privacy: str, accounts: int = 3) -> Path:
    flats = "".join(f"  - {{id: apt{i}, driver: simulator, profile: sim-energy-meter}}\n" for i in range(1, 4))
    account_lines = "".join(
        f"    - {{id: A{i}, meters: [apt{i}.energy_kwh], max_power_kw: 40}}\n" for i in range(1, accounts + 1)
    )
    path = tmp_path / "site.yaml"
    path.write_text(
        "version: 1\ngateway: {id: gw1, site: tower}\n"
        f"devices:\n  - {{id: main, driver: simulator, profile: sim-energy-meter}}\n{flats}"
        "incentives:\n  baseline: {method: fixed, kwh: 0.5}\n  emission_factor: {kg_per_kwh: 0.5}\n"
        f"  signing_key_file: k.pem\n  pseudonym_key_file: p.key\n  accounts:\n{account_lines}"
        f"privacy:\n{privacy}"
    )
    return path


def test_the_site_registers_the_aggregate_as_a_building_point(tmp_path: Path) -> None:
    site = load_site(_site(tmp_path, "  building_aggregate: {every: 15min}\n"))
    info = site.registry["building.energy_kwh_total"]
    assert (info.unit, info.kind, info.personal, info.measurement) == ("kWh", "float", False, "building")
    assert info.description == "Sum of 3 household meters (privacy.building_aggregate)"


@pytest.mark.parametrize(
    ("privacy", "accounts", "position", "message"),
    [
        ("  building_aggregate: {}\n", 2, (17, 23), "needs at least 3 meters (min_meters); incentives.accounts names"),
        ("  building_aggregate: {min_meters: 2}\n", 3, (18, 36), "greater than or equal to 3"),
        ("  building_aggregate: {point: main.energy_kwh}\n", 3, (18, 31), "'main.energy_kwh' is already a device"),
        (
            "  building_aggregate: {meters: [apt1.energy_kwh, apt2.energy_kwh, apt9.energy_kwh]}\n",
            3,
            (18, 67),
            "building aggregate meter 'apt9.energy_kwh' is not a point of any device",
        ),
    ],
)
def test_aggregate_config_errors_are_positioned(
    tmp_path: Path, privacy: str, accounts: int, position: tuple[int, int], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_site(_site(tmp_path, privacy, accounts))
    first = info.value.diagnostics[0]
    assert message in first.message
    assert (first.line, first.col) == position


async def test_a_running_gateway_stores_the_sum_of_the_flats_at_each_boundary(tmp_path: Path) -> None:
    from gateway.supervisor import Gateway

    path = _site(tmp_path, "  building_aggregate: {every: 1s}\n")
    text = path.read_text().replace("signing_key_file: k.pem", "signing_key_file: keys/k.pem")
    keys = "pseudonym_key_file: keys/p.key\n  generate_missing_keys: true"
    path.write_text(text.replace("pseudonym_key_file: p.key", keys))
    gateway = Gateway(load_site(path), data_dir=tmp_path / "data", http_listen="off")
    stop = asyncio.Event()
    seen: list[tuple[Sample, float]] = []

    async def watch() -> None:
        await gateway.started.wait()
        sub = gateway.bus.subscribe("test", maxsize=1000, policy="drop_oldest")
        async for batch in sub:
            for sample in batch:
                if sample.point == "building.energy_kwh_total":
                    flats = sum(gateway.aggregate.latest[m][0] for m in METERS)  # type: ignore[union-attr]
                    seen.append((sample, flats))
            if len(seen) >= 2:
                stop.set()

    async with asyncio.timeout(20):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(watch())
            await gateway.run(stop)
    assert len(seen) >= 2
    for sample, flats in seen:
        assert sample.ts % NS == 0 and sample.quality is Quality.GOOD
        assert sample.value == pytest.approx(flats, abs=0.01)  # the flats' counters move by mWh per second
    assert gateway.aggregate is not None and gateway.aggregate.sent >= 2
