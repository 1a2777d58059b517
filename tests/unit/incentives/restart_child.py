"""A gateway stand-in for the restart test: feeds a meter story to the stage, appends events to an 'outbox' file.

``python -m tests.unit.incentives.restart_child SITE DATA_DIR OUTBOX FIRST LAST [--die-after-first-issue]``

Prints ``fed <index>`` after each batch (the parent kills it with SIGKILL at a chosen index). With
``--die-after-first-issue`` it kills itself with SIGKILL right after the first interval record is issued and before the
record reaches the outbox file: the worst moment for exactly-once.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import orjson

from gateway.config.site import load_site
from gateway.incentives.stage import IncentiveStage
from gateway.model import Sample

NS = 1_000_000_000
T0 = 1_793_577_600 * NS
STEP = 30 * NS


def story(index: int) -> list[Sample]:
    """The meters' readings at step ``index``: deterministic, so every run sees the same world."""
    ts = T0 + index * STEP
    return [
        Sample("apt1.energy_kwh", round(100 + index * 0.011, 6), ts),
        Sample("apt2.energy_kwh", round(40 + index * 0.023 + (index % 7) * 0.001, 6), ts + 2 * NS),
    ]


def main(argv: list[str]) -> int:
    site_path, data_dir, outbox_path, first, last = argv[:5]
    die_after_issue = "--die-after-first-issue" in argv
    stage = IncentiveStage.open(load_site(Path(site_path)), Path(data_dir))
    with open(outbox_path, "ab") as outbox:
        for index in range(int(first), int(last) + 1):
            batch = story(index)
            events = stage.process(batch, max(sample.ts for sample in batch))
            if die_after_issue and any(e.body.get("kind") == "interval" for e in events):
                os.kill(os.getpid(), signal.SIGKILL)
            for event in events:
                outbox.write(orjson.dumps(event.body) + b"\n")
            outbox.flush()
            os.fsync(outbox.fileno())
            print(f"fed {index}", flush=True)
    stage.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
