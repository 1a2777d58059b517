"""Drivers are plugins: a driver package nobody in gateway/ names is found through its entry point, and the site
schema, ``check``, ``run`` and the error for an unknown ``driver:`` are assembled from what is installed.

The throw-away driver is written into a temporary directory as a package plus a ``.dist-info`` holding its
``entry_points.txt`` (what ``pip install`` writes), put on the path of a real ``python -m gateway`` process. The
lazy-import checks run real commands in fresh interpreters too: ``sys.modules`` of this test process says nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from gateway.config.site import site_drivers, site_model
from gateway.plugins import DriverPlugin, UplinkPlugin, plugins

REPO = Path(__file__).resolve().parents[2]

_PLUGIN = '''
"""A throw-away driver: counters behind "hubs" (a top-level section its devices name)."""
from __future__ import annotations

import asyncio
import time
from typing import Literal

from gateway.config.types import Ident, StrictModel
from gateway.driver_api import DeviceState, DeviceStatus
from gateway.model import Quality, Sample
from gateway.plugins import DriverPlugin, SiteSection
from gateway.registry import PointInfo


class HubConfig(StrictModel):
    id: Ident


class CounterDevice(StrictModel):
    id: Ident
    driver: Literal["tally"]
    hub: Ident
    start: int = 0
    personal: bool = False


class TallySource:
    def __init__(self, devices):
        self.name = "tally[" + ",".join(d.id for d in devices) + "]"
        self._devices = devices
        self._status = [DeviceStatus(d.id, "tally") for d in devices]

    @property
    def devices(self):
        return frozenset(d.id for d in self._devices)

    async def run(self, publish, stopping):
        count = 0
        while not stopping.is_set():
            batch = [Sample(d.id + ".count", d.start + count, time.time_ns(), Quality.GOOD) for d in self._devices]
            await publish(batch)
            for status in self._status:
                status.state = DeviceState.ONLINE
            count += 1
            try:
                await asyncio.wait_for(stopping.wait(), 0.05)
            except TimeoutError:
                pass

    async def write(self, command):
        raise NotImplementedError

    def status(self):
        return list(self._status)


class TallyPlugin(DriverPlugin):
    name = "tally"
    device_model = CounterDevice
    cli = "tally_driver.cli"
    sections = (SiteSection(key="tally_hubs", model=HubConfig, what="tally hub", device_field="hub"),)

    def points(self, device, profile):
        return [PointInfo(id=device.id + ".count", unit=None, kind="int", description="a count")]

    def references(self, device):
        return {"tally_hubs": device.hub}

    def build_sources(self, site):
        return [TallySource([d for d in site.config.devices if isinstance(d, CounterDevice)])]


plugin = TallyPlugin()
'''

_CLI = '''
"""The tally driver's sub-commands."""


def register(subparsers):
    tally = subparsers.add_parser("tally", help="tally tools: count to three")
    tally.set_defaults(handler=lambda args: print("1 2 3") or 0)
'''

_SITE = """\
version: 1
gateway: {{id: gw1, site: plugintest}}
http: {{enabled: false}}
tally_hubs:
  - {{id: hub1}}
devices:
  - {{id: {device}, driver: tally, hub: {hub}, start: 40}}
"""


@pytest.fixture(scope="module")
def tally_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the ``tally_driver`` package and its installed metadata (a .dist-info)."""
    root = tmp_path_factory.mktemp("tally")
    package = root / "tally_driver"
    package.mkdir()
    (package / "__init__.py").write_text('"""The tally driver."""\n')
    (package / "plugin.py").write_text(_PLUGIN)
    (package / "cli.py").write_text(_CLI)
    dist = root / "tally_driver-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tally-driver\nVersion: 0.1\n")
    # the one line a driver adds to its pyproject.toml, as pip writes it; and a driver whose module is missing
    (dist / "entry_points.txt").write_text(
        "[edge_gateway.drivers]\ntally = tally_driver.plugin:plugin\nbroken = tally_driver.missing:plugin\n"
    )
    return root


def _gateway(args: list[str], extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = [str(extra_path)] if extra_path is not None else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_the_built_in_plugins_register_through_entry_points() -> None:
    found = plugins()
    assert list(found.drivers) == ["bacnet", "modbus", "mqtt", "simulator"]
    assert list(found.uplinks) == ["influx", "platform"]
    assert all(isinstance(p, DriverPlugin) for p in found.drivers.values())
    assert all(isinstance(p, UplinkPlugin) for p in found.uplinks.values())
    assert found.broken == {}


def test_a_site_schema_holds_only_the_drivers_the_file_uses() -> None:
    """A site imports the config models of the drivers its devices name (issue 13, item 8); a top-level key none of
    them declares brings in every driver, so it is checked (a section no device uses) or refused with its "did you
    mean" (a typo) as by the whole schema."""
    modbus_device = {"id": "m1", "driver": "modbus", "bus": "b1"}
    base = {"version": 1, "gateway": {"id": "g", "site": "s"}, "devices": [modbus_device, "not a device"]}
    everything = ["bacnet", "modbus", "mqtt", "simulator"]
    assert list(site_drivers({**base, "modbus_buses": []})) == ["modbus"]
    assert list(site_drivers({**base, "mqtt_sources": []})) == everything
    assert list(site_drivers({**base, "modbus_bus": []})) == everything
    assert list(site_drivers([base])) == everything
    assert list(site_drivers({"devices": [{"driver": "modbsu"}]})) == []  # refused by the unknown-driver message
    fields = site_model(["modbus"]).model_fields
    assert "modbus_buses" in fields
    assert "mqtt_sources" not in fields
    assert "bacnet_networks" not in fields


def test_an_installed_driver_is_checked_and_run(tally_path: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(_SITE.format(device="counter1", hub="hub1"))
    checked = _gateway(["check", str(site)], tally_path)
    assert checked.returncode == 0, checked.stderr
    data_dir = tmp_path / "data"
    ran = _gateway(["run", str(site), "--data-dir", str(data_dir), "--duration", "1", "--http", "off"], tally_path)
    assert ran.returncode == 0, ran.stderr
    # what the driver read reached the outbox, committed
    db = sqlite3.connect(data_dir / "outbox.db")
    try:
        rows = [row for (payload,) in db.execute("SELECT payload FROM telemetry") for row in orjson.loads(payload)]
    finally:
        db.close()
    values = [value for point, value, _ts, _quality in rows if point == "counter1.count"]
    assert values[:2] == [40, 41]


def test_an_installed_drivers_sub_commands_join_the_cli(tally_path: Path) -> None:
    listed = _gateway(["--help"], tally_path)
    assert listed.returncode == 0 and "tally tools: count to three" in listed.stdout
    ran = _gateway(["tally"], tally_path)
    assert ran.returncode == 0 and ran.stdout == "1 2 3\n"


def test_a_driver_that_cannot_be_loaded_stops_only_the_sites_using_it(tally_path: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(_SITE.format(device="counter1", hub="hub1"))
    checked = _gateway(["check", str(site)], tally_path)
    assert checked.returncode == 0  # the broken plugin is logged, and this site does not use it
    assert "plugin broken (edge_gateway.drivers) cannot be loaded: No module named 'tally_driver.missing'" in (
        checked.stderr
    )
    site.write_text(site.read_text().replace("driver: tally", "driver: broken"))
    refused = _gateway(["check", str(site)], tally_path)
    assert refused.returncode == 1
    assert (
        "driver 'broken' is installed but cannot be loaded (tally_driver.missing:plugin: ModuleNotFoundError: "
        "No module named 'tally_driver.missing'); installed drivers: bacnet, modbus, mqtt, simulator, tally"
    ) in refused.stderr


def test_an_installed_drivers_section_is_checked(tally_path: Path, tmp_path: Path) -> None:
    """Its devices must name an entry of its section, and the section's ids are unique, like the built-ins'."""
    site = tmp_path / "site.yaml"
    site.write_text(_SITE.format(device="counter1", hub="hub9") + "  - {id: counter2, driver: tally, hub: hub1}\n")
    site.write_text(site.read_text().replace("  - {id: hub1}\n", "  - {id: hub1}\n  - {id: hub1}\n"))
    checked = _gateway(["check", str(site)], tally_path)
    assert checked.returncode == 1
    assert f"{site}:6:10: duplicate tally hub id 'hub1' (first defined on line 5)" in checked.stderr
    assert f"{site}:8:40: device 'counter1' names unknown tally hub 'hub9'" in checked.stderr


def test_an_unknown_driver_lists_the_installed_ones(tally_path: Path, tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(_SITE.format(device="counter1", hub="hub1").replace("driver: tally", "driver: taly"))
    checked = _gateway(["check", str(site)], tally_path)
    assert checked.returncode == 1
    installed = "bacnet, modbus, mqtt, simulator, tally"
    expected = f"unknown driver 'taly' (did you mean 'tally'?); installed drivers: {installed}"
    assert expected in checked.stderr
    without = _gateway(["check", str(site)])  # the same file where tally is not installed
    assert "unknown driver 'taly'; installed drivers: bacnet, modbus, mqtt, simulator" in without.stderr
    assert "tally_hubs" in without.stderr  # its section is an unknown key there


_MQTT_ONLY = """\
version: 1
gateway: {id: gw1, site: lazy}
http: {enabled: false}
mqtt_sources:
  - {id: b, host: 127.0.0.1, port: 1, subscriptions: [{id: z, topic: "z2m/+", decoder: {type: json}}]}
devices:
  - {id: plug, driver: mqtt, source: b, points: {power: {path: $.power, unit: W}}}
"""


def _modules_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running ``code``."""
    report = "import sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    probe = f"{textwrap.dedent(code)}\n{report}"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


PROTOCOL_LIBRARIES = {"pymodbus", "serial", "paho", "aiomqtt", "influxdb_client", "aiohttp"}


def test_help_imports_no_protocol_library() -> None:
    loaded = _modules_after(
        """
        import contextlib, io
        from gateway.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit:
                pass
        """
    )
    assert not loaded & PROTOCOL_LIBRARIES


def test_an_mqtt_only_site_does_not_import_pymodbus(tmp_path: Path) -> None:
    """``check`` and building the sources (what ``run`` does before it connects) of an MQTT-only site."""
    site = tmp_path / "site.yaml"
    site.write_text(_MQTT_ONLY)
    loaded = _modules_after(
        f"""
        from gateway.cli import main
        assert main(["check", {str(site)!r}]) == 0
        from gateway.config.site import load_site
        from gateway.supervisor import build_sources
        assert [s.name for s in build_sources(load_site({str(site)!r}))] == ["mqtt[b]"]
        """
    )
    assert "pymodbus" not in loaded and "serial" not in loaded
    assert "influxdb_client" not in loaded
