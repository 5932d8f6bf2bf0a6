"""What a run does with a diverging loss, a resume with changed settings or a broken checkpoint, a second process on
the same run folder, and bad input found only at set-up (issue 19): one line, nothing lost, nothing half-written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from callbacks.nonfinite import NonFiniteLossError
from experiments.config import ConfigError, compose
from experiments.mlflow_logger import RUN_ID_FILE
from experiments.run import train
from experiments.run_lock import RunLockedError, hold_run_lock
from experiments.run_metadata import PROJECT_ROOT
from tests.conftest import run_overrides


def finite(checkpoint) -> bool:
    return all(bool(value.isfinite().all()) for value in checkpoint["state_dict"].values() if value.is_floating_point())


def test_a_diverging_run_stops_at_the_first_non_finite_loss_keeping_the_last_good_checkpoint(tiny_config):
    config = tiny_config("tiny", ["optim.lr=1e6", "optim.min_lr=0", "checkpoint_every=1", "trainer.max_steps=8"])
    with pytest.raises(NonFiniteLossError) as error:  # before: train/loss = nan from step 2, exit 0, FINISHED
        train(config)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("non-finite loss at step 2 (source '") and "train/loss/layer_" in message
    (run_dir,) = Path(config.output_dir, "tiny").iterdir()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 2 and finite(checkpoint)  # steps 0 and 1 were finite
    run = mlflow.MlflowClient(config.tracking.uri).get_run((run_dir / RUN_ID_FILE).read_text().strip())
    assert run.info.status == "FAILED"


def test_up_to_max_nonfinite_steps_bad_steps_are_skipped_and_counted(tiny_config):
    config = tiny_config("tiny", ["optim.lr=1e6", "optim.min_lr=0", "max_nonfinite_steps=6", "trainer.max_steps=6"])
    result = train(config)
    skipped = result.metrics["train/nonfinite_steps"]
    assert 1 <= skipped <= 6
    assert finite(torch.load(result.checkpoint, weights_only=True, map_location="cpu"))
    with pytest.raises(NonFiniteLossError, match=r"more than max_nonfinite_steps=1"):
        train(tiny_config("tiny", ["optim.lr=1e6", "optim.min_lr=0", "max_nonfinite_steps=1", "trainer.max_steps=6",
                                   "resume=false"]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus_dir, mlflow_dir):
    """A finished 2-step tiny run and ``make(overrides)`` composing the same command with more overrides."""
    root = tmp_path_factory.mktemp("resume")

    def make(overrides=()):
        return compose("tiny", [*run_overrides(root, corpus_dir, mlflow_dir), "trainer.max_steps=2",
                                "checkpoint_every=1", *overrides])

    return make, train(make())


@pytest.mark.parametrize("overrides, named", [
    (["optim.lr=0.01"], "optim.lr: 0.001 -> 0.01"),  # before: resumed, the LR never moved to the new value
    (["plugins.mel.rank=8"], "plugins.mel.rank: 16 -> 8"),  # before: a size-mismatch traceback
    (["seed=3", "data.locales=[de]"], "data.locales: ['de', 'fr'] -> ['de']; seed: 0 -> 3"),
])
def test_a_strict_resume_with_settings_that_cannot_change_stops_naming_them(finished, overrides, named):
    make, first = finished
    config = make([*overrides, "resume=true"])
    with pytest.raises(ConfigError) as error:
        train(config)
    message = str(error.value)
    assert message.startswith("config error at `resume`:") and named in message
    assert "resume=false starts a new run" in message
    assert "\n" not in message
    client = mlflow.MlflowClient(config.tracking.uri)
    assert "resume.count" not in client.get_run(first.run_id).data.tags  # the MLflow run was not touched


def test_other_settings_that_cannot_change_on_resume_start_a_new_run_saying_so(finished, capsys):
    """Before: the README's second command stopped with a config error: changing what a run is asks for a new run."""
    make, first = finished
    config = make(["data.locales=[de]"])
    other = train(config)
    assert other.run_dir.parent == first.run_dir.parent and other.run_dir != first.run_dir
    assert other.run_id != first.run_id
    assert (f"new run {other.run_dir}: no run of tiny has these settings (newest, {first.run_dir.name}: "
            f"data.locales: ['de', 'fr'] -> ['de']); resume=true continues the newest one\n") in capsys.readouterr().out
    client = mlflow.MlflowClient(config.tracking.uri)
    assert "resume.count" not in client.get_run(first.run_id).data.tags  # the first run was not touched


def test_a_resume_applies_the_settings_that_can_change(finished):
    """Also after the test above: the newest run with the same fixed settings is continued, not the newest run."""
    make, first = finished
    config = make(["trainer.max_steps=3", "trainer.log_every_n_steps=2", "probe.every_n_steps=7"])
    resumed = train(config)
    assert resumed.run_dir == first.run_dir and resumed.run_id == first.run_id
    assert torch.load(resumed.checkpoint, weights_only=True, map_location="cpu")["global_step"] == 3


def test_a_second_process_on_the_same_run_folder_stops_naming_the_holder(finished):
    make, first = finished
    config = make(["trainer.max_steps=3"])
    client = mlflow.MlflowClient(config.tracking.uri)
    before = client.get_run(first.run_id).data.tags.get("resume.count")
    with hold_run_lock(first.run_dir):  # another training process, as far as the lock can tell
        with pytest.raises(RunLockedError) as error:  # before: both resumed, steps logged twice
            train(config)
    assert f"in use by process {os.getpid()}" in str(error.value) and "resume=false" in str(error.value)
    assert client.get_run(first.run_id).data.tags.get("resume.count") == before


def test_the_lock_is_free_again_after_its_holder_is_killed_with_sigkill(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from experiments.run_lock import hold_run_lock\n"
                               f"with hold_run_lock(Path({str(tmp_path)!r})):\n"
                               "    print('held', flush=True); time.sleep(600)"],
                              cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid} "):
            with hold_run_lock(tmp_path):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with hold_run_lock(tmp_path):  # a lock file left by a killed process is not a lock
        assert (tmp_path / "run.lock").read_text().strip() == str(os.getpid())


def test_a_corrupt_checkpoint_on_resume_is_named_and_the_run_left_as_it_is(finished, tmp_path):
    make, first = finished
    checkpoint = first.run_dir / "checkpoints" / "last.ckpt"
    shutil.copy(checkpoint, tmp_path / "good.ckpt")
    try:
        checkpoint.write_bytes(b"garbage")
        config = make()
        with pytest.raises(ConfigError) as error:  # before: a PytorchStreamReader traceback, the run flipped to FAILED
            train(config)
        assert f"cannot read checkpoint {checkpoint} (not a torch checkpoint" in str(error.value)
        assert "resume=false" in str(error.value)
        assert mlflow.MlflowClient(config.tracking.uri).get_run(first.run_id).info.status == "FINISHED"
    finally:
        shutil.copy(tmp_path / "good.ckpt", checkpoint)


def test_bad_data_found_at_set_up_leaves_no_run_folder_and_no_mlflow_run(tmp_path, corpus_dir, mlflow_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"query": [f"q{i}" for i in range(40)], "passage": list(range(40))}), data / "s.parquet")
    config = compose("tiny", [*run_overrides(tmp_path, corpus_dir, mlflow_dir), "data.corpus=folder",
                              f"data.dir={data}", "tracking.experiment=bad-data"])
    with pytest.raises(ConfigError, match=r"column 'passage' has type int64"):
        train(config)
    assert not (tmp_path / "outputs").exists()
    experiment = mlflow.MlflowClient(config.tracking.uri).get_experiment_by_name("bad-data")
    assert mlflow.MlflowClient(config.tracking.uri).search_runs([experiment.experiment_id]) == []
