"""Modbus, MQTT and the simulator have no priority array: a relinquish, or a write at a BACnet priority (an
allowlist entry's ``priority:``), is refused with a clear WriteRejected before anything is queued or published,
rather than written as if the priority had been honoured."""

from __future__ import annotations

import pytest

from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusProfile
from drivers.modbus.source import ModbusBusSource
from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig
from drivers.mqtt.source import MqttSource
from gateway.errors import DeviceUnavailable, WriteRejected
from gateway.model import Command

MODBUS_PROFILE = ModbusProfile.model_validate(
    {
        "driver": "modbus",
        "vendor": "t",
        "model": "t",
        "doc": "tests",
        "points": {"speed": {"table": "holding", "address": 0, "type": "u16", "writable": True, "min": 0, "max": 50}},
    }
)


def modbus_source() -> ModbusBusSource:
    bus = ModbusBusConfig.model_validate({"id": "b", "type": "tcp", "host": "127.0.0.1"})
    device = ModbusDeviceConfig(id="vfd", driver="modbus", profile="t", bus="b", unit=1)
    return ModbusBusSource(bus, [(device, MODBUS_PROFILE)], clock=lambda: 0.0)


def mqtt_source() -> MqttSource:
    config = MqttSourceConfig.model_validate(
        {
            "id": "building",
            "host": "127.0.0.1",
            "port": 1883,
            "subscriptions": [{"id": "z2m", "topic": "zigbee2mqtt/+", "decoder": {"type": "zigbee2mqtt"}}],
        }
    )
    lamp = MqttDeviceConfig.model_validate(
        {
            "id": "lamp",
            "driver": "mqtt",
            "source": "building",
            "topic_name": "Lamp",
            "subscription": "z2m",
            "points": {
                "on": {"path": "$.state", "kind": "bool", "command": {"topic": "zigbee2mqtt/Lamp/set", "key": "state"}}
            },
        }
    )
    return MqttSource(config, [lamp])


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (Command("vfd.speed", None, "platform", relinquish=True), "Modbus has no write priorities, a relinquish"),
        (Command("vfd.speed", 10, "rule", priority=12), "Modbus has no write priorities, priority 12"),
    ],
)
async def test_modbus_refuses_relinquish_and_priorities(command: Command, message: str) -> None:
    source = modbus_source()
    with pytest.raises(WriteRejected, match=message):
        await source.write(command)
    # the same point without them gets past every check (and fails only because the bus is not running)
    with pytest.raises(DeviceUnavailable, match="not running"):
        await source.write(Command("vfd.speed", 10, "rule"))


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (Command("lamp.on", None, "platform", relinquish=True), "MQTT points have no write priorities, a relinquish"),
        (Command("lamp.on", True, "rule", priority=9), "MQTT points have no write priorities, priority 9"),
        (Command("lamp.on", None, "rule"), "needs a value"),
    ],
)
async def test_mqtt_refuses_relinquish_and_priorities(command: Command, message: str) -> None:
    source = mqtt_source()
    with pytest.raises(WriteRejected, match=message):
        await source.write(command)
    with pytest.raises(DeviceUnavailable, match="not connected"):
        await source.write(Command("lamp.on", True, "rule"))


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (Command("ahu3.vent_setpoint_pct", None, "platform", relinquish=True), "no write priorities, a relinquish"),
        (Command("ahu3.vent_setpoint_pct", 40, "rule", priority=12), "no write priorities, priority 12"),
    ],
)
async def test_the_simulator_refuses_relinquish_and_priorities(command: Command, message: str) -> None:
    from drivers.simulator.source import build_sources
    from gateway.config.site import FIRMWARE_CONFIGS, load_site

    (source,) = build_sources(load_site(FIRMWARE_CONFIGS / "sites" / "demo.yaml"))
    with pytest.raises(WriteRejected, match=message):
        await source.write(command)
    await source.write(Command("ahu3.vent_setpoint_pct", 40, "rule"))  # a plain write still works
