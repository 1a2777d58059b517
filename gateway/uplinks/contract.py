"""The city-platform MQTT contract, version 1: topics and payloads, as pure functions (no MQTT library).

Owns what goes on the wire toward the platform; ``schemas/*.schema.json`` describe the same payloads and a test
checks every payload built here against them. Changing a payload means changing its schema and ``CONTRACT_VERSION``.

Topics, under ``base = {prefix}/{site}/{gateway}``::

    base/status              retained, QoS 1: online on connect; offline by Last Will or on a clean stop
                             (a Last Will's ``since``/``ts`` is when the connection began, not its end)
    base/meta                retained, QoS 1: devices and points with units, kinds and tags
    base/telemetry/{device}  QoS 1: telemetry v1 (the default): one message per device and read time, with the
                             outbox seq; telemetry v2 (``telemetry_version: 2``): one message per device and
                             stored batch (a poll), its reads in ``reads``, each with its own time
    base/events/{type}       QoS 1: alarms, rule notifications, incentive records, command results; stable ids
    base/{subject}           QoS 1: a rule's ``publish`` action (subject is the rule's topic, relative to base)
    base/cmd/{action}        subscribed: commands from the platform (see gateway.platform_commands)

Timestamps on the wire are Unix milliseconds (integers): nanoseconds do not survive a JavaScript number.

Personal data stays in the building: telemetry and meta carry only points the registry knows and does not mark
``personal`` (``PlatformPoints``). Every telemetry and meta payload is built here, so no caller can forget the
filter; the platform gets personal data only inside incentive records and as the building aggregate
(docs/privacy.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from gateway.model import Quality
from gateway.outbox import StoredEvent, TelemetryBatch

if TYPE_CHECKING:
    from gateway.registry import PointInfo, PointRegistry

CONTRACT_VERSION = 1
#: telemetry payload versions a gateway can send (``platform.telemetry_version``); every other message is v1
TELEMETRY_VERSIONS = (1, 2)
_QUALITY_NAMES = {Quality.UNCERTAIN: "uncertain", Quality.BAD: "bad"}
#: what a rule's publish topic may not contain: MQTT wildcards, NUL, empty levels, and the gateway's own topics
_RESERVED_FIRST_LEVELS = frozenset({"status", "meta", "telemetry", "events", "cmd"})


class PlatformPoints:
    """The points whose values may go to the platform raw: known to the registry and not personal.

    A point the registry does not know is withheld too: it is a reading of a device removed from the site file
    while still queued in the outbox, and whether it was personal can no longer be told. Answers are cached per
    point (a running registry only grows, by the derived points of reloaded rules; a known point never changes)."""

    def __init__(self, registry: Mapping[str, PointInfo]) -> None:
        self._registry = registry
        #: point -> (device, name) when it may be sent, () when it is known and personal; unknown points are absent
        self.names: dict[str, tuple[str, str] | tuple[()]] = {}
        self._devices: dict[str, str] = {}  # one device string for all its points, not one per point

    def __contains__(self, point: object) -> bool:
        return isinstance(point, str) and bool(self.names.get(point) or self.resolve(point))

    def resolve(self, point: str) -> tuple[str, str] | tuple[()]:
        """The slow path of ``names``: (device, name) of a point that may be sent, else ()."""
        info = self._registry.get(point)
        if info is None:
            return ()  # not cached: a rule reload may still register it
        if info.personal:
            self.names[point] = ()
            return ()
        device, _, name = point.partition(".")
        names = self.names[point] = (self._devices.setdefault(device, device), name)
        return names


def base_topic(prefix: str, site: str, gateway: str) -> str:
    return f"{prefix}/{site}/{gateway}"


def status_payload(state: str, *, reason: str, ts_ms: int, version: str, since_ms: int | None = None) -> bytes:
    doc: dict[str, Any] = {"v": CONTRACT_VERSION, "state": state, "reason": reason, "ts": ts_ms}
    if since_ms is not None:
        doc["since"] = since_ms
    doc["gateway_version"] = version
    return orjson.dumps(doc)


def will_payload(*, connected_ms: int, version: str) -> bytes:
    """The Last Will (offline, reason ``lost``), built when the connection is opened: the broker sends it later, as
    it is, so the one time it can honestly carry is the connection's start, ``since``. The time of death is when the
    platform receives it. ``ts`` is the same connect time, kept because contract v1 requires it on every status."""
    return status_payload("offline", reason="lost", ts_ms=connected_ms, version=version, since_ms=connected_ms)


def meta_payload(*, site: str, gateway: str, name: str | None, registry: PointRegistry, ts_ms: int) -> bytes:
    """Devices and their points, without personal points (and without devices that have nothing else)."""
    devices: dict[str, Any] = {}
    for device in registry.devices():
        points: dict[str, Any] = {}
        for point_id in registry.points_of(device):
            info = registry[point_id]
            if info.personal:
                continue
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
        if points:
            devices[device] = {"points": points}
    doc = {"v": CONTRACT_VERSION, "site": site, "gateway": gateway, "name": name, "ts": ts_ms, "devices": devices}
    return orjson.dumps(doc)


def telemetry_messages(
    base: str, rows: list[TelemetryBatch], *, historical: bool, shared: PlatformPoints
) -> Iterator[tuple[str, bytes]]:
    """One message per (stored batch, device, read time): ``seq`` is the stored batch's, so a resend is
    recognisable; ``(seq, ts)`` identifies a message on its device topic. Only points in ``shared`` are sent (values
    and quality alike); a device whose read held nothing else gets no message."""
    known = shared.names
    good = Quality.GOOD
    for row in rows:
        groups: dict[tuple[str, int], tuple[dict[str, Any], dict[str, str]]] = {}
        # the group the last sample went to (see telemetry_messages_v2): most samples skip the lookup
        last_device, last_ts = "", -1
        values: dict[str, Any] = {}
        qualities: dict[str, str] = {}
        for point, value, ts, quality, _reason in row.samples:
            names = known.get(point) or shared.resolve(point)
            if not names:
                continue
            device, name = names
            if ts != last_ts or device != last_device or name in values or (qualities and name in qualities):
                key = (device, ts)
                group = groups.get(key)
                if group is None or name in group[0] or name in group[1]:
                    if group is not None:  # the same point twice at one ts in one batch: keep both, in order
                        yield _telemetry(base, row.seq, key, group, historical)
                    group = groups[key] = ({}, {})
                values, qualities = group
                last_device, last_ts = device, ts
            if quality is good:
                values[name] = value
                continue
            if quality is not Quality.BAD:
                values[name] = value
            qualities[name] = _QUALITY_NAMES[quality]
        for key, group in groups.items():
            yield _telemetry(base, row.seq, key, group, historical)


def telemetry_messages_v2(
    base: str, rows: list[TelemetryBatch], *, historical: bool, shared: PlatformPoints
) -> Iterator[tuple[str, bytes]]:
    """Telemetry v2: one message per (stored batch, device), so a device read in two requests in one poll costs one
    message, not two. Each read keeps its own time: ``reads`` is a list of v1 bodies without ``v`` and ``seq``
    (``ts``, ``values``, ``quality``), in the order read. ``seq`` alone identifies a message on its device topic; a
    resend repeats it. The same point twice at one time in one batch starts a second read, as v1 sent a second
    message. Only points in ``shared`` are sent; a device whose batch held nothing else gets no message."""
    known = shared.names
    good = Quality.GOOD
    for row in rows:
        # device -> (its reads in order, ts -> the read still open for that time)
        devices: dict[str, tuple[list[tuple[int, dict[str, Any], dict[str, str], dict[str, str]]], dict[int, int]]] = {}
        # the read the last sample went to: a poll batch is one device's reads, sample after sample of one time,
        # so almost every sample takes this path (about half the cost of looking its read up)
        last_device, last_ts = "", -1
        values: dict[str, Any] = {}
        qualities: dict[str, str] = {}
        reasons: dict[str, str] = {}
        for point, value, ts, quality, reason in row.samples:
            names = known.get(point) or shared.resolve(point)
            if not names:
                continue
            device, name = names
            if ts != last_ts or device != last_device or name in values or (qualities and name in qualities):
                entry = devices.get(device)
                if entry is None:
                    entry = devices[device] = ([], {})
                reads, open_at = entry
                index = open_at.get(ts)
                if index is None or name in reads[index][1] or name in reads[index][2]:
                    index = open_at[ts] = len(reads)
                    reads.append((ts, {}, {}, {}))
                _ts, values, qualities, reasons = reads[index]
                last_device, last_ts = device, ts
            if quality is good:
                values[name] = value
                continue
            if quality is not Quality.BAD:
                values[name] = value
            qualities[name] = _QUALITY_NAMES[quality]
            if reason is not None:
                reasons[name] = reason
        for device, (reads, _open) in devices.items():
            docs: list[dict[str, Any]] = []
            for ts, values, qualities, reasons in reads:
                read: dict[str, Any] = {"ts": ts // 1_000_000, "values": values}
                if qualities:
                    read["quality"] = qualities
                if reasons:
                    read["reason"] = reasons
                docs.append(read)
            doc: dict[str, Any] = {"v": 2, "seq": row.seq, "reads": docs}
            if historical:
                doc["historical"] = True
            yield f"{base}/telemetry/{device}", orjson.dumps(doc)


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


#: event types whose newest message a late subscriber must still get: the incentive chain-head checkpoint (a platform
#: that subscribes after an outage compares it with the records it holds and sees a missing tail)
RETAINED_EVENT_TYPES = frozenset({"incentive_checkpoint"})


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
