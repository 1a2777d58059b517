"""The whole gateway, one process, every path at once: a Modbus meter and an MQTT sensor in, a derived point and a
rule publish in the middle, InfluxDB (VictoriaMetrics) and the city-platform broker out, then a clean stop.

Each part has its own deeper tests; this one proves they are wired together as the README says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.services import Mosquitto, VictoriaMetrics, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAST = "{batch_size: 500, live_window: 0.5s, retry_min: 0.05s, retry_max: 0.3s, timeout: 3s}"


def _write_site(tmp: Path, modbus_port: int, broker: Mosquitto, tsdb: VictoriaMetrics) -> Path:
    (tmp / "test-boiler.yaml").write_text(
        "driver: modbus\nvendor: Test\nmodel: Boiler\nmeasurement: boiler\ndoc: the test server's register layout\n"
        "points:\n"
        # the test server's unit 1 holds 1000 + i in holding register i
        "  flow_temp:   {table: holding, address: 0, type: u16, scale: 0.01, unit: degC}\n"
        "  return_temp: {table: holding, address: 1, type: u16, scale: 0.01, unit: degC}\n"
    )
    (tmp / "rules.yaml").write_text(
        "version: 1\n"
        "points:\n"
        "  boiler.delta_t: {expr: 'boiler.return_temp - boiler.flow_temp', unit: K}\n"
        "rules:\n"
        "  - id: lobby-warm\n"
        "    when: lobby.temperature > 20\n"
        "    then:\n"
        "      - publish: {topic: alerts/lobby, payload: {t: '=lobby.temperature'}}\n"
    )
    site = tmp / "site.yaml"
    site.write_text(
        "version: 1\n"
        "gateway: {id: gw1, site: tower}\n"
        "http: {enabled: false}\n"
        'profile_dirs: ["."]\n'
        f"modbus_buses:\n  - {{id: plant, type: tcp, host: 127.0.0.1, port: {modbus_port}, timeout: 0.5s}}\n"
        "mqtt_sources:\n"
        f"  - id: building\n    host: 127.0.0.1\n    port: {broker.port}\n"
        "    subscriptions:\n      - {id: z2m, topic: 'zigbee2mqtt/+', decoder: {type: zigbee2mqtt}}\n"
        "devices:\n"
        "  - {id: boiler, driver: modbus, profile: test-boiler, bus: plant, unit: 1, poll: 0.2s}\n"
        "  - id: lobby\n    driver: mqtt\n    source: building\n    topic_name: Lobby\n"
        "    points:\n      temperature: {unit: degC}\n"
        "rules: [rules.yaml]\n"
        "uplinks:\n"
        f"  influx: {{url: '{tsdb.url}', org: acme, bucket: sys, extra_tags: {{test: system}}, delivery: {FAST}}}\n"
        f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: sys, delivery: {FAST}}}\n"
    )
    return site


def _series(tsdb: VictoriaMetrics) -> dict[str, list[float]]:
    """``device.field`` -> values, from every series this test wrote."""
    out: dict[str, list[float]] = {}
    for row in tsdb.export('{test="system"}'):
        labels = row["metric"]
        name = str(labels["__name__"])  # type: ignore[index]
        field = name.split("_", 1)[1]
        out.setdefault(f"{labels['device']}.{field}", []).extend(float(v) for v in row["values"])  # type: ignore[index, union-attr]
    return out


def test_modbus_and_mqtt_in_rules_in_the_middle_influx_and_platform_out(
    tmp_path: Path, broker: Mosquitto, tsdb: VictoriaMetrics
) -> None:
    modbus_port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/integration/modbus/modbus_server.py"), "--tcp", str(modbus_port)],
        stdout=subprocess.PIPE,
        env=env,
    )
    watcher = subprocess.Popen(
        ["mosquitto_sub", "-p", str(broker.port), "-t", "sys/#", "-v", "-W", "60"], stdout=subprocess.PIPE
    )
    gateway = None
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        site = _write_site(tmp_path, modbus_port, broker, tsdb)
        with (tmp_path / "gateway.log").open("wb") as log:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", str(site), "--data-dir", str(tmp_path / "data")],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        series: dict[str, list[float]] = {}
        while time.monotonic() < deadline:
            assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
            subprocess.run(
                [
                    "mosquitto_pub",
                    "-p",
                    str(broker.port),
                    "-t",
                    "zigbee2mqtt/Lobby",
                    "-m",
                    '{"temperature": 21.5, "linkquality": 120}',
                ],
                check=True,
                timeout=5,
            )
            series = _series(tsdb)
            if {"boiler.flow_temp", "boiler.delta_t", "lobby.temperature"} <= series.keys():
                break
            time.sleep(0.3)
        assert series.get("boiler.flow_temp", [None])[0] == pytest.approx(10.00)
        assert series["boiler.return_temp"][0] == pytest.approx(10.01)
        assert series["boiler.delta_t"][0] == pytest.approx(0.01)
        assert series["lobby.temperature"][0] == 21.5

        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(15) == 0, (tmp_path / "gateway.log").read_text()[-3000:]
        time.sleep(0.3)
    finally:
        for proc in (gateway, server, watcher):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        if server.stdout is not None:
            server.stdout.close()
    assert watcher.stdout is not None
    lines = watcher.stdout.read().decode().splitlines()
    watcher.stdout.close()
    by_topic: dict[str, list[dict[str, object]]] = {}
    for line in lines:
        topic, _, payload = line.partition(" ")
        by_topic.setdefault(topic, []).append(orjson.loads(payload))
    assert [m["state"] for m in by_topic["sys/tower/gw1/status"]][-1] == "offline"  # goodbye on a clean stop
    assert "online" in [m["state"] for m in by_topic["sys/tower/gw1/status"]]
    assert any("boiler" in m["devices"] for m in by_topic["sys/tower/gw1/meta"])  # type: ignore[operator]
    boiler = by_topic["sys/tower/gw1/telemetry/boiler"]
    assert boiler[0]["values"] == {"flow_temp": 10.0, "return_temp": 10.01}
    assert any(m["values"] == {"temperature": 21.5} for m in by_topic["sys/tower/gw1/telemetry/lobby"])
    assert by_topic["sys/tower/gw1/alerts/lobby"][0]["payload"] == {"t": 21.5}
