"""From (topic, payload) to samples: which subscription and device a message belongs to, decoded and counted.

Owns: ``Ingest`` (the per-source router: topic -> subscription, device binding and decoder, with a bounded topic
cache; availability topics -> device state and BAD samples), ``SubscriptionStats`` (messages, malformed by reason,
unmapped topics, per subscription), the per-device ``DeviceCounters`` it keeps up to date (malformed, refused by
unit/range/type, unavailable, undeclared fields) and ``RateLimitedLog`` (one log line per key and interval,
however fast bad messages arrive).

Imports no protocol library: the client hands it plain ``str`` topics and ``bytes`` payloads, which is also how the
unit and property-based tests drive it. Nothing a payload contains can make ``ingest`` raise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson

from drivers.mqtt.config import MqttAvailability, MqttDeviceConfig, MqttSourceConfig
from drivers.mqtt.decoders import DeviceBinding, DeviceCounters, MalformedPayload, PayloadDecoder, make_decoder
from drivers.mqtt.topics import TopicTemplate
from gateway.model import Quality, Sample

log = logging.getLogger("drivers.mqtt")

#: distinct topics remembered by the router; past this the cache is cleared (a topic flood cannot grow memory)
TOPIC_CACHE_SIZE = 20_000
#: keys a RateLimitedLog remembers; past this it forgets them all (a flood of distinct topics cannot grow memory)
LOG_KEYS_LIMIT = 4_096


@dataclass(slots=True)
class SubscriptionStats:
    """Counters of one subscription, read by the status page and /metrics."""

    subscription: str
    messages: int = 0
    malformed: int = 0
    #: topics that match the filter but name no configured device (counted, not logged: often other devices)
    unmapped: int = 0
    malformed_by_reason: dict[str, int] = field(default_factory=dict)

    def count_malformed(self, reason: str) -> None:
        self.malformed += 1
        self.malformed_by_reason[reason] = self.malformed_by_reason.get(reason, 0) + 1


class RateLimitedLog:
    """At most one warning per key per ``interval`` seconds; the next one says how many were suppressed."""

    def __init__(
        self, logger: logging.Logger, *, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log (and return True) unless ``key`` logged within the interval; then only count it."""
        now = self._clock()
        if len(self._last) >= LOG_KEYS_LIMIT and key not in self._last:
            self._last.clear()
            self._suppressed.clear()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            self._logger.warning(message + " (%d similar suppressed)", *args, suppressed)
        else:
            self._logger.warning(message, *args)
        return True


class _Route:
    __slots__ = ("binding", "decoder", "field", "max_payload", "stats")

    def __init__(
        self,
        stats: SubscriptionStats,
        decoder: PayloadDecoder,
        binding: DeviceBinding,
        field: str | None,
        max_payload: int,
    ) -> None:
        self.stats = stats
        self.decoder = decoder
        self.binding = binding
        self.field = field
        self.max_payload = max_payload


class _SubscriptionRouter:
    __slots__ = ("bindings", "decoder", "max_payload", "stats", "template")

    def __init__(
        self, template: TopicTemplate, decoder: PayloadDecoder, stats: SubscriptionStats, max_payload: int
    ) -> None:
        self.template = template
        self.decoder = decoder
        self.stats = stats
        self.max_payload = max_payload
        #: topic level -> binding
        self.bindings: dict[str, DeviceBinding] = {}


class _AvailabilityRouter:
    """One ``availability:`` entry: its template, what it accepts as online/offline, the devices it covers."""

    __slots__ = ("config", "devices", "offline", "online", "template")

    def __init__(self, config: MqttAvailability, devices: dict[str, list[DeviceCounters]]) -> None:
        self.config = config
        self.template = config.topic_template()
        online, offline = config.payloads()
        self.online = frozenset(online)
        self.offline = frozenset(offline)
        #: topic level -> the counters (which hold the availability) of the devices with that topic name; usually
        #: one, but two subscriptions may each have a device of the same name
        self.devices = devices

    def parse(self, payload: bytes) -> bool | None:
        """True (online), False (offline) or None (not an availability payload of this format)."""
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
        if self.config.format == "zigbee2mqtt" and text.startswith("{"):
            # Zigbee2MQTT 1.35+: {"state": "online"}; older releases publish the bare word
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError:
                return None
            state = doc.get("state") if isinstance(doc, dict) else None
            text = state if isinstance(state, str) else ""
        if text in self.online:
            return True
        if text in self.offline:
            return False
        return None


class Ingest:
    """Routes and decodes the messages of one MQTT source."""

    def __init__(
        self,
        source: MqttSourceConfig,
        devices: Sequence[MqttDeviceConfig],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source_id = source.id
        self._routers: list[_SubscriptionRouter] = []
        self.stats: dict[str, SubscriptionStats] = {}
        self.bindings: list[DeviceBinding] = []
        mine = [d for d in devices if d.source == source.id]
        #: device id -> its counters, shared by its bindings on every subscription
        self.counters: dict[str, DeviceCounters] = {d.id: DeviceCounters(d.id) for d in mine}
        self._point_ids: dict[str, tuple[str, ...]] = {d.id: tuple(f"{d.id}.{p}" for p in d.points) for d in mine}
        by_level: dict[str, list[DeviceCounters]] = {}
        for d in mine:
            by_level.setdefault(d.topic_level, []).append(self.counters[d.id])
        self._availability = [_AvailabilityRouter(entry, by_level) for entry in source.availability]
        #: availability payloads that matched no format (counted, logged rate-limited; never malformed data)
        self.availability_unrecognised = 0
        self.availability_messages = 0
        for sub in source.subscriptions:
            stats = SubscriptionStats(sub.id)
            self.stats[sub.id] = stats
            router = _SubscriptionRouter(
                sub.topic_template(), make_decoder(sub.decoder), stats, sub.max_payload or source.max_payload
            )
            for device in devices:
                if device.source != source.id or device.subscription not in (None, sub.id):
                    continue
                binding = DeviceBinding(device, sub, self.counters[device.id])
                if binding.points:
                    router.bindings[device.topic_level] = binding
                    self.bindings.append(binding)
            self._routers.append(router)
        self._cache: dict[str, _Route | _AvailabilityRouter | None] = {}
        self._bad_log = RateLimitedLog(log, clock=clock)
        self._unknown_log = RateLimitedLog(log, interval=300.0, clock=clock)
        self.unrouted = 0  # topics no subscription's template maps (a filter wider than its template)

    def _route(self, topic: str) -> _Route | _AvailabilityRouter | None:
        for availability in self._availability:
            matched = availability.template.match(topic)
            if matched is not None and matched[0] in availability.devices:
                return availability
        for router in self._routers:
            matched = router.template.match(topic)
            if matched is None:
                continue
            level, field_level = matched
            binding = router.bindings.get(level)
            if binding is None:
                continue
            return _Route(router.stats, router.decoder, binding, field_level, router.max_payload)
        return None

    def _unmapped(self, topic: str) -> None:
        for availability in self._availability:
            matched = availability.template.match(topic)
            if matched is not None:  # availability of a device this gateway does not read: not an error
                self.availability_messages += 1
                return
        for router in self._routers:
            matched = router.template.match(topic)
            if matched is not None:
                router.stats.messages += 1
                router.stats.unmapped += 1
                # often another system's device on a shared broker: said once per topic per 5 minutes, not silence
                self._unknown_log.warning(
                    topic,
                    "mqtt[%s]: no configured device has topic_name %r (topic %r, subscription %s); ignored",
                    self.source_id,
                    matched[0][:200],
                    topic[:200],
                    router.stats.subscription,
                )
                return
        self.unrouted += 1
        self._unknown_log.warning(
            topic, "mqtt[%s]: topic %r matches no subscription template; ignored", self.source_id, topic[:200]
        )

    def ingest(self, topic: str, payload: bytes, received_ns: int, out: list[Sample]) -> None:
        """Decode one message into ``out``; malformed payloads are counted and logged (rate-limited)."""
        try:
            route = self._cache[topic]
        except KeyError:
            route = self._route(topic)
            if len(self._cache) >= TOPIC_CACHE_SIZE:
                self._cache.clear()
            self._cache[topic] = route
        if route is None:
            self._unmapped(topic)
            return
        if type(route) is _AvailabilityRouter:
            self._availability_message(route, topic, payload, received_ns, out)
            return
        assert type(route) is _Route
        stats = route.stats
        stats.messages += 1
        binding = route.binding
        binding.messages += 1
        binding.last_message_ns = received_ns
        counters = binding.counters
        counters.messages += 1
        if len(payload) > route.max_payload:
            self._malformed(
                stats, binding, topic, MalformedPayload("oversize", f"{len(payload)} bytes > {route.max_payload}")
            )
            return
        mark = len(out)
        try:
            route.decoder.decode(payload, binding, route.field, received_ns, out)
        except MalformedPayload as exc:
            self._malformed(stats, binding, topic, exc)
            return
        except Exception as exc:  # a decoder bug must not stop the driver: count it, and say it is a bug
            log.exception("mqtt: decoder %s failed on a message of %s", route.decoder.name, topic)
            del out[mark:]
            binding.refusals.clear()
            self._malformed(stats, binding, topic, MalformedPayload("internal", repr(exc)))
            return
        produced = len(out) > mark
        if binding.refusals:
            self._refused(binding, topic, produced=produced)
        if produced or not binding.refusals:
            counters.last_ok_ns = received_ns

    def _availability_message(
        self, route: _AvailabilityRouter, topic: str, payload: bytes, received_ns: int, out: list[Sample]
    ) -> None:
        self.availability_messages += 1
        matched = route.template.match(topic)
        assert matched is not None  # the route was chosen by this match
        online = route.parse(payload)
        if online is None:
            self.availability_unrecognised += 1
            self._bad_log.warning(
                f"{self.source_id}.availability.{topic}",
                "mqtt[%s]: availability message on %r is neither %s nor %s: %r; device state unchanged",
                self.source_id,
                topic[:200],
                "/".join(sorted(route.online)),
                "/".join(sorted(route.offline)),
                payload[:60],
            )
            return
        for counters in route.devices[matched[0]]:
            was = counters.available
            counters.available = online
            counters.availability_topic = topic
            if online:
                if was is False:
                    log.info("mqtt[%s]: %s is online again (%s)", self.source_id, counters.device, topic[:200])
                continue
            counters.unavailable += 1
            if was is not False:
                log.warning("mqtt[%s]: %s went offline (%s)", self.source_id, counters.device, topic[:200])
            # its points are BAD from now: downstream sees the outage, not a silently frozen last value
            out.extend(
                Sample(point_id, None, received_ns, Quality.BAD, "offline")
                for point_id in self._point_ids[counters.device]
            )

    def _refused(self, binding: DeviceBinding, topic: str, *, produced: bool) -> None:
        counters = binding.counters
        for point_id, reason, detail in binding.refusals:
            counters.refused[reason] = counters.refused.get(reason, 0) + 1
            self._bad_log.warning(
                f"{self.source_id}.{binding.device}.{reason}",
                "mqtt[%s]: refused %s from %r (%s: %s); %d refused so far on %s",
                self.source_id,
                point_id,
                topic[:200],
                reason,
                detail[:200],
                sum(counters.refused.values()),
                binding.device,
            )
        binding.refusals.clear()
        if not produced:  # nothing of the message was usable: not a successful poll
            counters.rejected += 1

    def _malformed(self, stats: SubscriptionStats, binding: DeviceBinding, topic: str, exc: MalformedPayload) -> None:
        counters = binding.counters
        counters.rejected += 1
        # a wrong value type is the device sending something other than configured: a refusal, not garbage
        by_reason = counters.refused if exc.reason == "type" else counters.malformed
        by_reason[exc.reason] = by_reason.get(exc.reason, 0) + 1
        stats.count_malformed(exc.reason)
        self._bad_log.warning(
            f"{self.source_id}.{stats.subscription}",
            "mqtt[%s]: dropped malformed message on %r (%s); %d malformed so far on subscription %s",
            self.source_id,
            topic[:200],
            str(exc)[:200],
            stats.malformed,
            stats.subscription,
        )
