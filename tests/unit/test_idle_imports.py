"""A running gateway imports only what its site uses (issue 13 item 8: idle memory).

``run`` imports the command groups only up to its own (not the incentive key tools with cryptography, the rules
tools or the drivers' sub-commands), and the status server imports prometheus-client at the first ``/metrics``
scrape, not at start. Each import check runs in a fresh interpreter: ``sys.modules`` of this test process says
nothing. The SQLite connections a gateway keeps open have bounded page caches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gateway.incentives.ledger as ledger_module
import gateway.outbox as outbox_module
import rules.state as state_module
from gateway.incentives.ledger import Ledger
from gateway.outbox import Outbox
from rules.state import RuleStateStore
from tests.services import free_port

REPO = Path(__file__).resolve().parents[2]


def _run_fresh(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )


def _modules_after(code: str) -> set[str]:
    """Every module a fresh interpreter has imported after running ``code``."""
    done = _run_fresh(f"{textwrap.dedent(code)}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))")
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


_PARSE = """
import contextlib, io
from gateway.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({argv!r})
    except SystemExit:
        pass
"""


def test_run_imports_only_the_core_command_group() -> None:
    loaded = _modules_after(_PARSE.format(argv=["--log-level", "debug", "run", "--help"]))
    assert "gateway.commands" in loaded
    not_needed = {"cryptography", "gateway.incentives.cli", "rules.cli", "gateway.http.cli", "drivers.modbus.cli"}
    assert not loaded & not_needed


def test_help_and_an_unknown_command_still_list_every_command() -> None:
    loaded = _modules_after(_PARSE.format(argv=["--help"]))
    assert {"gateway.incentives.cli", "rules.cli", "gateway.platform.cli", "drivers.modbus.cli"} <= loaded
    done = _run_fresh("from gateway.cli import main\nraise SystemExit(main(['bogus']))")
    assert done.returncode == 2
    assert "invalid choice: 'bogus'" in done.stderr
    for command in ("run", "check", "modbus", "rules", "incentives", "keys", "status", "platform"):
        assert f"'{command}'" in done.stderr


def test_an_abbreviated_global_option_is_still_parsed_as_before() -> None:
    """The command-word finder does not abbreviate options: it imports every group and argparse decides."""
    done = _run_fresh("from gateway.cli import main\nraise SystemExit(main(['--log-l', 'bogus', 'run', 'x.yaml']))")
    assert done.returncode == 2
    assert "argument --log-level: invalid choice: 'bogus'" in done.stderr


_MODBUS_SITE = """\
version: 1
gateway: {id: gw1, site: plant}
http: {enabled: false}
modbus_buses:
  - {id: line1, type: tcp, host: 127.0.0.1, port: PORT, timeout: 200ms}
devices:
  - {id: meter1, driver: modbus, bus: line1, profile: eastron-sdm630, unit: 1, poll: 1s}
"""


def test_a_modbus_only_site_runs_without_importing_another_driver(tmp_path: Path) -> None:
    """The site schema is assembled from the drivers the file names: the BACnet, MQTT and simulator plugins and
    their config models stay unimported, and so do their protocol libraries. (``check`` does load every plugin, to
    report one that cannot be loaded.)"""
    site = tmp_path / "site.yaml"
    site.write_text(_MODBUS_SITE.replace("PORT", str(free_port())))  # nothing listens: the run retries, then stops
    argv = ["run", str(site), "--data-dir", str(tmp_path / "data"), "--duration", "1", "--http", "off"]
    loaded = _modules_after(f"from gateway.cli import main\nassert main({argv!r}) == 0")
    assert {"drivers.modbus.plugin", "drivers.modbus.config"} <= loaded  # the site was loaded, its driver too
    other_drivers = {m for m in loaded if m.startswith(("drivers.bacnet", "drivers.mqtt", "drivers.simulator"))}
    assert not other_drivers
    assert not {m for m in loaded if m.partition(".")[0] in {"bacpypes3", "paho", "aiomqtt"}}


def test_prometheus_client_is_imported_at_the_first_scrape(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\ngateway: {id: gw1, site: plant}\n"
        "devices:\n  - {id: zone1, driver: simulator, profile: sim-zone, poll: 1s}\n"
    )
    done = _run_fresh(
        f"""
        import asyncio, sys
        from aiohttp.test_utils import TestClient, TestServer
        from gateway.config.site import load_site
        from gateway.http.server import create_app
        from gateway.supervisor import Gateway

        async def main():
            gateway = Gateway(load_site({str(site)!r}), data_dir={str(tmp_path / "data")!r}, http_listen="off")
            async with TestClient(TestServer(create_app(gateway))) as client:
                for path in ("/healthz", "/readyz", "/api/status", "/api/points"):
                    await (await client.get(path)).read()
                print("before", "prometheus_client" in sys.modules, "gateway.metrics" in sys.modules)
                for _ in range(2):
                    response = await client.get("/metrics")
                    body = await response.text()
                    kind = response.headers["Content-Type"]
                    print("scrape", response.status, body.count("edge_gateway_info{{"), body.count("process_cpu"))
                from prometheus_client import CONTENT_TYPE_LATEST
                print("after", "prometheus_client" in sys.modules, kind == CONTENT_TYPE_LATEST)

        asyncio.run(main())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "before False False",
        "scrape 200 1 3",
        "scrape 200 1 3",
        "after True True",
    ]


async def test_sqlite_page_caches_are_bounded(tmp_path: Path) -> None:
    """Each long-lived connection has its documented page-cache bound, not SQLite's 2000 KiB default."""
    outbox = Outbox(tmp_path / "outbox.db")
    try:
        for db in (outbox._db, outbox._reader):  # both connections: the writer thread's and the readers'
            assert db.execute("PRAGMA cache_size").fetchone() == (-outbox_module.CACHE_KIB,)
    finally:
        await outbox.close()
    ledger = Ledger.open(tmp_path, durable=False)
    try:
        assert ledger._db.execute("PRAGMA cache_size").fetchone() == (-ledger_module.CACHE_KIB,)
    finally:
        ledger.close()
    store = RuleStateStore(tmp_path / "rules.db")
    try:
        assert store._db.execute("PRAGMA cache_size").fetchone() == (-state_module.CACHE_KIB,)
    finally:
        store.close()
    assert outbox_module.CACHE_KIB < 2000 and ledger_module.CACHE_KIB < 2000 and state_module.CACHE_KIB < 2000
