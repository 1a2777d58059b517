"""``edge-gateway mqtt discover``: listen to a broker and print a site file for the devices it carries.

Owns argument parsing, the listening (a plain paho client on its own thread for ``--seconds``) and the exit code;
recognising devices is ``drivers.mqtt.discover``. paho is imported when the command runs, not at ``--help``.

Exit codes: 0 ok (also when nothing was recognised: the output says so), 2 usage error, 3 the broker could not be
reached, 130 Ctrl-C (``gateway.cli``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

from drivers.mqtt.discover import Discovery
from drivers.mqtt.topics import check_topic_filter
from gateway.arguments import duration, host_port

#: a message larger than this is not looked at (no device status is this big; a firmware blob might be)
MAX_DISCOVERY_PAYLOAD = 256 * 1024


def register(subparsers: Any) -> None:
    mqtt = subparsers.add_parser("mqtt", help="MQTT tools: discover the devices on a broker")
    sub = mqtt.add_subparsers(dest="mqtt_command", metavar="COMMAND", required=True)
    discover = sub.add_parser(
        "discover",
        help="listen to a broker and print a site file with the devices, points and units it recognised",
        description="Recognises Zigbee2MQTT (bridge/devices), Tasmota (tele/+/SENSOR, STATE, LWT), Shelly Gen2 "
        "(events/rpc, status/<component>, online), SenML packs and The Things Stack v3 uplinks. Retained messages "
        "arrive at once; other devices report at their own interval, so listen at least that long.",
    )
    discover.add_argument("--broker", type=host_port(1883), required=True, metavar="HOST:PORT")
    discover.add_argument("--seconds", type=duration, default=10.0, help="how long to listen (default 10s)")
    discover.add_argument("--topic", type=_topic_filter, default="#", metavar="FILTER", help="default: #")
    discover.add_argument("--username", help="broker user; the password is read from $MQTT_PASSWORD")
    discover.set_defaults(handler=_discover)


def _topic_filter(text: str) -> str:
    try:
        return check_topic_filter(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _discover(args: argparse.Namespace) -> int:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = args.broker
    discovery = Discovery()
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe(args.topic, qos=0)

    def on_subscribe(client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        subscribed.set()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if len(message.payload) > MAX_DISCOVERY_PAYLOAD:
            return
        try:
            topic = message.topic
        except UnicodeDecodeError:
            return
        with lock:
            discovery.feed(topic, bytes(message.payload))

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-gateway-discover-{os.getpid()}")
    if args.username:
        client.username_pw_set(args.username, os.environ.get("MQTT_PASSWORD"))
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        print(f"cannot reach the broker at {host}:{port}: {exc}", file=sys.stderr)
        return 3
    client.loop_start()
    try:
        if not subscribed.wait(timeout=10.0):
            print(f"the broker at {host}:{port} did not accept the subscription to {args.topic!r}", file=sys.stderr)
            return 3
        print(f"listening to {args.topic!r} on {host}:{port} for {args.seconds:g} s ...", file=sys.stderr)
        time.sleep(args.seconds)
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        found = sum(1 for d in discovery.devices.values() if d.points)
        print(f"{discovery.messages} messages, {found} devices recognised", file=sys.stderr)
        sys.stdout.write(discovery.site_yaml(host=host, port=port))
    return 0
