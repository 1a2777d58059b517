"""Files only the gateway may read, and the lock that keeps one gateway process per data directory.

Owns: ``ensure_private_dir`` (the data directory is created 0700), ``create_private_sqlite`` (a SQLite database,
and with it its ``-wal`` and ``-shm`` files, created 0600), ``private_umask`` (for other files written in one go),
``check_private_file`` (a secret readable by group or others is refused, the way ssh refuses a private key) and
``DataDirLock`` (an exclusive ``flock`` on ``<data_dir>/gateway.lock``).

Why these modes: the outbox holds every reading (apartment meters among them), the incentive ledger holds the real
account ids, and the key files sign and pseudonymise records. None of it is for other users of the machine.

Imports only the standard library and ``gateway.errors``: the outbox, the ledger, the rule state and the key loaders
all use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway.errors import DataDirBusy

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
LOCK_FILE = "gateway.lock"
#: the files SQLite keeps beside a database in WAL mode
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with the last level 0700. An existing directory keeps its mode: the
    operator (or systemd's ``StateDirectoryMode``) may have chosen it on purpose."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # created meanwhile by someone else: keep theirs
            path.mkdir(mode=PRIVATE_DIR_MODE)
            os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode is narrowed by the umask; make it exact
    return path


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files and directories created inside the block are readable by their owner only (umask 077).

    The umask is process-wide: keep the block short and around file creation only."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _make_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600, or narrow an existing file to 0600 (one written by an older version)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)


def create_private_sqlite(path: Path, **connect_args: Any) -> sqlite3.Connection:
    """``sqlite3.connect(path, **connect_args)`` on a database file that is mode 0600 before SQLite opens it.

    SQLite creates a database's ``-wal`` and ``-shm`` files with the mode of the database file itself, so they are
    0600 too; side files left by an older version are narrowed here. The parent directory must exist (see
    ``ensure_private_dir``). Raises ``OSError`` or ``sqlite3.Error`` like ``sqlite3.connect``.
    """
    path = Path(path)
    _make_private(path)
    for suffix in SQLITE_SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            _make_private(side)
    db: sqlite3.Connection = sqlite3.connect(path, **connect_args)
    return db


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret file that its group or other users can read or write (like ssh with a private key).

    Raises ``PermissionError`` with one line naming the file, its mode and the fix. A missing file raises
    ``FileNotFoundError`` (the caller reports it as it reports any unreadable file)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if not mode & 0o077:
        return
    for bits, verb in ((0o044, "readable"), (0o022, "writable"), (0o011, "accessible")):
        if mode & bits:
            who = "others" if mode & bits & 0o007 else "its group"
            raise PermissionError(f"{what} {path} is {verb} by {who} (mode {mode:04o}): chmod 600 {path}")


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/gateway.lock``: one gateway process per data directory.

    Two processes on one outbox would both append and both deliver (double-counted energy on the platform) and
    fight over the ledger's unique keys. The lock is taken before anything in the directory is opened for writing
    and held until ``release`` (or the process ends: the kernel drops it with the file descriptor, so a gateway
    killed with SIGKILL leaves nothing to clean up). The holder's PID is written into the file, so the refusal can
    name it. The file itself is never deleted (deleting a lock file races with the next process taking it).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock or raise ``DataDirBusy`` naming the data directory and the holder's PID."""
        if self._fd is not None:
            return self
        ensure_private_dir(self.data_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise DataDirBusy(
                f"data directory {self.data_dir} is in use by another gateway process (PID {holder}): "
                "stop it first, or give this one another --data-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        # The holder writes its PID right after taking the lock: give it a moment if we looked in between.
        for _ in range(10):
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            if text:
                return text
            time.sleep(0.01)
        return "unknown"

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
