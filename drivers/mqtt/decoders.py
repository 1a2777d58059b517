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
from collections.abc import Callable
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
    Zigbee2MqttDecoderConfig,
    default_path,
)
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


class BoundPoint:
    """One point compiled for one subscription's decoder."""

    __slots__ = ("convert", "keys", "name", "parse_text", "point_id", "record")

    def __init__(self, device: str, name: str, spec: MqttPointSpec, decoder_type: str) -> None:
        self.point_id = f"{device}.{name}"
        self.name = name
        path = spec.path or default_path(decoder_type, name)
        #: JSON path keys: ``$.ENERGY.Total`` -> ("ENERGY", "Total"); ``$.rxInfo.0.rssi`` -> ("rxInfo", 0, "rssi")
        self.keys = split_path(path) if path.startswith("$") else ()
        #: the SenML record name or the ``{field}`` topic level; ``$`` for the whole plain payload
        self.record = path
        self.convert = make_converter(spec)
        self.parse_text = make_text_parser(spec)


class DeviceBinding:
    """A device as one subscription sees it: its compiled points, and what has been reported about it."""

    __slots__ = ("absent", "by_record", "device", "last_message_ns", "messages", "points", "root", "subscription")

    def __init__(self, device: MqttDeviceConfig, subscription: MqttSubscription) -> None:
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

    def note_absent(self, point: BoundPoint) -> None:
        if point.name not in self.absent:
            self.absent.add(point.name)
            log.warning(
                "mqtt: %s has no field %s in messages of subscription %s (reported once)",
                point.point_id,
                point.record,
                self.subscription,
            )


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

    def decode(
        self, payload: bytes, binding: DeviceBinding, field: str | None, received_ns: int, out: list[Sample]
    ) -> None:
        doc = _load_json(payload)
        if type(doc) is not dict:
            raise MalformedPayload("shape", f"expected a JSON object, got {_kind_of(doc)}")
        self.emit(doc, binding, self.timestamp(doc, received_ns), out)

    def timestamp(self, doc: dict[str, Any], received_ns: int) -> int:
        return received_ns

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
                out.append(_new_tuple(Sample, (point.point_id, point.convert(raw), ts, _GOOD)))
        except MalformedPayload:
            del out[mark:]
            raise


class JsonDecoder(Decoder):
    def __init__(self, config: JsonDecoderConfig) -> None:
        self._stamp: TimestampSpec | None = config.timestamp
        if config.timestamp is not None:
            self._ts_keys = split_path(config.timestamp.path)
            self._zone = ZoneInfo(config.timestamp.timezone)
            self._unit = {"unix_s": 10**9, "unix_ms": 10**6, "unix_ns": 1}.get(config.timestamp.format, 0)

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

    def timestamp(self, doc: dict[str, Any], received_ns: int) -> int:
        raw = doc.get("last_seen")
        if raw is None:
            return received_ns
        ts = iso_to_ns(raw, UTC) if type(raw) is str else seconds_to_ns(raw, 10**6)
        return _plausible(ts, received_ns)


class TasmotaDecoder(Decoder):
    """``tele/<topic>/SENSOR`` ``{"Time": "2024-01-05T10:00:00", "ENERGY": {"Total": 12.3, ...}}`` and
    ``tele/<topic>/STATE`` ``{"Time": ..., "POWER": "ON", ...}``. ``Time`` is local time without an offset."""

    name = "tasmota"

    def __init__(self, config: TasmotaDecoderConfig) -> None:
        self._zone = ZoneInfo(config.timezone)

    def timestamp(self, doc: dict[str, Any], received_ns: int) -> int:
        raw = doc.get("Time")
        if raw is None:
            return received_ns
        return _plausible(iso_to_ns(raw, self._zone), received_ns)


class ShellyGen2Decoder(Decoder):
    """``{"src": "shellyplus1pm-...", "method": "NotifyStatus", "params": {"ts": 1631266595.43,
    "switch:0": {"apower": 12.3}}}``. Other methods (``NotifyEvent``) carry no status and are skipped."""

    name = "shelly_gen2"
    report_absent = False
    _STATUS_METHODS: Final = frozenset({"NotifyStatus", "NotifyFullStatus"})

    def decode(
        self, payload: bytes, binding: DeviceBinding, field: str | None, received_ns: int, out: list[Sample]
    ) -> None:
        doc = _load_json(payload)
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
        out.append(_new_tuple(Sample, (point.point_id, point.parse_text(text), received_ns, _GOOD)))


class SenmlDecoder:
    """SenML JSON pack (RFC 8428): ``[{"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e+09, "bu": "%RH",
    "v": 20}, {"u": "lon", "v": 24.30621}, ...]``. Base fields carry over to the following records; a point's
    path is matched against the resolved name (base name + name) first, then the record's own name."""

    name = "senml"

    def decode(
        self, payload: bytes, binding: DeviceBinding, field: str | None, received_ns: int, out: list[Sample]
    ) -> None:
        pack = _load_json(payload)
        if type(pack) is not list:
            raise MalformedPayload("shape", f"a SenML pack is a JSON array of records, got {_kind_of(pack)}")
        mark = len(out)
        base_name, base_time, base_value, base_sum = "", 0.0, 0.0, 0.0
        seen: set[str] = set()
        by_record = binding.by_record
        try:
            for record in pack:
                if type(record) is not dict:
                    raise MalformedPayload("shape", f"a SenML record is an object, got {_kind_of(record)}")
                if "bn" in record:
                    base_name = _senml_str(record["bn"], "bn")
                if "bt" in record:
                    base_time = _senml_number(record["bt"], "bt")
                if "bv" in record:
                    base_value = _senml_number(record["bv"], "bv")
                if "bs" in record:
                    base_sum = _senml_number(record["bs"], "bs")
                name = _senml_str(record.get("n", ""), "n")
                point = by_record.get(base_name + name) or by_record.get(name)
                if point is None:
                    continue
                seen.add(point.name)
                value = _senml_value(record, base_value, base_sum)
                when = base_time + _senml_number(record.get("t", 0), "t")
                if abs(when) < _SENML_RELATIVE_LIMIT:
                    ts = received_ns + int(when * 1e9)
                else:
                    ts = _plausible(seconds_to_ns(when, 10**9), received_ns)
                out.append(_new_tuple(Sample, (point.point_id, point.convert(value), ts, _GOOD)))
        except MalformedPayload:
            del out[mark:]
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
    raise AssertionError(f"no decoder for {config!r}")
