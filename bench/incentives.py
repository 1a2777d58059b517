"""Incentive ledger throughput: meter samples stored per second and records issued (signed, chained, committed) per
second, on a simulated building of 200 flats read every 10 s for 6 hours with 15-minute intervals (the programme's
defaults otherwise: daily netting, 5-minute max gap). Each record carries the readings its interval used (90 here).

    .venv/bin/python bench/incentives.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from gateway.config.site import load_site
from gateway.incentives.stage import IncentiveStage
from gateway.model import Sample

FLATS = 200
STEP_S = 10
HOURS = 6
NS = 1_000_000_000
T0 = 1_793_577_600 * NS


def site_text() -> str:
    devices = "\n".join(
        f"  - {{id: apt{i}, driver: simulator, profile: sim-energy-meter, seed: {i}}}" for i in range(FLATS)
    )
    accounts = "\n".join(f'    - {{id: "ACC-{i:04d}", meters: [apt{i}.energy_kwh]}}' for i in range(FLATS))
    return f"""version: 1
gateway: {{id: bench, site: tower}}
devices:
{devices}
incentives:
  baseline: {{method: like_days, days: 10, min_days: 3}}
  emission_factor: {{kg_per_kwh: 0.5703}}
  max_power_kw: 40
  signing_key_file: keys/s.pem
  pseudonym_key_file: keys/p.key
  generate_missing_keys: true
  accounts:
{accounts}
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "site.yaml").write_text(site_text())
        stage = IncentiveStage.open(load_site(root / "site.yaml"), root / "data")
        steps = HOURS * 3600 // STEP_S
        samples = records = 0
        closing = 0.0  # time spent in the calls that closed intervals (compute, baseline, sign, commit)
        started = time.perf_counter()
        for step in range(steps + 1):
            ts = T0 + step * STEP_S * NS
            batch = [Sample(f"apt{i}.energy_kwh", round(1000 + i + step * 0.003, 3), ts) for i in range(FLATS)]
            samples += len(batch)
            call = time.perf_counter()
            # records only (the chain-head checkpoint that follows each issuing call is not a record)
            issued = sum(event.type == "incentive" for event in stage.process(batch, ts))
            if issued:
                closing += time.perf_counter() - call
            records += issued
        elapsed = time.perf_counter() - started
        stage.close()
    result = {
        "flats": FLATS,
        "samples": samples,
        "records": records,
        "seconds": round(elapsed, 2),
        "samples_per_s": round(samples / elapsed),
        "us_per_sample_incl_records": round(elapsed / samples * 1e6, 1),
        "records_per_s": round(records / closing),
    }
    print(f"{samples} meter samples, {records} records in {elapsed:.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
