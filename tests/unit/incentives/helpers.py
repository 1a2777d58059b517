"""Shared builders for the incentive tests: a small site on disk, samples, a stage on a fresh data dir."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from gateway.config.site import Site, load_site
from gateway.model import Event, Quality, Sample

NS = 1_000_000_000
#: 2026-11-02 00:00:00 UTC, a Monday
T0 = 1_793_577_600 * NS
MIN = 60 * NS

DEFAULT_INCENTIVES = """
interval: 15min
max_gap: 5min
settle: 1min
max_delay: 30min
netting: interval
baseline: {method: fixed, kwh: 0.5}
emission_factor: {kg_per_kwh: 0.5703}
max_power_kw: 40
signing_key_file: keys/signing.pem
pseudonym_key_file: keys/pseudonym.key
generate_missing_keys: true
accounts:
  - {id: "ACC-0001", meters: [apt1.energy_kwh]}
  - {id: "ACC-0002", meters: [apt2.energy_kwh]}
"""


def write_site(directory: Path, incentives: str = DEFAULT_INCENTIVES, *, timezone: str = "UTC") -> Path:
    body = textwrap.indent(textwrap.dedent(incentives).strip("\n"), "  ")
    text = (
        "version: 1\n"
        f"gateway: {{id: gw1, site: tower, timezone: {timezone}}}\n"
        "devices:\n"
        "  - {id: apt1, driver: simulator, profile: sim-energy-meter}\n"
        "  - {id: apt2, driver: simulator, profile: sim-energy-meter}\n"
        "  - {id: zone1, driver: simulator, profile: sim-zone}\n"
        f"incentives:\n{body}\n"
    )
    path = directory / "site.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def make_site(directory: Path, incentives: str = DEFAULT_INCENTIVES, *, timezone: str = "UTC") -> Site:
    return load_site(write_site(directory, incentives, timezone=timezone))


def records(events: list[Event]) -> list[dict[str, Any]]:
    """The incentive records among ``events`` (checkpoints left out), in the order they were handed out."""
    return [e.body for e in events if e.type == "incentive"]


def intervals(events: list[Event]) -> list[dict[str, Any]]:
    return [r for r in records(events) if r["kind"] == "interval"]


def reading(point: str, ts_ns: int, kwh: float | int, quality: Quality = Quality.GOOD) -> Sample:
    return Sample(point, kwh, ts_ns, quality)
