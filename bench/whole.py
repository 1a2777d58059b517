"""The whole gateway, process against its own figures: ``edge-gateway run`` on a Modbus site with the platform uplink.

Starts a pymodbus TCP server in another process (50 devices x 100 f32 points in holding and input registers, values
a function of point and second, see bench/_whole_harness.py), Mosquitto on a free loopback port, and a subscriber
that counts and checks every delivered value; generates a site file in a temp dir, checks it with
``edge-gateway check``, runs ``edge-gateway run`` on it (polled every second, platform uplink at QoS 1, data dir in
the temp dir), and after the warm-up samples the gateway process's CPU (all threads) and RSS at 1 Hz.

    .venv/bin/python bench/whole.py --quick              # about 2 minutes, 30 s of it warm-up
    .venv/bin/python bench/whole.py --quick --no-uplink  # outbox only: a reader follows outbox.db and checks it
    .venv/bin/python bench/whole.py --minutes 60         # a soak
    .venv/bin/python bench/whole.py --devices 2 --points 5 --minutes 0.5 --warmup 5

The last line is one JSON object: cpu_us_per_point, rss_mib (at the end), rss_growth_mib_per_min (least squares
after the warm-up), log_lines_per_min (the gateway's stdout + stderr), delivered_per_s, bad_values. Every process
it starts is stopped on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _whole_harness as harness


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.common_arguments(parser)
    parser.add_argument("--no-uplink", action="store_true", help="no platform uplink: the outbox is the delivery")
    parser.add_argument("--keep-log", type=Path, help="copy the gateway's log here at the end")
    args = parser.parse_args()
    warmup, seconds = harness.window(args)
    harness.check_limits(args.devices, args.points)

    print(harness.machine_line())
    print(
        f"workload: {args.devices} devices x {args.points} f32 points polled every 1 s "
        f"({args.devices * args.points} values/s), "
        f"{'outbox only' if args.no_uplink else 'platform uplink to Mosquitto at QoS 1'}; "
        f"warm-up {warmup:.0f} s, measured {seconds:.0f} s",
        flush=True,
    )
    with harness.interrupts_as_exit(), ExitStack() as stack:
        modbus_port = stack.enter_context(harness.simulator(args.devices, args.points))
        broker_port = subscriber = None
        if not args.no_uplink:
            broker_port = stack.enter_context(harness.broker())
            subscriber = harness.Subscriber(broker_port)
            stack.callback(subscriber.close)
        result = harness.run_edge(
            modbus_port=modbus_port,
            broker_port=broker_port,
            subscriber=subscriber,
            devices=args.devices,
            points=args.points,
            warmup=warmup,
            seconds=seconds,
            keep=args.keep_log,
            telemetry_version=args.telemetry_version,
        )
    for line in harness.describe("edge-gateway", result):
        print(line)
    print(json.dumps(result.figures()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
