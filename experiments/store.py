"""The MLflow store of a run: usable (the check before training) and safe (lock, migration, repair).

Usable: :func:`check_tracking` stops a run before any weights load when the store cannot be reached or written, or
when an existing experiment keeps its artifacts somewhere else than ``tracking.artifact_dir``.

Safe: MLflow creates and migrates a SQLite store the first time a client opens it; two processes doing that at once
(two runs started together, or the ranks of one job) interleave their migrations and leave tables such as
``_alembic_tmp_latest_metrics`` behind, which breaks every later run. Here one process at a time opens the store,
under ``<store>.lock`` (a ``filelock``, dropped by the kernel when its holder dies), and in a job only global rank 0
opens it first: the other ranks wait for it (:func:`wait_for_store`).

``python -m experiments.store repair sqlite:///path/mlflow.db`` repairs a half-migrated store: it finishes or drops
the migration's leftover ``_alembic_tmp_*`` tables (a leftover whose table is gone holds that table's rows and takes
its name back), then runs ``mlflow db upgrade`` (which alone stops at the leftover: "table ... already exists").
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from filelock import FileLock
from omegaconf import DictConfig

from contracts.config_error import ConfigError

LEFTOVER_PREFIX = "_alembic_tmp_"  # alembic's SQLite batch migrations: copy into it, drop the table, rename it back
WAIT_SECONDS = 600  # how long a non-zero rank waits for rank 0 to create the store
REMOTE_SCHEMES = ("http", "https", "databricks")
# MLflow 3's UI opens an experiment on its GenAI (traces) view unless this experiment tag says model training.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


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


class TrackingError(ConfigError):
    """The MLflow store cannot be used; raised before any training. ``str()`` names the URI."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__("tracking.uri", f"cannot use the MLflow store {uri} (unreachable or not writable), "
                                         f"nothing was trained: {reason}")
        self.uri = uri


def is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0] in REMOTE_SCHEMES


def artifact_location(config: DictConfig) -> str | None:
    """Where a new MLflow experiment keeps artifacts: ``tracking.artifact_dir`` for a local store; a remote server
    chooses its own (a client-side path would be meaningless to it)."""
    if is_remote(config.tracking.uri):
        return None
    return Path(config.tracking.artifact_dir).resolve().as_uri()


def prepare_local_store(config: DictConfig) -> None:
    """Creates the folder of a SQLite store (else TrackingError) and the ``tracking.artifact_dir`` of a local store,
    checked writable by writing and removing a file (else ConfigError naming ``tracking.artifact_dir``)."""
    uri = config.tracking.uri
    database = sqlite_path(uri)
    if database is not None:
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingError(uri, f"{type(error).__name__}: {error}") from None
    if not is_remote(uri):
        artifact_dir = Path(config.tracking.artifact_dir)
        try:
            artifact_dir.mkdir(parents=True, exist_ok=True)
            probe = artifact_dir / f".write-check-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise ConfigError("tracking.artifact_dir", f"{artifact_dir} is not a writable folder "
                                                       f"({type(error).__name__}: {error.strerror or error})") from None


@contextmanager
def fail_fast_http() -> Iterator[None]:
    """MLflow retries an unreachable server 7 times with back-off (minutes); the store check wants one answer, and
    training must not stall on a dead server (:class:`experiments.mlflow_logger.StrictMLFlowLogger` keeps what it
    could not send)."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _local_path(location: str) -> str:
    """An artifact location as a comparable string: the resolved path of a ``file:`` URI or plain path, else the
    URI itself (``s3://...``)."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return str(Path(unquote(parsed.path)).resolve())
    return location


def check_artifact_location(config: DictConfig, experiment) -> None:
    """MLflow fixes an experiment's artifact location when the experiment is created and ignores any other one
    later: a ``tracking.artifact_dir`` that disagrees would silently put this run's artifacts elsewhere.

    Raises:
        ConfigError: naming ``tracking.artifact_dir``, both locations and the experiment.
    """
    wanted = artifact_location(config)
    if wanted is None or _local_path(wanted) == _local_path(experiment.artifact_location):
        return
    raise ConfigError("tracking.artifact_dir", f"{_local_path(wanted)} disagrees with "
                      f"{_local_path(experiment.artifact_location)}, where the existing MLflow experiment "
                      f"{experiment.name!r} in {config.tracking.uri} keeps its artifacts (fixed when it was created); "
                      f"set tracking.artifact_dir to that folder, or use another tracking.experiment or tracking.uri")


def check_tracking(config: DictConfig) -> None:
    """Stops the run before any training when the store cannot be reached or written, or when an existing
    experiment keeps its artifacts somewhere else than ``tracking.artifact_dir``.

    Creates the experiment if needed (tagged as a model-training experiment, so the UI opens on its runs) and writes
    one experiment tag (a real write, cheap); for a local store also writes and removes a file in
    ``tracking.artifact_dir``.

    Raises:
        TrackingError: naming ``tracking.uri`` and the store's answer.
        ConfigError: naming ``tracking.artifact_dir`` (see :func:`check_artifact_location`).
    """
    uri = config.tracking.uri
    prepare_local_store(config)  # a bad tracking.artifact_dir is named as such
    try:
        with fail_fast_http():
            client = open_store(uri)  # created or migrated by one process at a time
            experiment = client.get_experiment_by_name(config.tracking.experiment)
            if experiment is None:
                experiment_id = client.create_experiment(config.tracking.experiment, artifact_location(config),
                                                         tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            else:
                experiment_id = experiment.experiment_id
            client.set_experiment_tag(experiment_id, "matryoshka_lab.last_write_check", datetime.now().isoformat())
    except HalfMigratedStoreError as error:  # not a reachability problem: say what it is and how to repair it
        raise ConfigError("tracking.uri", str(error)) from None
    except Exception as error:  # any failure here means the store is not usable; say which and why
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrackingError(uri, f"{type(error).__name__}: {reason}"[:500]) from None
    if experiment is not None:
        check_artifact_location(config, experiment)


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
