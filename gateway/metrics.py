"""Prometheus metrics of a running gateway, built from its live state at scrape time.

Owns the metric names and labels (``edge_gateway_*`` plus the standard ``process_*``). A dedicated
``CollectorRegistry`` per gateway holds one custom collector that takes one status snapshot per scrape
(``gateway.status.GatewayStatus``, the one the status page reads): nothing is incremented on the hot path, so
metrics cost nothing between scrapes. Never imports aiohttp, a driver
or a protocol library (prometheus-client only).

Exposed families (labels in brackets):
    edge_gateway_info[version, site, gateway]           1
    edge_gateway_up / _ready / _uptime_seconds           liveness, readiness, time since start
    edge_gateway_device_up[device, driver]               1 online, 0 otherwise
    edge_gateway_device_polls_total / _errors_total      per device
    edge_gateway_device_read_failures_total              per device and reason
    edge_gateway_device_poll_latency_seconds             summary (sum/count over good polls) per device
    edge_gateway_device_last_poll_latency_seconds        per device
    edge_gateway_bus_published_samples_total
    edge_gateway_queue_depth[queue]                      ``bus.<consumer>`` in batches; ``outbox`` in samples
    edge_gateway_queue_oldest_age_seconds[queue]         outbox only (the oldest undelivered batch)
    edge_gateway_queue_dropped_samples_total[queue]      drop_oldest viewers, and the outbox over its budget
                                                         (only samples some uplink had not delivered)
    edge_gateway_outbox_bytes[class] / _events / _writable
    edge_gateway_outbox_disk_bytes[file]                 db, wal, shm as the filesystem reports them
    edge_gateway_outbox_disk_limit_bytes                 both budgets plus the outbox's disk margin
    edge_gateway_outbox_compacted_samples_total          removed after every uplink had delivered them
    edge_gateway_uplink_{up, backlog_samples, backlog_events, oldest_age_seconds}[uplink]
    edge_gateway_uplink_{sent_samples, sent_events, replayed_samples, dropped_samples, requests_failed}_total[uplink]
    edge_gateway_rule_evaluations_total / _failures_total[rule]
    edge_gateway_rule_state[rule, state]                 1 for the current state
    process_cpu_seconds_total, process_resident_memory_bytes, ... (prometheus-client's ProcessCollector)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.driver_api import DeviceState, DeviceStatus
from gateway.http import views
from gateway.status import GatewayStatus, StatusSource

#: the content type of ``exposition()``
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: the keys of ``UplinkRunner.status()`` each metric is read from, first match wins (short aliases are accepted so
#: that a simpler uplink can report too)
_UPLINK_GAUGES = {
    "backlog_samples": ("backlog_samples", "backlog"),
    "backlog_events": ("backlog_events",),
    "oldest_age_seconds": ("oldest_age_s",),
}
_UPLINK_COUNTERS = {
    "sent_samples": ("sent_samples", "sent"),
    "sent_events": ("sent_events",),
    "replayed_samples": ("replayed_samples", "replayed"),
    "dropped_samples": ("dropped_samples", "dropped"),
    "requests_failed": ("requests_failed",),
}
_UPLINK_UP_STATES = frozenset({"connected", "ok", "up", "idle", "running", "sending", "online"})
#: a degraded device answered its last poll (some of its reads were refused): it is up
_ANSWERING = frozenset({DeviceState.ONLINE, DeviceState.DEGRADED})
_RULE_STATES = ("idle", "pending", "active", "failed", "disabled")


def _number(status: Mapping[str, object], keys: Iterable[str]) -> float | None:
    for key in keys:
        value = status.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _count(counters: Mapping[str, object], key: str) -> float:
    """A source's counter (``gateway.status.DeviceCounting``); 0 when it does not count that."""
    return _number(counters, (key,)) or 0.0


def _by_reason(counters: Mapping[str, object], key: str) -> dict[str, float]:
    found = counters.get(key)
    if not isinstance(found, Mapping):
        return {}
    return {str(reason): float(n) for reason, n in found.items() if isinstance(n, int | float)}


class GatewayCollector(Collector):
    """Reads one snapshot of a gateway's state on every ``collect()``."""

    def __init__(self, source: StatusSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        snap = self._source.status_snapshot()
        yield from self._gateway_metrics(snap)
        yield from self._device_metrics(snap)
        yield from self._message_metrics(snap)
        yield from self._queue_metrics(snap)
        yield from self._uplink_metrics(snap)
        yield from self._broker_metrics(snap)
        yield from self._rule_metrics(snap)
        yield from self._incentive_metrics(snap)

    def _gateway_metrics(self, snap: GatewayStatus) -> Iterator[Metric]:
        info = GaugeMetricFamily("edge_gateway_info", "Gateway identity", labels=["version", "site", "gateway"])
        info.add_metric([__version__, snap.site, snap.gateway_id], 1)
        yield info
        yield GaugeMetricFamily("edge_gateway_up", "1 once the gateway has started", value=int(snap.started))
        ready = views.is_ready(snap)
        yield GaugeMetricFamily("edge_gateway_ready", "1 when /readyz would answer 200", value=int(ready))
        uptime = (snap.now_ns - snap.started_ns) / 1e9 if snap.started_ns else 0.0
        yield GaugeMetricFamily("edge_gateway_uptime_seconds", "Seconds since the gateway started", value=uptime)
        yield GaugeMetricFamily("edge_gateway_points", "Points in the registry", value=len(snap.points))
        yield CounterMetricFamily(
            "edge_gateway_bus_published_samples", "Samples published on the bus", value=snap.published_samples
        )

    def _device_metrics(self, snap: GatewayStatus) -> Iterator[Metric]:
        labels = ["device", "driver"]
        up = GaugeMetricFamily("edge_gateway_device_up", "1 when the device answered its last poll", labels=labels)
        polls = CounterMetricFamily("edge_gateway_device_polls", "Polls attempted", labels=labels)
        errors = CounterMetricFamily("edge_gateway_device_errors", "Polls that failed", labels=labels)
        latency = SummaryMetricFamily(
            "edge_gateway_device_poll_latency_seconds", "Latency of successful polls", labels=labels
        )
        last = GaugeMetricFamily(
            "edge_gateway_device_last_poll_latency_seconds", "Latency of the last successful poll", labels=labels
        )
        for status in snap.devices:
            key = [status.device, status.driver]
            up.add_metric(key, int(status.state in _ANSWERING))
            polls.add_metric(key, status.polls)
            errors.add_metric(key, status.errors)
            latency.add_metric(key, count_value=status.polls - status.errors, sum_value=status.latency_sum_s)
            last.add_metric(key, status.last_latency_s)
        yield from (up, polls, errors, latency, last)
        yield device_failure_metric(snap.devices)

    def _message_metrics(self, snap: GatewayStatus) -> Iterator[Metric]:
        """Message-driven sources (MQTT): per device and source, messages and why some were not used."""
        labels = ["source", "device"]
        messages = CounterMetricFamily(
            "edge_gateway_device_messages", "Messages received for the device", labels=labels
        )
        rejected = CounterMetricFamily(
            "edge_gateway_device_rejected_messages", "Messages dropped or yielding nothing usable", labels=labels
        )
        malformed = CounterMetricFamily(
            "edge_gateway_device_malformed_messages", "Messages that could not be decoded", labels=[*labels, "reason"]
        )
        refused = CounterMetricFamily(
            "edge_gateway_device_refused_values", "Values refused (unit, range, type)", labels=[*labels, "reason"]
        )
        unavailable = CounterMetricFamily(
            "edge_gateway_device_unavailable", "Availability messages saying the device went offline", labels=labels
        )
        undeclared = GaugeMetricFamily(
            "edge_gateway_device_undeclared_fields", "Distinct payload fields no point reads", labels=labels
        )
        unmapped = CounterMetricFamily(
            "edge_gateway_source_unmapped_messages", "Messages naming no configured device", labels=["source"]
        )
        for device, c in snap.device_counters.items():
            key = [str(c.get("source", "")), device]
            messages.add_metric(key, _count(c, "messages"))
            rejected.add_metric(key, _count(c, "rejected"))
            for reason, count in _by_reason(c, "malformed_by_reason").items():
                malformed.add_metric([*key, reason], count)
            for reason, count in _by_reason(c, "refused_by_reason").items():
                refused.add_metric([*key, reason], count)
            unavailable.add_metric(key, _count(c, "unavailable"))
            undeclared.add_metric(key, _count(c, "undeclared"))
        for name, c in snap.source_counters.items():
            unmapped.add_metric([name], _count(c, "unmapped"))
        yield from (messages, rejected, malformed, refused, unavailable, undeclared, unmapped)

    def _queue_metrics(self, snap: GatewayStatus) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "edge_gateway_queue_depth", "Queued batches (bus) or samples (outbox)", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "edge_gateway_queue_oldest_age_seconds", "Age of the oldest undelivered entry", labels=["queue"]
        )
        dropped = CounterMetricFamily("edge_gateway_queue_dropped_samples", "Samples dropped", labels=["queue"])
        for queue in snap.queues:
            depth.add_metric([f"bus.{queue.name}"], queue.depth)
            dropped.add_metric([f"bus.{queue.name}"], queue.dropped_samples)
        outbox = snap.outbox
        if outbox is not None:
            stats = outbox.stats
            depth.add_metric(["outbox"], stats.telemetry_samples)
            oldest_ns = stats.oldest_telemetry_ns
            oldest.add_metric(["outbox"], (snap.now_ns - oldest_ns) / 1e9 if oldest_ns else 0.0)
            dropped.add_metric(["outbox"], stats.dropped_samples)
        yield from (depth, oldest, dropped)
        if outbox is not None:
            stored = GaugeMetricFamily("edge_gateway_outbox_bytes", "Bytes held in the outbox", labels=["class"])
            stored.add_metric(["telemetry"], outbox.stats.telemetry_bytes)
            stored.add_metric(["events"], outbox.stats.event_bytes)
            yield stored
            yield GaugeMetricFamily("edge_gateway_outbox_events", "Events held", value=outbox.stats.event_count)
            disk = GaugeMetricFamily(
                "edge_gateway_outbox_disk_bytes", "Outbox files on disk (database, WAL, shared memory)", labels=["file"]
            )
            for file, size in outbox.disk_usage.items():
                disk.add_metric([file], size)
            yield disk
            yield GaugeMetricFamily(
                "edge_gateway_outbox_disk_limit_bytes",
                "What the outbox files may reach: both budgets plus the documented margin",
                value=outbox.telemetry_budget + outbox.event_budget + outbox.disk_margin,
            )
            yield CounterMetricFamily(
                "edge_gateway_outbox_compacted_samples",
                "Telemetry samples removed after every uplink had delivered them",
                value=outbox.stats.compacted_samples,
            )
            yield GaugeMetricFamily(
                "edge_gateway_outbox_writable", "0 when the last outbox write failed", value=int(outbox.writable)
            )

    def _uplink_metrics(self, snap: GatewayStatus) -> Iterator[Metric]:
        up = GaugeMetricFamily("edge_gateway_uplink_up", "1 when the uplink is connected", labels=["uplink"])
        gauges = {
            name: GaugeMetricFamily(
                f"edge_gateway_uplink_{name}", f"Uplink {name.replace('_', ' ')}", labels=["uplink"]
            )
            for name in _UPLINK_GAUGES
        }
        counters = {
            name: CounterMetricFamily(
                f"edge_gateway_uplink_{name}", f"Uplink {name.replace('_', ' ')}", labels=["uplink"]
            )
            for name in _UPLINK_COUNTERS
        }
        for status in views.uplinks(snap):
            label = [str(status["name"])]
            up.add_metric(label, int(str(status.get("state", "")).lower() in _UPLINK_UP_STATES))
            for name, keys in _UPLINK_GAUGES.items():
                if (value := _number(status, keys)) is not None:
                    gauges[name].add_metric(label, value)
            for name, keys in _UPLINK_COUNTERS.items():
                if (value := _number(status, keys)) is not None:
                    counters[name].add_metric(label, value)
        yield up
        yield from gauges.values()
        yield from counters.values()

    def _broker_metrics(self, snap: GatewayStatus) -> Iterator[Metric]:
        """MQTT connections over a broker list (gateway/mqtt_connection.py): the broker in use and the failovers,
        for the sensor sources and the uplinks alike, labelled by the source's or uplink's name."""
        failovers = CounterMetricFamily(
            "edge_gateway_mqtt_failovers", "Moves to the next broker of the list", labels=["connection"]
        )
        info = GaugeMetricFamily(
            "edge_gateway_mqtt_broker_info", "1 for the broker in use (or being tried)", labels=["connection", "broker"]
        )
        found = [(name, c) for name, c in snap.source_counters.items()]
        found += [(str(status["name"]), status) for status in views.uplinks(snap)]
        for name, status in found:
            broker = status.get("broker")
            if not isinstance(broker, str):
                continue  # not an MQTT connection
            failovers.add_metric([name], _count(status, "failovers"))
            info.add_metric([name, broker], 1)
        yield from (failovers, info)

    def _rule_metrics(self, snap: GatewayStatus) -> Iterator[Metric]:
        evaluations = CounterMetricFamily("edge_gateway_rule_evaluations", "Rule evaluations", labels=["rule"])
        failures = CounterMetricFamily("edge_gateway_rule_failures", "Rule evaluations that raised", labels=["rule"])
        state = GaugeMetricFamily("edge_gateway_rule_state", "1 for the rule's current state", labels=["rule", "state"])
        for rule in snap.rules.rules:
            evaluations.add_metric([rule.id], rule.evaluations)
            failures.add_metric([rule.id], rule.failures)
            for name in _RULE_STATES:
                state.add_metric([rule.id, name], int(rule.state.lower() == name))
        yield from (evaluations, failures, state)

    def _incentive_metrics(self, snap: GatewayStatus) -> Iterator[Metric]:
        stage = snap.incentives
        if not stage.enabled:
            return
        refused = CounterMetricFamily(
            "edge_gateway_incentive_readings_refused",
            "Meter readings the incentive stage refused or ignored, by reason",
            labels=["reason"],
        )
        for reason, count in stage.refused.items():
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily(
            "edge_gateway_incentive_clock_steps",
            "Times the gateway clock stepped back (the intervals it touched are flagged clock)",
            value=stage.clock_steps,
        )
        yield GaugeMetricFamily(
            "edge_gateway_incentive_epoch", "The incentive programme epoch in force", value=stage.epoch or 0
        )


def build_registry(gateway: StatusSource) -> CollectorRegistry:
    """A registry of this gateway only (never the global default one, so tests and two gateways never collide)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition format (``prometheus_client.CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)


def device_failure_metric(statuses: Iterable[DeviceStatus]) -> Metric:
    """``edge_gateway_device_read_failures_total{device, driver, reason}``: failed reads, and poll cycles skipped
    while the link was down or the device disabled, by reason (``exception_3``, ``no_answer``, ``link_down``...)."""
    failures = CounterMetricFamily(
        "edge_gateway_device_read_failures",
        "Failed reads (and poll cycles skipped while down) by reason",
        labels=["device", "driver", "reason"],
    )
    for status in statuses:
        for reason, count in sorted(status.failures.items()):
            failures.add_metric([status.device, status.driver, reason], count)
    return failures
