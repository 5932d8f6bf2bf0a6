"""A local SQLite MLflow store that concurrent runs cannot break: created and migrated under a file lock, a
half-migrated one named as such, and the one command that repairs it.

MLflow creates and migrates a SQLite store the first time a client opens it; two processes doing that at once (two
runs started together, or the ranks of one job) interleave their migrations and leave tables such as
``_alembic_tmp_latest_metrics`` behind, which breaks every later run. Here one process at a time opens the store,
under ``<store>.lock`` (a ``filelock``, dropped by the kernel when its holder dies), and in a job only global rank 0
opens it first: the other ranks wait for it (:func:`wait_for_store`).

``python -m experiments.store repair sqlite:///path/mlflow.db`` repairs a half-migrated store: it finishes or drops
the migration's leftover ``_alembic_tmp_*`` tables (a leftover whose table is gone holds that table's rows and takes
its name back), then runs ``mlflow db upgrade`` (which alone stops at the leftover: "table ... already exists").
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from filelock import FileLock

LEFTOVER_PREFIX = "_alembic_tmp_"  # alembic's SQLite batch migrations: copy into it, drop the table, rename it back
WAIT_SECONDS = 600  # how long a non-zero rank waits for rank 0 to create the store


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def store_lock(uri: str):
    """The file lock next to a SQLite store (``<store>.lock``); a no-op context for any other store."""
    path = sqlite_path(uri)
    return FileLock(f"{path}.lock") if path else nullcontext()


def repair_command(uri: str) -> str:
    return f"python -m experiments.store repair {uri}"


def half_migrated(uri: str) -> list[str]:
    """The migration leftovers (``_alembic_tmp_*`` tables) in a SQLite store; [] for a sound or non-SQLite store."""
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ?",
                                      (f"{LEFTOVER_PREFIX}%",)).fetchall()
    except sqlite3.Error:
        return []
    return sorted(name for (name,) in rows if name.startswith(LEFTOVER_PREFIX))


class HalfMigratedStoreError(RuntimeError):
    """A store whose schema migration was interrupted; ``str()`` names the leftovers and the repair command."""

    def __init__(self, uri: str, leftovers: list[str]) -> None:
        super().__init__(f"the MLflow store {uri} is half-migrated (an interrupted schema migration left "
                         f"{', '.join(leftovers)}); repair it with: {repair_command(uri)}")


def open_store(uri: str):
    """An ``MlflowClient`` of ``uri`` whose store exists and is migrated: created or migrated under the store's lock.

    Raises:
        HalfMigratedStoreError: the store holds an interrupted migration.
    """
    from mlflow import MlflowClient

    with store_lock(uri):
        leftovers = half_migrated(uri)
        if leftovers:
            raise HalfMigratedStoreError(uri, leftovers)
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # opens (creates, migrates) the store now, under the lock
        except Exception:
            leftovers = half_migrated(uri)
            if leftovers:
                raise HalfMigratedStoreError(uri, leftovers) from None
            raise
    return client


def wait_for_store(uri: str, timeout_s: float = WAIT_SECONDS) -> None:
    """Blocks until global rank 0 has created and migrated the SQLite store (a non-zero rank never creates it):
    the file exists and its lock is free. Other stores: returns at once.

    Raises:
        TimeoutError: naming the store, after ``timeout_s``.
    """
    path = sqlite_path(uri)
    if path is None:
        return
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not create the MLflow store {uri} within {timeout_s:.0f} s")
        time.sleep(0.2)
    with FileLock(f"{path}.lock", timeout=max(1.0, deadline - time.monotonic())):
        pass  # rank 0 holds it while it migrates


@contextmanager
def _connection(path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(path)
    try:
        yield connection
        connection.commit()
    finally:
        connection.close()


def repair(uri: str) -> list[str]:
    """Resolves each ``_alembic_tmp_<table>`` leftover (dropped when ``<table>`` exists, else renamed to it), then
    runs ``mlflow db upgrade``; returns what was done, one line per leftover."""
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{uri} is not a SQLite store file")
    done = []
    with store_lock(uri), _connection(path) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for leftover in half_migrated(uri):
            table = leftover.removeprefix(LEFTOVER_PREFIX)
            if table in tables:
                connection.execute(f'DROP TABLE "{leftover}"')
                done.append(f"dropped {leftover} ({table} is complete)")
            else:
                connection.execute(f'ALTER TABLE "{leftover}" RENAME TO "{table}"')
                done.append(f"renamed {leftover} to {table} (the migration had dropped {table})")
    with store_lock(uri):
        mlflow = Path(sys.executable).with_name("mlflow")
        subprocess.run([str(mlflow) if mlflow.exists() else "mlflow", "db", "upgrade", uri], check=True,
                       stdout=subprocess.DEVNULL)
    return done


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "repair":
        print("usage: python -m experiments.store repair sqlite:///path/to/mlflow.db", file=sys.stderr)
        return 2
    try:
        for line in repair(argv[1]):
            print(line)
    except (OSError, sqlite3.Error, subprocess.CalledProcessError) as error:
        print(f"cannot repair {argv[1]}: {error}", file=sys.stderr)
        return 1
    print(f"{argv[1]} is migrated and ready")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
