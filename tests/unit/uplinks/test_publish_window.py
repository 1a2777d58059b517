"""The platform uplink's publish window on its own: a batch completes only when every one of its message ids is
acknowledged, a cancelled batch's late acknowledgements still free their slots, and a lost connection fails every
batch still owed one and wakes a publisher waiting for room. (With a real broker: integration/uplinks.)"""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from gateway.uplinks.mqtt import _BatchAck, _PublishWindow


def new_ack() -> _BatchAck:
    return _BatchAck(asyncio.get_running_loop().create_future())


async def test_a_batch_is_done_only_when_every_message_is_acknowledged() -> None:
    window = _PublishWindow(10, name="test")
    ack = new_ack()
    for mid in (1, 2, 3):
        window.track(mid, ack)
    ack.seal()
    window.acked(2)
    window.acked(99)  # a message of aiomqtt's own (status, meta): not counted
    window.acked(1)
    assert not ack.done.done() and len(window) == 1
    window.acked(3)
    assert ack.done.done() and ack.done.exception() is None
    assert len(window) == 0 and window.acked_total == 3


async def test_acknowledgements_before_the_seal_do_not_complete_a_batch_still_being_published() -> None:
    window = _PublishWindow(10, name="test")
    ack = new_ack()
    window.track(1, ack)
    window.acked(1)  # the broker answered the first message before the second was handed to paho
    assert not ack.done.done()
    window.track(2, ack)
    ack.seal()
    assert not ack.done.done()
    window.acked(2)
    assert ack.done.done()


async def test_a_cancelled_batch_still_frees_its_slots_when_its_acks_arrive() -> None:
    window = _PublishWindow(2, name="test")
    ack = new_ack()
    window.track(1, ack)
    window.track(2, ack)
    ack.seal()
    ack.done.cancel()  # the runner's timeout gave up on it
    window.acked(1)
    window.acked(2)
    assert len(window) == 0


async def test_a_lost_connection_fails_what_is_owed_and_wakes_a_publisher_waiting_for_room() -> None:
    window = _PublishWindow(1, name="test")
    first = new_ack()
    window.track(1, first)
    first.seal()
    waiter = asyncio.create_task(window.wait_for_room())
    await asyncio.sleep(0)
    assert not waiter.done() and window.congested
    window.fail_all(aiomqtt.MqttError("connection lost"))
    with pytest.raises(aiomqtt.MqttError, match="connection lost"):
        await waiter
    with pytest.raises(aiomqtt.MqttError):
        await first.done
    assert len(window) == 0 and not window.congested
    with pytest.raises(aiomqtt.MqttError):  # a window of a dead connection accepts nothing more
        await window.wait_for_room()
    with pytest.raises(aiomqtt.MqttError):
        window.track(2, new_ack())


async def test_room_comes_back_when_half_the_window_is_acknowledged() -> None:
    window = _PublishWindow(4, name="test")
    ack = new_ack()
    for mid in range(1, 5):
        window.track(mid, ack)
    ack.seal()
    waiter = asyncio.create_task(window.wait_for_room())
    await asyncio.sleep(0)
    window.acked(1)
    await asyncio.sleep(0)
    assert not waiter.done()  # one slot free is not yet room: publish in bursts, not one message per PUBACK
    window.acked(2)
    await asyncio.wait_for(waiter, 1)
    assert len(window) == 2
