"""``edge-gateway bacnet discover|read|plan`` against real bacpypes3 devices on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.bacnet.cli import discover, read_one
from drivers.bacnet.config import BacnetNetworkConfig, ObjectId
from gateway.cli import main
from gateway.errors import DeviceUnavailable
from tests.integration.bacnet.devices import free_udp_port, start_device

pytestmark = pytest.mark.integration


def network() -> BacnetNetworkConfig:
    return BacnetNetworkConfig.model_validate(
        {"id": "cli", "address": "127.0.0.1", "port": free_udp_port(), "timeout": "500ms", "retries": 0}
    )


async def test_discover_prints_a_profile_snippet_with_names_and_units() -> None:
    dev = await start_device(2001, {"analog-input,1": 21.0, "analog-value,2": 50.0, "binary-input,3": "active"})
    try:
        text = await discover(network(), dev.address, 1.0)
    finally:
        dev.close()
    assert f"# device 2001 at {dev.address}: max-APDU 1476, segmented-both" in text
    assert '  analog_input_1: {object: "analog-input,1", unit: degrees-celsius}' in text
    assert '  analog_value_2: {object: "analog-value,2", unit: percent}' in text
    assert '  binary_input_3: {object: "binary-input,3"}' in text
    assert "instance: 2001" in text


async def test_discover_with_nobody_there_says_so() -> None:
    text = await discover(network(), f"127.0.0.1:{free_udp_port()}", 0.3)
    assert text.startswith("# no I-Am")


async def test_read_one_property_and_a_silent_address() -> None:
    dev = await start_device(2002, {"analog-input,1": 19.5})
    try:
        assert await read_one(network(), dev.address, ObjectId("analog-input", 1), "present-value") == 19.5
    finally:
        dev.close()
    with pytest.raises(DeviceUnavailable):
        await read_one(network(), f"127.0.0.1:{free_udp_port()}", ObjectId("analog-input", 1), "present-value")


def test_plan_counts_requests_per_cycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "devices").mkdir()
    points = "\n".join(f'  t{i}: {{object: "analog-input,{i}", unit: degrees-celsius}}' for i in range(1, 41))
    (tmp_path / "devices" / "p40.yaml").write_text(f"driver: bacnet\nvendor: v\nmodel: m\ndoc: d\npoints:\n{points}\n")
    (tmp_path / "sites").mkdir()
    site = tmp_path / "sites" / "s.yaml"
    site.write_text("""\
version: 1
gateway: {id: gw, site: s}
bacnet_networks: [{id: bms, address: 127.0.0.1}]
devices:
  - {id: a, driver: bacnet, profile: p40, network: bms, instance: 1, address: "10.0.0.1"}
  - {id: b, driver: bacnet, profile: p40, network: bms, instance: 2, max_apdu: 1476}
  - {id: c, driver: bacnet, profile: p40, network: bms, instance: 3, read_multiple: false}
""")
    assert main(["bacnet", "plan", str(site)]) == 0
    out = capsys.readouterr().out
    assert "a (device 1, 10.0.0.1): 4 ReadPropertyMultiple requests reading 80 properties for 40 points" in out
    assert "b (device 2, found by Who-Is): 1 ReadPropertyMultiple request" in out
    assert "c (device 3, found by Who-Is): 40 ReadProperty requests" in out
    assert "per cycle: 45 requests (120 with one ReadProperty per point)" in out


def test_read_refuses_a_bad_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bacnet", "read", "--address", "127.0.0.1", "--device", "1", "--object", "analog-in,1"]) == 1
    assert "unknown or unsupported object type" in capsys.readouterr().err
