"""From (topic, payload) to samples: which subscription and device a message belongs to, decoded and counted.

Owns: ``Ingest`` (the per-source router: topic -> subscription, device binding and decoder, with a bounded topic
cache), ``SubscriptionStats`` (messages, malformed by reason, unmapped topics, per subscription) and
``RateLimitedLog`` (one log line per subscription and interval, however fast bad messages arrive).

Imports no protocol library: the client hands it plain ``str`` topics and ``bytes`` payloads, which is also how the
unit and property-based tests drive it. Nothing a payload contains can make ``ingest`` raise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig
from drivers.mqtt.decoders import DeviceBinding, MalformedPayload, PayloadDecoder, make_decoder
from drivers.mqtt.topics import TopicTemplate
from gateway.model import Sample

log = logging.getLogger("drivers.mqtt")

#: distinct topics remembered by the router; past this the cache is cleared (a topic flood cannot grow memory)
TOPIC_CACHE_SIZE = 20_000


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
        for sub in source.subscriptions:
            stats = SubscriptionStats(sub.id)
            self.stats[sub.id] = stats
            router = _SubscriptionRouter(
                sub.topic_template(), make_decoder(sub.decoder), stats, sub.max_payload or source.max_payload
            )
            for device in devices:
                if device.source != source.id or device.subscription not in (None, sub.id):
                    continue
                binding = DeviceBinding(device, sub)
                if binding.points:
                    router.bindings[device.topic_level] = binding
                    self.bindings.append(binding)
            self._routers.append(router)
        self._cache: dict[str, _Route | None] = {}
        self._bad_log = RateLimitedLog(log, clock=clock)
        self.unrouted = 0  # topics no subscription's template maps (a filter wider than its template)

    def _route(self, topic: str) -> _Route | None:
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
        for router in self._routers:
            if router.template.match(topic) is not None:
                router.stats.messages += 1
                router.stats.unmapped += 1
                return
        self.unrouted += 1

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
        stats = route.stats
        stats.messages += 1
        binding = route.binding
        binding.messages += 1
        binding.last_message_ns = received_ns
        if len(payload) > route.max_payload:
            self._malformed(stats, topic, MalformedPayload("oversize", f"{len(payload)} bytes > {route.max_payload}"))
            return
        try:
            route.decoder.decode(payload, binding, route.field, received_ns, out)
        except MalformedPayload as exc:
            self._malformed(stats, topic, exc)
        except Exception as exc:  # a decoder bug must not stop the driver: count it, and say it is a bug
            log.exception("mqtt: decoder %s failed on a message of %s", route.decoder.name, topic)
            self._malformed(stats, topic, MalformedPayload("internal", repr(exc)))

    def _malformed(self, stats: SubscriptionStats, topic: str, exc: MalformedPayload) -> None:
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
