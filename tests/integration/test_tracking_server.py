"""End to end against real MLflow servers on 127.0.0.1: a tiny run over HTTP (checked through MLflow's REST API), and
``make ui``'s launcher (starts fast, one Ctrl-C stops it and everything it started). Servers are stopped by PID."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest

from experiments.run import train
from experiments.run_metadata import PROJECT_ROOT
from tests.integration.test_tracking import free_port

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    """PIDs of every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body.startswith(b"{") else {"text": body.decode()}


def wait_until_up(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited during start-up"
        try:
            if get(f"http://127.0.0.1:{port}/health").get("text", "").strip() == "OK":
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no MLflow server on port {port} after {timeout} s")


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> set[int]:
    """Signals the server, waits, then kills whatever of it and its children is left; returns the PIDs it had."""
    pids = {process.pid} | descendants(process.pid)
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid for pid in pids if alive(pid)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    return left


def test_a_tiny_run_reaches_a_remote_mlflow_server(tiny_config, tmp_path):
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "served")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=open(tmp_path / "server.log", "w"),
        stderr=subprocess.STDOUT)
    try:
        wait_until_up(port, server)
        config = tiny_config("tiny", [f"tracking.uri=http://127.0.0.1:{port}", "trainer.max_steps=10"])
        result = train(config)
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        run = get(f"{api}/runs/get?run_id={result.run_id}")["run"]
        params = {param["key"]: param["value"] for param in run["data"]["params"]}
        tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
        assert params["plugins.mel.ranks"] == "[16, 8]" and params["trainer.max_steps"] == "10"
        assert params["tracking.uri"] == f"http://127.0.0.1:{port}"
        assert {"git.commit", "config.hash", "versions.torch", "device"} <= set(tags)
        query = urllib.parse.urlencode({"run_id": result.run_id, "metric_key": "train/loss"})
        steps = sorted(metric["step"] for metric in get(f"{api}/metrics/get-history?{query}")["metrics"])
        assert steps == list(range(10))
        listed = get(f"{api}/artifacts/list?{urllib.parse.urlencode({'run_id': result.run_id, 'path': 'plots'})}")
        files = {entry["path"] for entry in listed["files"]}
        assert {"plots/final_view_loss_rank_16.png", "plots/final_view_loss.json"} <= files
        # the artifacts went through the server into its own store, not into a client-side folder
        assert list((tmp_path / "served").rglob("final_view_loss_rank_16.png"))
        config_text = get(f"http://127.0.0.1:{port}/get-artifact?"
                          f"{urllib.parse.urlencode({'path': 'config.yaml', 'run_uuid': result.run_id})}")["text"]
        assert "max_steps: 10" in config_text
    finally:
        left = stop(server)
    assert left == set()


def test_the_ui_launcher_prints_its_url_starts_without_job_workers_and_stops_on_ctrl_c(tmp_path):
    port, uri = free_port(), f"sqlite:///{tmp_path}/ui/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("abl", (tmp_path / "artifacts").as_uri())
    client.create_run(experiment_id)
    run_dir = tmp_path / "outputs" / "abl" / "20261201-000000"  # make ui RUN=...: the run's own store and experiment
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"tracking:\n  uri: {uri}\n  experiment: abl\n")
    ui = subprocess.Popen([sys.executable, "-m", "experiments.mlflow_ui", "--port", str(port), "--run", str(run_dir)],
                          cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        first = ui.stdout.readline()
        assert first.startswith(f"MLflow UI: http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?"
                                f"workflowType=machine_learning&viewStateShareKey=matryoshka-lab-headline  "
                                f"(store {uri}; ")
        wait_until_up(port, ui)
        assert len(descendants(ui.pid)) == 1  # one web server; by default 4 web workers and 7 job workers
    finally:
        left = stop(ui, signal.SIGINT)
    assert left == set() and ui.returncode is not None


def start_server(port: int, root: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri",
         f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "served")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=open(root / "server.log", "a"),
        stderr=subprocess.STDOUT)
    wait_until_up(port, server)
    return server


def test_a_server_killed_mid_run_neither_stops_nor_stalls_training_and_gets_the_metrics_later(
        tiny_config, tmp_path, capfd):
    import threading

    import torch

    from experiments.mlflow_logger import UNLOGGED_FILE

    port, steps = free_port(), 12
    server = start_server(port, tmp_path)
    config = tiny_config("tiny", [f"tracking.uri=http://127.0.0.1:{port}", f"trainer.max_steps={steps}",
                                  "checkpoint_every=3"])
    run_root = Path(config.output_dir) / "tiny"

    def kill_after_the_first_checkpoint():
        while not list(run_root.glob("*/checkpoints/last.ckpt")):
            time.sleep(0.05)
        for pid in {server.pid} | descendants(server.pid):  # kill -9 the server and its web workers
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_the_first_checkpoint, daemon=True)
    killer.start()
    try:
        result = train(config)  # before: frozen for minutes, then a ~230-line MlflowException
    finally:
        killer.join(timeout=60)
        server.wait()
    assert torch.load(result.checkpoint, weights_only=True, map_location="cpu")["global_step"] == steps
    waiting = [json.loads(line) for line in (result.run_dir / UNLOGGED_FILE).read_text().splitlines()]
    assert {entry["step"] for entry in waiting if "train/loss" in entry["metrics"]} >= {steps - 1}
    warnings = [line for line in capfd.readouterr().err.splitlines() if "does not answer" in line]
    assert len(warnings) == 1 and f"http://127.0.0.1:{port} (tracking.uri)" in warnings[0]

    server = start_server(port, tmp_path)  # the server is back: the same command sends what it missed
    try:
        again = train(config)
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        query = urllib.parse.urlencode({"run_id": result.run_id, "metric_key": "train/loss"})
        logged = [metric["step"] for metric in get(f"{api}/metrics/get-history?{query}")["metrics"]]
        assert again.run_id == result.run_id and sorted(logged) == list(range(steps))  # each step exactly once
        assert not (result.run_dir / UNLOGGED_FILE).exists()
        assert get(f"{api}/runs/get?run_id={result.run_id}")["run"]["info"]["status"] == "FINISHED"
    finally:
        assert stop(server) == set()
