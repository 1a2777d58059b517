"""The supervisor owns the rule engine's persistence: the engine's steps do no I/O, and the running gateway writes
what they changed after each step (not only at shutdown), so a power cut keeps a latch that fired a second ago."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.config.site import load_site
from gateway.supervisor import Gateway
from rules.state import RuleStateStore, SavedRuleState

SITE = """version: 1
gateway: {id: gw1, site: tower}
devices:
  - {id: apt1, driver: simulator, profile: sim-energy-meter, seed: 1}
rules: [rules.yaml]
"""

RULES = """version: 1
rules:
  - id: meter-alive
    when: apt1.energy_kwh >= 0
    then: [{event: {type: note, message: the meter answers}}]
"""


async def _saved_rule_state(path: Path, rule_id: str) -> SavedRuleState:
    while True:
        store = RuleStateStore(path)
        try:
            saved = store.load().get(rule_id)
        finally:
            store.close()
        if saved is not None:
            return saved
        await asyncio.sleep(0.05)


async def test_a_running_gateway_saves_rule_state_after_the_step_that_changed_it(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text(SITE)
    (tmp_path / "rules.yaml").write_text(RULES)
    data = tmp_path / "data"
    gateway = Gateway(load_site(tmp_path / "site.yaml"), data_dir=data, http_listen="off")
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    try:
        await asyncio.wait_for(gateway.started.wait(), 10)
        # the gateway is still running: only a flush after the step can have written the row
        saved = await asyncio.wait_for(_saved_rule_state(data / "rules-state.db", "meter-alive"), 10)
        assert saved.state == "active"
        assert not runner.done()
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
