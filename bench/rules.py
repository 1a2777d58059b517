"""Rule engine benchmark: compiled expression evaluations per second, and samples per second through 200 rules.

    .venv/bin/python bench/rules.py --quick      # about 15 s
    .venv/bin/python bench/rules.py              # longer runs, steadier figures

Part 1 evaluates compiled expressions in a tight loop over a dict of current values (what the engine does for each
rule it evaluates). Part 2 builds 50 simulated zones (200 points), 50 derived points (15-minute CO2 averages) and
200 rules (for:, clear_when, let, schedules, cooldown, writes through the allowlist, publishes) and pushes one
batch per second of all 200 points, plus a tick per second, on a fake clock. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.model import Quality, Sample
from gateway.registry import PointInfo, PointRegistry
from rules.expr import compile_expr
from rules.runtime import RuleRuntime

ZONES = 50
T0 = 1_772_409_600 * 10**9 + 8 * 3600 * 10**9  # Monday 2026-03-02 08:00 UTC


def bench_expressions(evaluations: int) -> dict[str, float]:
    points = {"zone3.co2": "num", "zone3.occupancy": "num", "ahu3.vent_setpoint_pct": "num"}
    values = {"zone3.co2": 1200.0, "zone3.occupancy": 3, "ahu3.vent_setpoint_pct": 40.0}
    cases = {
        "simple": "zone3.co2 > 1000",
        "and": "zone3.co2 > 1000 and zone3.occupancy > 0",
        "arith": "clamp(ahu3.vent_setpoint_pct + 20, 40, 100)",
    }
    out: dict[str, float] = {}
    for name, source in cases.items():
        fn = compile_expr(source, points).evaluate  # type: ignore[arg-type]
        best = 0.0
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(evaluations):
                fn(values)
            best = max(best, evaluations / (time.perf_counter() - started))
        out[name] = best
        print(f"expression {name:<6} {source!r:<48} {best / 1e6:6.2f} M evals/s")
    return out


def build_site(directory: Path) -> tuple[PointRegistry, Path]:
    registry = PointRegistry()
    lines = ["version: 1", "points:"]
    for zone in range(ZONES):
        for name, kind in (("co2", "float"), ("temperature", "float"), ("occupancy", "int"), ("humidity", "float")):
            registry.add(PointInfo(id=f"z{zone}.{name}", kind=kind))  # type: ignore[arg-type]
        registry.add(PointInfo(id=f"z{zone}.damper_pct", writable=True, min=0, max=100))
        lines.append(f"  z{zone}.co2_avg15: {{avg: z{zone}.co2, window: 15min}}")
    lines += [
        "schedules:",
        '  office: {days: mon-fri, from: "07:00", to: "19:00", tz: Asia/Shanghai}',
        "allow:",
        "  modbus:",
        *[f"    - {{point: z{zone}.damper_pct, min: 20, max: 100}}" for zone in range(ZONES)],
        "rules:",
    ]
    for zone in range(ZONES):
        z = f"z{zone}"
        lines += [
            f"  - id: {z}-co2",
            f"    when: {z}.co2_avg15 > 1000 and {z}.occupancy > 0",
            "    for: 5min",
            f"    clear_when: {z}.co2_avg15 < 850",
            "    cooldown: 10min",
            "    then:",
            f"      - write: {{point: {z}.damper_pct, value: '=clamp({z}.co2 / 20, 40, 100)'}}",
            f"      - publish: {{topic: alerts/{z}/co2, payload: {{co2: '={z}.co2'}}}}",
            f"  - id: {z}-hot",
            f"    when: {z}.temperature > 26.5",
            "    for: 2min",
            f"    clear_when: {z}.temperature < 25.5",
            "    only_during: office",
            f"    then: [{{event: {{type: comfort, message: hot, data: {{t: '={z}.temperature'}}}}}}]",
            f"  - id: {z}-humid",
            f"    let: {{dew: '{z}.temperature - (100 - {z}.humidity) / 5'}}",
            "    when: dew > 18",
            "    then: [{alarm: {severity: minor, message: condensation risk, data: {dew: '=dew'}}}]",
            f"  - id: {z}-empty-vent",
            f"    when: {z}.occupancy == 0 and {z}.co2 < 600",
            "    for: 15min",
            f"    then: [{{write: {{point: {z}.damper_pct, value: 20}}}}]",
        ]
    path = directory / "bench-rules.yaml"
    path.write_text("\n".join(lines) + "\n")
    return registry, path


def bench_rules(seconds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        registry, path = build_site(Path(tmp))
        started = time.perf_counter()
        runtime = RuleRuntime.load([path], registry, timezone="Asia/Shanghai", state=None)
        load_ms = (time.perf_counter() - started) * 1000
    rules = len(runtime.rule_set.rules)
    rng = random.Random(5)
    level = {f"z{z}": 900.0 + rng.random() * 300 for z in range(ZONES)}
    batches = []
    for second in range(seconds):  # pre-built, so the figure is the engine's, not the generator's
        ts = T0 + second * 10**9
        batch = []
        for z in range(ZONES):
            zone = f"z{z}"
            level[zone] += rng.uniform(-8, 8)
            batch += [
                Sample(f"{zone}.co2", level[zone], ts, Quality.GOOD),
                Sample(f"{zone}.temperature", 24 + rng.random() * 4, ts, Quality.GOOD),
                Sample(f"{zone}.occupancy", rng.choice((0, 0, 1, 3, 8)), ts, Quality.GOOD),
                Sample(f"{zone}.humidity", 40 + rng.random() * 30, ts, Quality.GOOD),
            ]
        batches.append((ts, batch))
    samples = sum(len(b) for _, b in batches)
    gc.collect()
    actions = 0
    started = time.perf_counter()
    for ts, batch in batches:
        out = runtime.process(batch, ts)
        tick = runtime.tick(ts)
        actions += len(out.commands) + len(out.events) + len(out.publishes)
        actions += len(tick.commands) + len(tick.events) + len(tick.publishes)
    elapsed = time.perf_counter() - started
    rate = samples / elapsed
    print(
        f"rules: {rules} rules, {len(runtime.rule_set.derived)} derived points, load {load_ms:.0f} ms; "
        f"{samples} samples in {elapsed:.2f} s = {rate:,.0f} samples/s "
        f"({elapsed / seconds * 1000:.2f} ms per 1 s cycle of {ZONES * 4} points; {actions} actions)"
    )
    return {"rule_samples_per_s": rate, "rules": rules, "load_ms": load_ms, "cycle_ms": elapsed / seconds * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 15 seconds")
    args = parser.parse_args()
    evaluations = 1_000_000 if args.quick else 5_000_000
    seconds = 1800 if args.quick else 7200
    print(f"python {platform.python_version()} on {platform.machine()}, {time.strftime('%Y-%m-%d')}")
    exprs = bench_expressions(evaluations)
    engine = bench_rules(seconds)
    result = {
        "expr_evals_per_s": round(exprs["and"]),
        "expr_simple_evals_per_s": round(exprs["simple"]),
        "expr_arith_evals_per_s": round(exprs["arith"]),
        "rule_samples_per_s": round(engine["rule_samples_per_s"]),
        "rules": engine["rules"],
        "rule_cycle_ms_200_points": round(engine["cycle_ms"], 3),
        "load_ms_200_rules": round(engine["load_ms"], 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
