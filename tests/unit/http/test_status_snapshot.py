"""The views and /metrics read one immutable snapshot (``Gateway.status_snapshot``), not the live parts: what a view
holds does not move while the gateway goes on, a part whose status call raises is recorded with its error, and
every view built from one snapshot shows the same moment."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.driver_api import DeviceState
from gateway.http import views
from gateway.metrics import build_registry, exposition
from gateway.model import Command, Quality, Sample
from gateway.status import GatewayStatus, UplinkStatus
from gateway.supervisor import Gateway


class BrokenUplink:
    name = "uplink[broken]"

    async def run(self, stopping: asyncio.Event) -> None:
        await stopping.wait()

    def status(self) -> UplinkStatus:
        raise RuntimeError("cursor table locked")


def test_a_snapshot_is_a_copy_that_does_not_move(gateway: Gateway, now: int) -> None:
    snap = gateway.status_snapshot()
    assert isinstance(snap, GatewayStatus)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.started = False  # type: ignore[misc]
    # the gateway goes on: a device fails, a new reading arrives, a command is logged
    live_status = gateway.sources[0].status()[0]
    live_status.record_error("no answer")
    live_status.count_failure("no_answer")
    gateway.live.update([Sample("zone1.co2", 999.0, now, Quality.GOOD)])
    gateway.commands.add(Command("ahu1.fan_speed_pct", 40, "test"), "ok")
    held = next(d for d in snap.devices if d.device == live_status.device)
    assert held.state is DeviceState.ONLINE and held.failures == {}
    assert snap.latest["zone1.co2"].value == 640.0
    assert snap.commands == ()
    # a new snapshot sees it all
    later = gateway.status_snapshot()
    assert next(d for d in later.devices if d.device == live_status.device).state is DeviceState.OFFLINE
    assert later.latest["zone1.co2"].value == 999.0
    assert [c["point"] for c in later.commands] == ["ahu1.fan_speed_pct"]


def test_an_uplink_whose_status_raises_is_shown_with_its_error(gateway: Gateway) -> None:
    gateway.uplinks = [BrokenUplink()]
    snap = gateway.status_snapshot()
    assert views.uplinks(snap) == [
        {"name": "uplink[broken]", "state": "unknown", "last_error": "status failed: cursor table locked"}
    ]
    assert {
        "severity": "warning",
        "source": "uplink[broken]",
        "message": "unknown: status failed: cursor table locked",
    } in views.alarms(snap)
    # /metrics still answers, without figures for that uplink
    text = exposition(build_registry(gateway)).decode()
    assert 'edge_gateway_uplink_up{uplink="uplink[broken]"} 0.0' in text
    assert 'edge_gateway_uplink_backlog_samples{uplink="uplink[broken]"}' not in text


def test_the_overview_is_one_moment(gateway: Gateway) -> None:
    """Every section of the overview comes from one snapshot: its readiness and its device list agree even when a
    device fails between them (here: before the overview, seen by both)."""
    gateway.sources[0].status()[0].record_error("no answer")
    data = views.overview(gateway)
    offline = [d["id"] for d in data["devices"] if d["state"] == "offline"]
    assert len(offline) == 1
    online = sum(1 for d in data["devices"] if d["state"] == "online")
    assert data["readiness"]["checks"]["drivers"]["detail"] == f"{online} of {len(data['devices'])} devices online"
    assert {"severity": "error", "source": f"device {offline[0]}", "message": "offline: no answer"} in data["alarms"]
