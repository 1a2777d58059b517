"""The city-platform MQTT contract, version 1: topics and payloads, as pure functions (no MQTT library).

Owns what goes on the wire toward the platform; ``schemas/*.schema.json`` describe the same payloads and a test
checks every payload built here against them. Changing a payload means changing its schema and ``CONTRACT_VERSION``.

Topics, under ``base = {prefix}/{site}/{gateway}``::

    base/status              retained, QoS 1: online on connect; offline by Last Will or on a clean stop
    base/meta                retained, QoS 1: devices and points with units, kinds and tags
    base/telemetry/{device}  QoS 1: one message per device and read (a poll batch), with the outbox seq
    base/events/{type}       QoS 1: alarms, rule notifications, incentive records, command results; stable ids
    base/{subject}           QoS 1: a rule's ``publish`` action (subject is the rule's topic, relative to base)
    base/cmd/{action}        subscribed: commands from the platform (see gateway.commands_platform)

Timestamps on the wire are Unix milliseconds (integers): nanoseconds do not survive a JavaScript number.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson

from gateway.model import Quality
from gateway.outbox import StoredEvent, TelemetryBatch

if TYPE_CHECKING:
    from gateway.registry import PointRegistry

CONTRACT_VERSION = 1
_QUALITY_NAMES = {Quality.UNCERTAIN: "uncertain", Quality.BAD: "bad"}
#: what a rule's publish topic may not contain: MQTT wildcards, NUL, empty levels, and the gateway's own topics
_RESERVED_FIRST_LEVELS = frozenset({"status", "meta", "telemetry", "events", "cmd"})


def base_topic(prefix: str, site: str, gateway: str) -> str:
    return f"{prefix}/{site}/{gateway}"


def status_payload(state: str, *, reason: str, ts_ms: int, version: str) -> bytes:
    doc = {"v": CONTRACT_VERSION, "state": state, "reason": reason, "ts": ts_ms, "gateway_version": version}
    return orjson.dumps(doc)


def meta_payload(*, site: str, gateway: str, name: str | None, registry: PointRegistry, ts_ms: int) -> bytes:
    devices: dict[str, Any] = {}
    for device in registry.devices():
        points: dict[str, Any] = {}
        for point_id in registry.points_of(device):
            info = registry[point_id]
            entry: dict[str, Any] = {"kind": info.kind, "writable": info.writable, "measurement": info.measurement}
            for key in ("unit", "min", "max", "description"):
                value = getattr(info, key)
                if value is not None:
                    entry[key] = value
            if info.tags:
                entry["tags"] = dict(info.tags)
            if not info.physical:
                entry["derived"] = True
            points[info.name] = entry
        devices[device] = {"points": points}
    doc = {"v": CONTRACT_VERSION, "site": site, "gateway": gateway, "name": name, "ts": ts_ms, "devices": devices}
    return orjson.dumps(doc)


def telemetry_messages(base: str, rows: list[TelemetryBatch], *, historical: bool) -> Iterator[tuple[str, bytes]]:
    """One message per (stored batch, device, read time): ``seq`` is the stored batch's, so a resend is
    recognisable; ``(seq, ts)`` identifies a message on its device topic."""
    for row in rows:
        groups: dict[tuple[str, int], tuple[dict[str, Any], dict[str, str]]] = {}
        for point, value, ts, quality in row.samples:
            device, _, name = point.partition(".")
            key = (device, ts)
            group = groups.get(key)
            if group is None or name in group[0] or name in group[1]:
                if group is not None:  # the same point twice at one ts in one batch: keep both, in order
                    yield _telemetry(base, row.seq, key, group, historical)
                group = groups[key] = ({}, {})
            values, qualities = group
            if quality is not Quality.BAD:
                values[name] = value
            if quality is not Quality.GOOD:
                qualities[name] = _QUALITY_NAMES[quality]
        for key, group in groups.items():
            yield _telemetry(base, row.seq, key, group, historical)


def _telemetry(
    base: str, seq: int, key: tuple[str, int], group: tuple[dict[str, Any], dict[str, str]], historical: bool
) -> tuple[str, bytes]:
    device, ts = key
    values, qualities = group
    doc: dict[str, Any] = {"v": CONTRACT_VERSION, "seq": seq, "ts": ts // 1_000_000, "values": values}
    if qualities:
        doc["quality"] = qualities
    if historical:
        doc["historical"] = True
    return f"{base}/telemetry/{device}", orjson.dumps(doc)


def publish_topic_problem(subject: str) -> str | None:
    """Why a rule's publish topic cannot be used (or None): it must stay under the gateway's base topic."""
    if not subject or subject.startswith("/") or subject.endswith("/") or "//" in subject:
        return f"publish topic {subject!r} must be a relative topic without empty levels"
    if any(c in subject for c in "#+\0"):
        return f"publish topic {subject!r} must not contain MQTT wildcards"
    if subject.split("/", 1)[0] in _RESERVED_FIRST_LEVELS:
        return f"publish topic {subject!r} collides with the gateway's own topics"
    return None


def event_message(base: str, stored: StoredEvent) -> tuple[str, bytes]:
    """``publish`` events go to their own topic with the rule's payload; every other event to events/{type}."""
    event = stored.event
    ts_ms = event.ts // 1_000_000
    if event.type == "publish":
        doc = {"v": CONTRACT_VERSION, "id": event.id, "ts": ts_ms, "payload": event.body}
        return f"{base}/{event.subject}", orjson.dumps(doc)
    doc = {
        "v": CONTRACT_VERSION,
        "id": event.id,
        "type": event.type,
        "subject": event.subject,
        "ts": ts_ms,
        "body": event.body,
    }
    return f"{base}/events/{event.type}", orjson.dumps(doc)
