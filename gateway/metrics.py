"""Prometheus metrics of a running gateway, built from its live state at scrape time.

Owns the metric names and labels (``edge_gateway_*`` plus the standard ``process_*``). A dedicated
``CollectorRegistry`` per gateway holds one custom collector that reads the supervisor's counters when scraped:
nothing is incremented on the hot path, so metrics cost nothing between scrapes. Never imports aiohttp, a driver
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

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.driver_api import DeviceState, DeviceStatus
from gateway.http import views

if TYPE_CHECKING:
    from gateway.supervisor import Gateway

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


def _number(status: Mapping[str, Any], keys: Iterable[str]) -> float | None:
    for key in keys:
        value = status.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


class GatewayCollector(Collector):
    """Reads a gateway's live state on every ``collect()``."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        yield from self._gateway_metrics()
        yield from self._device_metrics()
        yield from self._message_metrics()
        yield from self._queue_metrics()
        yield from self._uplink_metrics()
        yield from self._rule_metrics()
        yield from self._incentive_metrics()

    def _gateway_metrics(self) -> Iterator[Metric]:
        gw = self._gateway
        identity = gw.site.config.gateway
        info = GaugeMetricFamily("edge_gateway_info", "Gateway identity", labels=["version", "site", "gateway"])
        info.add_metric([__version__, identity.site, identity.id], 1)
        yield info
        yield GaugeMetricFamily("edge_gateway_up", "1 once the gateway has started", value=int(gw.started.is_set()))
        ready = views.readiness(gw)["ready"]
        yield GaugeMetricFamily("edge_gateway_ready", "1 when /readyz would answer 200", value=int(ready))
        uptime = (time.time_ns() - gw.started_ns) / 1e9 if gw.started_ns else 0.0
        yield GaugeMetricFamily("edge_gateway_uptime_seconds", "Seconds since the gateway started", value=uptime)
        yield GaugeMetricFamily("edge_gateway_points", "Points in the registry", value=len(gw.registry))
        yield CounterMetricFamily(
            "edge_gateway_bus_published_samples", "Samples published on the bus", value=gw.bus.published_samples
        )

    def _device_metrics(self) -> Iterator[Metric]:
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
        for status in self._gateway.device_status():
            key = [status.device, status.driver]
            up.add_metric(key, int(status.state in _ANSWERING))
            polls.add_metric(key, status.polls)
            errors.add_metric(key, status.errors)
            latency.add_metric(key, count_value=status.polls - status.errors, sum_value=status.latency_sum_s)
            last.add_metric(key, status.last_latency_s)
        yield from (up, polls, errors, latency, last)
        yield device_failure_metric(self._gateway.device_status())

    def _message_metrics(self) -> Iterator[Metric]:
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
        for device, c in views.device_message_counters(self._gateway).items():
            key = [str(c["source"]), device]
            messages.add_metric(key, c["messages"])
            rejected.add_metric(key, c["rejected"])
            for reason, count in c["malformed_by_reason"].items():
                malformed.add_metric([*key, reason], count)
            for reason, count in c["refused_by_reason"].items():
                refused.add_metric([*key, reason], count)
            unavailable.add_metric(key, c["unavailable"])
            undeclared.add_metric(key, c["undeclared"])
        for name, c in views.source_message_counters(self._gateway).items():
            unmapped.add_metric([name], c.get("unmapped", 0))
        yield from (messages, rejected, malformed, refused, unavailable, undeclared, unmapped)

    def _queue_metrics(self) -> Iterator[Metric]:
        gw = self._gateway
        depth = GaugeMetricFamily(
            "edge_gateway_queue_depth", "Queued batches (bus) or samples (outbox)", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "edge_gateway_queue_oldest_age_seconds", "Age of the oldest undelivered entry", labels=["queue"]
        )
        dropped = CounterMetricFamily("edge_gateway_queue_dropped_samples", "Samples dropped", labels=["queue"])
        for sub in gw.bus.subscriptions():
            depth.add_metric([f"bus.{sub.name}"], sub.depth())
            dropped.add_metric([f"bus.{sub.name}"], sub.stats.dropped_samples)
        outbox = gw.outbox
        if outbox is not None:
            stats = outbox.stats
            depth.add_metric(["outbox"], stats.telemetry_samples)
            oldest_ns = stats.oldest_telemetry_ns
            oldest.add_metric(["outbox"], (time.time_ns() - oldest_ns) / 1e9 if oldest_ns else 0.0)
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
            for file, size in outbox.disk_usage().items():
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
                "edge_gateway_outbox_writable", "0 when the last outbox write failed", value=int(outbox.writable())
            )

    def _uplink_metrics(self) -> Iterator[Metric]:
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
        for status in views.uplinks(self._gateway):
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

    def _rule_metrics(self) -> Iterator[Metric]:
        evaluations = CounterMetricFamily("edge_gateway_rule_evaluations", "Rule evaluations", labels=["rule"])
        failures = CounterMetricFamily("edge_gateway_rule_failures", "Rule evaluations that raised", labels=["rule"])
        state = GaugeMetricFamily("edge_gateway_rule_state", "1 for the rule's current state", labels=["rule", "state"])
        for rule in views.rules(self._gateway)["rules"]:
            rule_id = str(rule["id"])
            if (value := _number(rule, ("evaluations", "evaluated"))) is not None:
                evaluations.add_metric([rule_id], value)
            if (value := _number(rule, ("failures", "errors"))) is not None:
                failures.add_metric([rule_id], value)
            for name in _RULE_STATES:
                state.add_metric([rule_id, name], int(rule["state"] == name))
        yield from (evaluations, failures, state)

    def _incentive_metrics(self) -> Iterator[Metric]:
        stage = self._gateway.incentives
        if stage is None:
            return
        refused = CounterMetricFamily(
            "edge_gateway_incentive_readings_refused",
            "Meter readings the incentive stage refused or ignored, by reason",
            labels=["reason"],
        )
        for reason, count in stage.counters.items():
            if reason != "clock_steps":
                refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily(
            "edge_gateway_incentive_clock_steps",
            "Times the gateway clock stepped back (the intervals it touched are flagged clock)",
            value=stage.counters.get("clock_steps", 0),
        )
        yield GaugeMetricFamily(
            "edge_gateway_incentive_epoch", "The incentive programme epoch in force", value=stage.epoch
        )


def build_registry(gateway: Gateway) -> CollectorRegistry:
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
