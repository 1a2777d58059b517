"""Personal data against the real far sides: the audit's join (``telemetry/apt101`` carrying the meter reading an
incentive record names) is impossible on a real Mosquitto; a real TSDB gets apartment series only when its uplink
opted in with ``include_personal``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config.site import Site, load_site
from gateway.model import Quality, Sample
from gateway.outbox import Outbox
from gateway.uplinks.runner import build_uplinks
from tests.integration.uplinks.common import FAST_DELIVERY, CommandRecorder, wait_for
from tests.integration.uplinks.test_influx_victoria import run_until_delivered, series
from tests.integration.uplinks.test_platform_mosquitto import platform
from tests.services import Mosquitto, VictoriaMetrics

pytestmark = pytest.mark.integration

INCENTIVES = """incentives:
  baseline: {method: fixed, kwh: 0.5}
  emission_factor: {kg_per_kwh: 0.5703}
  max_power_kw: 40
  signing_key_file: keys/signing.pem
  pseudonym_key_file: keys/pseudonym.key
  accounts:
    - {id: "ACC-101", meters: [apt101.energy_kwh]}
    - {id: "ACC-102", meters: [apt102.energy_kwh]}
"""


def privacy_site(tmp_path: Path, uplinks: str) -> Site:
    path = tmp_path / "site.yaml"
    path.write_text(
        "version: 1\n"
        "gateway: {id: gw1, site: tower}\n"
        "http: {enabled: false}\n"
        "devices:\n"
        "  - {id: main, driver: simulator, profile: sim-energy-meter}\n"
        "  - {id: apt101, driver: simulator, profile: sim-energy-meter}\n"
        "  - {id: apt102, driver: simulator, profile: sim-energy-meter}\n"
        f"uplinks:\n{uplinks}" + INCENTIVES
    )
    return load_site(path)


def reads(t0_ms: int) -> list[Sample]:
    ts = t0_ms * 1_000_000
    return [
        Sample("main.energy_kwh", 98765.5, ts, Quality.GOOD),
        Sample("main.power_kw", 41.25, ts, Quality.GOOD),
        Sample("apt101.energy_kwh", 1523.4, ts, Quality.GOOD),
        Sample("apt101.power_kw", 1.75, ts, Quality.GOOD),
        Sample("apt102.energy_kwh", 877.125, ts, Quality.UNCERTAIN),
        Sample("apt102.current", None, ts, Quality.BAD),
    ]


async def test_the_platform_never_sees_an_apartment_point_in_telemetry_or_meta(
    tmp_path: Path, broker: Mosquitto
) -> None:
    site = privacy_site(
        tmp_path, f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: priv, delivery: {FAST_DELIVERY}}}\n"
    )
    outbox = Outbox(tmp_path / "outbox.db")
    t0 = 1_790_600_000_000
    await outbox.append(reads(t0))
    await outbox.append(reads(t0 + 1000))
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())
    async with platform(broker, "priv/tower/gw1") as seen:
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(runner.run(stopping))
            await wait_for(lambda: len(seen.on("telemetry/main")) == 2 and bool(seen.on("meta")), what="delivery")
            await wait_for(lambda: runner.status()["backlog_samples"] == 0, what="everything acked")
            stopping.set()
    await outbox.close()

    topics = {topic for topic, _payload, _retain in seen.messages}
    assert topics == {"priv/tower/gw1/status", "priv/tower/gw1/meta", "priv/tower/gw1/telemetry/main"}
    assert [m["values"] for m in seen.on("telemetry/main")] == [{"energy_kwh": 98765.5, "power_kw": 41.25}] * 2
    (meta,) = seen.on("meta")
    assert set(meta["devices"]) == {"main"}
    assert not any("apt10" in repr(payload) or "1523.4" in repr(payload) for _t, payload, _r in seen.messages)


@pytest.mark.parametrize("include_personal", [False, True])
async def test_the_tsdb_gets_apartment_series_only_when_its_uplink_opted_in(
    tmp_path: Path, tsdb: VictoriaMetrics, include_personal: bool
) -> None:
    test = f"personal_{str(include_personal).lower()}"
    (tmp_path / "influx.token").write_text("not-checked-by-victoria\n")
    site = privacy_site(
        tmp_path,
        f"  influx: {{url: '{tsdb.url}', org: acme, bucket: b, token_file: influx.token, extra_tags: {{test: {test}}},"
        f" include_personal: {str(include_personal).lower()}, delivery: {FAST_DELIVERY}}}\n",
    )
    outbox = Outbox(tmp_path / "outbox.db")
    t0 = 1_790_700_000_000
    await outbox.append(reads(t0))
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())
    await run_until_delivered(outbox, runner)
    await outbox.close()

    assert series(tsdb, test, "energy_meter_energy_kwh", device="main") == [(t0, 98765.5)]
    apartment = series(tsdb, test, "energy_meter_energy_kwh", device="apt101")
    assert apartment == ([(t0, 1523.4)] if include_personal else [])
    assert runner.status()["backlog_samples"] == 0  # withheld is not stuck: the cursor moved over it


async def test_a_running_gateway_sends_the_building_sum_and_nothing_of_the_flats(
    tmp_path: Path, broker: Mosquitto
) -> None:
    from gateway.supervisor import Gateway

    uplink = f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: agg, delivery: {FAST_DELIVERY}}}\n"
    path = tmp_path / "site.yaml"
    devices = "".join(
        f"  - {{id: {d}, driver: simulator, profile: sim-energy-meter, seed: {i}}}\n"
        for i, d in enumerate(("main", "apt101", "apt102", "apt201"))
    )
    path.write_text(
        "version: 1\ngateway: {id: gw1, site: tower}\nhttp: {enabled: false}\ndevices:\n"
        + devices
        + f"uplinks:\n{uplink}"
        + INCENTIVES.replace("keys/pseudonym.key", "keys/pseudonym.key\n  generate_missing_keys: true")
        + '    - {id: "ACC-201", meters: [apt201.energy_kwh]}\n'
        + "privacy:\n  building_aggregate: {every: 1s}\n"
    )
    gateway = Gateway(load_site(path), data_dir=tmp_path / "data", http_listen="off")
    stop = asyncio.Event()
    async with platform(broker, "agg/tower/gw1") as seen, asyncio.TaskGroup() as tg:
        tg.create_task(gateway.run(stop))
        await wait_for(lambda: len(seen.on("telemetry/building")) >= 2, what="two building sums")
        stop.set()

    topics = {topic.removeprefix("agg/tower/gw1/") for topic, _payload, _retain in seen.messages}
    # the flats' meters travel only inside incentive records (the genesis record and its checkpoint here)
    assert topics - {"events/incentive", "events/incentive_checkpoint"} == {
        "status",
        "meta",
        "telemetry/main",
        "telemetry/building",
    }
    (meta,) = seen.on("meta")
    assert set(meta["devices"]) == {"main", "building"}
    assert meta["devices"]["building"]["points"]["energy_kwh_total"]["unit"] == "kWh"
    sums = seen.on("telemetry/building")
    assert all(set(m["values"]) == {"energy_kwh_total"} and m["ts"] % 1000 == 0 for m in sums)
