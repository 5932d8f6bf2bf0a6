"""A real ``kill -9`` mid-training: re-running the same command resumes from the last checkpoint, into the same MLflow
run, with every metric step logged exactly once, and ends at the weights of an uninterrupted run, with dropout on (the
checkpoint carries the random generators: before, the resumed steps drew other masks)."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from experiments.mlflow_logger import RUN_ID_FILE
from experiments.run_metadata import PROJECT_ROOT

STEPS, EVERY = 40, 4


def command(tmp_path, corpus_dir, outputs):
    store = tmp_path / "mlruns"
    return [sys.executable, "-m", "experiments.run", "tiny", f"output_dir={tmp_path}/{outputs}",
            f"data.dir={corpus_dir}",
            f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_dir={store}/artifacts",
            "trainer.enable_progress_bar=false", f"trainer.max_steps={STEPS}", f"checkpoint_every={EVERY}",
            "data.locales=[de,fr]", "model.tiny.dropout=0.1"]


def run_to_end(args, log):
    # one thread in every process: identical float results need identical kernels
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(args, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, log.name


def wait_for_steps_after_a_checkpoint(process, run_root, uri, timeout=300):
    """Polls until a checkpoint exists and MLflow holds at least two steps logged after it; returns the checkpoint's
    step and the last logged step."""
    client = None  # opened once the run has created the store (opening it first would race its creation)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be killed; raise STEPS"
        runs = list(run_root.glob("*/checkpoints/last.ckpt"))
        ids = list(run_root.glob(f"*/{RUN_ID_FILE}"))
        if runs and ids:
            checkpoint_step = torch.load(runs[0], weights_only=False, map_location="cpu")["global_step"]
            client = client or mlflow.MlflowClient(uri)
            logged = [m.step for m in client.get_metric_history(ids[0].read_text().strip(), "train/loss")]
            if checkpoint_step and logged and max(logged) >= checkpoint_step + 1:
                return checkpoint_step, max(logged)
        time.sleep(0.05)
    pytest.fail("no checkpoint followed by logged steps within the time limit")


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_into_the_same_run(tmp_path, corpus_dir):
    killed_args = command(tmp_path, corpus_dir, "outputs")
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert f"tracking.uri={uri}" in killed_args
    log = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen(killed_args, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)})
    run_root = tmp_path / "outputs" / "tiny"
    try:
        checkpoint_step, last_logged = wait_for_steps_after_a_checkpoint(process, run_root, uri)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()  # no-op if already dead; never leave it running
        process.wait()
    assert process.returncode == -signal.SIGKILL
    (run_dir,) = run_root.iterdir()
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] < STEPS and last_logged > checkpoint_step  # steps to recompute exist

    run_to_end(killed_args, open(tmp_path / "resumed.log", "w"))  # the same command again
    run_to_end(command(tmp_path, corpus_dir, "straight"), open(tmp_path / "straight.log", "w"))

    assert [path.name for path in run_root.iterdir()] == [run_dir.name]  # resumed in place, no second run folder
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume.count"] == "1"
    for key in run.data.metrics:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert len(steps) == len(set(steps)), f"{key} has duplicate steps"
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(losses) == list(range(STEPS))

    (straight_dir,) = (tmp_path / "straight" / "tiny").iterdir()
    straight_id = (straight_dir / RUN_ID_FILE).read_text().strip()
    assert straight_id != run_id
    straight_losses = {m.step: m.value for m in client.get_metric_history(straight_id, "train/loss")}
    assert losses == straight_losses  # the killed session's values and the recomputed ones agree exactly
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    reference = torch.load(straight_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert final["global_step"] == reference["global_step"] == STEPS
    assert final["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=0, msg=key)
