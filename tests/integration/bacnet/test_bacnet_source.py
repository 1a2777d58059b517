"""The BACnet driver against real bacpypes3 devices on loopback UDP ports (tests/integration/bacnet/devices.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from drivers.bacnet.client import BacnetLink
from drivers.bacnet.config import BacnetDeviceConfig, BacnetNetworkConfig, BacnetProfile
from drivers.bacnet.source import BacnetNetworkSource
from gateway.driver_api import DeviceState
from gateway.errors import DeviceRejected, DeviceUnavailable, WriteRejected
from gateway.model import Command, Quality, Sample
from tests.integration.bacnet.devices import Device, free_udp_port, start_device, start_garbage

pytestmark = pytest.mark.integration


def network(**extra: Any) -> BacnetNetworkConfig:
    data = {
        "id": "bms",
        "address": "127.0.0.1",
        "port": free_udp_port(),
        "timeout": "300ms",
        "retries": 0,
        "backoff_min": "50ms",
        "backoff_max": "100ms",
    }
    data.update(extra)
    return BacnetNetworkConfig.model_validate(data)


def profile(points: dict[str, dict[str, Any]]) -> BacnetProfile:
    return BacnetProfile.model_validate(
        {"driver": "bacnet", "vendor": "test", "model": "t", "doc": "tests", "points": points}
    )


def device_config(ident: str, instance: int, address: str | None, **extra: Any) -> BacnetDeviceConfig:
    data = {
        "id": ident,
        "driver": "bacnet",
        "profile": "p",
        "network": "bms",
        "instance": instance,
        "address": address,
        "poll": "100ms",
    }
    data.update(extra)
    return BacnetDeviceConfig.model_validate(data)


def many_points(count: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    objects = {f"analog-input,{i}": float(i) + 0.5 for i in range(1, count + 1)}
    points = {f"t{i}": {"object": f"analog-input,{i}", "unit": "degrees-celsius"} for i in range(1, count + 1)}
    return objects, points


@pytest.fixture
async def devices() -> AsyncIterator[list[Device]]:
    started: list[Device] = []
    yield started
    for device in started:
        device.close()


async def poll_once(source: BacnetNetworkSource, net: BacnetNetworkConfig, ident: str) -> list[Sample]:
    """One poll of every interval of one device, through a real link."""
    async with BacnetLink(net) as link:
        source._link = link
        device = next(d for d in source._devices if d.config.id == ident)
        return await source.poll_device(link, device, tuple(device.groups))


async def test_rpm_reads_every_point_in_one_request(devices: list[Device]) -> None:
    objects, points = many_points(6)
    objects["binary-input,1"] = "active"
    objects["multi-state-value,1"] = 3
    points["fan"] = {"object": "binary-input,1"}
    points["mode"] = {"object": "multi-state-value,1"}
    dev = await start_device(1001, objects)
    devices.append(dev)
    net = network()
    source = BacnetNetworkSource(net, [(device_config("ahu", 1001, dev.address), profile(points))])

    samples = await poll_once(source, net, "ahu")

    values = {s.point: s.value for s in samples}
    assert values["ahu.t1"] == 1.5 and values["ahu.t6"] == 6.5
    assert values["ahu.fan"] is True and values["ahu.mode"] == 3
    assert all(s.quality is Quality.GOOD for s in samples)
    assert dev.requests.get("ReadPropertyMultipleRequest") == 1
    # two ReadProperty of the device object (max-APDU, segmentation) and none for the points
    assert dev.requests.get("ReadPropertyRequest") == 2
    assert source.requests_per_cycle() == {"ahu": 1}
    status = source.status()[0]
    assert status.state is DeviceState.ONLINE and status.info["max_apdu"] == 1476


async def test_small_apdu_without_segmentation_splits_the_reads(devices: list[Device]) -> None:
    objects, points = many_points(40)
    dev = await start_device(1002, objects, max_apdu=206, segmentation="no-segmentation")
    devices.append(dev)
    net = network()
    source = BacnetNetworkSource(net, [(device_config("vav", 1002, dev.address), profile(points))])

    samples = await poll_once(source, net, "vav")

    assert len(samples) == 40 and all(s.quality is Quality.GOOD for s in samples)
    assert {s.value for s in samples} == {float(i) + 0.5 for i in range(1, 41)}
    plan = source._plan(source._devices[0], tuple(source._devices[0].groups))
    assert len(plan) > 1 and all(r.size <= 206 for r in plan)
    assert dev.requests["ReadPropertyMultipleRequest"] == len(plan)
    assert source.status()[0].info["segmentation"] == "no-segmentation"


async def test_device_refusing_rpm_is_read_one_property_at_a_time(devices: list[Device]) -> None:
    objects, points = many_points(5)
    dev = await start_device(1003, objects, rpm=False)
    devices.append(dev)
    net = network()
    source = BacnetNetworkSource(net, [(device_config("old", 1003, dev.address), profile(points))])

    first = await poll_once(source, net, "old")
    second = await poll_once(source, net, "old")

    for samples in (first, second):
        assert [s.value for s in samples] == [1.5, 2.5, 3.5, 4.5, 5.5]
        assert all(s.quality is Quality.GOOD for s in samples)
    # refused once, then never asked again
    assert dev.requests["ReadPropertyMultipleRequest"] == 1
    assert dev.requests["ReadPropertyRequest"] == 2 + 5 + 5
    assert "unrecognized-service" in str(source.status()[0].info["read_multiple"])
    assert source.requests_per_cycle() == {"old": 5}


async def test_unknown_objects_and_wrong_types_go_bad_alone(devices: list[Device]) -> None:
    dev = await start_device(1004, {"analog-input,1": 20.0})
    devices.append(dev)
    points = {
        "ok": {"object": "analog-input,1", "unit": "degrees-celsius"},
        "missing": {"object": "analog-input,99"},
        # units is an enumeration: configured as a present-value of a binary object it cannot be a bool
        "wrong": {"object": "binary-input,1"},
    }
    net = network()
    source = BacnetNetworkSource(net, [(device_config("mix", 1004, dev.address), profile(points))])

    samples = {s.point: s for s in await poll_once(source, net, "mix")}

    assert samples["mix.ok"].value == 20.0 and samples["mix.ok"].quality is Quality.GOOD
    assert samples["mix.missing"].value is None and samples["mix.missing"].quality is Quality.BAD
    assert samples["mix.wrong"].quality is Quality.BAD
    status = source.status()[0]
    assert status.state is DeviceState.DEGRADED
    assert status.failures.get("unknown_object", 0) >= 1


async def test_fault_and_out_of_service_make_points_uncertain(devices: list[Device]) -> None:
    dev = await start_device(
        1005,
        {
            # bacpypes3 derives status-flags from these, as a real controller does
            "analog-input,1": {"presentValue": 1.0, "reliability": "no-sensor"},
            "analog-input,2": {"presentValue": 2.0, "outOfService": True},
            "analog-input,3": {"presentValue": 3.0, "eventState": "offnormal"},
            "analog-input,4": 4.0,
        },
    )
    devices.append(dev)
    _objects, points = many_points(4)
    net = network()
    source = BacnetNetworkSource(net, [(device_config("f", 1005, dev.address), profile(points))])

    samples = {s.point: s for s in await poll_once(source, net, "f")}

    assert samples["f.t1"].quality is Quality.UNCERTAIN and samples["f.t1"].value == 1.0  # fault
    assert samples["f.t2"].quality is Quality.UNCERTAIN and samples["f.t2"].value == 2.0  # out of service
    assert samples["f.t3"].quality is Quality.GOOD  # in alarm: the value is real
    assert samples["f.t4"].quality is Quality.GOOD
    flags = str(source.status()[0].info["flags"])
    assert "f.t1: fault" in flags and "f.t3: in-alarm" in flags and "out-of-service" in flags


async def test_silent_and_garbage_devices_never_stall_the_others(devices: list[Device]) -> None:
    objects, points = many_points(3)
    good = await start_device(1006, objects)
    devices.append(good)
    _garbage, garbage_transport, garbage_port = await start_garbage()
    silent_port = free_udp_port()  # nobody listens there
    net = network()
    source = BacnetNetworkSource(
        net,
        [
            (device_config("good", 1006, good.address), profile(points)),
            (device_config("silent", 1007, f"127.0.0.1:{silent_port}"), profile(points)),
            (device_config("garbage", 1008, f"127.0.0.1:{garbage_port}"), profile(points)),
        ],
    )
    batches: list[list[Sample]] = []
    done = asyncio.Event()

    async def publish(batch: list[Sample]) -> None:
        batches.append(batch)
        silent = [b for b in batches if b[0].point.startswith("silent.")]
        garbage = [b for b in batches if b[0].point.startswith("garbage.")]
        if len(silent) >= 2 and len(garbage) >= 2:
            done.set()

    stopping = asyncio.Event()
    runner = asyncio.create_task(source.run(publish, stopping))
    try:
        await asyncio.wait_for(done.wait(), timeout=30)  # a hang guard, not a timing assertion
    finally:
        stopping.set()
        await asyncio.wait_for(runner, timeout=10)
    garbage_transport.close()

    order = [b[0].point.split(".")[0] for b in batches]
    # the good device was polled several times before the silent one's first request had even timed out
    assert order.index("silent") >= 2 and order[: order.index("silent")].count("good") >= 2
    good_batches = [b for b in batches if b[0].point.startswith("good.")]
    assert all(s.quality is Quality.GOOD for b in good_batches for s in b)
    for name in ("silent", "garbage"):
        theirs = [s for b in batches if b[0].point.startswith(f"{name}.") for s in b]
        assert theirs and all(s.quality is Quality.BAD and s.value is None for s in theirs)
    states = {s.device: s for s in source.status()}
    assert states["good"].state is DeviceState.ONLINE
    assert states["silent"].state is DeviceState.DISABLED and states["garbage"].state is DeviceState.DISABLED
    assert states["silent"].errors >= 1


async def test_write_at_priority_then_relinquish(devices: list[Device]) -> None:
    dev = await start_device(1009, {"analog-value,1": 40.0, "binary-value,1": "inactive"})
    devices.append(dev)
    points = {
        "damper": {"object": "analog-value,1", "writable": True, "min": 0, "max": 100, "priority": 10},
        "enable": {"object": "binary-value,1", "writable": True},
        "ghost": {"object": "analog-value,7", "writable": True},
    }
    net = network()
    source = BacnetNetworkSource(net, [(device_config("vav", 1009, dev.address), profile(points))])
    obj = dev.objects["analog-value,1"]
    async with BacnetLink(net) as link:
        source._link = link
        await source.write(Command("vav.damper", 55.0, "test"))
        assert obj.presentValue == 55.0
        assert obj.priorityArray[9].real == 55.0  # slot 10 (1-based)
        await source.write(Command("vav.enable", True, "test"))
        assert str(dev.objects["binary-value,1"].presentValue) == "active"

        await source.relinquish("vav.damper")
        assert obj.presentValue == 40.0  # back to the relinquish default
        assert obj.priorityArray[9].null is not None

        writes = dev.requests["WritePropertyRequest"]
        with pytest.raises(WriteRejected, match="outside the profile's bounds"):
            await source.write(Command("vav.damper", 150, "test"))
        with pytest.raises(WriteRejected, match="takes a number"):
            await source.write(Command("vav.damper", "open", "test"))
        assert dev.requests["WritePropertyRequest"] == writes  # refused here: nothing sent

        with pytest.raises(DeviceRejected, match="unknown-object"):
            await source.write(Command("vav.ghost", 1.0, "test"))
        assert dev.requests["WritePropertyRequest"] == writes + 1  # refused by the device once, not retried


async def test_write_to_a_silent_device_is_unavailable() -> None:
    net = network()
    points = {"sp": {"object": "analog-value,1", "writable": True}}
    source = BacnetNetworkSource(net, [(device_config("gone", 1010, f"127.0.0.1:{free_udp_port()}"), profile(points))])
    async with BacnetLink(net) as link:
        source._link = link
        with pytest.raises(DeviceUnavailable):
            await source.write(Command("gone.sp", 1.0, "test"))


async def test_who_is_to_an_address_finds_the_device(devices: list[Device]) -> None:
    dev = await start_device(1011, {"analog-input,1": 1.0}, max_apdu=480, segmentation="no-segmentation")
    devices.append(dev)
    async with BacnetLink(network()) as link:
        found = await link.who_is(None, None, dev.address, seconds=2)
    assert [(i.instance, i.address, i.max_apdu, i.segmentation) for i in found] == [
        (1011, dev.address, 480, "no-segmentation")
    ]


async def test_an_answer_too_big_for_the_device_is_read_again_in_halves(devices: list[Device]) -> None:
    objects, points = many_points(120)
    dev = await start_device(1012, objects, segmentation="no-segmentation")
    devices.append(dev)
    net = network(max_properties=500)
    source = BacnetNetworkSource(net, [(device_config("big", 1012, dev.address), profile(points))])
    device = source._devices[0]
    async with BacnetLink(net) as link:
        source._link = link
        await source._read_limits(link, device, dev.address)
        device.budget = 100_000  # as if the device had claimed it could send segmented answers
        samples = await source.poll_device(link, device, tuple(device.groups))

    assert len(samples) == 120 and all(s.quality is Quality.GOOD for s in samples)
    assert {s.value for s in samples} == {float(i) + 0.5 for i in range(1, 121)}
    # one refused request of 240 properties, then halves until each answer fits one APDU
    assert dev.requests["ReadPropertyMultipleRequest"] > 2
    assert source.status()[0].failures.get("segmentation_not_supported", 0) >= 1


async def test_a_device_across_a_bbmd_is_found_by_who_is_as_a_foreign_device() -> None:
    from bacpypes3.ipv4.app import BBMDApplication
    from bacpypes3.local.analog import AnalogInputObject
    from bacpypes3.local.device import DeviceObject
    from bacpypes3.pdu import IPv4Address

    bbmd_port = free_udp_port()
    # the BBMD is itself a device (instance 4001) with one sensor: a Who-Is distributed through it reaches it
    bbmd = BBMDApplication(
        DeviceObject(objectIdentifier=("device", 4001), objectName="bbmd", vendorIdentifier=999),
        IPv4Address(f"127.0.0.1:{bbmd_port}"),
    )
    await asyncio.wait(list(bbmd.server._transport_tasks), timeout=5)
    bbmd.add_object(
        AnalogInputObject(
            objectIdentifier=("analog-input", 1), objectName="t", presentValue=7.5, units="degrees-celsius"
        )
    )
    net = network(foreign={"bbmd": f"127.0.0.1:{bbmd_port}", "ttl": "30s"})
    points = {"t": {"object": "analog-input,1", "unit": "degrees-celsius"}}
    source = BacnetNetworkSource(net, [(device_config("far", 4001, None), profile(points))])
    batches: list[list[Sample]] = []
    got = asyncio.Event()

    async def publish(batch: list[Sample]) -> None:
        batches.append(batch)
        if batch[0].value == 7.5 and str(source.status()[0].info.get("bbmd")).endswith(": registered"):
            got.set()

    stopping = asyncio.Event()
    runner = asyncio.create_task(source.run(publish, stopping))
    try:
        await asyncio.wait_for(got.wait(), timeout=30)  # hang guard
    finally:
        stopping.set()
        await asyncio.wait_for(runner, timeout=10)
        bbmd.close()
    info = source.status()[0].info
    assert info["address"] == f"127.0.0.1:{bbmd_port}"
    assert info["bbmd"] == f"127.0.0.1:{bbmd_port}: registered"
    assert [entry.fdTTL for entry in bbmd.bbmd.bbmdFDT] == [30]


async def test_an_unexpected_answer_to_rpm_is_a_clear_refusal_not_a_value(devices: list[Device]) -> None:
    objects, points = many_points(3)
    dev = await start_device(1013, objects, rpm_simple_ack=True)
    devices.append(dev)
    net = network()
    source = BacnetNetworkSource(net, [(device_config("odd", 1013, dev.address), profile(points))])

    first = await poll_once(source, net, "odd")
    second = await poll_once(source, net, "odd")

    for samples in (first, second):
        assert [(s.value, s.quality) for s in samples] == [(None, Quality.BAD)] * 3
    status = source.status()[0]
    assert status.state is DeviceState.OFFLINE
    assert "not a ReadPropertyMultiple acknowledgement" in str(status.last_error)
    assert status.failures.get("malformed_answer", 0) == 2
    assert dev.requests["ReadPropertyMultipleRequest"] == 2  # one per poll: answered, so not retried


async def test_a_surprise_in_one_device_poll_does_not_stop_the_others(devices: list[Device]) -> None:
    objects, points = many_points(2)
    good = await start_device(1014, objects)
    bad = await start_device(1015, objects)
    devices.extend([good, bad])

    class SurprisingLink(BacnetLink):
        """The real link, except that reads of one device raise what no translation expected (a library bug)."""

        async def read_multiple(self, address: str, request: Any) -> Any:
            if address == bad.address:
                raise RuntimeError("bacpypes3 surprise")
            return await super().read_multiple(address, request)

    net = network()
    source = BacnetNetworkSource(
        net,
        [
            (device_config("good", 1014, good.address), profile(points)),
            (device_config("bad", 1015, bad.address), profile(points)),
        ],
        link_factory=SurprisingLink,
    )
    seen: dict[str, int] = {"good": 0, "bad": 0}
    enough = asyncio.Event()

    async def publish(batch: list[Sample]) -> None:
        seen[batch[0].point.split(".")[0]] += 1
        if seen["good"] >= 3 and seen["bad"] >= 3:
            enough.set()

    stopping = asyncio.Event()
    runner = asyncio.create_task(source.run(publish, stopping))
    try:
        await asyncio.wait_for(enough.wait(), timeout=30)  # hang guard
    finally:
        stopping.set()
        await asyncio.wait_for(runner, timeout=10)
    states = {s.device: s for s in source.status()}
    assert states["good"].state is DeviceState.ONLINE
    assert states["bad"].failures["internal_error"] >= 3 and "RuntimeError" in str(states["bad"].last_error)
