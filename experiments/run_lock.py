"""One training process per run folder: an exclusive ``flock`` on ``<run_dir>/run.lock``.

The kernel drops the lock when its holder exits in any way (``kill -9`` included), so a lock is never stale; the
file keeps the holder's PID for the message the second process prints.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    descriptor = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(run_dir, holder) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock; the file stays (removing it would race a waiting process)


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir``'s lock (a folder without a lock file is not locked)."""
    try:
        descriptor = os.open(run_dir / LOCK_NAME, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # releases a lock taken here
