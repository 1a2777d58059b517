"""Every endpoint of the status server against a real (not running) Gateway: real registry, live cache, bus and
outbox, with scripted device, rule and uplink status where those belong to other components."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.types import Secret
from gateway.errors import StoreError
from gateway.http.page import format_bytes
from gateway.http.server import create_app
from gateway.model import Quality, Sample
from gateway.rule_report import clock
from gateway.supervisor import Gateway
from rules.runtime import Problem, RuleStatus

TOKEN = "s3cret-token-0123456789"


class Incentives:
    epoch = 1

    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        self.records = records
        self.asked: list[Any] = []
        self.counters = {"invalid": 0, "future": 0, "late_dropped": 0, "clock_steps": 0}

    def records_of_day(self, day: Any) -> list[dict[str, Any]]:
        self.asked.append(day)
        if self.records is None:
            raise OSError("database is locked")
        return self.records


class Rules:
    def __init__(self, rules: list[RuleStatus] | None = None, *, broken: bool = False) -> None:
        self.rules = rules or []
        self.broken = broken

    def status(self) -> list[RuleStatus]:
        if self.broken:
            raise RuntimeError("state store locked")
        return self.rules


class Uplink:
    name = "uplink[influx]"

    def __init__(self, status: dict[str, Any]) -> None:
        self._status = status

    async def run(self, stopping: asyncio.Event) -> None:
        await stopping.wait()

    def status(self) -> dict[str, Any]:
        return self._status


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(gateway))) as test_client:
        yield test_client


async def get_json(client: TestClient[Any, Any], path: str, status: int = 200) -> Any:
    resp = await client.get(path)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return orjson.loads(await resp.read())


# -- /api/points and /api/history ---------------------------------------------------------------------------------


async def test_points_have_the_shape_tail_reads(client: TestClient[Any, Any], gateway: Gateway, now: int) -> None:
    points = {p["id"]: p for p in await get_json(client, "/api/points")}
    assert set(points) == set(gateway.registry)
    co2 = points["zone1.co2"]
    assert co2["value"] == 640.0 and co2["ts"] == now - 1_000_000_000
    assert co2["quality"] == "good" and co2["unit"] == "ppm"
    assert 0.9 < co2["age_s"] < 5
    assert points["zone1.occupancy"]["value"] == 3 and points["zone1.occupancy"]["kind"] == "int"
    bad = points["apt101.power_kw"]
    assert bad["value"] is None and bad["quality"] == "bad"
    assert bad["personal"] is True and co2["personal"] is False  # the local page shows both, and says which is which
    never = points["ahu3.fan_speed_pct"]
    assert never["value"] is None and never["ts"] is None and never["quality"] is None


async def test_history_is_in_milliseconds_and_filters(client: TestClient[Any, Any], now: int) -> None:
    one = await get_json(client, "/api/history?point=zone1.co2")
    assert one == {
        "zone1.co2": [[(now - 2_000_000_000) // 1_000_000, 612.5], [(now - 1_000_000_000) // 1_000_000, 640.0]]
    }
    newer = await get_json(client, f"/api/history?point=zone1.co2&since_ms={(now - 1_500_000_000) // 1_000_000}")
    assert newer == {"zone1.co2": [[(now - 1_000_000_000) // 1_000_000, 640.0]]}
    everything = await get_json(client, "/api/history")
    assert set(everything) == {"zone1.co2", "zone1.occupancy"}  # BAD samples carry no value to plot
    never_polled = await get_json(client, "/api/history?point=ahu3.fan_speed_pct")
    assert never_polled == {}


async def test_history_rejects_unknown_points_and_bad_times(client: TestClient[Any, Any]) -> None:
    assert "unknown point" in (await get_json(client, "/api/history?point=nope.nothing", 404))["error"]
    assert "since_ms must be an integer" in (await get_json(client, "/api/history?since_ms=yesterday", 400))["error"]


# -- devices, rules, uplinks, queues ------------------------------------------------------------------------------


async def test_devices_report_state_counters_and_last_error(client: TestClient[Any, Any], gateway: Gateway) -> None:
    statuses = gateway.sources[0].status()
    statuses[0].record_error("timeout after 1.0 s (3 retries)")
    devices = {d["id"]: d for d in await get_json(client, "/api/devices")}
    first = devices[statuses[0].device]
    assert first["state"] == "offline" and first["errors"] == 1 and first["polls"] == 11
    assert first["last_error"] == "timeout after 1.0 s (3 retries)"
    assert devices["zone1"]["state"] == "online" and devices["zone1"]["mean_latency_ms"] == pytest.approx(2.0)
    assert devices["zone1"]["points"] == 4


async def test_rules_without_rule_files(client: TestClient[Any, Any]) -> None:
    assert await get_json(client, "/api/rules") == {
        "loaded": False,
        "rules": [],
        "problems": [],
        "resolved_problems": [],
        "reload": None,
        "error": None,
    }


async def test_rules_states_and_failures_become_alarms(
    client: TestClient[Any, Any], gateway: Gateway, now: int
) -> None:
    gateway.rules = Rules(
        [
            RuleStatus("co2-high", "active", now - 60_000_000_000, None, 120, 0, ()),
            RuleStatus("night-setback", "pending", now, None, 120, 0, ("zone9.co2",)),
            RuleStatus("bad-division", "failed", now, "ZeroDivisionError: division by zero", 120, 7, ()),
        ]
    )
    gateway.rule_problems.add(Problem("night-setback", "not evaluated: no value for zone9.co2", now, ongoing=True))
    view = await get_json(client, "/api/rules")
    assert [(r["id"], r["state"]) for r in view["rules"]] == [
        ("co2-high", "active"),
        ("night-setback", "pending"),
        ("bad-division", "failed"),
    ]
    assert view["problems"] == [f"{clock(now)} night-setback: not evaluated: no value for zone9.co2"]
    alarms = await get_json(client, "/api/alarms")
    assert alarms[0] == {
        "severity": "error",
        "source": "rule bad-division",
        "message": "ZeroDivisionError: division by zero",
    }
    assert {"severity": "alarm", "source": "rule co2-high", "message": "condition active"} in alarms


async def test_a_rule_runtime_whose_status_raises_is_shown_not_fatal(
    client: TestClient[Any, Any], gateway: Gateway
) -> None:
    gateway.rules = Rules(broken=True)
    view = await get_json(client, "/api/rules")
    assert view["error"] == "rule status failed: state store locked"
    page = await client.get("/")
    assert page.status == 200
    assert "rule status failed: state store locked" in await page.text()


async def test_uplinks_never_print_a_secret(client: TestClient[Any, Any], gateway: Gateway) -> None:
    gateway.uplinks = [
        Uplink(
            {
                "state": "retrying",
                "backlog_samples": 1200,
                "oldest_age_s": 42.0,
                "sent": 5000,
                "dropped": 0,
                "replayed": 300,
                "last_error": "connection refused",
                "token": Secret("influx-admin-token"),
            }
        )
    ]
    resp = await client.get("/api/uplinks")
    body = await resp.read()
    assert b"influx-admin-token" not in body
    [uplink] = orjson.loads(body)
    assert uplink["name"] == "uplink[influx]" and uplink["token"] == "***" and uplink["backlog_samples"] == 1200
    alarms = await get_json(client, "/api/alarms")
    assert {"severity": "warning", "source": "uplink[influx]", "message": "retrying: connection refused"} in alarms
    html = await (await client.get("/")).text()
    assert "1,200 samples" in html and "influx-admin-token" not in html


async def test_queues_show_bus_and_outbox(client: TestClient[Any, Any], gateway: Gateway, now: int) -> None:
    gateway.bus.subscribe("outbox", maxsize=8)
    await gateway.bus.publish([Sample("zone1.co2", 700.0, now, Quality.GOOD)])
    assert gateway.outbox is not None
    await gateway.outbox.append([Sample("zone1.co2", 700.0, now, Quality.GOOD)])
    queues = await get_json(client, "/api/queues")
    assert queues["bus"] == [
        {
            "name": "outbox",
            "policy": "block",
            "depth": 1,
            "capacity": 8,
            "delivered_samples": 0,
            "dropped_samples": 0,
            "blocked_s": 0.0,
        }
    ]
    assert queues["outbox"]["telemetry_samples"] == 1 and queues["outbox"]["writable"] is True
    assert queues["outbox"]["disk_bytes"]["db"] > 0 and set(queues["outbox"]["disk_bytes"]) == {"db", "wal", "shm"}
    assert queues["outbox"]["over_budget_s"] is None and queues["outbox"]["compacted_samples"] == 0
    html = await (await client.get("/")).text()
    on_disk = format_bytes(sum(queues["outbox"]["disk_bytes"].values()))  # the files, not the payload bytes
    assert f"writable, {on_disk} on disk" in html


# -- health -------------------------------------------------------------------------------------------------------


async def test_healthz_answers_while_the_loop_runs(client: TestClient[Any, Any]) -> None:
    health = await get_json(client, "/healthz")
    assert health["status"] == "ok" and health["started"] is True and health["uptime_s"] >= 5


async def test_readyz_ready(client: TestClient[Any, Any]) -> None:
    ready = await get_json(client, "/readyz")
    assert ready["ready"] is True
    assert ready["checks"]["drivers"] == {"ok": True, "detail": "8 of 8 devices online"}


async def test_readyz_unready_when_the_outbox_cannot_be_written(
    client: TestClient[Any, Any], gateway: Gateway, now: int
) -> None:
    outbox = gateway.outbox
    assert outbox is not None
    # a full disk, as SQLite sees one: the database may not grow by a single page
    pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
    outbox._db.execute(f"PRAGMA max_page_count = {pages}")
    big = [Sample("zone1.co2", float(i), now + i, Quality.GOOD) for i in range(20_000)]
    with pytest.raises((StoreError, sqlite3.Error)):
        await outbox.append(big)
    ready = await get_json(client, "/readyz", 503)
    assert ready["ready"] is False
    assert ready["checks"]["outbox"]["ok"] is False
    assert "full" in ready["checks"]["outbox"]["detail"]
    alarms = await get_json(client, "/api/alarms")
    assert alarms[0]["severity"] == "critical" and alarms[0]["source"] == "outbox"


async def test_readyz_unready_when_no_driver_delivers(client: TestClient[Any, Any], gateway: Gateway) -> None:
    for status in gateway.sources[0].status():
        status.record_error("no route to host")
    ready = await get_json(client, "/readyz", 503)
    assert ready["checks"]["drivers"] == {"ok": False, "detail": "0 of 8 devices online"}


async def test_readyz_unready_before_start_and_without_drivers(client: TestClient[Any, Any], gateway: Gateway) -> None:
    gateway.started.clear()
    gateway.sources = []
    ready = await get_json(client, "/readyz", 503)
    assert ready["checks"]["config"]["ok"] is False
    assert ready["checks"]["drivers"] == {"ok": False, "detail": "no driver configured"}


# -- /metrics -----------------------------------------------------------------------------------------------------


async def test_metrics_parse_with_prometheus_clients_own_parser(
    client: TestClient[Any, Any], gateway: Gateway, now: int
) -> None:
    gateway.sources[0].status()[0].record_error("timeout")
    gateway.rules = Rules([RuleStatus("bad-division", "failed", now, "ZeroDivisionError", 120, 7, ())])
    gateway.uplinks = [
        Uplink(
            {  # the shape of gateway.uplinks.runner.UplinkRunner.status()
                "name": "uplink[influx]",
                "state": "up",
                "backlog_samples": 12,
                "backlog_events": 1,
                "replaying": False,
                "oldest_age_s": 0.8,
                "sent_samples": 5000,
                "sent_events": 4,
                "replayed_samples": 300,
                "dropped_samples": 2,
                "quarantined": 0,
                "requests_ok": 10,
                "requests_failed": 1,
                "in_flight": 0,
                "retry_in_s": 0.0,
                "last_error": None,
            }
        )
    ]
    gateway.bus.subscribe("outbox", maxsize=8)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}

    def value(name: str, **labels: str) -> float:
        for sample in (s for family in families.values() for s in family.samples):
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        raise AssertionError(f"{name}{labels} not exposed")

    first = gateway.sources[0].status()[0].device
    assert value("edge_gateway_device_polls_total", device=first) == 11
    assert value("edge_gateway_device_errors_total", device=first) == 1
    assert value("edge_gateway_device_up", device=first) == 0
    assert value("edge_gateway_device_up", device="zone1") == 1
    assert value("edge_gateway_device_poll_latency_seconds_count", device="zone1") == 10
    assert value("edge_gateway_device_poll_latency_seconds_sum", device="zone1") == pytest.approx(0.02)
    assert value("edge_gateway_queue_depth", queue="bus.outbox") == 0
    assert value("edge_gateway_queue_depth", queue="outbox") == 0
    assert gateway.outbox is not None
    files = {f: gateway.outbox.disk_usage()[f] for f in ("db", "wal", "shm")}
    assert value("edge_gateway_outbox_disk_bytes", file="db") == files["db"] > 0  # measured from the files
    assert value("edge_gateway_outbox_disk_bytes", file="wal") == files["wal"]
    assert value("edge_gateway_outbox_disk_limit_bytes") == (
        gateway.outbox.telemetry_budget + gateway.outbox.event_budget + gateway.outbox.disk_margin
    )
    assert value("edge_gateway_outbox_compacted_samples_total") == 0
    assert value("edge_gateway_uplink_backlog_samples", uplink="uplink[influx]") == 12
    assert value("edge_gateway_uplink_backlog_events", uplink="uplink[influx]") == 1
    assert value("edge_gateway_uplink_oldest_age_seconds", uplink="uplink[influx]") == 0.8
    assert value("edge_gateway_uplink_sent_samples_total", uplink="uplink[influx]") == 5000
    assert value("edge_gateway_uplink_sent_events_total", uplink="uplink[influx]") == 4
    assert value("edge_gateway_uplink_dropped_samples_total", uplink="uplink[influx]") == 2
    assert value("edge_gateway_uplink_replayed_samples_total", uplink="uplink[influx]") == 300
    assert value("edge_gateway_uplink_requests_failed_total", uplink="uplink[influx]") == 1
    assert value("edge_gateway_uplink_up", uplink="uplink[influx]") == 1
    assert value("edge_gateway_rule_evaluations_total", rule="bad-division") == 120
    assert value("edge_gateway_rule_failures_total", rule="bad-division") == 7
    assert value("edge_gateway_rule_state", rule="bad-division", state="failed") == 1
    assert value("edge_gateway_rule_state", rule="bad-division", state="idle") == 0
    assert value("edge_gateway_ready") == 1
    assert value("edge_gateway_info", site="demo_tower", gateway="demo_gw") == 1
    assert value("process_resident_memory_bytes") > 10 * 1024 * 1024
    assert value("process_cpu_seconds_total") > 0


# -- the page -----------------------------------------------------------------------------------------------------


async def test_page_renders_every_panel_and_escapes_what_devices_say(
    client: TestClient[Any, Any], gateway: Gateway
) -> None:
    gateway.sources[0].status()[0].record_error("<script>alert(1)</script> bad frame")
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    html = await resp.text()
    for section in ('id="summary"', 'id="alarms"', 'id="points"', 'id="devices"', 'id="rules"', 'id="uplinks"'):
        assert section in html
    assert 'id="incentives"' in html and 'id="commands"' in html
    assert 'data-point="zone1.co2"' in html and ">640.0<" in html and "°C" in html
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; bad frame" in html
    assert "http://" not in html and "https://" not in html  # nothing loaded from outside the building


async def test_the_page_tells_the_browser_to_load_nothing_from_elsewhere(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/")
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff" and resp.headers["X-Frame-Options"] == "DENY"
    assert "<script>" not in await resp.text()  # no inline script: the CSP would block it


async def test_static_files_are_served(client: TestClient[Any, Any]) -> None:
    for name, marker in (("status.js", "api/points"), ("status.css", ".spark")):
        resp = await client.get(f"/static/{name}")
        assert resp.status == 200
        assert marker in await resp.text()
    assert (await client.get("/static/../server.py")).status in (403, 404)


async def test_unknown_route_is_404(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/api/nothing")).status == 404


async def test_api_status_is_everything_at_once(client: TestClient[Any, Any]) -> None:
    status = await get_json(client, "/api/status")
    assert set(status) == {
        "gateway",
        "readiness",
        "alarms",
        "devices",
        "points",
        "rules",
        "uplinks",
        "queues",
        "incentives",
        "commands",
    }
    assert status["gateway"]["id"] == "demo_gw" and status["readiness"]["ready"] is True


# -- authentication -----------------------------------------------------------------------------------------------


@pytest.fixture
async def locked(gateway: Gateway) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(gateway, token=Secret(TOKEN)))) as test_client:
        yield test_client


async def test_a_token_protects_everything_but_the_probes(locked: TestClient[Any, Any]) -> None:
    for path in ("/", "/api/points", "/metrics", "/static/status.js"):
        resp = await locked.get(path)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert (await locked.get("/healthz")).status == 200
    assert (await locked.get("/readyz")).status == 200


async def test_bearer_and_basic_auth_with_the_token(locked: TestClient[Any, Any]) -> None:
    assert (await locked.get("/api/points", headers={"Authorization": f"Bearer {TOKEN}"})).status == 200
    basic = base64.b64encode(f"operator:{TOKEN}".encode()).decode()
    assert (await locked.get("/", headers={"Authorization": f"Basic {basic}"})).status == 200
    wrong = base64.b64encode(b"operator:guess").decode()
    assert (await locked.get("/", headers={"Authorization": f"Basic {wrong}"})).status == 401
    assert (await locked.get("/", headers={"Authorization": "Basic !!notbase64"})).status == 401
    assert (await locked.get("/", headers={"Authorization": "Bearer guess"})).status == 401
    assert (await locked.get("/", headers={"Authorization": f"Token {TOKEN}"})).status == 401


async def test_incentive_records_of_the_day(client: TestClient[Any, Any], gateway: Gateway) -> None:
    record = {
        "schema": "edge-gateway/incentive-record/2",
        "kind": "interval",
        "id": "inc_" + "0" * 32,
        "seq": 7,
        "account": "acct_" + "ab" * 16,
        "interval": {"start": "2026-11-26T01:00:00Z", "end": "2026-11-26T01:15:00Z", "local_start": "09:00+08:00"},
        "status": "measured",
        "flags": [],
        "energy_kwh": "1.250000",
        "delta_kwh": "0.310000",
        "saving_kwh": "0.310000",
        "co2e_saved_kg": "0.176700",
    }
    stage = Incentives([record])
    stage.counters["future"] = 2  # two readings stamped ahead of the clock were refused
    gateway.incentives = stage
    view = await get_json(client, "/api/incentives")
    assert view["enabled"] is True and view["records"] == [record] and view["error"] is None
    assert view["refused"] == {"invalid": 0, "future": 2, "late_dropped": 0}
    assert str(stage.asked[0]) == view["day"]  # asked for today in the gateway's time zone, as a date
    html = await (await client.get("/")).text()
    for shown in ("09:00+08:00", "acct_abababababababababa…", "measured", "0.310000", "0.176700", "1 records"):
        assert shown in html
    assert "Meter readings refused or ignored since start: future 2" in html
    metrics = await (await client.get("/metrics")).text()
    assert 'edge_gateway_incentive_readings_refused_total{reason="future"} 2.0' in metrics


async def test_incentive_records_that_cannot_be_read(client: TestClient[Any, Any], gateway: Gateway) -> None:
    gateway.incentives = Incentives(None)
    view = await get_json(client, "/api/incentives")
    assert view["records"] == [] and view["error"] == "cannot read records: database is locked"
    assert "cannot read records: database is locked" in await (await client.get("/")).text()
