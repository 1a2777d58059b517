"""Private files and the data-directory lock: modes of everything the gateway creates, refusals of exposed secrets."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import DataDirBusy
from gateway.files import (
    DataDirLock,
    check_private_file,
    create_private_sqlite,
    ensure_private_dir,
    private_umask,
)
from gateway.model import Quality, Sample
from gateway.outbox import Outbox


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The common default (022): files would be world-readable unless created private on purpose."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_a_new_sqlite_database_and_its_wal_and_shm_files_are_0600(tmp_path: Path) -> None:
    db = create_private_sqlite(tmp_path / "ledger.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (1)")
        assert {p.name: oct(mode(p)) for p in tmp_path.iterdir()} == {
            "ledger.db": "0o600",
            "ledger.db-wal": "0o600",
            "ledger.db-shm": "0o600",
        }
    finally:
        db.close()


def test_an_existing_world_readable_database_is_narrowed_and_keeps_its_data(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE t (x)")
    old.execute("INSERT INTO t VALUES (42)")
    old.commit()
    old.close()
    os.chmod(path, 0o644)
    db = create_private_sqlite(path)
    try:
        assert db.execute("SELECT x FROM t").fetchall() == [(42,)]
    finally:
        db.close()
    assert mode(path) == 0o600


def test_the_data_dir_is_created_0700_and_an_existing_one_keeps_its_mode(tmp_path: Path) -> None:
    created = ensure_private_dir(tmp_path / "a" / "data")
    assert mode(created) == 0o700
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o750)
    os.chmod(existing, 0o750)
    ensure_private_dir(existing)
    assert mode(existing) == 0o750


def test_private_umask_applies_inside_the_block_only(tmp_path: Path) -> None:
    with private_umask():
        (tmp_path / "secret").write_text("x")
    (tmp_path / "public").write_text("x")
    assert mode(tmp_path / "secret") == 0o600
    assert mode(tmp_path / "public") == 0o644


@pytest.mark.parametrize(
    ("file_mode", "message"),
    [
        (0o644, "signing key {path} is readable by others (mode 0644): chmod 600 {path}"),
        (0o640, "signing key {path} is readable by its group (mode 0640): chmod 600 {path}"),
        (0o602, "signing key {path} is writable by others (mode 0602): chmod 600 {path}"),
        (0o600, None),
        (0o400, None),
    ],
)
def test_a_secret_open_to_group_or_others_is_refused_like_ssh(
    tmp_path: Path, file_mode: int, message: str | None
) -> None:
    path = tmp_path / "key.pem"
    path.write_text("secret")
    os.chmod(path, file_mode)
    if message is None:
        check_private_file(path, "signing key")
        return
    with pytest.raises(PermissionError) as info:
        check_private_file(path, "signing key")
    assert str(info.value) == message.format(path=path)


async def test_the_outbox_its_wal_and_shm_and_a_new_data_dir_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    outbox = Outbox(data / "outbox.db")
    try:
        await outbox.append([Sample("m1.energy_kwh", 1.0, 1, Quality.GOOD)])
        files = {p.name: oct(mode(p)) for p in data.iterdir()}
    finally:
        await outbox.close()
    assert mode(data) == 0o700
    assert files == {"outbox.db": "0o600", "outbox.db-wal": "0o600", "outbox.db-shm": "0o600"}


def test_the_rule_state_file_is_private(tmp_path: Path) -> None:
    from rules.state import RuleStateStore

    store = RuleStateStore(tmp_path / "rules-state.db")
    store.close()
    assert mode(tmp_path / "rules-state.db") == 0o600


def test_the_lock_is_exclusive_names_its_holder_and_is_free_again_after_release(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = DataDirLock(data).acquire()
    assert (data / "gateway.lock").read_text() == f"{os.getpid()}\n"
    assert mode(data / "gateway.lock") == 0o600
    assert mode(data) == 0o700
    with pytest.raises(DataDirBusy) as info:
        DataDirLock(data).acquire()  # another open file description: flock refuses it, even in one process
    assert str(info.value) == (
        f"data directory {data} is in use by another gateway process (PID {os.getpid()}): "
        "stop it first, or give this one another --data-dir"
    )
    first.release()
    with DataDirLock(data) as again:
        assert again.held
    assert not again.held
