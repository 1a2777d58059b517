"""Fleet benchmark: many gateway identities -> a three-node NATS cluster (MQTT on every node, JetStream R3) -> two
receiver processes sharing one durable consumer -> VictoriaMetrics and the verified ledger.

Each identity is the real platform uplink (gateway/uplinks/mqtt.py + contract.py) over its own outbox, fed with
simulated polls (four points each) and, every ``--incentive-every`` polls, a signed incentive record and its
checkpoint (tests/platform_services.py). The identities connect to the three nodes in turn. All identities run in
this one process (one event loop): on a small machine the publishing side, not the receivers, is usually the limit,
so ``msgs_per_s`` is a floor for the receivers; ``receiver_cpu_us_per_msg`` is what they cost.

    .venv/bin/python bench/fleet.py --quick        # 20 gateways, 100 polls each, as fast as the uplinks go

Figures (last line, JSON): gateways; messages (telemetry + incentive + checkpoint messages the receivers
committed); msgs_per_s from the first poll to the moment the receivers had committed everything; receiver_cpu_us_per_msg
(user + system CPU of both receivers / messages they handled, duplicates included); p99_ms (upper bound of the
latency-histogram bucket holding the 99th percentile of live telemetry, read time to commit); lost and duplicated
(samples at the TSDB and records at the ledger, against what the outboxes committed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.platform.progress import LATENCY_BUCKETS_MS  # importable through the path above
from tests.platform_services import (
    DedupVictoriaMetrics,
    Fleet,
    NatsCluster,
    read_report,
    settled_exactly_once,
)

_HANDLED = ("telemetry", "incentive", "checkpoint", "checkpoint.old", "status", "meta", "quarantined")


def p99(histogram: dict[str, int]) -> int | None:
    """Upper bound (ms) of the bucket holding the 99th percentile; -1 beyond the last bucket."""
    buckets = [(b, histogram.get(f"latency_ms.le_{b}", 0)) for b in LATENCY_BUCKETS_MS]
    buckets.append((-1, histogram.get("latency_ms.le_inf", 0)))
    total = sum(n for _, n in buckets)
    running = 0
    for bound, n in buckets:
        running += n
        if total and running >= 0.99 * total:
            return bound
    return None


async def run(
    gateways: int, polls: int, live_polls: int, interval: float, incentive_every: int, batch: int
) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    cluster = NatsCluster()
    tsdb = DedupVictoriaMetrics()
    cluster.start()
    tsdb.start()
    fleet = Fleet(
        work,
        gateways=gateways,
        ports=[node.mqtt_port for node in cluster.nodes],
        receiver_args=[
            *(a for url in cluster.urls for a in ("--nats", url)),
            *("--tsdb", tsdb.url, "--batch", str(batch)),
        ],
    )
    try:
        fleet.start_receivers()
        # phase 1, throughput: a backlog of `polls` reads per gateway is committed to the outboxes first (appending
        # is the slow part of this harness, not what is measured), then the uplinks start and publish it as fast
        # as they can; timed from their start until the receivers committed everything
        for n in range(polls):
            ts = int(time.time() * 1000) - (polls - n) * 10
            for identity in fleet.identities:
                await identity.poll(ts)
                if n % incentive_every == incentive_every - 1:
                    await identity.issue_incentive(ts)
        cpu_before = sum(r.cpu_seconds() for r in fleet.receivers)
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            started = time.monotonic()
            for identity in fleet.identities:
                tg.create_task(identity.run(stopping))
            await fleet.wait_caught_up(timeout=600)
            elapsed = time.monotonic() - started
            cpu = sum(r.cpu_seconds() for r in fleet.receivers) - cpu_before
            after_burst = read_report(fleet.db)["counters"]
            # phase 2, latency: paced live polls (every gateway every `interval` s), read time to commit
            await fleet.drive(live_polls, interval=interval, incentive_every=incentive_every)
            await fleet.wait_caught_up(timeout=600)
            stopping.set()
        report = read_report(fleet.db)
        counters = report["counters"]
        handled = sum(v for k, v in after_burst.items() if k in _HANDLED or k.startswith("duplicate."))
        messages = sum(after_burst.get(k, 0) for k in ("telemetry", "incentive", "checkpoint"))
        live = {k: counters.get(k, 0) - after_burst.get(k, 0) for k in counters if k.startswith("latency_ms.")}
        exact = await settled_exactly_once(fleet.identities, fleet.db, tsdb)
        fleet.stop_receivers()
        handled_all, busy = receiver_busy([r.log for r in fleet.receivers])
        result: dict[str, object] = {
            "gateways": gateways,
            "polls_per_gateway": polls,
            "messages": messages,
            "samples": after_burst.get("samples", 0),
            "duplicates_seen": sum(v for k, v in counters.items() if k.startswith("duplicate.")),
            "seconds": round(elapsed, 2),
            "msgs_per_s": round(messages / elapsed, 1),
            "receiver_cpu_us_per_msg": round(cpu * 1e6 / max(1, handled), 1),
            "receiver_msgs_per_busy_s": round(handled_all / busy, 1) if busy else None,
            "live_polls_per_gateway": live_polls,
            "live_interval_s": interval,
            "p99_ms": p99(live),
            "gaps": report["gaps"],
            "quarantined": counters.get("quarantined", 0),
            "lost": exact["lost"],
            "duplicated": exact["duplicated"],
        }
        return result
    finally:
        await fleet.close()
        cluster.close()
        tsdb.close()
        shutil.rmtree(work, ignore_errors=True)


def receiver_busy(logs: list[Path]) -> tuple[int, float]:
    """(messages, busy seconds) summed over the receivers' "stopped after" lines (after a clean stop)."""
    messages, busy = 0, 0.0
    for log in logs:
        for match in re.finditer(
            r"stopped after (\d+) message\(s\) in \d+ batch\(es\), busy ([\d.]+) s", log.read_text()
        ):
            messages += int(match.group(1))
            busy += float(match.group(2))
    return messages, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 gateways x 100 polls")
    parser.add_argument("--gateways", type=int, default=50)
    parser.add_argument("--polls", type=int, default=300)
    parser.add_argument("--live-polls", type=int, default=50, help="paced polls per gateway for the latency")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between paced poll rounds")
    parser.add_argument("--incentive-every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    if args.quick:
        args.gateways, args.polls, args.live_polls = 20, 100, 25
    result = asyncio.run(
        run(args.gateways, args.polls, args.live_polls, args.interval, args.incentive_every, args.batch)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
