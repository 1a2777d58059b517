"""The BACnet driver in the site schema, through its plugin (drivers/bacnet/plugin.py): networks, devices, duplicate
ids and references, and the check that a network's local address is on this host."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.bacnet.config import BacnetDeviceConfig
from drivers.bacnet.source import build_sources
from gateway.config.site import load_site
from gateway.errors import ConfigError

PROFILE = """\
driver: bacnet
vendor: Test
model: VAV-1
doc: tests
points:
  zone_temp: {object: "analog-input,1", unit: degrees-celsius}
  damper: {object: "analog-output,1", unit: percent, writable: true, min: 0, max: 100}
"""


def write_site(tmp_path: Path, body: str) -> Path:
    devices = tmp_path / "devices"
    devices.mkdir(exist_ok=True)
    (devices / "test-vav.yaml").write_text(PROFILE)
    site = tmp_path / "sites" / "site.yaml"
    site.parent.mkdir(exist_ok=True)
    site.write_text("version: 1\ngateway: {id: gw1, site: s1}\n" + body)
    return site


def test_a_bacnet_site_loads_and_builds_one_source_per_network(tmp_path: Path) -> None:
    site = load_site(
        write_site(
            tmp_path,
            """\
bacnet_networks:
  - {id: bms, address: 127.0.0.1/8, port: 47808}
devices:
  - {id: vav1, driver: bacnet, profile: test-vav, network: bms, instance: 3001, address: "10.0.0.5"}
  - {id: vav2, driver: bacnet, profile: test-vav, network: bms, instance: 3002}
""",
        )
    )
    assert isinstance(site.config.devices[0], BacnetDeviceConfig)
    assert site.registry["vav1.zone_temp"].unit == "°C"
    assert site.registry["vav1.damper"].writable and site.registry["vav1.damper"].max == 100
    sources = build_sources(site)
    assert [s.name for s in sources] == ["bacnet[bms]"]
    assert sources[0].devices == frozenset({"vav1", "vav2"})


def test_unknown_network_and_duplicate_network_ids_are_positioned_errors(tmp_path: Path) -> None:
    path = write_site(
        tmp_path,
        """\
bacnet_networks:
  - {id: bms, address: 127.0.0.1}
  - {id: bms, address: 127.0.0.2}
devices:
  - {id: vav1, driver: bacnet, profile: test-vav, network: nope, instance: 3001}
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_site(path)
    text = "\n".join(d.format() for d in caught.value.diagnostics)
    assert "duplicate BACnet network id 'bms'" in text and "site.yaml:5:" in text
    assert "names unknown BACnet network 'nope'" in text and "site.yaml:7:" in text


def test_check_refuses_a_local_address_that_is_not_on_this_host_and_run_agrees(tmp_path: Path) -> None:
    from gateway.cli import main as cli_main

    body = """\
bacnet_networks:
  - {{id: bms, address: {address}, port: 47808}}
devices:
  - {{id: vav1, driver: bacnet, profile: test-vav, network: bms, instance: 1001, address: "127.0.0.1:47999"}}
profile_dirs: [../devices]
http: {{enabled: false}}
"""
    away = write_site(tmp_path, body.format(address="192.0.2.7/24"))  # TEST-NET-1: never a local address
    assert cli_main(["check", str(away), "--data-dir", str(tmp_path / "data")]) == 1
    assert cli_main(["run", str(away), "--data-dir", str(tmp_path / "data"), "--duration", "1"]) == 1
    here = write_site(tmp_path, body.format(address="127.0.0.1/8"))
    assert cli_main(["check", str(here), "--data-dir", str(tmp_path / "data")]) == 0
