"""Payload decoders: the bytes of one MQTT message in, samples of one device's points out.

Owns: ``MalformedPayload`` (the only exception a decoder raises), ``DeviceBinding`` (one device's compiled points as
seen through one subscription), the value converters per point kind, the payload-timestamp rules, and one decoder
per payload family: ``plain``, ``json``, ``zigbee2mqtt``, ``tasmota``, ``shelly_gen2`` and ``senml``.

Imports no protocol library and nothing of the runtime beyond ``gateway.model`` and the driver's config models.

Hot-path rules (tens of thousands of messages a second): a decoder appends straight into the caller's batch list
(no per-message result list), field paths are pre-split into key tuples at start-up, converters are closures chosen
once per point, and ``Sample`` tuples are built with ``tuple.__new__`` (skipping the NamedTuple's Python-level
``__new__``). A message either yields all its configured fields or none: on a malformed field the samples already
appended for that message are removed again, so a half-decoded message never reaches the bus.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Final
from zoneinfo import ZoneInfo

import orjson

from drivers.mqtt.config import (
    DecoderConfig,
    JsonDecoderConfig,
    MqttDeviceConfig,
    MqttPointSpec,
    MqttSubscription,
    PlainDecoderConfig,
    SenmlDecoderConfig,
    ShellyGen2DecoderConfig,
    TasmotaDecoderConfig,
    TimestampSpec,
    TtsV3DecoderConfig,
    Zigbee2MqttDecoderConfig,
    default_path,
)
from drivers.mqtt.units import UNITS, Conversion, UnitMismatch, canonical_unit, conversion
from gateway.model import Quality, Sample, Value

log = logging.getLogger("drivers.mqtt")

_MISSING: Final = object()
_GOOD: Final = Quality.GOOD
_new_tuple = tuple.__new__
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
#: a payload time before 2001 is a device that never synchronised its clock (Tasmota without NTP says 1970)
_MIN_PLAUSIBLE_NS: Final = 978_307_200 * 10**9
#: a payload time more than a day ahead of the gateway's clock is not believed either
_MAX_AHEAD_NS: Final = 86_400 * 10**9
#: SenML: times below 2**28 seconds are relative to now (RFC 8428, section 4.5.3)
_SENML_RELATIVE_LIMIT: Final = 2**28
_TRUE_WORDS: Final = frozenset({"on", "true", "1", "open", "yes"})
_FALSE_WORDS: Final = frozenset({"off", "false", "0", "closed", "no"})


class MalformedPayload(ValueError):
    """A message that cannot be decoded. ``reason`` is a short counter label: ``json``, ``encoding``, ``shape``,
    ``type``, ``timestamp`` or ``oversize``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _kind_of(raw: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(raw), "a number"
    )


# --- value converters ----------------------------------------------------------------------------------------

Converter = Callable[[Any], Value]


def make_converter(spec: MqttPointSpec) -> Converter:
    """The function turning one decoded JSON value into the point's value (raises MalformedPayload)."""
    if spec.kind == "float":
        scale, offset = spec.scale, spec.offset
        identity = scale == 1.0 and offset == 0.0

        def to_float(raw: Any) -> Value:
            kind = type(raw)
            if kind is float or kind is int:
                return float(raw) if identity else raw * scale + offset
            raise MalformedPayload("type", f"expected a number, got {_kind_of(raw)}")

        return to_float
    if spec.kind == "int":

        def to_int(raw: Any) -> Value:
            kind = type(raw)
            if kind is int:
                return int(raw)
            if kind is float and raw.is_integer():
                return int(raw)
            raise MalformedPayload("type", f"expected an integer, got {_kind_of(raw)} {str(raw)[:20]!r}")

        return to_int
    if spec.kind == "bool":

        def to_bool(raw: Any) -> Value:
            kind = type(raw)
            if kind is bool:
                return bool(raw)
            if kind is str or kind is int:
                word = str(raw).lower()
                if word in _TRUE_WORDS:
                    return True
                if word in _FALSE_WORDS:
                    return False
            raise MalformedPayload("type", f"expected a boolean (true/false, ON/OFF), got {str(raw)[:20]!r}")

        return to_bool

    def to_str(raw: Any) -> Value:
        kind = type(raw)
        if kind is str:
            return str(raw)
        if kind is int or kind is float:
            return str(raw)
        raise MalformedPayload("type", f"expected a string, got {_kind_of(raw)}")

    return to_str


def make_text_parser(spec: MqttPointSpec) -> Converter:
    """The function turning a plain-text payload (``23.5``, ``ON``) into the point's value."""
    convert = make_converter(spec)
    if spec.kind == "float":

        def parse_float(text: str) -> Value:
            try:
                number = float(text)
            except ValueError:
                raise MalformedPayload("type", f"expected a number, got {text[:20]!r}") from None
            if not math.isfinite(number):
                raise MalformedPayload("type", f"expected a finite number, got {text[:20]!r}")
            return convert(number)

        return parse_float
    if spec.kind == "int":

        def parse_int(text: str) -> Value:
            try:
                return int(text)
            except ValueError:
                raise MalformedPayload("type", f"expected an integer, got {text[:20]!r}") from None

        return parse_int
    return convert  # bool words and strings are handled by the JSON converter as they are


# --- bindings -----------------------------------------------------------------------------------------------------

#: units a format documents for a field without saying them in the payload, by the field's last path keys. Only
#: dimensions of the conversion table are listed, so a point written in another spelling (``volt``) is not refused.
_IMPLIED_UNITS: Final[dict[str, dict[tuple[str | int, ...], str]]] = {
    # https://tasmota.github.io/docs/Power-Monitoring-Calibration/ : ENERGY totals in kWh, powers in W
    "tasmota": {
        ("ENERGY", "Total"): "kWh",
        ("ENERGY", "Today"): "kWh",
        ("ENERGY", "Yesterday"): "kWh",
        ("ENERGY", "Power"): "W",
    },
    # https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Switch#status : apower W, aenergy.total Wh,
    # temperature.tC/tF; EM/EMData (act_power W, total_act_energy Wh)
    "shelly_gen2": {
        ("apower",): "W",
        ("aenergy", "total"): "Wh",
        ("ret_aenergy", "total"): "Wh",
        ("act_power",): "W",
        ("total_act_power",): "W",
        ("total_act_energy",): "Wh",
        ("total_act_ret_energy",): "Wh",
        ("tC",): "°C",
        ("tF",): "°F",
    },
}
#: Tasmota states the unit of its temperature and pressure readings once per message
_TASMOTA_UNIT_KEYS: Final = {"temperature": "TempUnit", "pressure": "PressureUnit"}
#: distinct undeclared fields remembered per binding (each counted once); past this, no more are counted
_UNDECLARED_LIMIT: Final = 64
_REFUSED: Final = object()
#: The Things Stack radio figures a point may read (``$.@rssi``): computed from ``rx_metadata``, optional
RADIO_FIELDS: Final = ("@rssi", "@snr")


def _implied_unit(decoder_type: str, keys: tuple[str | int, ...]) -> str | None:
    for suffix, unit in _IMPLIED_UNITS.get(decoder_type, {}).items():
        if keys[-len(suffix) :] == suffix:
            return unit
    return None


class BoundPoint:
    """One point compiled for one subscription's decoder."""

    __slots__ = (
        "_conversions",
        "checked",
        "convert",
        "dimension",
        "keys",
        "kind",
        "max",
        "min",
        "name",
        "parse_text",
        "payload_unit",
        "point_id",
        "record",
        "unit",
        "unit_aware",
    )

    def __init__(self, device: str, name: str, spec: MqttPointSpec, decoder_type: str) -> None:
        self.point_id = f"{device}.{name}"
        self.name = name
        self.kind = spec.kind
        path = spec.path or default_path(decoder_type, name)
        #: JSON path keys: ``$.ENERGY.Total`` -> ("ENERGY", "Total"); ``$.rxInfo.0.rssi`` -> ("rxInfo", 0, "rssi")
        self.keys = split_path(path) if path.startswith("$") else ()
        #: the SenML record name or the ``{field}`` topic level; ``$`` for the whole plain payload
        self.record = path
        self.convert = make_converter(spec)
        self.parse_text = make_text_parser(spec)
        self.unit = canonical_unit(spec.unit) if spec.unit else None
        known = UNITS.get(self.unit) if self.unit is not None else None
        self.dimension = known.dimension if known is not None else None
        # scale/offset are the operator's own conversion of the raw value: a payload unit is not applied on top
        self.unit_aware = self.unit is not None and spec.scale == 1.0 and spec.offset == 0.0
        #: the unit the format sends this field in without saying so (configured, or documented by the format)
        implied = spec.payload_unit or (_implied_unit(decoder_type, self.keys) if self.dimension else None)
        self.payload_unit = canonical_unit(implied) if implied else None
        numeric = spec.kind in ("float", "int")
        self.min = spec.min if numeric else None
        self.max = spec.max if numeric else None
        #: whether ``finish`` has anything to do (kept False on the common path: one attribute test per value)
        self.checked = self.unit_aware or self.min is not None or self.max is not None
        self._conversions: dict[str, Conversion] = {}

    def in_unit(self, value: Value, payload_unit: object) -> Value:
        """``value`` (in ``payload_unit``) in the point's unit; raises UnitMismatch when it cannot be."""
        if type(payload_unit) is not str:
            raise UnitMismatch(f"the payload's unit is {_kind_of(payload_unit)}, not text")
        convert = self._conversions.get(payload_unit)
        if convert is None:
            assert self.unit is not None  # only called for unit-aware points
            convert = conversion(canonical_unit(payload_unit), self.unit)
            if len(self._conversions) < 16:  # a payload cycling through unit spellings cannot grow memory
                self._conversions[payload_unit] = convert
        if self.kind == "float":
            return convert(float(value))
        if canonical_unit(payload_unit) == self.unit:
            return value
        raise UnitMismatch(f"{payload_unit!r} would need converting to {self.unit!r} but the point is {self.kind}")

    def finish(self, value: Value, payload_unit: object, binding: DeviceBinding) -> Any:
        """The value to publish, after unit conversion and range check, or ``_REFUSED`` (noted on the binding)."""
        if self.unit_aware:
            # an empty unit (SenML ``"u": ""``) states nothing, like an absent one
            stated = payload_unit is not None and not (type(payload_unit) is str and not payload_unit.strip())
            unit = payload_unit if stated else self.payload_unit
            if unit is not None:
                try:
                    value = self.in_unit(value, unit)
                except UnitMismatch as exc:
                    binding.refusals.append((self.point_id, "unit", str(exc)))
                    return _REFUSED
        if not isinstance(value, str) and (
            (self.min is not None and value < self.min) or (self.max is not None and value > self.max)
        ):
            binding.refusals.append((self.point_id, "range", f"{value!r} is outside [{self.min}, {self.max}]"))
            return _REFUSED
        return value


@dataclass(slots=True)
class DeviceCounters:
    """What happened to one device's messages, over all its subscriptions: read by status(), /metrics, /api."""

    device: str
    #: messages routed to the device (data messages, not availability)
    messages: int = 0
    #: messages dropped whole or yielding nothing but refusals: not a successful poll
    rejected: int = 0
    last_ok_ns: int = 0
    #: messages that could not be decoded, by reason (json, encoding, shape, timestamp, oversize, internal)
    malformed: dict[str, int] = field(default_factory=dict)
    #: values refused: ``unit`` and ``range`` count samples, ``type`` counts messages (a wrong type drops all of it)
    refused: dict[str, int] = field(default_factory=dict)
    #: availability messages saying the device went offline
    unavailable: int = 0
    #: distinct payload fields no point declares (each counted once, then ignored)
    undeclared: int = 0
    #: what the last availability message said (None: no availability configured or nothing heard yet)
    available: bool | None = None
    availability_topic: str | None = None

    @property
    def accepted(self) -> int:
        return self.messages - self.rejected

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "rejected": self.rejected,
            "malformed": sum(self.malformed.values()),
            "malformed_by_reason": dict(self.malformed),
            "refused": sum(self.refused.values()),
            "refused_by_reason": dict(self.refused),
            "unavailable": self.unavailable,
            "undeclared": self.undeclared,
        }


class DeviceBinding:
    """A device as one subscription sees it: its compiled points, and what has been reported about it."""

    __slots__ = (
        "absent",
        "by_record",
        "counters",
        "declared",
        "device",
        "last_message_ns",
        "messages",
        "points",
        "radio",
        "refusals",
        "root",
        "subscription",
        "undeclared",
    )

    def __init__(
        self, device: MqttDeviceConfig, subscription: MqttSubscription, counters: DeviceCounters | None = None
    ) -> None:
        self.device = device.id
        self.subscription = subscription.id
        self.points = tuple(
            BoundPoint(device.id, name, spec, subscription.decoder.type)
            for name, spec in device.points.items()
            if spec.subscription in (None, subscription.id)
        )
        self.by_record = {p.record: p for p in self.points}
        self.root = self.by_record.get("$")
        #: names of points already reported absent (each is reported once)
        self.absent: set[str] = set()
        self.messages = 0
        self.last_message_ns = 0
        self.counters = counters if counters is not None else DeviceCounters(device.id)
        #: (point id, reason, detail) of the values refused in the message being decoded; the router counts them
        self.refusals: list[tuple[str, str, str]] = []
        #: top-level fields (or SenML record names) the points read; the rest of a payload is undeclared
        self.declared: frozenset[str] = frozenset(
            {str(p.keys[0]) for p in self.points if p.keys} | {p.record for p in self.points if not p.keys}
        )
        self.undeclared: set[str] = set()
        #: points reading The Things Stack's best RSSI/SNR: optional, so never reported absent
        self.radio = frozenset(p.name for p in self.points if p.keys and p.keys[0] in RADIO_FIELDS)
        self.absent.update(self.radio)

    def note_absent(self, point: BoundPoint) -> None:
        if point.name not in self.absent:
            self.absent.add(point.name)
            log.warning(
                "mqtt: %s has no field %s in messages of subscription %s (reported once)",
                point.point_id,
                point.record,
                self.subscription,
            )

    def note_fields(self, fields: Iterable[str], ignore: frozenset[str]) -> None:
        """Count (once each) the fields of a payload that no point declares; they are ignored, never an error."""
        if len(self.undeclared) >= _UNDECLARED_LIMIT:
            return
        for name in fields:
            if name not in self.declared and name not in ignore and name not in self.undeclared:
                self.undeclared.add(name)
                self.counters.undeclared += 1
                log.info(
                    "mqtt: %s sends field %r that no point declares (ignored; reported once)",
                    self.device,
                    name[:80],
                )
                if len(self.undeclared) >= _UNDECLARED_LIMIT:
                    return


# --- timestamps ---------------------------------------------------------------------------------------------------


def _plausible(ts_ns: int, received_ns: int) -> int:
    if _MIN_PLAUSIBLE_NS <= ts_ns <= received_ns + _MAX_AHEAD_NS:
        return ts_ns
    return received_ns


def iso_to_ns(text: Any, zone: tzinfo) -> int:
    if type(text) is not str or len(text) > 64:
        raise MalformedPayload("timestamp", f"expected an ISO 8601 time, got {_kind_of(text)}")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise MalformedPayload("timestamp", f"not an ISO 8601 time: {text[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return ((moment - _EPOCH) // _MICROSECOND) * 1000


def seconds_to_ns(raw: Any, unit_ns: int) -> int:
    kind = type(raw)
    if kind is int:
        return int(raw) * unit_ns
    if kind is float and math.isfinite(raw) and abs(raw) < 1e19:
        return int(raw * unit_ns)
    raise MalformedPayload("timestamp", f"expected a number for the time, got {_kind_of(raw)}")


def split_path(path: str) -> tuple[str | int, ...]:
    """``$.a.b`` -> ("a", "b"); an all-digit key also indexes an array (``$.rxInfo.0.rssi``)."""
    return tuple(int(key) if key.isdigit() else key for key in path.split(".")[1:])


def _lookup(doc: Any, keys: tuple[str | int, ...]) -> Any:
    node = doc
    for key in keys:
        kind = type(node)
        if kind is dict:
            node = node.get(str(key) if type(key) is int else key, _MISSING)
            if node is _MISSING:
                return _MISSING
        elif kind is list and type(key) is int and key < len(node):
            node = node[key]
        else:
            return _MISSING
    return node


def _load_json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        reason = "encoding" if "utf-8" in str(exc).lower() else "json"
        raise MalformedPayload(reason, str(exc)[:120]) from None


# --- decoders -----------------------------------------------------------------------------------------------------


class Decoder:
    """Base of the JSON-document decoders. ``decode`` appends the binding's samples to ``out``."""

    name = "json"
    #: partial-update formats (Shelly notifications) omit unchanged fields by design: no absent report
    report_absent = True
    #: top-level fields that are the format's own, not values (never counted as undeclared)
    meta_fields: frozenset[str] = frozenset()

    def decode(
        self, payload: bytes, binding: DeviceBinding, field: str | None, received_ns: int, out: list[Sample]
    ) -> None:
        doc = _load_json(payload)
        if type(doc) is not dict:
            raise MalformedPayload("shape", f"expected a JSON object, got {_kind_of(doc)}")
        self.emit(doc, binding, self.timestamp(doc, received_ns), out)

    def timestamp(self, doc: dict[str, Any], received_ns: int) -> int:
        return received_ns

    def unit_of(self, doc: Any, point: BoundPoint) -> object:
        """The unit the payload states for ``point``'s value, or None when it says nothing."""
        return None

    def emit(self, doc: Any, binding: DeviceBinding, ts: int, out: list[Sample]) -> None:
        mark = len(out)
        try:
            for point in binding.points:
                raw = _lookup(doc, point.keys)
                if raw is _MISSING:
                    if self.report_absent and point.name not in binding.absent:
                        binding.note_absent(point)
                    continue
                if raw is None:  # Zigbee2MQTT and others send null for "not known yet": not an error
                    continue
                value = point.convert(raw)
                if point.checked:
                    value = point.finish(value, self.unit_of(doc, point), binding)
                    if value is _REFUSED:
                        continue
                out.append(_new_tuple(Sample, (point.point_id, value, ts, _GOOD, None)))
        except MalformedPayload:
            del out[mark:]
            binding.refusals.clear()
            raise
        # undeclared fields: every one of a device's first 16 messages, then one in 64 (a payload's shape rarely
        # changes; scanning every message cost about 0.4 us of the 4-5 us a message takes)
        count = binding.messages
        if type(doc) is dict and (count < 16 or not count & 63) and not binding.declared.issuperset(doc):
            binding.note_fields(doc, self.meta_fields)


class JsonDecoder(Decoder):
    def __init__(self, config: JsonDecoderConfig) -> None:
        self._stamp: TimestampSpec | None = config.timestamp
        if config.timestamp is not None:
            self._ts_keys = split_path(config.timestamp.path)
            self._zone = ZoneInfo(config.timestamp.timezone)
            self._unit = {"unix_s": 10**9, "unix_ms": 10**6, "unix_ns": 1}.get(config.timestamp.format, 0)
            self.meta_fields = frozenset({str(self._ts_keys[0])})

    def decode(
        self, payload: bytes, binding: DeviceBinding, field: str | None, received_ns: int, out: list[Sample]
    ) -> None:
        doc = _load_json(payload)
        if type(doc) is not dict:
            if binding.root is None:
                raise MalformedPayload("shape", f"expected a JSON object, got {_kind_of(doc)}")
            self.emit(doc, binding, received_ns, out)  # ``path: $`` reads a bare JSON value
            return
        self.emit(doc, binding, self.timestamp(doc, received_ns), out)

    def timestamp(self, doc: dict[str, Any], received_ns: int) -> int:
        if self._stamp is None:
            return received_ns
        raw = _lookup(doc, self._ts_keys)
        if raw is _MISSING or raw is None:
            return received_ns
        ts = iso_to_ns(raw, self._zone) if self._unit == 0 else seconds_to_ns(raw, self._unit)
        return _plausible(ts, received_ns)


class Zigbee2MqttDecoder(Decoder):
    """``{"temperature": 21.5, "humidity": 48, "battery": 97, "linkquality": 120, "last_seen": ...}``

    ``last_seen`` is present when Zigbee2MQTT's ``advanced.last_seen`` is set: ISO 8601 (``ISO_8601``,
    ``ISO_8601_local``) or milliseconds since the epoch (``epoch``).
    """

    name = "zigbee2mqtt"
    meta_fields = frozenset({"last_seen"})

    def timestamp(self, doc: dict[str, Any], received_ns: int) -> int:
        raw = doc.get("last_seen")
        if raw is None:
            return received_ns
        ts = iso_to_ns(raw, UTC) if type(raw) is str else seconds_to_ns(raw, 10**6)
        return _plausible(ts, received_ns)


class TasmotaDecoder(Decoder):
    """``tele/<topic>/SENSOR`` ``{"Time": "2024-01-05T10:00:00", "ENERGY": {"Total": 12.3, ...}}`` and
    ``tele/<topic>/STATE`` ``{"Time": ..., "POWER": "ON", ...}``. ``Time`` is local time without an offset.

    Units: ``TempUnit`` (``C``/``F``) and ``PressureUnit`` (``hPa``/``mmHg``) say the unit of every temperature
    and pressure reading of the message; ENERGY totals are kWh and powers W (documented, not stated)."""

    name = "tasmota"
    meta_fields = frozenset({"Time", "TempUnit", "PressureUnit", "SpeedUnit"})

    def __init__(self, config: TasmotaDecoderConfig) -> None:
        self._zone = ZoneInfo(config.timezone)

    def timestamp(self, doc: dict[str, Any], received_ns: int) -> int:
        raw = doc.get("Time")
        if raw is None:
            return received_ns
        return _plausible(iso_to_ns(raw, self._zone), received_ns)

    def unit_of(self, doc: Any, point: BoundPoint) -> object:
        key = _TASMOTA_UNIT_KEYS.get(point.dimension or "")
        return doc.get(key) if key is not None and type(doc) is dict else None


class ShellyGen2Decoder(Decoder):
    """``{"src": "shellyplus1pm-...", "method": "NotifyStatus", "params": {"ts": 1631266595.43,
    "switch:0": {"apower": 12.3}}}``. Other methods (``NotifyEvent``) carry no status and are skipped.

    With a ``{field}`` level in the template (``<id>/status/{field}``, Shelly's per-component status topics), the
    payload is that component's status object: the point paths stay the same (``$.switch:0.apower``), so a device
    can move between the two topic styles without editing its points."""

    name = "shelly_gen2"
    report_absent = False
    meta_fields = frozenset({"ts"})
    _STATUS_METHODS: Final = frozenset({"NotifyStatus", "NotifyFullStatus"})

    def decode(
        self, payload: bytes, binding: DeviceBinding, field: str | None, received_ns: int, out: list[Sample]
    ) -> None:
        doc = _load_json(payload)
        if field is not None:
            if type(doc) is not dict:
                raise MalformedPayload("shape", f"a component status must be an object, got {_kind_of(doc)}")
            self.emit({field: doc}, binding, received_ns, out)
            return
        if type(doc) is not dict:
            raise MalformedPayload("shape", f"expected a JSON-RPC object, got {_kind_of(doc)}")
        if doc.get("method") not in self._STATUS_METHODS:
            return
        params = doc.get("params")
        if type(params) is not dict:
            raise MalformedPayload("shape", f"NotifyStatus params must be an object, got {_kind_of(params)}")
        raw_ts = params.get("ts")
        ts = received_ns if raw_ts is None else _plausible(seconds_to_ns(raw_ts, 10**9), received_ns)
        self.emit(params, binding, ts, out)


class TtsV3Decoder(Decoder):
    """The Things Stack v3 uplink (``v3/<app>@<tenant>/devices/<device id>/up``): ``{"end_device_ids":
    {"device_id": ...}, "received_at": "...Z", "uplink_message": {"decoded_payload": {...}, "rx_metadata":
    [{"rssi": -42, "snr": 9.5}, ...]}}``. Paths are relative to ``decoded_payload``; ``$.@rssi`` and ``$.@snr``
    are the best RSSI and SNR among the gateways that received the uplink (optional: never reported absent).
    Time is ``received_at`` (the network server's receive time). A message without ``uplink_message`` (join
    accepts, downlink events on the same filter) carries no readings and is skipped."""

    name = "tts_v3"
    meta_fields = frozenset(RADIO_FIELDS)

    def decode(
        self, payload: bytes, binding: DeviceBinding, field: str | None, received_ns: int, out: list[Sample]
    ) -> None:
        doc = _load_json(payload)
        if type(doc) is not dict:
            raise MalformedPayload("shape", f"expected a JSON object, got {_kind_of(doc)}")
        uplink = doc.get("uplink_message")
        if uplink is None:
            return
        if type(uplink) is not dict:
            raise MalformedPayload("shape", f"uplink_message must be an object, got {_kind_of(uplink)}")
        decoded = uplink.get("decoded_payload", {})
        if type(decoded) is not dict:
            raise MalformedPayload("shape", f"decoded_payload must be an object, got {_kind_of(decoded)}")
        raw_ts = doc.get("received_at")
        ts = received_ns if raw_ts is None else _plausible(iso_to_ns(_trim_fraction(raw_ts), UTC), received_ns)
        view = decoded
        if binding.radio:
            view = {**decoded, **_best_radio(uplink.get("rx_metadata"))}
        self.emit(view, binding, ts, out)


def _trim_fraction(text: Any) -> Any:
    """``2020-09-01T12:34:56.123456789Z`` -> six fraction digits: Go writes nanoseconds, Python 3.11 reads micro."""
    if type(text) is not str or "." not in text:
        return text
    head, _, tail = text.partition(".")
    digits = len(tail) - len(tail.lstrip("0123456789"))
    return f"{head}.{tail[: min(digits, 6)]}{tail[digits:]}"


def _best_radio(metadata: Any) -> dict[str, Any]:
    """The strongest RSSI and SNR among the receiving gateways (each optional: absent when no gateway gave it)."""
    best: dict[str, Any] = {}
    if type(metadata) is not list:
        return best
    for gateway in metadata:
        if type(gateway) is not dict:
            continue
        for key, name in (("rssi", "@rssi"), ("snr", "@snr")):
            raw = gateway.get(key)
            if (type(raw) is int or type(raw) is float) and (name not in best or raw > best[name]):
                best[name] = raw
    return best


class PlainDecoder:
    """The payload is one value as UTF-8 text; its point is ``path: $`` or the topic's ``{field}`` level."""

    name = "plain"

    def decode(
        self, payload: bytes, binding: DeviceBinding, field: str | None, received_ns: int, out: list[Sample]
    ) -> None:
        point = binding.root if field is None else binding.by_record.get(field)
        if point is None:
            return  # a topic level no point asked for: unknown fields are ignored
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise MalformedPayload("encoding", f"not UTF-8 text ({exc.reason})") from None
        value = point.parse_text(text)
        if point.checked:
            value = point.finish(value, None, binding)
            if value is _REFUSED:
                return
        out.append(_new_tuple(Sample, (point.point_id, value, received_ns, _GOOD, None)))


class SenmlDecoder:
    """SenML JSON pack (RFC 8428): ``[{"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e+09, "bu": "%RH",
    "v": 20}, {"u": "lon", "v": 24.30621}, ...]``. Base fields carry over to the following records; a point's
    path is matched against the resolved name (base name + name) first, then the record's own name. A record's
    unit (``u``, else the base unit ``bu``) is converted to the point's unit. A base field of the wrong type is
    an error only for the records that use it: records no point declares are ignored whatever they hold."""

    name = "senml"

    def decode(
        self, payload: bytes, binding: DeviceBinding, field: str | None, received_ns: int, out: list[Sample]
    ) -> None:
        pack = _load_json(payload)
        if type(pack) is not list:
            raise MalformedPayload("shape", f"a SenML pack is a JSON array of records, got {_kind_of(pack)}")
        mark = len(out)
        base_name: Any = ""
        base_time: Any = 0.0
        base_value: Any = 0.0
        base_sum: Any = 0.0
        base_unit: Any = None
        seen: set[str] = set()
        by_record = binding.by_record
        try:
            for record in pack:
                if type(record) is not dict:
                    raise MalformedPayload("shape", f"a SenML record is an object, got {_kind_of(record)}")
                if "bn" in record:
                    base_name = record["bn"]
                if "bt" in record:
                    base_time = record["bt"]
                if "bv" in record:
                    base_value = record["bv"]
                if "bs" in record:
                    base_sum = record["bs"]
                if "bu" in record:
                    base_unit = record["bu"]
                name = record.get("n", "")
                if type(name) is not str:
                    continue  # a record no point can declare
                full = _senml_str(base_name, "bn") + name if base_name else name
                point = by_record.get(full) or by_record.get(name)
                if point is None:
                    if full not in binding.undeclared:
                        binding.note_fields((full,), frozenset())
                    continue
                seen.add(point.name)
                value = point.convert(
                    _senml_value(record, _senml_number(base_value, "bv"), _senml_number(base_sum, "bs"))
                )
                when = _senml_number(base_time, "bt") + _senml_number(record.get("t", 0), "t")
                if abs(when) < _SENML_RELATIVE_LIMIT:
                    ts = received_ns + int(when * 1e9)
                else:
                    ts = _plausible(seconds_to_ns(when, 10**9), received_ns)
                if point.checked:
                    value = point.finish(value, record.get("u", base_unit), binding)
                    if value is _REFUSED:
                        continue
                out.append(_new_tuple(Sample, (point.point_id, value, ts, _GOOD, None)))
        except MalformedPayload:
            del out[mark:]
            binding.refusals.clear()
            raise
        if len(seen) < len(binding.points):
            for point in binding.points:
                if point.name not in seen and point.name not in binding.absent:
                    binding.note_absent(point)


def _senml_str(raw: Any, key: str) -> str:
    if type(raw) is not str:
        raise MalformedPayload("type", f"SenML {key} must be a string, got {_kind_of(raw)}")
    return str(raw)


def _senml_number(raw: Any, key: str) -> float:
    kind = type(raw)
    if kind is int or kind is float:
        return float(raw)
    raise MalformedPayload("type", f"SenML {key} must be a number, got {_kind_of(raw)}")


def _senml_value(record: dict[str, Any], base_value: float, base_sum: float) -> Any:
    if "v" in record:
        return base_value + _senml_number(record["v"], "v")
    for key in ("vb", "vs", "vd"):
        if key in record:
            return record[key]
    if "s" in record:
        return base_sum + _senml_number(record["s"], "s")
    raise MalformedPayload("shape", "SenML record has no value (v, vs, vb, vd or s)")


PayloadDecoder = Decoder | PlainDecoder | SenmlDecoder


def make_decoder(config: DecoderConfig) -> PayloadDecoder:
    if isinstance(config, PlainDecoderConfig):
        return PlainDecoder()
    if isinstance(config, JsonDecoderConfig):
        return JsonDecoder(config)
    if isinstance(config, Zigbee2MqttDecoderConfig):
        return Zigbee2MqttDecoder()
    if isinstance(config, TasmotaDecoderConfig):
        return TasmotaDecoder(config)
    if isinstance(config, ShellyGen2DecoderConfig):
        return ShellyGen2Decoder()
    if isinstance(config, SenmlDecoderConfig):
        return SenmlDecoder()
    if isinstance(config, TtsV3DecoderConfig):
        return TtsV3Decoder()
    raise AssertionError(f"no decoder for {config!r}")
