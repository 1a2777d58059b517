"""Typed status the gateway's parts hand the supervisor, and the snapshot the HTTP views and /metrics read.

Owns the shapes only (no behaviour): ``UplinkStatus`` (what an uplink runner reports) and ``UplinkRunnerPart`` (what
the supervisor runs for an uplink), ``CommandEntry``, the parts of ``GatewayStatus`` (the one immutable snapshot the
views and /metrics read; ``gateway.snapshot`` takes it) and the optional counters a source may offer
(``DeviceCounting``, ``SourceCounting``). Must never import the supervisor, the site loader, a driver or a protocol
library (the plugin registry and the views import it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NotRequired, Protocol, TypedDict, runtime_checkable

from gateway.driver_api import DeviceStatus
from gateway.model import Sample
from gateway.registry import PointInfo

if TYPE_CHECKING:
    from gateway.config.site_types import Site
    from gateway.outbox import OutboxStats
    from gateway.rule_report import ReloadResult
    from rules.runtime import RuleStatus as RuleState

#: what ``UplinkRunner.state`` moves through: starting -> up <-> retrying -> stopped
UplinkState = Literal["starting", "up", "retrying", "stopped"]


class UplinkStatus(TypedDict):
    """One uplink's queue figures for /api/uplinks and /metrics (``UplinkRunner.status``)."""

    name: str
    state: UplinkState
    backlog_samples: int
    backlog_events: int
    replaying: bool
    oldest_age_s: float
    sent_samples: int
    sent_events: int
    replayed_samples: int
    dropped_samples: int
    quarantined: int
    requests_ok: int
    requests_failed: int
    in_flight: int
    retry_in_s: float
    last_error: str | None
    #: uplinks over a broker connection (``BrokerReporting``): the broker in use or being tried, failovers so far
    broker: NotRequired[str]
    failovers: NotRequired[int]


@runtime_checkable
class BrokerReporting(Protocol):
    """An uplink over an MQTT broker list (gateway/mqtt_connection.py) says which broker it uses and how often it
    failed over: ``{"broker": "host:port", "failovers": n}``."""

    def broker_status(self) -> Mapping[str, str | int]: ...


class UplinkFailure(TypedDict):
    """An uplink whose status call raised: its name and why (the page shows it instead of taking the page down)."""

    name: str
    state: Literal["unknown"]
    last_error: str


class UplinkRunnerPart(Protocol):
    """What the supervisor runs for one uplink (``gateway.uplinks.runner.UplinkRunner``)."""

    @property
    def name(self) -> str: ...

    async def run(self, stopping: asyncio.Event) -> None: ...

    def status(self) -> UplinkStatus: ...


class CommandEntry(TypedDict):
    """One command and what became of it (/api/commands)."""

    ts: int
    point: str
    value: float | int | bool | str | None
    origin: str
    result: str
    detail: str | None


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One bus subscriber's queue."""

    name: str
    policy: str
    depth: int
    capacity: int
    delivered_samples: int
    dropped_samples: int
    blocked_s: float


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """The durable outbox: its counters (a copy) and budgets."""

    writable: bool
    stats: OutboxStats
    telemetry_budget: int
    event_budget: int
    disk_margin: int
    disk_usage: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class RulesStatus:
    """The rule runtime's per-rule states, the problem log and the last reload."""

    loaded: bool
    rules: tuple[RuleState, ...]
    problems: tuple[str, ...]
    resolved_problems: tuple[str, ...]
    reload: ReloadResult | None
    #: the runtime's status call failed: why (the page shows it instead of the rules)
    error: str | None


@dataclass(frozen=True, slots=True)
class IncentivesStatus:
    """Today's incentive records (in the gateway's time zone) and the readings the stage refused, by reason."""

    enabled: bool
    day: str | None
    records: tuple[Mapping[str, object], ...]
    error: str | None
    refused: Mapping[str, int]
    clock_steps: int
    epoch: int | None


@dataclass(frozen=True, slots=True)
class GatewayStatus:
    """Everything the status page, the API and /metrics show, taken at once (``Gateway.status_snapshot``): copies,
    never the live objects, so a view cannot mutate the gateway and sees one consistent moment."""

    now_ns: int
    gateway_id: str
    site: str
    name: str | None
    timezone: str
    started: bool
    started_ns: int
    #: the gateway runs at least one source
    has_sources: bool
    devices: tuple[DeviceStatus, ...]
    #: per device / per source: what a message-driven source (MQTT) counted
    device_counters: Mapping[str, Mapping[str, object]]
    source_counters: Mapping[str, Mapping[str, object]]
    points: tuple[PointInfo, ...]
    latest: Mapping[str, Sample]
    #: points with no value yet that are not late -> when their first value comes
    awaiting: Mapping[str, str]
    #: sparkline history (only when asked for): point -> (ts_ns, value) oldest first
    history: Mapping[str, tuple[tuple[int, float], ...]]
    rules: RulesStatus
    uplinks: tuple[UplinkStatus | UplinkFailure, ...]
    queues: tuple[QueueStatus, ...]
    published_samples: int
    outbox: OutboxStatus | None
    incentives: IncentivesStatus
    commands: tuple[CommandEntry, ...]


class StatusSource(Protocol):
    """What the views and /metrics read: one snapshot per request (``gateway.supervisor.Gateway``)."""

    def status_snapshot(
        self, *, watch: bool = False, records: bool = False, history: bool = False, point: str | None = None
    ) -> GatewayStatus: ...


class ServedGateway(StatusSource, Protocol):
    """What the status server (gateway/http/server.py) reads of the gateway it serves (``gateway.supervisor.Gateway``):
    a snapshot for every view, and, without taking one, what the probes and the history route need. A protocol, so
    the server does not import the supervisor that starts it."""

    @property
    def site(self) -> Site: ...

    @property
    def started(self) -> asyncio.Event: ...

    @property
    def started_ns(self) -> int: ...

    def knows_point(self, point: str) -> bool:
        """A point of the registry, or one that has a value (a rule's derived point)."""
        ...


@runtime_checkable
class DeviceCounting(Protocol):
    """A message-driven source (MQTT) that counts messages per device."""

    def device_counters(self) -> Mapping[str, Mapping[str, object]]: ...


@runtime_checkable
class SourceCounting(Protocol):
    """A message-driven source that counts messages for the whole connection (also those reaching no device)."""

    def source_counters(self) -> Mapping[str, object]: ...
