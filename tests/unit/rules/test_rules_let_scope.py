"""A rule's `let` values are its own: a `for:` timer that fires from tick() must not read another rule's value of
the same name (found in review: the write carried the other rule's 999 instead of 40)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from gateway.model import Command, Quality, Sample
from gateway.registry import PointInfo
from rules.runtime import RuleRuntime

S = 10**9


def test_timed_firing_uses_its_own_let_values(tmp_path: Path) -> None:
    registry = {p: PointInfo(id=p) for p in ("a.v", "b.v")}
    registry["ahu.sp"] = PointInfo(id="ahu.sp", writable=True, min=0, max=1000)
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(
            """
            version: 1
            allow:
              modbus:
                - {point: ahu.sp, min: 0, max: 1000}
            rules:
              - id: b
                let: {x: "a.v * 2"}
                when: x > 10
                for: 1min
                then:
                  - write: {point: ahu.sp, value: "=x"}
              - id: a
                let: {x: "b.v"}
                when: x > 0
                then:
                  - publish: {topic: t/a, payload: {x: "=x"}}
            """
        )
    )
    runtime = RuleRuntime.load([path], registry, timezone="UTC", state=None)  # type: ignore[arg-type]
    t0 = 1_700_000_000 * S
    runtime.process([Sample("a.v", 20.0, t0, Quality.GOOD), Sample("b.v", 999.0, t0, Quality.GOOD)], t0)
    out = runtime.tick(t0 + 61 * S)
    assert out.commands == [Command("ahu.sp", 40.0, "b")]
