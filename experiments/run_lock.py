"""One training process per run folder: an exclusive lock on ``<run_dir>/run.lock`` (``filelock``: ``flock`` on Unix).

The kernel drops the lock when its holder exits in any way (``kill -9`` included), so a lock is never stale; the
file keeps the holder's PID for the message the second process prints (filelock opens the file without truncating
it, so a waiting process does not erase that PID).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from experiments.config import ConfigError

LOCK_NAME = "run.lock"


class RunLockedError(ConfigError):
    """Another process trains in this run folder; ``str()`` names its PID."""

    def __init__(self, run_dir: Path, holder: str) -> None:
        super().__init__("resume", f"run folder {run_dir} is in use by process {holder} (lock {run_dir / LOCK_NAME}); "
                                   f"wait for it to end, or start a new run with resume=false")


@contextmanager
def hold_run_lock(run_dir: Path) -> Iterator[None]:
    """Creates ``run_dir`` and holds its lock for the duration of the block.

    Raises:
        RunLockedError: another live process holds it (naming that process's PID).

    Example:
        >>> with hold_run_lock(Path("outputs/tiny/20261201-101500")):
        ...     trainer.fit(...)
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = path.read_text(encoding="utf-8", errors="replace").strip() or "unknown"
        raise RunLockedError(run_dir, holder) from None
    try:
        path.write_text(f"{os.getpid()}\n", encoding="utf-8")  # another descriptor: the lock stays held
        yield
    finally:
        lock.release()  # the file stays (removing it would race a waiting process)


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir``'s lock (a folder without a lock file is not locked)."""
    if not (run_dir / LOCK_NAME).is_file():
        return False
    probe = FileLock(run_dir / LOCK_NAME)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False
