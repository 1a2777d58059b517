"""Issue 12 end to end: a real Gateway (simulated AHU, the rules' allowlist) and a real Mosquitto. A platform
command re-sent after its result was delivered and compacted away, and again after the gateway restarted on the same
data directory, is answered with the first result (the same bytes) and written to the device once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiomqtt
import orjson
import pytest

from gateway.config.site import load_site
from gateway.supervisor import Gateway
from tests.integration.uplinks.common import FAST_DELIVERY, wait_for
from tests.services import Mosquitto

pytestmark = pytest.mark.integration

BASE = "once/tower/gw1"


def write_site(tmp_path: Path, broker: Mosquitto) -> Path:
    (tmp_path / "rules.yaml").write_text(
        "version: 1\nallow:\n  simulator:\n    - {point: ahu3.vent_setpoint_pct, min: 20, max: 100}\nrules: []\n"
    )
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\n"
        "gateway: {id: gw1, site: tower}\n"
        "http: {enabled: false}\n"
        "rules: [rules.yaml]\n"
        "devices:\n"
        "  - {id: ahu3, driver: simulator, profile: sim-ahu, seed: 3, poll: 1s}\n"
        "uplinks:\n"
        f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: once, delivery: {FAST_DELIVERY}}}\n"
    )
    return site


def platform_writes(gateway: Gateway) -> list[object]:
    return [e["value"] for e in gateway.commands.entries if e["origin"] == "platform" and e["result"] == "ok"]


async def test_a_command_is_written_once_across_compaction_and_a_restart(tmp_path: Path, broker: Mosquitto) -> None:
    site_path = write_site(tmp_path, broker)
    command = orjson.dumps(
        {"v": 1, "id": "dr-78", "point": "ahu3.vent_setpoint_pct", "value": 78, "ts": time.time_ns() // 10**6}
    )
    answers: list[bytes] = []
    writes: list[list[object]] = []

    async with aiomqtt.Client("127.0.0.1", port=broker.port, identifier="platform-once") as platform:
        await platform.subscribe(f"{BASE}/events/command_result", qos=1)

        async def listen() -> None:
            async for message in platform.messages:
                assert isinstance(message.payload, bytes)
                answers.append(message.payload)

        async with asyncio.TaskGroup() as tg:
            listener = tg.create_task(listen())
            for restart in (False, True):
                gateway = Gateway(load_site(site_path), data_dir=tmp_path / "data", http_listen="off")
                stop = asyncio.Event()
                run = tg.create_task(gateway.run(stop))
                await asyncio.wait_for(gateway.started.wait(), 10)
                uplink = gateway.uplinks[0].uplink  # type: ignore[attr-defined]
                await wait_for(uplink.connected.is_set, what="subscribed to commands")
                if not restart:
                    await platform.publish(f"{BASE}/cmd/write", command, qos=1)
                    await wait_for(lambda: len(answers) >= 1, what="the first result")
                    outbox = gateway.outbox
                    assert outbox is not None
                    deadline = time.monotonic() + 10
                    while outbox.has_event("cmd-result:dr-78"):  # delivered, then compacted away
                        assert time.monotonic() < deadline, "the result was never compacted"
                        await outbox.compact()
                        await asyncio.sleep(0.05)
                await platform.publish(f"{BASE}/cmd/write", command, qos=1)
                await wait_for(lambda want=(3 if restart else 2): len(answers) >= want, what="the repeated result")
                stop.set()
                await asyncio.wait_for(run, 10)
                writes.append(platform_writes(gateway))
            listener.cancel()

    assert writes == [[78], []]  # first run: one write; after the restart: none
    first = answers[0]
    assert answers == [first, first, first]
    assert orjson.loads(first)["body"]["status"] == "applied"
