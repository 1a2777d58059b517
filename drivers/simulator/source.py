"""The simulator source: polls every simulated device on its own interval and publishes one batch per poll.

It behaves like a real polling driver (read-time stamps, per-device status, writes checked against the profile) so
the demo exercises the same runtime paths as a building full of Modbus meters.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from drivers.simulator.config import SimulatorDeviceConfig, SimulatorProfile
from drivers.simulator.models import MODELS, AhuModel, Model
from gateway.config.site import Site
from gateway.driver_api import BatchSink, DeviceStatus, PublishAhead
from gateway.errors import WriteRejected
from gateway.model import Command, Quality, Sample

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _SimDevice:
    config: SimulatorDeviceConfig
    profile: SimulatorProfile
    model: Model
    rng: random.Random
    status: DeviceStatus
    point_ids: dict[str, str]  # point name -> point id, precomputed once


class SimulatorSource:
    """All simulated devices of a site, on one task."""

    name = "simulator"

    def __init__(self, devices: list[_SimDevice]) -> None:
        self._devices = {d.config.id: d for d in devices}

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(self._devices)

    def poll_device(self, device: _SimDevice, now_ns: int) -> list[Sample]:
        started = time.perf_counter()
        values = device.model.read(now_ns / 1e9, device.rng)
        device.status.record_ok(time.perf_counter() - started)
        ids = device.point_ids
        return [Sample(ids[name], value, now_ns, Quality.GOOD) for name, value in values.items()]

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        # (due time, device id): a heap keeps every device on its own interval without one task each
        due = [(start, dev_id) for dev_id in self._devices]
        heapq.heapify(due)
        # a simulated poll acknowledges nothing: the next device is polled while the last one is being stored
        ahead = PublishAhead(publish)
        try:
            await self._poll(due, ahead, loop, stopping)
        finally:
            await ahead.drain()

    async def _poll(
        self,
        due: list[tuple[float, str]],
        ahead: PublishAhead,
        loop: asyncio.AbstractEventLoop,
        stopping: asyncio.Event,
    ) -> None:
        while not stopping.is_set():
            when, dev_id = due[0]
            delay = when - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=delay)
                    break
                except TimeoutError:
                    pass
            heapq.heappop(due)
            device = self._devices[dev_id]
            await ahead.hand(self.poll_device(device, time.time_ns()))
            interval = device.config.poll
            nxt = when + interval
            if nxt < loop.time():  # fell behind (machine suspended?): skip missed polls rather than burst
                nxt = loop.time() + interval
            heapq.heappush(due, (nxt, dev_id))

    async def write(self, command: Command) -> None:
        dev_id, _, name = command.point.partition(".")
        device = self._devices.get(dev_id)
        if device is None or name not in device.profile.points:
            raise WriteRejected(f"{command.point}: no such simulated point")
        spec = device.profile.points[name]
        if not spec.writable or not isinstance(device.model, AhuModel):
            raise WriteRejected(f"{command.point}: not writable")
        if command.relinquish or command.priority is not None:
            # like Modbus: a simulated register holds one value, there is no priority slot to pick or release
            what = "a relinquish" if command.relinquish else f"priority {command.priority}"
            raise WriteRejected(f"{command.point}: the simulator has no write priorities, {what} cannot be honoured")
        value = command.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WriteRejected(f"{command.point}: needs a number, got {value!r}")
        if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
            raise WriteRejected(f"{command.point}: {value} outside [{spec.min}, {spec.max}]")
        device.model.write(name, float(value))
        log.info("simulator: %s <- %s (from %s)", command.point, value, command.origin)

    def status(self) -> list[DeviceStatus]:
        return [d.status for d in self._devices.values()]


def build_sources(site: Site) -> list[SimulatorSource]:
    tz = ZoneInfo(site.config.gateway.timezone)
    devices: list[_SimDevice] = []
    for config in site.config.devices:
        if not isinstance(config, SimulatorDeviceConfig):
            continue
        profile = site.profiles[config.id]
        assert isinstance(profile, SimulatorProfile)
        model = MODELS[profile.model](seed=config.seed, scale=config.scale, tz=tz)
        devices.append(
            _SimDevice(
                config=config,
                profile=profile,
                model=model,
                rng=random.Random(config.seed),
                status=DeviceStatus(config.id, "simulator"),
                point_ids={name: f"{config.id}.{name}" for name in profile.points},
            )
        )
    return [SimulatorSource(devices)] if devices else []
