"""COV against real bacpypes3 devices: notifications, renewal past the lifetime, a restarted device found by the
polling safety net, unsubscribe on stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from drivers.bacnet.config import BacnetDeviceConfig, BacnetNetworkConfig, BacnetProfile
from drivers.bacnet.source import BacnetNetworkSource
from gateway.model import Quality, Sample
from tests.integration.bacnet.devices import free_udp_port, start_device

pytestmark = pytest.mark.integration

POINTS = {
    "temp": {"object": "analog-input,1", "unit": "degrees-celsius"},
    "fan": {"object": "binary-input,1"},
    # bacpypes3's commandable binary value has no COV support: the device refuses that one object, as real
    # controllers do for some object types; it is polled while the others are under COV
    "enable": {"object": "binary-value,1"},
}


def source_for(address: str, cov: dict[str, Any], **network: Any) -> BacnetNetworkSource:
    net = BacnetNetworkConfig.model_validate(
        {
            "id": "bms",
            "address": "127.0.0.1",
            "port": free_udp_port(),
            "timeout": "300ms",
            "retries": 1,
            "backoff_min": "100ms",
            "backoff_max": "200ms",
            **network,
        }
    )
    profile = BacnetProfile.model_validate(
        {"driver": "bacnet", "vendor": "t", "model": "t", "doc": "t", "points": POINTS}
    )
    device = BacnetDeviceConfig.model_validate(
        {
            "id": "zone",
            "driver": "bacnet",
            "profile": "t",
            "network": "bms",
            "instance": 3001,
            "address": address,
            "poll": "100ms",
            "cov": cov,
        }
    )
    return BacnetNetworkSource(net, [(device, profile)])


class Collector:
    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.changed = asyncio.Event()

    async def __call__(self, batch: list[Sample]) -> None:
        self.samples.extend(batch)
        self.changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition`` holds (a hang guard of 30 s, not a timing assertion)."""
        async with asyncio.timeout(30):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


def info(source: BacnetNetworkSource, key: str) -> int:
    return int(source.status()[0].info.get(key) or 0)


async def test_notifications_arrive_and_the_subscription_outlives_its_lifetime() -> None:
    dev = await start_device(
        3001,
        {
            "analog-input,1": {"presentValue": 10.0, "covIncrement": 0.5},
            "binary-input,1": "inactive",
            "binary-value,1": "inactive",
        },
    )
    source = source_for(dev.address, {"lifetime": "2s", "verify": "1h", "confirmed": False})
    got = Collector()
    stopping = asyncio.Event()
    runner = asyncio.create_task(source.run(got, stopping))
    try:
        await got.until(lambda: info(source, "cov_notifications") >= 2)  # the initial notification of each object
        dev.objects["analog-input,1"].presentValue = 12.0
        await got.until(lambda: any(s.point == "zone.temp" and s.value == 12.0 for s in got.samples))
        # a renewal every second (half the 2 s lifetime): after 4 the first lifetime is long over
        await got.until(lambda: info(source, "cov_renewals") >= 4)
        before = info(source, "cov_notifications")
        dev.objects["binary-input,1"].presentValue = "active"
        await got.until(lambda: any(s.point == "zone.fan" and s.value is True for s in got.samples))
        assert info(source, "cov_notifications") > before  # brought by the subscription, not by a poll
        # the object without COV is still polled
        assert source.status()[0].info["cov_refused"] == "binary-value,1"
        dev.objects["binary-value,1"].presentValue = "active"
        await got.until(lambda: any(s.point == "zone.enable" and s.value is True for s in got.samples))
        assert all(s.quality is Quality.GOOD for s in got.samples)
        assert "cov_silent" not in source.status()[0].failures
    finally:
        stopping.set()
        await asyncio.wait_for(runner, timeout=10)
    # stopping cancelled the subscriptions at the device
    assert not list(dev.app.device_object.activeCovSubscriptions)
    dev.close()


async def test_a_restarted_device_is_found_by_the_safety_net_and_subscribed_again() -> None:
    port = free_udp_port()
    objects = {
        "analog-input,1": {"presentValue": 10.0, "covIncrement": 0.5},
        "binary-input,1": "inactive",
        "binary-value,1": "inactive",
    }
    dev = await start_device(3001, objects, port=port)
    source = source_for(dev.address, {"lifetime": "5min", "verify": "300ms", "confirmed": True})
    got = Collector()
    stopping = asyncio.Event()
    runner = asyncio.create_task(source.run(got, stopping))
    try:
        await got.until(lambda: info(source, "cov_notifications") >= 2 and info(source, "cov_renewals") >= 1)
        renewals = info(source, "cov_renewals")
        # the device restarts with another value and no memory of the subscription
        dev.close()
        dev = await start_device(
            3001,
            {
                "analog-input,1": {"presentValue": 20.0, "covIncrement": 0.5},
                "binary-input,1": "inactive",
                "binary-value,1": "inactive",
            },
            port=port,
        )
        await got.until(lambda: info(source, "cov_renewals") > renewals)
        assert source.status()[0].failures.get("cov_silent", 0) >= 1
        before = info(source, "cov_notifications")
        dev.objects["analog-input,1"].presentValue = 25.0
        await got.until(
            lambda: (
                info(source, "cov_notifications") > before
                and any(s.point == "zone.temp" and s.value == 25.0 for s in got.samples)
            )
        )
    finally:
        stopping.set()
        await asyncio.wait_for(runner, timeout=10)
        dev.close()


async def test_a_device_without_cov_is_polled() -> None:
    dev = await start_device(3001, {"analog-input,1": 10.0, "binary-input,1": "inactive", "binary-value,1": "inactive"})

    async def refuse(apdu: Any) -> None:
        from bacpypes3.errors import ExecutionError

        raise ExecutionError(errorClass="services", errorCode="optionalFunctionalityNotSupported")

    dev.app.do_SubscribeCOVRequest = refuse
    source = source_for(dev.address, {"lifetime": "1min", "verify": "1h"})
    got = Collector()
    stopping = asyncio.Event()
    runner = asyncio.create_task(source.run(got, stopping))
    try:
        await got.until(lambda: "refused for every object" in str(source.status()[0].info.get("cov")))
        count = len(got.samples)
        dev.objects["analog-input,1"].presentValue = 11.0
        await got.until(lambda: any(s.value == 11.0 for s in got.samples[count:]))
    finally:
        stopping.set()
        await asyncio.wait_for(runner, timeout=10)
        dev.close()
    assert info(source, "cov_notifications") == 0
