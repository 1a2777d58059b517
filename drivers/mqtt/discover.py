"""What devices a broker carries, recognised from their traffic, written out as a site file to edit.

Owns: ``Discovery`` (fed ``(topic, payload)`` pairs; recognises Zigbee2MQTT's ``bridge/devices`` and device
states, Tasmota ``tele/<t>/SENSOR|STATE|LWT``, Shelly Gen2 ``<id>/events/rpc``, ``<id>/status/<component>`` and
``<id>/online``, SenML packs and The Things Stack v3 uplinks) and ``Discovery.site_yaml`` (a complete site file:
one source, its subscriptions and availability topics, one device per recognised device with its points, kinds
and units, which ``edge-gateway check`` accepts).

Pure: imports no protocol library (``drivers.mqtt.cli`` does the listening), so the recognisers are tested on
payloads alone. What is not recognised is counted and listed, never guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from drivers.mqtt.units import canonical_unit

#: the messages kept per topic are only the last one; past this many topics, new ones are counted, not kept
MAX_TOPICS = 10_000
_IDENT_BAD = re.compile(r"[^a-z0-9_]+")
#: Shelly Gen2 component fields that are bookkeeping, not readings
_SHELLY_SKIP = frozenset({"id", "source", "minute_ts", "by_minute", "errors", "ts"})
_SHELLY_UNITS = {
    "apower": "W",
    "act_power": "W",
    "voltage": "V",
    "current": "A",
    "total": "Wh",
    "tC": "°C",
    "tF": "°F",
    "freq": "Hz",
    "rh": "%",
}
_TASMOTA_UNITS = {"Total": "kWh", "Today": "kWh", "Yesterday": "kWh", "Power": "W", "Voltage": "V", "Current": "A"}
#: topic levels that name a message kind, not a device (``lora/<eui>/up``, ``sensors/<id>/senml``)
_FIXED_WORDS = frozenset({"up", "uplink", "senml", "data", "telemetry", "event", "events", "json", "sensors", "state"})
_TASMOTA_SKIP = frozenset({"Time", "TempUnit", "PressureUnit", "SpeedUnit", "TotalStartTime", "Wifi", "Uptime"})


def ident(text: str, fallback: str = "x") -> str:
    """A lowercase identifier (``[a-z][a-z0-9_]*``) from any name: ``Living Room`` -> ``living_room``."""
    cleaned = _IDENT_BAD.sub("_", text.lower()).strip("_")
    if not cleaned:
        cleaned = fallback
    if not cleaned[0].isalpha():
        cleaned = f"{fallback}_{cleaned}"
    return cleaned[:60]


@dataclass
class FoundPoint:
    path: str
    kind: str  # float, bool, str
    unit: str | None = None
    #: for devices seen on several subscriptions (Tasmota SENSOR and STATE): the one carrying this point
    subscription: str | None = None


@dataclass
class FoundDevice:
    family: str  # the subscription it belongs to
    topic_name: str
    points: dict[str, FoundPoint] = field(default_factory=dict)

    def add(self, name: str, point: FoundPoint) -> None:
        key = ident(name, "p")
        if key in self.points and self.points[key].path != point.path:
            suffix = 2
            while f"{key}_{suffix}" in self.points:
                suffix += 1
            key = f"{key}_{suffix}"
        self.points.setdefault(key, point)


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float"
    if isinstance(value, str):
        return "str"
    return None


def _json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


class Discovery:
    """Recognised devices, by (family, topic name), from the messages seen."""

    def __init__(self) -> None:
        self.devices: dict[tuple[str, str], FoundDevice] = {}
        #: subscription id -> (filter, template or None, decoder type)
        self.subscriptions: dict[str, tuple[str, str | None, str]] = {}
        #: availability entries: (filter, template or None, format)
        self.availability: dict[str, tuple[str, str | None, str]] = {}
        self.messages = 0
        self.unrecognised: dict[str, int] = {}
        self._topics: set[str] = set()
        #: the last unrecognised payload per topic: a Zigbee2MQTT state retained before ``bridge/devices`` arrives
        #: is recognised once the bridge has said which base topic and devices it has (see ``finish``)
        self._later: dict[str, bytes] = {}

    # --- feeding ---------------------------------------------------------------------------------------------

    def feed(self, topic: str, payload: bytes) -> None:
        self.messages += 1
        if topic not in self._topics:
            if len(self._topics) >= MAX_TOPICS:
                return
            self._topics.add(topic)
        if not self._recognise(topic, payload):
            # kept for a second look only if small: MAX_TOPICS x 8 KiB bounds the memory at 80 MiB
            self._later[topic] = payload if len(payload) <= 8192 else b""

    def _recognise(self, topic: str, payload: bytes) -> bool:
        levels = topic.split("/")
        return any(
            recognise(topic, levels, payload)
            for recognise in (self._zigbee2mqtt, self._tasmota, self._shelly, self._tts, self._senml)
        )

    def finish(self) -> None:
        """Look again at what was not recognised when it arrived; count what still is not, by first level."""
        later, self._later = self._later, {}
        for topic, payload in later.items():
            if not self._recognise(topic, payload):
                levels = topic.split("/")
                prefix = levels[0] + ("/..." if len(levels) > 1 else "")
                self.unrecognised[prefix] = self.unrecognised.get(prefix, 0) + 1

    def _device(self, family: str, topic_name: str) -> FoundDevice:
        key = (family, topic_name)
        if key not in self.devices:
            self.devices[key] = FoundDevice(family, topic_name)
        return self.devices[key]

    def _zigbee2mqtt(self, topic: str, levels: list[str], payload: bytes) -> bool:
        if "bridge" in levels:
            at = levels.index("bridge")
            base = "/".join(levels[:at])
            if not base:
                return False
            if levels[at + 1 :] == ["devices"]:
                devices = _json(payload)
                if not isinstance(devices, list):
                    return False
                self._z2m_source(base)
                for entry in devices:
                    self._z2m_device(base, entry)
                return True
            return base in self._z2m_bases() or levels[at + 1 :] in (["state"], ["info"], ["logging"])
        for base in self._z2m_bases():
            if topic.startswith(base + "/"):
                rest = topic[len(base) + 1 :]
                name, _, tail = rest.rpartition("/")
                if tail == "availability" and name:
                    return True
                if rest.endswith(("/set", "/get")):
                    return True
                state = _json(payload)
                found = self.devices.get(("z2m", rest))
                if isinstance(state, dict) and found is not None and not found.points:
                    for key, value in state.items():  # no exposes known: infer from the state's values
                        kind = "bool" if value in ("ON", "OFF") else _kind(value)  # Zigbee2MQTT's switch states
                        if kind and key not in ("last_seen", "linkquality") and "." not in key:
                            found.add(key, FoundPoint(f"$.{key}", kind))
                return found is not None
        return False

    def _z2m_bases(self) -> list[str]:
        return [t.removesuffix("/#") for t, _, d in self.subscriptions.values() if d == "zigbee2mqtt"]

    def _z2m_source(self, base: str) -> None:
        # '#' and a spanning {device}: friendly names may contain '/'
        self.subscriptions["z2m"] = (f"{base}/#", f"{base}/{{device}}", "zigbee2mqtt")
        self.availability["z2m"] = (f"{base}/#", f"{base}/{{device}}/availability", "zigbee2mqtt")

    def _z2m_device(self, base: str, entry: Any) -> None:
        if not isinstance(entry, dict) or entry.get("type") == "Coordinator":
            return
        name = entry.get("friendly_name")
        definition = entry.get("definition")
        if not isinstance(name, str) or not name or "+" in name or "#" in name:
            return
        found = self._device("z2m", name)
        exposes = definition.get("exposes") if isinstance(definition, dict) else None
        for expose in _flatten_exposes(exposes if isinstance(exposes, list) else []):
            prop = expose.get("property")
            access = expose.get("access", 1)
            if not isinstance(prop, str) or "." in prop or not isinstance(access, int) or not access & 1:
                continue  # not published in the state message (write-only or get-only)
            kind = {"numeric": "float", "binary": "bool"}.get(str(expose.get("type")), "str")
            unit = expose.get("unit") if kind == "float" and isinstance(expose.get("unit"), str) else None
            found.add(prop, FoundPoint(f"$.{prop}", kind, unit))

    def _tasmota(self, topic: str, levels: list[str], payload: bytes) -> bool:
        if len(levels) != 3 or levels[0] != "tele" or levels[2] not in ("SENSOR", "STATE", "LWT"):
            return False
        if levels[2] == "LWT":
            self.availability["tasmota"] = ("tele/+/LWT", None, "tasmota")
            return True
        doc = _json(payload)
        if not isinstance(doc, dict):
            return False
        sub = "tasmota" if levels[2] == "SENSOR" else "tasmota_state"
        self.subscriptions[sub] = (f"tele/+/{levels[2]}", None, "tasmota")
        found = self._device("tasmota", levels[1])
        temp_unit = {"C": "°C", "F": "°F"}.get(str(doc.get("TempUnit")))
        pressure_unit = doc.get("PressureUnit") if isinstance(doc.get("PressureUnit"), str) else None
        for path, value in _leaves(doc, skip=_TASMOTA_SKIP):
            kind = _kind(value)
            last = path[-1]
            if sub == "tasmota_state":
                # STATE carries the relays (POWER, POWER1...) as ON/OFF; the rest is Wi-Fi and uptime bookkeeping
                if not (last.startswith("POWER") and value in ("ON", "OFF")):
                    continue
                kind = "bool"
            elif kind is None or kind == "str":
                continue
            unit = _TASMOTA_UNITS.get(last) if path[0] == "ENERGY" else None
            if last in ("Temperature", "DewPoint"):
                unit = temp_unit
            elif last == "Pressure":
                unit = pressure_unit
            found.add("_".join(path), FoundPoint("$." + ".".join(path), kind, unit, sub))
        return True

    def _shelly(self, topic: str, levels: list[str], payload: bytes) -> bool:
        if len(levels) == 2 and levels[1] == "online" and payload in (b"true", b"false"):
            self.availability["shelly"] = ("+/online", None, "shelly")
            return True
        if len(levels) == 3 and levels[1:] == ["events", "rpc"]:
            doc = _json(payload)
            if not isinstance(doc, dict) or "method" not in doc:
                return False
            params = doc.get("params")
            if doc.get("method") in ("NotifyStatus", "NotifyFullStatus") and isinstance(params, dict):
                self.subscriptions["shelly"] = ("+/events/rpc", None, "shelly_gen2")
                found = self._device("shelly", levels[0])
                for component, status in params.items():
                    if ":" in component and isinstance(status, dict):
                        self._shelly_component(found, component, status)
            return True
        if len(levels) == 3 and levels[1] == "status" and ":" in levels[2]:
            status = _json(payload)
            if not isinstance(status, dict):
                return False
            self.subscriptions["shelly_status"] = ("+/status/+", "{device}/status/{field}", "shelly_gen2")
            self._shelly_component(self._device("shelly_status", levels[0]), levels[2], status)
            return True
        return False

    def _shelly_component(self, found: FoundDevice, component: str, status: dict[str, Any]) -> None:
        for path, value in _leaves(status, skip=_SHELLY_SKIP):
            kind = _kind(value)
            if kind is None or kind == "str":
                continue
            unit = _SHELLY_UNITS.get(path[-1]) if kind == "float" else None
            found.add(
                "_".join([component.replace(":", "_"), *path]),
                FoundPoint("$." + ".".join([component, *path]), kind, unit),
            )

    def _tts(self, topic: str, levels: list[str], payload: bytes) -> bool:
        if len(levels) != 5 or levels[0] != "v3" or levels[2] != "devices" or levels[4] != "up":
            return False
        doc = _json(payload)
        uplink = doc.get("uplink_message") if isinstance(doc, dict) else None
        if not isinstance(uplink, dict):
            return False
        self.subscriptions["tts"] = ("v3/+/devices/+/up", "v3/+/devices/{device}/up", "tts_v3")
        found = self._device("tts", levels[3])
        decoded = uplink.get("decoded_payload")
        for path, value in _leaves(decoded if isinstance(decoded, dict) else {}, skip=frozenset()):
            kind = _kind(value)
            if kind is not None:
                found.add("_".join(path), FoundPoint("$." + ".".join(path), kind))
        if isinstance(uplink.get("rx_metadata"), list):
            found.add("rssi", FoundPoint("$.@rssi", "float", "dBm"))
            found.add("snr", FoundPoint("$.@snr", "float", "dB"))
        return True

    def _senml(self, topic: str, levels: list[str], payload: bytes) -> bool:
        pack = _json(payload)
        if not isinstance(pack, list) or not pack or not all(isinstance(r, dict) for r in pack):
            return False
        if not any(("v" in r or "vb" in r or "vs" in r) for r in pack):
            return False
        base = next((r["bn"] for r in pack if isinstance(r.get("bn"), str)), "")
        # the level naming the device: the one the base name contains, else the last that is not a fixed word
        lowered = base.lower()
        index = next((i for i, level in enumerate(levels) if level and level.lower() in lowered), None)
        if index is None:
            named = [i for i, level in enumerate(levels) if level and level.lower() not in _FIXED_WORDS]
            index = named[-1] if named else len(levels) - 1
        filter_levels = ["+" if i == index else level for i, level in enumerate(levels)]
        sub = f"senml_{len([k for k in self.subscriptions if k.startswith('senml')]) + 1}"
        for key, (existing, _, decoder) in self.subscriptions.items():
            if decoder == "senml" and existing == "/".join(filter_levels):
                sub = key
        self.subscriptions[sub] = ("/".join(filter_levels), None, "senml")
        found = self._device(sub, levels[index])
        base_unit: Any = None
        for record in pack:
            base_unit = record.get("bu", base_unit)
            name = record.get("n")
            if not isinstance(name, str) or not name:
                continue
            kind = "bool" if "vb" in record else "str" if "vs" in record else "float" if "v" in record else None
            if kind is None:
                continue
            unit = record.get("u", base_unit)
            unit = canonical_unit(unit) if isinstance(unit, str) and unit and kind == "float" else None
            found.add(name, FoundPoint(name, kind, unit))
        return True

    # --- output ----------------------------------------------------------------------------------------------

    def site_yaml(self, *, host: str, port: int) -> str:
        """A complete site file (``edge-gateway check`` accepts it) with what was recognised."""
        self.finish()
        lines = [
            f"# Written by `edge-gateway mqtt discover` from {self.messages} messages on {host}:{port}.",
            "# Edit the gateway id and site, device ids and point names; delete what this gateway should not read.",
            "version: 1",
            "gateway: {id: gw1, site: site1}",
            "mqtt_sources:",
            "  - id: discovered",
            f"    host: {_q(host)}",
            f"    port: {port}",
            "    subscriptions:",
        ]
        used = {d.family for d in self.devices.values() if d.points}
        used |= {p.subscription for d in self.devices.values() for p in d.points.values() if p.subscription}
        subs = {k: v for k, v in self.subscriptions.items() if k in used}
        if not subs:
            lines.append("      []  # nothing recognised: see the comments below")
        for sub_id, (topic, template, decoder) in sorted(subs.items()):
            entry = f"{{id: {sub_id}, topic: {_q(topic)}"
            entry += f", template: {_q(template)}" if template else ""
            lines.append(f"      - {entry}, qos: 1, decoder: {{type: {decoder}}}}}")
        if self.availability:
            lines.append("    availability:")
            for topic, template, fmt in sorted(self.availability.values()):
                entry = f"{{topic: {_q(topic)}" + (f", template: {_q(template)}" if template else "")
                lines.append(f"      - {entry}, format: {fmt}}}")
        lines.append("devices:" if any(d.points for d in self.devices.values()) else "devices: []")
        taken: set[str] = set()
        for (family, topic_name), found in sorted(self.devices.items()):
            if not found.points:
                continue
            device_id = ident(topic_name, "dev")
            while device_id in taken:
                device_id += "_2"
            taken.add(device_id)
            lines += [
                f"  - id: {device_id}",
                "    driver: mqtt",
                "    source: discovered",
                f"    topic_name: {_q(topic_name)}",
            ]
            if family != "tasmota":
                lines.append(f"    subscription: {family}")
            lines.append("    points:")
            for name, point in found.points.items():
                parts = [f"path: {_q(point.path)}"]
                if point.kind != "float":
                    parts.append(f"kind: {point.kind}")
                if point.unit:
                    parts.append(f"unit: {_q(point.unit)}")
                if point.subscription:
                    parts.append(f"subscription: {point.subscription}")
                lines.append(f"      {name}: {{{', '.join(parts)}}}")
        for prefix, count in sorted(self.unrecognised.items()):
            lines.append(f"# not recognised: {count} topic(s) under {prefix}")
        return "\n".join(lines) + "\n"


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return orjson.dumps(text).decode()


def _leaves(doc: dict[str, Any], *, skip: frozenset[str], depth: int = 0) -> list[tuple[list[str], Any]]:
    """(path, value) of every scalar in nested objects (arrays skipped: no stable meaning per index)."""
    found: list[tuple[list[str], Any]] = []
    if depth > 4:
        return found
    for key, value in doc.items():
        if key in skip or "." in key or not key:
            continue
        if isinstance(value, dict):
            found += [([key, *path], leaf) for path, leaf in _leaves(value, skip=skip, depth=depth + 1)]
        elif not isinstance(value, list) and value is not None:
            found.append(([key], value))
    return found


def _flatten_exposes(exposes: list[Any]) -> list[dict[str, Any]]:
    """Zigbee2MQTT exposes, with the features of composite ones (switch, light, climate) listed in their place."""
    flat: list[dict[str, Any]] = []
    for expose in exposes:
        if not isinstance(expose, dict):
            continue
        features = expose.get("features")
        if isinstance(features, list) and "property" not in expose:
            flat += _flatten_exposes(features)
        else:
            flat.append(expose)
    return flat
