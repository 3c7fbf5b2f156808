"""Folder locks: one process at a time works in a sweep folder or a run folder.

A lock is the file ``<folder>/<name>.lock`` held with :mod:`filelock` (the kernel's ``flock``: released when its
holder ends, however it ends, ``kill -9`` included) and, beside it, ``<name>.lock.json`` naming the holder (what it
is, pid, host, since), so that a second process says who holds the folder instead of working beside it. A holder
record left by a process that ended without releasing (killed) is a stale lock: the next process takes it over and
says so. The lock file itself stays (deleting it would let a waiting process lock a file nobody else sees).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import atomic_write

logger = logging.getLogger(__name__)


class FolderInUse(ConfigError):
    """Another process holds the folder's lock."""


def lock_files(name: str) -> tuple[str, str]:
    """The file names a lock called ``name`` keeps in its folder (the lock, its holder record)."""
    return f"{name}.lock", f"{name}.lock.json"


def read_holder(record: Path) -> dict[str, Any] | None:
    """The holder record beside a lock (None when there is none, or it is unreadable)."""
    try:
        holder = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``a sweep driver (pid 123 on node7, since 2025-01-31 12:00:00)``."""
    if holder is None:
        return "another process (its holder record is missing)"
    return (
        f"{holder.get('what', 'a process')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"since {holder.get('since', '?')})"
    )


class FolderLock:
    """The lock of one folder, for one kind of holder (``with FolderLock(folder, "sweep", "a sweep driver"):``).

    Args:
        folder: The folder (created when missing).
        name: The lock's name: ``<name>.lock`` and ``<name>.lock.json`` in the folder.
        what: What holds it, as other processes are told (``a sweep driver``, ``a training run``).
    """

    def __init__(self, folder: Path, name: str, what: str) -> None:
        lock, record = lock_files(name)
        self.folder, self.path, self.record, self.what = Path(folder), Path(folder) / lock, Path(folder) / record, what
        self._lock: Any = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> FolderLock:
        """Takes the lock now or raises :class:`FolderInUse` naming its holder (never waits)."""
        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise FolderInUse(
                f"{self.folder} is in use by {describe_holder(read_holder(self.record))}; wait for it to end or "
                "stop that process"
            ) from None
        previous = read_holder(self.record)
        if previous is not None:
            logger.warning(
                f"{self.folder}: took over the lock of {describe_holder(previous)}, which ended without releasing it"
            )
        holder = {
            "what": self.what,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        try:
            atomic_write(self.record, lambda tmp: Path(tmp).write_text(json.dumps(holder) + "\n"))
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return self

    def release(self) -> None:
        """Releases the lock (its holder record first); a no-op when it is not held."""
        if self._lock is None:
            return
        self.record.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
