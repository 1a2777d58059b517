"""Config models of the MQTT sensor driver: a broker connection with its subscriptions, and the devices behind it.

Owns: ``MqttSourceConfig`` (a site's ``mqtt_sources:`` entry: broker, session, TLS, credentials, subscriptions with
topic filter, topic template, QoS and payload decoder), ``MqttDeviceConfig`` (a ``devices:`` entry with
``driver: mqtt``: the device's topic name and its points, each a field path with unit, kind and scaling) and
``check_bindings`` (the cross-checks between the two that need the whole site).

Must never import paho or aiomqtt (a site file is validated without loading any protocol library) nor anything of
the runtime beyond ``gateway.config``, ``gateway.mqtt_connection``, ``gateway.registry`` and
``drivers.mqtt.topics``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BeforeValidator, Field, field_validator, model_validator

from drivers.mqtt.topics import TopicTemplate, check_topic_filter
from gateway.config.types import Duration, Ident, PositiveDuration, Size, StrictModel
from gateway.mqtt_connection import MqttConnectionConfig
from gateway.registry import PointInfo, ValueKind

#: ``$`` (the whole payload) or ``$.a.b`` (keys separated by dots; a key may hold ``:``, as Shelly's ``switch:0``)
JSON_PATH_RE = re.compile(r"\$(?:\.[^.\s]+)*\Z")
DEFAULT_MAX_PAYLOAD = 64 * 1024


#: bytes, written as ``64KiB``/``1MiB`` or a number
PayloadSize = Annotated[Size, Field(le=256 * 1024**2)]


def _protocol_text(value: Any) -> Any:
    # YAML reads ``protocol: 5`` as an int and ``3.1.1`` as a string; accept both spellings.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Protocol = Annotated[Literal["3.1.1", "5"], BeforeValidator(_protocol_text)]


# --- decoders ------------------------------------------------------------------------------------------------------


class TimestampSpec(StrictModel):
    """Where a generic JSON payload carries its own time, and how it is written."""

    path: str
    format: Literal["unix_s", "unix_ms", "unix_ns", "iso8601"] = "unix_s"
    #: for ISO 8601 times without an offset
    timezone: str = "UTC"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not JSON_PATH_RE.match(value) or value == "$":
            raise ValueError(f"timestamp path must look like $.ts or $.meta.time, not {value!r}")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return _check_zone(value)


def _check_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name like Europe/Berlin)") from None
    return value


class PlainDecoderConfig(StrictModel):
    """The payload is one value as text (``23.5``, ``ON``, ``true``); receive time is the timestamp."""

    type: Literal["plain"]


class JsonDecoderConfig(StrictModel):
    """A JSON document; each point names a field path (``$.temperature``, ``$.ENERGY.Total``)."""

    type: Literal["json"]
    timestamp: TimestampSpec | None = None


class Zigbee2MqttDecoderConfig(StrictModel):
    """Zigbee2MQTT device state (``zigbee2mqtt/<friendly name>``); time from ``last_seen`` when enabled."""

    type: Literal["zigbee2mqtt"]


class TasmotaDecoderConfig(StrictModel):
    """Tasmota ``tele/<topic>/SENSOR`` and ``STATE``; ``Time`` is the device's local time, in ``timezone``."""

    type: Literal["tasmota"]
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return _check_zone(value)


class ShellyGen2DecoderConfig(StrictModel):
    """Shelly Gen2+ RPC notifications (``<id>/events/rpc``): ``NotifyStatus``/``NotifyFullStatus``; paths are
    relative to ``params`` (``$.switch:0.apower``); time from ``params.ts``."""

    type: Literal["shelly_gen2"]


class SenmlDecoderConfig(StrictModel):
    """SenML JSON (RFC 8428) packs; a point's path is the record name (with or without the base name)."""

    type: Literal["senml"]


class TtsV3DecoderConfig(StrictModel):
    """The Things Stack v3 uplinks (``v3/<app>@<tenant>/devices/+/up``): paths relative to ``decoded_payload``,
    ``$.@rssi``/``$.@snr`` for the best radio figures among the receiving gateways; time from ``received_at``."""

    type: Literal["tts_v3"]


DecoderConfig = Annotated[
    PlainDecoderConfig
    | JsonDecoderConfig
    | Zigbee2MqttDecoderConfig
    | TasmotaDecoderConfig
    | ShellyGen2DecoderConfig
    | SenmlDecoderConfig
    | TtsV3DecoderConfig,
    Field(discriminator="type"),
]
#: decoders whose point paths are JSON paths (``$.a.b``); the others name a record or a topic ``{field}``
JSON_PATH_DECODERS = frozenset({"json", "zigbee2mqtt", "tasmota", "shelly_gen2", "tts_v3"})


# --- the broker connection --------------------------------------------------------------------------------------


class MqttSubscription(StrictModel):
    """``{id: z2m, topic: zigbee2mqtt/+, qos: 1, decoder: {type: zigbee2mqtt}}``"""

    id: Ident
    topic: str
    #: which topic level names the device; defaults to the filter's only ``+``
    template: str | None = None
    qos: Literal[0, 1, 2] = 0
    decoder: DecoderConfig
    #: overrides the source's ``max_payload``
    max_payload: PayloadSize | None = None

    @field_validator("topic")
    @classmethod
    def _filter(cls, value: str) -> str:
        return check_topic_filter(value)

    @model_validator(mode="after")
    def _template_fits(self) -> Self:
        self.topic_template()  # raises ValueError with the reason
        return self

    def topic_template(self) -> TopicTemplate:
        if self.template is None:
            return TopicTemplate.default_for(self.topic)
        return TopicTemplate(self.template, self.topic)


#: what each availability format sends (compared after stripping whitespace; Zigbee2MQTT also sends JSON)
AVAILABILITY_PAYLOADS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html#zigbee2mqtt-friendly-name-availability
    "zigbee2mqtt": (("online",), ("offline",)),
    # https://tasmota.github.io/docs/MQTT/ : tele/<topic>/LWT, "Online" on connect, "Offline" as last will
    "tasmota": (("Online",), ("Offline",)),
    # https://shelly-api-docs.shelly.cloud/gen2/General/RPCChannels#mqtt : <id>/online true/false (also Gen1)
    "shelly": (("true",), ("false",)),
}


class MqttAvailability(StrictModel):
    """Where devices say whether they are reachable: ``{topic: zigbee2mqtt/+/availability, format: zigbee2mqtt}``,
    ``{topic: tele/+/LWT, format: tasmota}``, ``{topic: +/online, format: shelly}``, or the generic form
    ``{topic: devices/+/status, online: up, offline: down}``. ``{device}`` is found as in a subscription."""

    topic: str
    template: str | None = None
    format: Literal["zigbee2mqtt", "tasmota", "shelly", "generic"] = "generic"
    #: generic format only: the payloads meaning online and offline (default ``online``/``offline``)
    online: str | None = None
    offline: str | None = None
    #: availability messages are retained and rare: QoS 1 so a change is not lost
    qos: Literal[0, 1, 2] = 1

    @field_validator("topic")
    @classmethod
    def _filter(cls, value: str) -> str:
        return check_topic_filter(value)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        self.topic_template()
        if self.format != "generic" and (self.online is not None or self.offline is not None):
            raise ValueError(f"online/offline are fixed by the {self.format} format; give them only for generic")
        online, offline = self.payloads()
        if set(online) & set(offline):
            raise ValueError("online and offline payloads must differ")
        return self

    def topic_template(self) -> TopicTemplate:
        if self.template is None:
            return TopicTemplate.default_for(self.topic)
        return TopicTemplate(self.template, self.topic)

    def payloads(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if self.format == "generic":
            return (self.online or "online",), (self.offline or "offline",)
        return AVAILABILITY_PAYLOADS[self.format]


class MqttSourceConfig(MqttConnectionConfig):
    """One broker connection (a site's ``mqtt_sources:`` entry): the shared connection keys (host, port, keepalive,
    client_id, tls, username, password/password_file; gateway/mqtt_connection.py) and the sensor side's own.
    ``client_id`` is required for a persistent session: the broker keys the session on it."""

    id: Ident
    protocol: Protocol = "3.1.1"
    #: ``persistent`` keeps subscriptions and queued QoS 1/2 messages at the broker while the gateway is away
    session: Literal["clean", "persistent"] = "clean"
    #: MQTT 5 only: how long the broker keeps a persistent session after a disconnect
    session_expiry: PositiveDuration = 86400.0
    connect_timeout: PositiveDuration = 10.0
    max_payload: PayloadSize = DEFAULT_MAX_PAYLOAD
    #: reconnect backoff: doubles from ``reconnect_min`` up to ``reconnect_max``, with jitter, forever
    reconnect_min: PositiveDuration = 0.5
    reconnect_max: PositiveDuration = 30.0
    #: a batch is handed to the bus when it holds this many samples or has waited ``batch_linger``
    batch_max_samples: Annotated[int, Field(ge=1, le=1_000_000)] = 5000
    batch_linger: Annotated[Duration, Field(le=1.0)] = 0.005
    #: QoS 1/2 messages are acknowledged only after their samples were handed on (end-to-end at-least-once)
    ack_after_publish: bool = True
    subscriptions: Annotated[list[MqttSubscription], Field(min_length=1)]
    #: availability topics: they set the device state and make its points BAD while it is offline
    availability: list[MqttAvailability] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.session == "persistent" and not self.client_id:
            raise ValueError("session: persistent needs a client_id (the broker keys the session on it)")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min is larger than reconnect_max")
        seen: set[str] = set()
        for sub in self.subscriptions:
            if sub.id in seen:
                raise ValueError(f"duplicate subscription id {sub.id!r}")
            seen.add(sub.id)
        return self

    def subscription(self, sub_id: str) -> MqttSubscription:
        for sub in self.subscriptions:
            if sub.id == sub_id:
                return sub
        raise KeyError(sub_id)


# --- devices ----------------------------------------------------------------------------------------------------


class MqttCommandSpec(StrictModel):
    """How a write to this point is published: ``{topic: cmnd/plug1/POWER}`` sends the value as text;
    ``{topic: zigbee2mqtt/Lamp/set, key: state}`` sends ``{"state": value}``."""

    topic: str
    key: str | None = None
    qos: Literal[0, 1, 2] = 1
    retain: bool = False
    #: what a boolean is sent as (Tasmota and Zigbee2MQTT switches want ``ON``/``OFF``)
    true: str | bool = "ON"
    false: str | bool = "OFF"

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        check_topic_filter(value)
        if "+" in value.split("/") or "#" in value.split("/"):
            raise ValueError("a command topic cannot contain wildcards")
        return value


class MqttPointSpec(StrictModel):
    """One value in a message. ``value = raw * scale + offset`` for float points."""

    #: JSON path (``$.temperature``), SenML record name, or the ``{field}`` topic level; defaults from the name
    path: str | None = None
    #: the unit samples are published in; a payload stating another unit is converted to it, or refused
    unit: str | None = None
    #: the unit the payload sends this value in when the format does not say (a decoder that sends Wh)
    payload_unit: str | None = None
    kind: ValueKind = "float"
    scale: float = 1.0
    offset: float = 0.0
    description: str | None = None
    min: float | None = None
    max: float | None = None
    #: only messages of this subscription carry the point (Tasmota ``STATE`` vs ``SENSOR``)
    subscription: Ident | None = None
    command: MqttCommandSpec | None = None
    #: personal data (a tenant's plug or meter): never sent raw to the city platform (docs/privacy.md)
    personal: bool = False
    #: an energy meter's rating in kW (the most power it can measure): incentive readings implying more are flagged
    max_power_kw: Annotated[float, Field(gt=0)] | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (not value or (value.startswith("$") and not JSON_PATH_RE.match(value))):
            raise ValueError(f"invalid field path {value!r}: use $ or $.key.key (keys separated by dots)")
        return value

    @model_validator(mode="after")
    def _scaling(self) -> Self:
        if self.kind != "float" and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset apply to float points only (this one is {self.kind})")
        if self.scale == 0:
            raise ValueError("scale cannot be 0")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is larger than max")
        return self


class MqttDeviceConfig(StrictModel):
    """``{id: living_room, driver: mqtt, source: building, topic_name: "Living Room", points: {...}}``"""

    profile_model: ClassVar[type[StrictModel] | None] = None

    id: Ident
    driver: Literal["mqtt"]
    source: Ident
    #: the device's level in the topic (Zigbee2MQTT friendly names and Tasmota topics are rarely identifiers)
    topic_name: str | None = None
    #: only this subscription of the source maps to the device (default: every subscription that matches)
    subscription: Ident | None = None
    measurement: str = "mqtt"
    points: Annotated[dict[Ident, MqttPointSpec], Field(min_length=1)]
    tags: dict[str, str] = Field(default_factory=dict)
    #: every point of this device is personal data
    personal: bool = False

    @field_validator("topic_name")
    @classmethod
    def _topic_level(cls, value: str | None) -> str | None:
        # a Zigbee2MQTT friendly name may hold '/' (``floor1/kitchen/lamp``): it then spans topic levels, which a
        # subscription whose filter ends in '#' maps (see TopicTemplate)
        if value is not None and (not value or any(c in value for c in "+#\0") or "" in value.split("/")):
            raise ValueError(f"topic_name {value!r} must be non-empty topic levels (no +, #, NUL or empty level)")
        return value

    @property
    def topic_level(self) -> str:
        return self.topic_name if self.topic_name is not None else self.id

    def point_infos(self, profile: StrictModel | None) -> list[PointInfo]:
        return [
            PointInfo(
                id=f"{self.id}.{name}",
                unit=spec.unit,
                kind=spec.kind,
                writable=spec.command is not None,
                min=spec.min,
                max=spec.max,
                description=spec.description,
                measurement=self.measurement,
                tags={"device": self.id, **self.tags},
                personal=self.personal or spec.personal,
                max_power_kw=spec.max_power_kw,
            )
            for name, spec in self.points.items()
        ]


def default_path(decoder_type: str, point_name: str) -> str:
    """A point without ``path`` is read from the field of its own name."""
    return point_name if decoder_type in ("senml", "plain") else f"$.{point_name}"


def check_bindings(sources: Sequence[MqttSourceConfig], devices: Sequence[MqttDeviceConfig]) -> list[str]:
    """Problems that need the whole site: unknown subscription ids, a topic level claimed by two devices on one
    subscription, paths that do not suit the subscription's decoder. Each problem is one message."""
    problems: list[str] = []
    by_id = {source.id: source for source in sources}
    claimed: dict[tuple[str, str, str], str] = {}
    for device in devices:
        source = by_id.get(device.source)
        if source is None:
            problems.append(f"device {device.id!r} names unknown MQTT source {device.source!r}")
            continue
        sub_ids = {sub.id for sub in source.subscriptions}
        if device.subscription is not None and device.subscription not in sub_ids:
            problems.append(
                f"device {device.id!r}: source {source.id!r} has no subscription {device.subscription!r} "
                f"(it has {sorted(sub_ids)})"
            )
            continue
        subs = [s for s in source.subscriptions if device.subscription in (None, s.id)]
        if "/" in device.topic_level and not any(s.topic_template().spans_levels for s in subs):
            problems.append(
                f"device {device.id!r}: topic_name {device.topic_level!r} spans topic levels, so its subscription "
                "needs a filter ending in # and a template with {device} under it (topic: zigbee2mqtt/#, "
                "template: zigbee2mqtt/{device})"
            )
        for sub in subs:
            key = (source.id, sub.id, device.topic_level)
            if key in claimed:
                problems.append(
                    f"devices {claimed[key]!r} and {device.id!r} both map topic level {device.topic_level!r} "
                    f"of subscription {sub.id!r}"
                )
            claimed[key] = device.id
        for name, spec in device.points.items():
            if spec.subscription is not None and spec.subscription not in {s.id for s in subs}:
                problems.append(f"point {device.id}.{name}: no subscription {spec.subscription!r} feeds this device")
                continue
            for sub in subs:
                if spec.subscription not in (None, sub.id):
                    continue
                path = spec.path or default_path(sub.decoder.type, name)
                json_path = sub.decoder.type in JSON_PATH_DECODERS
                if json_path and not path.startswith("$"):
                    problems.append(
                        f"point {device.id}.{name}: decoder {sub.decoder.type} of subscription {sub.id!r} "
                        f"reads JSON paths like $.{path}, not {path!r}"
                    )
                elif sub.decoder.type == "senml" and path.startswith("$"):
                    problems.append(
                        f"point {device.id}.{name}: SenML points name a record (like temp), not a JSON path {path!r}"
                    )
                elif sub.decoder.type == "plain" and path != "$" and not sub.topic_template().has_field:
                    problems.append(
                        f"point {device.id}.{name}: path {path!r} needs a {{field}} level in the template of "
                        f"subscription {sub.id!r} (a plain payload is one value: use path: $)"
                    )
    return problems
