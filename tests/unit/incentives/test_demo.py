"""The demo building's incentives block loads with the demo site and yields records for its simulated flats."""

from __future__ import annotations

import random
from pathlib import Path
from zoneinfo import ZoneInfo

from drivers.simulator.models import EnergyMeterModel
from gateway.config.site import load_site
from gateway.incentives.stage import IncentiveStage
from gateway.model import Sample

REPO = Path(__file__).resolve().parents[3]
NS = 1_000_000_000


def _demo_site_text() -> str:
    site = (REPO / "firmware_configs" / "sites" / "demo.yaml").read_text(encoding="utf-8")
    assert "\nincentives:" in site, "the demo site must carry the demo incentives block"
    return site


def test_demo_block_issues_signed_records_for_each_flat(tmp_path: Path) -> None:
    site_file = tmp_path / "sites" / "demo.yaml"
    site_file.parent.mkdir()
    site_file.write_text(_demo_site_text(), encoding="utf-8")
    rules_dir = tmp_path / "rules"  # the demo site references ../rules/demo.yaml
    rules_dir.mkdir()
    (rules_dir / "demo.yaml").write_text((REPO / "firmware_configs" / "rules" / "demo.yaml").read_text())
    site = load_site(site_file)
    stage = IncentiveStage.open(site, tmp_path / "data")
    zone = ZoneInfo(site.config.gateway.timezone)
    meters = {
        f"{d}.energy_kwh": EnergyMeterModel(seed=seed, scale=1.0, tz=zone)
        for d, seed in (("apt101", 101), ("apt102", 102), ("apt201", 201))
    }
    rng = random.Random(1)
    start = 1_793_577_600  # whole minute
    events = []
    try:
        for second in range(4 * 60):
            t = start + second
            batch = [Sample(p, m.read(t, rng)["energy_kwh"], t * NS) for p, m in meters.items()]
            events += stage.process(batch, t * NS)
        assert (tmp_path / "data" / "keys" / "incentive-signing.pub.pem").exists()
    finally:
        stage.close()
    issued = [e for e in events if e.type == "incentive" and e.body["kind"] == "interval"]
    assert len(issued) == 3 * 3  # three closed minutes, three flats
    assert {e.body["status"] for e in issued} == {"measured"}  # the simulated meters raise no flag
    assert len({e.subject for e in issued}) == 3
