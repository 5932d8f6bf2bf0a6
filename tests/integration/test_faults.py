"""Fault injection (issue 29): each fault a hostile or unlucky user met, reproduced, with what the run does now.
docs/reliability.md lists them (fault -> what happens -> what the user does). Names the fix introduced are imported
inside the tests, so each test fails on its own against the code before the fix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import torch

from experiments.config import ConfigError, compose
from experiments.mlflow_logger import RUN_ID_FILE, UNLOGGED_FILE
from experiments.run import RUN_DIR_ENV, train
from experiments.run_metadata import PROJECT_ROOT
from tests.conftest import run_overrides

CHATTR = shutil.which("chattr")


def immutable(*paths: Path, on: bool = True, recursive: bool = False) -> None:
    """``chattr +i`` (or ``-i``): even root cannot write, rename over or delete the path."""
    subprocess.run([CHATTR, *(["-R"] if recursive else []), "+i" if on else "-i", *map(str, paths)], check=True,
                   capture_output=True)


def chattr_works(folder: Path) -> bool:
    probe = folder / ".chattr-probe"
    probe.write_text("x")
    try:
        immutable(probe)
        immutable(probe, on=False)
        return True
    except (OSError, subprocess.CalledProcessError, TypeError):
        return False
    finally:
        probe.unlink(missing_ok=True)


def needs_chattr(folder: Path) -> None:
    if CHATTR is None or not chattr_works(folder):
        pytest.skip("chattr +i is not available here (needs root and a filesystem with attributes)")


def store_overrides(tmp_path: Path, corpus_dir: Path, outputs: str = "outputs") -> list[str]:
    """Overrides with this test's own MLflow store (a fault that breaks a store must not break the session's)."""
    store = tmp_path / "store"
    return [f"output_dir={tmp_path}/{outputs}", f"data.dir={corpus_dir}", f"tracking.uri=sqlite:///{store}/mlflow.db",
            f"tracking.artifact_dir={store}/artifacts", "trainer.enable_progress_bar=false", "probe.enabled=false"]


def python(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    environment.pop(RUN_DIR_ENV, None)
    return subprocess.Popen([sys.executable, *args], cwd=PROJECT_ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@contextmanager
def killed_at_the_end(process: subprocess.Popen) -> Iterator[None]:
    """Runs the block while ``process`` lives, then kills it with SIGKILL (a crash, not a stop) and reaps it; a block
    that fails leaves no process behind either."""
    try:
        yield
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 300, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended before {what}: {process.stderr.read()[-2000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def checkpoint_step(path: Path) -> int | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"] if zipfile.is_zipfile(path) \
            else None
    except Exception:  # being replaced right now
        return None


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus_dir, mlflow_dir):
    """A finished 2-step tiny run and ``make(overrides)`` composing the same command with more overrides."""
    root = tmp_path_factory.mktemp("faults")

    def make(overrides=()):
        return compose("tiny", [*run_overrides(root, corpus_dir, mlflow_dir), "trainer.max_steps=2",
                                "checkpoint_every=1", "tracking.experiment=faults", *overrides])

    return make, train(make())


# 1. A failed checkpoint write is reported as success.
def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_line_and_no_temp_files(tmp_path, corpus_dir,
                                                                                          capsys):
    from experiments.run import train_and_report

    needs_chattr(tmp_path)
    temporary = tmp_path / "tmpdir"
    temporary.mkdir()
    overrides = [*store_overrides(tmp_path, corpus_dir), "trainer.max_steps=30", "checkpoint_every=5"]
    found: list[Path] = []

    def lock_the_first_checkpoint():  # chattr +i as soon as step 5 is saved (the issue froze it at step 7)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not found:
            for path in (tmp_path / "outputs").glob("tiny/*/checkpoints/last.ckpt"):
                if checkpoint_step(path) == 5:
                    immutable(path)
                    found.append(path)
            time.sleep(0.01)

    watcher = threading.Thread(target=lock_the_first_checkpoint, daemon=True)
    watcher.start()
    saved_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(temporary)
    try:
        code = train_and_report("tiny", overrides)  # before: 0, "checkpoint: .../last.ckpt" holding step 5
    finally:
        os.environ.pop("TMPDIR") if saved_tmpdir is None else os.environ.update(TMPDIR=saved_tmpdir)
        watcher.join()
        for path in found:
            immutable(path, on=False)
    assert found, "the first checkpoint never appeared"
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert error.startswith(f"cannot write checkpoint {found[0]} at step ") and "(PermissionError" in error
    assert f"the run stopped; {found[0]} still holds step 5; make it writable" in error
    assert sorted(os.listdir(found[0].parent)) == ["last.ckpt"]  # before: checkpoint-sized temp files left behind
    assert list(temporary.iterdir()) == []


# 2. A save killed mid-way with $TMPDIR on another filesystem.
PAUSING_WRITER = textwrap.dedent("""
    # Runs experiments.run with a pause inside the checkpoint writer once ARM exists: the process sleeps while it
    # writes the bytes of a new last.ckpt (a copy from $TMPDIR: sendfile) or flushes them (fsync), for the test's kill.
    import os, runpy, sys, time
    from pathlib import Path

    arm, paused = Path(sys.argv[1]), Path(sys.argv[2])
    real_fsync, real_sendfile = os.fsync, os.sendfile

    def pause_on_checkpoint(descriptor):
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            return
        if "last.ckpt" in target and arm.exists():
            paused.write_text(target)
            time.sleep(600)

    def fsync(descriptor):
        pause_on_checkpoint(descriptor if isinstance(descriptor, int) else descriptor.fileno())
        return real_fsync(descriptor)

    def sendfile(out_descriptor, in_descriptor, offset, count):
        pause_on_checkpoint(out_descriptor)
        return real_sendfile(out_descriptor, in_descriptor, offset, count)

    os.fsync, os.sendfile = fsync, sendfile
    sys.argv = ["experiments.run", *sys.argv[3:]]
    runpy.run_module("experiments.run", run_name="__main__")
""")


def test_a_kill_during_a_save_with_tmpdir_elsewhere_leaves_the_previous_checkpoint_and_resume_works(tmp_path,
                                                                                                   corpus_dir):
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm (a second filesystem for $TMPDIR)")
    elsewhere = Path(f"/dev/shm/matryoshka-faults-{os.getpid()}")
    elsewhere.mkdir()
    driver = tmp_path / "pausing_writer.py"
    driver.write_text(PAUSING_WRITER)
    arm, paused = tmp_path / "arm", tmp_path / "paused"
    overrides = [*store_overrides(tmp_path, corpus_dir), "trainer.max_steps=30", "checkpoint_every=2"]
    process = python([str(driver), str(arm), str(paused), "tiny", *overrides], env={"TMPDIR": str(elsewhere)})
    try:
        with killed_at_the_end(process):
            checkpoint = wait_for(lambda: next(iter((tmp_path / "outputs").glob("tiny/*/checkpoints/last.ckpt")),
                                               None), process, what="the first checkpoint")
            first = wait_for(lambda: checkpoint_step(checkpoint), process, what="a readable first checkpoint")
            arm.touch()  # the next save pauses while it writes
            wait_for(paused.exists, process, what="the next save")
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
    assert checkpoint_step(checkpoint) == first  # before: a 0-byte last.ckpt; the next run refused to resume
    resumed = train(compose("tiny", overrides))
    assert resumed.run_dir == checkpoint.parent.parent
    assert checkpoint_step(checkpoint) == 30
    assert sorted(os.listdir(checkpoint.parent)) == ["last.ckpt"]  # the killed save's temporary file is gone


def test_a_folder_checkpoint_is_swapped_in_whole(tmp_path):
    from lightning_modules.atomic_checkpoint import new_sibling_folder, swap_in_folder

    target = tmp_path / "last.ckpt"
    target.mkdir()
    (target / "shard_0").write_text("old")
    written = new_sibling_folder(target)
    (written / "shard_0").write_text("new")
    (written / ".metadata").write_text("meta")
    swap_in_folder(written, target)
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert (target / "shard_0").read_text() == "new" and (target / ".metadata").is_file()


# 3. Processes racing on a store that does not exist yet.
RACER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from experiments.config import compose
    from experiments.mlflow_logger import make_logger
    from experiments.store import check_tracking

    config = compose("tiny", sys.argv[2:])
    if sys.argv[1] == "rank0":
        check_tracking(config)  # a job's global rank 0 (or a second job's)
    else:
        make_logger(config, Path(config.output_dir)).experiment  # a rank > 0 of the same job (RANK=1)
    print("ok")
""")


def test_runs_and_ranks_racing_on_a_fresh_store_all_succeed_and_leave_it_sound(tmp_path, corpus_dir):
    store = tmp_path / "store" / "mlflow.db"
    overrides = store_overrides(tmp_path, corpus_dir)
    racers = [python(["-c", RACER, role, *overrides], env=env) for role, env in
              (("rank0", {}), ("rank1", {"RANK": "1", "LOCAL_RANK": "1"}), ("rank0", {}))]
    results = [(racer.wait(timeout=300), *racer.communicate()) for racer in racers]
    for code, out, err in results:  # before: "table _alembic_tmp_experiments already exists", store broken for good
        assert code == 0 and out.strip() == "ok", err[-2000:]
    import sqlite3

    with sqlite3.connect(store) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "experiments" in tables and not [name for name in tables if name.startswith("_alembic_tmp_")]


def test_a_half_migrated_store_is_named_with_the_command_that_repairs_it(tmp_path, corpus_dir):
    store = tmp_path / "store" / "mlflow.db"
    overrides = store_overrides(tmp_path, corpus_dir)
    config = compose("tiny", overrides)
    from experiments.store import check_tracking

    check_tracking(config)
    import sqlite3

    with sqlite3.connect(store) as connection:  # what an interrupted alembic batch migration leaves
        connection.execute("CREATE TABLE _alembic_tmp_latest_metrics (key VARCHAR(250))")
    with pytest.raises(ConfigError) as error:  # before: "(unreachable or not writable)" blamed reachability
        check_tracking(config)
    uri = config.tracking.uri
    assert str(error.value) == (f"config error at `tracking.uri`: the MLflow store {uri} is half-migrated (an "
                                f"interrupted schema migration left _alembic_tmp_latest_metrics); repair it with: "
                                f"python -m experiments.store repair {uri}")
    repair = python(["-m", "experiments.store", "repair", uri])
    out, err = repair.communicate(timeout=300)
    assert repair.returncode == 0, err
    assert "dropped _alembic_tmp_latest_metrics (latest_metrics is complete)" in out
    check_tracking(config)


# 4. A store that fails at the end, or is gone when the run folder resumes.
def test_a_store_made_read_only_at_the_end_costs_no_finished_training(tmp_path, corpus_dir, capsys, monkeypatch):
    import lightning

    from experiments.run import train_and_report

    needs_chattr(tmp_path)
    overrides = [*store_overrides(tmp_path, corpus_dir), "trainer.max_steps=3", "checkpoint_every=3"]
    store = tmp_path / "store"
    real_save = lightning.Trainer.save_checkpoint
    saves, frozen = [], []

    def save_then_freeze_the_store(trainer, path, *args, **kwargs):
        real_save(trainer, path, *args, **kwargs)
        saves.append(path)
        if len(saves) == 2:  # step 3's checkpoint, then the final save after fit: now the store turns read-only
            immutable(store, recursive=True)  # the database and the artifact folders
            frozen.append(path)

    monkeypatch.setattr(lightning.Trainer, "save_checkpoint", save_then_freeze_the_store)
    try:
        code = train_and_report("tiny", overrides)  # before: rc 1 (a traceback after the final checkpoint)
    finally:
        if frozen:
            immutable(store, on=False, recursive=True)
    assert frozen
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err  # before: the heatmaps' PermissionError, a traceback
    assert (f"warning: the MLflow store sqlite:///{store}/mlflow.db failed at the end of the run (") in captured.err
    assert "the checkpoint is saved; the loss heatmaps were not logged" in captured.err
    assert checkpoint_step(Path(frozen[0])) == 3
    assert f"checkpoint: {frozen[0]}" in captured.out


@pytest.mark.slow  # a second training process (~1 min on 2 shared cores)
def test_a_resume_whose_mlflow_run_is_gone_starts_a_new_one_and_replays_the_waiting_metrics(tmp_path, corpus_dir):
    overrides = [*store_overrides(tmp_path, corpus_dir), "trainer.max_steps=2", "checkpoint_every=1"]
    first = train(compose("tiny", overrides))
    (first.run_dir / UNLOGGED_FILE).write_text(json.dumps(  # what a store that stopped answering left waiting
        {"step": 1, "timestamp": 1, "metrics": {"train/waiting": 0.5}}) + "\n")
    shutil.rmtree(tmp_path / "store")  # the store deleted
    resume = python(["-m", "experiments.run", "tiny", *overrides[:-2], "trainer.max_steps=3", "checkpoint_every=1"])
    out, err = resume.communicate(timeout=600)
    assert resume.returncode == 0, err[-3000:]  # before: a "Run with id=... not found" traceback, forever
    new_run_id = (first.run_dir / RUN_ID_FILE).read_text().strip()
    assert new_run_id != first.run_id
    assert (f"the MLflow run {first.run_id} of {first.run_dir} is not in sqlite:///{tmp_path}/store/mlflow.db (store "
            f"deleted or replaced); this run folder goes on in a new MLflow run, which gets the metrics waiting in "
            f"{first.run_dir / UNLOGGED_FILE}") in err
    import sqlite3  # this process's MLflow client would still read the deleted store's file

    with sqlite3.connect(tmp_path / "store" / "mlflow.db") as store:
        waiting = store.execute("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'train/waiting'",
                                (new_run_id,)).fetchall()
        (run_dir,) = store.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = 'run_dir'",
                                   (new_run_id,)).fetchone()
    assert waiting == [(1, 0.5)] and run_dir == str(first.run_dir.resolve())
    assert not (first.run_dir / UNLOGGED_FILE).exists()


# 5. The checkpoint, not config.yaml, says what trained it.
def test_a_resume_without_config_yaml_still_refuses_settings_that_cannot_change(finished):
    make, first = finished
    saved = (first.run_dir / "config.yaml").read_text()
    (first.run_dir / "config.yaml").unlink()
    try:
        with pytest.raises(ConfigError) as error:  # before: resumed silently with the new batch size and LR
            train(make(["data.batch_size=4", "optim.lr=0.1", "resume=true"]))
        assert str(error.value) == (f"config error at `resume`: {first.run_dir} was trained with other values that "
                                    f"cannot change on resume (data.batch_size: 8 -> 4; optim.lr: 0.001 -> 0.1); "
                                    f"resume=false starts a new run with them")
        assert not (first.run_dir / "config.yaml").exists()  # nothing written with values that did not train it
        assert mlflow.MlflowClient(make().tracking.uri).get_run(first.run_id).info.status == "FINISHED"
    finally:
        (first.run_dir / "config.yaml").write_text(saved)


# 6. Two fresh runs in the same second (and on a store that does not exist yet).
FROZEN_CLOCK = textwrap.dedent("""
    # Runs experiments.run with the clock stopped at one second: both runs pick the same time-stamped folder name.
    import sys
    import experiments.run as run
    import experiments.run_folders as run_folders

    class Frozen(run_folders.datetime):
        @classmethod
        def now(cls, tz=None):
            return run_folders.datetime(2026, 12, 1, 10, 15, 0)

    run_folders.datetime = Frozen
    sys.exit(run.main(sys.argv[1:]))
""")


def test_two_runs_started_in_the_same_second_on_a_fresh_store_both_train_in_their_own_folder(tmp_path, corpus_dir):
    driver = tmp_path / "frozen_clock.py"
    driver.write_text(FROZEN_CLOCK)
    overrides = [*store_overrides(tmp_path, corpus_dir), "trainer.max_steps=1", "checkpoint_every=1", "resume=false"]
    runs = [python([str(driver), "tiny", *overrides]) for _ in range(2)]
    results = [(run.wait(timeout=600), *run.communicate()) for run in runs]
    for code, out, err in results:  # before: the store race (exit 2) or "run folder ... is in use" (exit 2)
        assert code == 0, err[-3000:]
    folders = sorted(path.name for path in (tmp_path / "outputs" / "tiny").iterdir())
    assert folders == ["20261201-101500", "20261201-101500-2"]
    assert all(checkpoint_step(tmp_path / "outputs" / "tiny" / name / "checkpoints" / "last.ckpt") == 1
               for name in folders)


# 7. Sizes checked before any work.
@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=0", "config error at `trainer.max_steps`: 0 trains nothing; set the number of optimizer steps "
                            "(>= 1)"),  # before: "final train/loss = nan", rc 0
    ("trainer.max_steps=-5", "config error at `trainer.max_steps`: -5 trains nothing; set the number of optimizer "
                             "steps (>= 1)"),  # before: a Lightning traceback
])
def test_a_step_count_that_trains_nothing_is_a_config_error(tiny_config, override, message):
    with pytest.raises(ConfigError) as error:
        tiny_config("tiny", [override])
    assert str(error.value) == message


def test_a_max_length_beyond_the_backbone_positions_is_a_config_error(tiny_config):
    config = tiny_config("tiny", ["model.max_length=600", "data.packing=true"])
    with pytest.raises(ConfigError) as error:  # before: a tensor-size error at step 2 (packing: a 2 TB allocation)
        train(config)
    assert str(error.value) == ("config error at `model.max_length`: 600 is more than the 512 positions of the "
                                "tiny_bert backbone; set model.max_length<=512")
    assert not Path(config.output_dir).exists()


# 8. Messages that point the right way.
def test_a_non_finite_stop_before_any_checkpoint_names_none(tiny_config):
    from callbacks.nonfinite import NonFiniteLossError

    config = tiny_config("tiny", ["optim.lr=1e6", "optim.min_lr=0", "checkpoint_every=50", "trainer.max_steps=8"])
    with pytest.raises(NonFiniteLossError) as error:
        train(config)
    message = str(error.value)  # before: "checkpoints/last.ckpt is the last good one", which did not exist
    assert "stopped, no checkpoint was saved before it; lower optim.lr" in message and "last.ckpt" not in message


def test_a_checkpoint_with_non_finite_weights_is_named_as_such(finished, tmp_path):
    make, first = finished
    checkpoint = first.run_dir / "checkpoints" / "last.ckpt"
    shutil.copy(checkpoint, tmp_path / "good.ckpt")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        key = next(key for key, value in state["state_dict"].items() if value.is_floating_point())
        state["state_dict"][key].view(-1)[0] = float("nan")
        torch.save(state, checkpoint)
        with pytest.raises(ConfigError) as error:  # before: "non-finite loss ...; lower optim.lr" (blames the LR)
            train(make(["trainer.max_steps=3"]))
        assert str(error.value) == (f"config error at `resume`: checkpoint {checkpoint} (step 2) holds non-finite "
                                    f"weights (NaN/inf in 1 tensors, e.g. {key}): it cannot be resumed; "
                                    f"resume=false starts a new run")
    finally:
        shutil.copy(tmp_path / "good.ckpt", checkpoint)


# 9. One line, no traceback.
def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_accelerator_gpu_without_a_gpu_is_one_line(capsys, tmp_path, corpus_dir, mlflow_dir):
    from experiments.run import main

    code = main(["tiny", *run_overrides(tmp_path, corpus_dir, mlflow_dir), "trainer.accelerator=gpu"])
    assert code == 2
    assert one_line(capsys) == ("config error at `trainer.accelerator`: lightning.Trainer refuses accelerator=gpu on "
                                "this machine: No supported gpu backend found!")  # before: a traceback


def test_yaml_errors_in_args_are_one_line(capsys):
    from experiments.run import main

    assert main(["tiny", "trainer.max_steps=3", "data.locales=[de"]) == 2  # before: a yaml.ParserError traceback
    assert one_line(capsys).startswith("config error at `ARGS`: cannot parse 'data.locales=[de': ")


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, corpus_dir, mlflow_dir, capsys):
    from experiments.run import main

    a_file = tmp_path / "outputs"
    a_file.write_text("not a folder")
    code = main(["tiny", *run_overrides(tmp_path, corpus_dir, mlflow_dir)])  # output_dir=<tmp_path>/outputs
    assert code == 2  # before: a FileExistsError/NotADirectoryError traceback after the model loaded
    assert one_line(capsys) == (f"config error at `output_dir`: {a_file}/tiny cannot hold run folders "
                                f"(NotADirectoryError: Not a directory); set output_dir to a writable folder")
    assert a_file.read_text() == "not a folder"


def test_an_unwritable_output_dir_is_one_line(tmp_path, corpus_dir, mlflow_dir, capsys):
    from experiments.run import main

    needs_chattr(tmp_path)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    immutable(outputs)
    try:
        code = main(["tiny", *run_overrides(tmp_path, corpus_dir, mlflow_dir)])
    finally:
        immutable(outputs, on=False)
    assert code == 2
    assert one_line(capsys) == (f"config error at `output_dir`: {outputs}/tiny cannot hold run folders "
                                f"(PermissionError: Operation not permitted); set output_dir to a writable folder")


def test_an_export_to_a_file_is_one_line(finished, tmp_path, capsys):
    from experiments.export import main

    make, first = finished
    a_file = tmp_path / "out"
    a_file.write_text("keep me")
    assert main([str(first.checkpoint), "--out", str(a_file), "--no-check"]) == 2  # before: NotADirectoryError
    assert one_line(capsys) == f"export error: OUT={a_file} is a file, not a folder; choose a new folder"
    assert a_file.read_text() == "keep me"


def test_an_export_of_a_checkpoint_from_another_config_uses_its_own_or_is_one_line(finished, tmp_path, capsys):
    from callbacks.run_config import CONFIG_KEY
    from experiments.export import main

    make, first = finished
    other = tmp_path / "other_run"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.yaml").write_text((first.run_dir / "config.yaml").read_text().replace("intermediate_size: 64",
                                                                                        "intermediate_size: 128"))
    moved = other / "checkpoints" / "last.ckpt"
    shutil.copy(first.checkpoint, moved)
    # The checkpoint carries its config: the export rebuilds the model that trained it (before: a size-mismatch
    # traceback from load_state_dict).
    assert main([str(moved), "--out", str(tmp_path / "export"), "--no-check"]) == 0
    capsys.readouterr()
    state = torch.load(moved, map_location="cpu", weights_only=True)
    del state[CONFIG_KEY]  # a checkpoint written before checkpoints carried their config
    torch.save(state, moved)
    assert main([str(moved), "--out", str(tmp_path / "export2"), "--no-check"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"export error: {moved} does not fit the model of {other / 'config.yaml'}: it was trained "
                           f"with another config (size mismatch for ")
    assert line.endswith("pass the checkpoint of that run")


# 10. Leftovers and small holes.
@pytest.mark.slow  # a second training process (~1 min on 2 shared cores)
def test_a_run_killed_before_its_first_checkpoint_is_marked_killed_by_the_next_run(tmp_path, corpus_dir):
    overrides = [*store_overrides(tmp_path, corpus_dir), "trainer.max_steps=2000", "checkpoint_every=1000"]
    process = python(["-m", "experiments.run", "tiny", *overrides])
    with killed_at_the_end(process):
        run_id_file = wait_for(lambda: next(iter((tmp_path / "outputs").glob(f"tiny/*/{RUN_ID_FILE}")), None),
                               process, what="the MLflow run")
        run_id = run_id_file.read_text().strip()
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/store/mlflow.db")
        wait_for(lambda: client.get_run(run_id).data.metrics.get("train/loss") is not None, process,
                 what="a logged step")
    assert client.get_run(run_id).info.status == "RUNNING"  # what the kill leaves
    train(compose("tiny", [*overrides[:-2], "trainer.max_steps=1"]))  # the next run of the experiment
    assert client.get_run(run_id).info.status == "KILLED"  # before: RUNNING forever


def test_make_ui_on_a_taken_port_exits_non_zero_naming_the_holder(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ui = python(["-m", "experiments.mlflow_ui", "--port", str(port), "--no-browser", "--uri",
                     f"sqlite:///{tmp_path}/mlflow.db"])
        try:
            out, err = ui.communicate(timeout=60)  # before: mlflow logged the clash and exited 0
        finally:
            ui.kill()
    assert ui.returncode == 1
    assert err.strip().startswith(f"port {port} of 127.0.0.1 is taken by process {os.getpid()} (")
    assert err.strip().endswith(f"stop it, or choose another port: make ui PORT={port + 1}")


def test_makefile_variables_are_one_shell_word_each(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
    (fake_bin / "python").chmod(0o755)
    stamp = tmp_path / "installed"
    stamp.touch()
    done = subprocess.run(["make", "-s", "-C", str(PROJECT_ROOT), "exp", f"BIN={fake_bin}", f"STAMP={stamp}",
                           f"NAME=tiny;touch {tmp_path}/X"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert not (tmp_path / "X").exists()  # before: the shell ran `touch X`
    assert done.stdout.splitlines() == ["[-m]", "[experiments.run]", f"[tiny;touch {tmp_path}/X]"]


def test_the_export_library_module_names_the_export_command():
    done = subprocess.run([sys.executable, "-m", "lightning_modules.cell_export", "--help"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2  # before: nothing printed, exit status 0
    assert "python -m experiments.export CKPT" in done.stderr
