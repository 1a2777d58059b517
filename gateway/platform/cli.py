"""``edge-gateway platform receive|report``: the city platform's side of the contract, as a command.

``receive`` runs one receiver process until SIGTERM/SIGINT (run N of them on one progress database to share the
work); ``report`` prints the progress database's counters, per-gateway gaps, ledger heads and recent quarantine as
JSON. Exit codes: 0 ok, 1 bad arguments or input, 3 a runtime failure (broker, TSDB or database unusable).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("gateway.platform")


def register(subparsers: Any) -> None:
    platform = subparsers.add_parser("platform", help="the city platform's receiver (verify, deduplicate, store)")
    sub = platform.add_subparsers(dest="platform_command", metavar="COMMAND", required=True)
    receive = sub.add_parser(
        "receive",
        help="consume the platform contract from NATS JetStream or MQTT into a TSDB and a verified ledger",
        description="Validate every message against the contract's schemas, deduplicate, track seq per gateway, "
        "verify incentive records and checkpoints with the gateways' public keys, write telemetry to an InfluxDB "
        "v2 write API, and quarantine bad input. See docs/platform-receiver.md.",
    )
    source = receive.add_mutually_exclusive_group(required=True)
    source.add_argument("--nats", metavar="URL", action="append", help="a NATS server URL (repeat for a cluster)")
    source.add_argument("--mqtt", metavar="HOST:PORT", help="an MQTT broker with shared subscriptions")
    receive.add_argument("--db", type=Path, required=True, help="the progress database (shared by all receivers)")
    receive.add_argument("--keys", type=Path, required=True, help="directory of <site>/<gateway>.pub.pem")
    receive.add_argument("--tsdb", required=True, metavar="URL", help="InfluxDB v2 base URL (…/api/v2/write)")
    receive.add_argument("--bucket", default="platform")
    receive.add_argument("--org", default="")
    receive.add_argument("--prefix", default="city", help="the contract's topic prefix (default city)")
    receive.add_argument("--batch", type=int, default=500, help="messages per TSDB write and commit")
    receive.add_argument("--replicas", type=int, default=3, help="JetStream stream replicas if it is created")
    receive.add_argument("--ack-wait", type=float, default=30.0, help="seconds before JetStream redelivers")
    receive.add_argument("--linger", type=float, default=0.05, help="seconds a short JetStream batch is topped up")
    receive.add_argument(
        "--capture",
        choices=("mqtt", "subjects"),
        default="mqtt",
        help="what the JetStream consumer reads: 'mqtt' (default) the QoS 1 messages NATS's MQTT side stored before "
        "its PUBACK ($MQTT_msgs); 'subjects' a stream over <prefix>.> (publishers that speak NATS)",
    )
    receive.add_argument("--durable", default="platform-receiver", help="the shared JetStream consumer's name")
    receive.add_argument("--group", default="platform-receiver", help="the MQTT shared subscription group")
    receive.add_argument("--client-id", help="MQTT client id (fixed per receiver: its session survives restarts)")
    receive.set_defaults(handler=_receive)
    report = sub.add_parser("report", help="counters, gaps, ledger heads and recent quarantine, as JSON")
    report.add_argument("--db", type=Path, required=True)
    report.add_argument("--quarantine", type=int, default=20, help="how many recent quarantined messages to list")
    report.set_defaults(handler=_report)


def _receive(args: argparse.Namespace) -> int:
    from gateway.logs import setup_logging

    setup_logging()
    # nats-py logs a traceback per failed connection attempt; the source's error callback says it once instead
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
    token = os.environ.get("PLATFORM_TSDB_TOKEN")
    if args.batch < 1 or args.ack_wait <= 0 or args.linger < 0:
        print("edge-gateway platform receive: --batch must be 1 or more, --ack-wait positive", file=sys.stderr)
        return 1
    if not args.tsdb.startswith(("http://", "https://")):
        print(f"edge-gateway platform receive: --tsdb {args.tsdb!r} is not an http(s) URL", file=sys.stderr)
        return 1
    if not args.keys.is_dir():
        print(f"edge-gateway platform receive: --keys {args.keys} is not a directory", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_run(args, token))
    except (OSError, sqlite3.Error, TimeoutError) as exc:
        print(f"edge-gateway platform receive: {exc or type(exc).__name__}", file=sys.stderr)
        return 3


async def _run(args: argparse.Namespace, token: str | None) -> int:
    from gateway.platform.progress import Progress
    from gateway.platform.receiver import InfluxWriter, PublicKeys, Receiver
    from gateway.platform.sources import JetStreamSource, MqttSharedSource

    source: JetStreamSource | MqttSharedSource
    if args.nats:
        source = JetStreamSource(
            servers=args.nats, prefix=args.prefix, durable=args.durable, replicas=args.replicas,
            batch=args.batch, ack_wait=args.ack_wait, linger=args.linger, capture=args.capture,
        )  # fmt: skip
    else:
        host, _, port = args.mqtt.rpartition(":")
        if not host or not port.isdigit():
            print(f"edge-gateway platform receive: --mqtt {args.mqtt!r} is not HOST:PORT", file=sys.stderr)
            return 1
        source = MqttSharedSource(
            host=host, port=int(port), prefix=args.prefix, group=args.group,
            client_id=args.client_id or f"platform-receiver-{os.getpid()}", batch=args.batch,
        )  # fmt: skip
    progress = Progress(args.db, keys=PublicKeys(args.keys))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    receiving = False

    def on_signal() -> None:
        stopping.set()
        if not receiving and main is not None:
            main.cancel()  # still connecting or waiting for the broker: nothing in hand to finish

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with source, InfluxWriter(url=args.tsdb, org=args.org, bucket=args.bucket, token=token) as tsdb:
            receiver = Receiver(source=source, tsdb=tsdb, progress=progress, prefix=args.prefix)
            where = f"NATS JetStream {' '.join(args.nats)}" if args.nats else f"MQTT {args.mqtt}"
            receiving = True
            log.info("platform: receiving (%s)", where)
            await receiver.run(stopping)
            log.info(
                "platform: stopped after %d message(s) in %d batch(es), busy %.3f s",
                receiver.messages, receiver.batches, receiver.busy,
            )  # fmt: skip
    except asyncio.CancelledError:
        log.info("platform: stopped before receiving anything")
    finally:
        progress.close()
    return 0


def _report(args: argparse.Namespace) -> int:
    from gateway.platform.progress import Progress
    from gateway.platform.receiver import summary

    if not args.db.exists():
        print(f"edge-gateway platform report: {args.db} does not exist", file=sys.stderr)
        return 1
    progress = Progress(args.db, keys=lambda _gateway: None)
    try:
        report = summary(progress)
        report["recent_quarantine"] = progress.quarantined(args.quarantine)
    finally:
        progress.close()
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
