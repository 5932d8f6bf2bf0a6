"""The MLflow UI launcher and the store helpers it shares with the runs table and the CLIs.

    python -m experiments.mlflow_ui [--port 5000] [--uri URI | --run RUN_DIR] [--experiment NAME]   # make ui
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_tracking_uri() -> str:
    """``tracking.uri`` of ``experiments/base.yaml``: the project's store."""
    from omegaconf import OmegaConf

    from experiments.config import EXPERIMENTS_DIR, Config

    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(EXPERIMENTS_DIR / "base.yaml")).tracking.uri


RUNS_ROUTE = "#/experiments/{}/runs?workflowType=machine_learning"  # MLflow 3's model-training view of the runs
UI_HOST = "127.0.0.1"
DEFAULT_PORT = 5000


# MLflow 3.17's UI restores a runs-table view (columns, sorting, charts) from the experiment tag
# mlflow.sharedViewState.<key> (JSON) when the URL carries viewStateShareKey=<key>: what its "Share" button writes.
VIEW_KEY = "matryoshka-lab-headline"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
GROUP_TAGS = ("experiment", "axes")  # run tags to group the runs table by (experiments.run_metadata.run_tags)
SEARCH_PAGE = 1000  # runs read to find an experiment's metric keys


def runs_page_url(base: str, experiment_id: str | None, view: str | None = None) -> str:
    """The URL of an experiment's runs table in the model-training view of the MLflow UI at ``base`` (MLflow 3.17
    opens on its GenAI view otherwise), in the saved view ``view`` (see :func:`save_headline_view`); the experiments
    list when ``experiment_id`` is None."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return f"{base}/{RUNS_ROUTE.format(experiment_id)}" + (f"&viewStateShareKey={view}" if view else "")


def headline_keys(metric_keys: set[str]) -> list[str]:
    """The probe's headline metrics (``final/...``, see :func:`evaluation.report.final_summary`), mean over tasks
    first."""
    return sorted((key for key in metric_keys if key.startswith("final/")),
                  key=lambda key: (not key.startswith("final/mean_main_score/"), key))


def headline_view(metric_keys: set[str]) -> dict:
    """The runs-table view ``make ui`` opens: the grouping tags, ``train/loss`` and the headline metrics
    (:func:`headline_keys`) as columns, newest run first. Column ids are MLflow's ``<type>.`<key>```."""
    columns = [f"tags.`{tag}`" for tag in GROUP_TAGS]
    columns += [f"metrics.`{key}`" for key in ["train/loss", *headline_keys(metric_keys)] if key in metric_keys]
    return {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}


def save_headline_view(client, experiment_id: str) -> str:
    """Stores :func:`headline_view` of the experiment's metrics as its shared view state; returns the view key."""
    import json

    runs = client.search_runs([experiment_id], max_results=SEARCH_PAGE)
    keys = set().union(*(run.data.metrics for run in runs)) if runs else set()
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(headline_view(keys)))
    return VIEW_KEY


def experiment_to_open(uri: str, experiment: str | None) -> str | None:
    """The id of ``experiment`` in the store, or (None given) of the experiment with the newest run; None when the
    store has no run yet. An unknown name stops with one line naming the experiments there are."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise SystemExit(f"no MLflow experiment {experiment!r} in {uri}; there are: {names}")
        return found.experiment_id
    ids = [e.experiment_id for e in client.search_experiments()]
    newest = client.search_runs(ids, max_results=1, order_by=["attributes.start_time DESC"]) if ids else []
    return newest[0].info.experiment_id if newest else None


def run_store(run_dir: str | Path) -> tuple[str, str]:
    """``(tracking.uri, tracking.experiment)`` from a run folder's resolved ``config.yaml``."""
    from omegaconf import OmegaConf

    config_file = Path(run_dir, "config.yaml")
    if not config_file.is_file():
        raise SystemExit(f"{run_dir}: not a run folder (no config.yaml); run folders are outputs/<NAME>/<timestamp>")
    tracking = OmegaConf.load(config_file).tracking
    return tracking.uri, tracking.experiment


def ui_hint(uri: str, run_id: str, client=None) -> str:
    """The end-of-run lines saying where a run went and the exact command that opens its experiment's runs table
    (for a remote store: the URL on that server). ``client``: an MlflowClient of ``uri`` (default: a new one)."""
    from mlflow import MlflowClient

    from experiments.store import is_remote

    client = client or MlflowClient(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    experiment = client.get_experiment(experiment_id).name
    head = f"MLflow run {run_id} in experiment {experiment!r} ({uri}); its runs table:"
    if is_remote(uri):
        return f"{head}\n  {runs_page_url(uri, experiment_id)}"
    store = "" if uri == default_tracking_uri() else f"URI={uri} "
    local = runs_page_url(f"http://{UI_HOST}:{DEFAULT_PORT}", experiment_id)
    return f"{head}\n  make ui {store}EXP={experiment}    (serves and opens {local})"


def ui_command(uri: str, port: int) -> tuple[list[str], dict[str, str]]:
    """``mlflow ui`` on 127.0.0.1 with background job workers off and one web worker: up in seconds, two processes,
    stopped by one Ctrl-C (by default it starts 7 job workers that outlive a killed server, and 4 web workers of
    ~170 MB each, more than one user's browser needs)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", uri,
               "--host", UI_HOST, "--port", str(port), "--workers", "1"]
    return command, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def has_browser() -> bool:
    """Whether ``webbrowser`` can open a graphical browser here (without one it would start a text browser in this
    terminal, which the server's log shares)."""
    return sys.platform in ("darwin", "win32") or any(os.environ.get(key) for key in
                                                        ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"))


def open_when_up(url: str, port: int, timeout_s: float = 120.0) -> None:
    """Opens ``url`` in the user's browser as soon as the server answers on ``port``, from a detached process (this
    one is about to become the server)."""
    import socket
    import time
    import webbrowser

    child = os.fork()
    if child:
        os.waitpid(child, 0)  # the child forks the waiter and exits at once: no zombie under the server
        return
    if os.fork():
        os._exit(0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((UI_HOST, port), timeout=1):
                webbrowser.open(url)
                break
        except OSError:
            time.sleep(0.5)
    os._exit(0)


def port_holder(port: int) -> str:
    """``process <pid> (<command line>)`` listening on TCP ``port`` here, from ``/proc`` (Linux); "another process"
    where it cannot be told (another user's process, another OS)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    for process in Path("/proc").glob("[0-9]*"):
        try:
            links = {os.readlink(fd) for fd in (process / "fd").iterdir()}
            if any(f"socket:[{inode}]" in links for inode in inodes):
                words = (process / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
                return f"process {process.name} ({' '.join(words)[:120]})"
        except OSError:
            continue
    return "another process"


def check_port_free(port: int) -> None:
    """Raises SystemExit (status 1) naming the process that listens on ``port`` of 127.0.0.1."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is not a holder
        try:
            probe.bind((UI_HOST, port))
        except OSError:
            raise SystemExit(f"port {port} of {UI_HOST} is taken by {port_holder(port)}; stop it, or choose "
                             f"another port: make ui PORT={port + 1}") from None


def ui_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.mlflow_ui",
                                     description="MLflow UI on 127.0.0.1, opened on an experiment's runs table")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--uri", default=None, help="tracking store (default: tracking.uri of base.yaml)")
    store.add_argument("--run", default=None, help="a run folder: its own store and experiment (config.yaml)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment to open (default: the newest run's)")
    parser.add_argument("--no-browser", action="store_true", help="only print the URL")
    args = parser.parse_args(argv)
    uri, experiment = (run_store(args.run) if args.run else (args.uri or default_tracking_uri(), None))
    experiment = args.experiment or experiment
    from experiments.store import is_remote

    if is_remote(uri):
        url = runs_page_url(uri, experiment_to_open(uri, experiment))
        raise SystemExit(f"{uri} is an MLflow server already: open {url}")
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    check_port_free(args.port)  # else mlflow would log the clash and exit 0
    experiment_id = experiment_to_open(uri, experiment)
    view = None
    if experiment_id is not None:
        from mlflow import MlflowClient

        view = save_headline_view(MlflowClient(uri), experiment_id)
    url = runs_page_url(f"http://{UI_HOST}:{args.port}", experiment_id, view)
    command, env = ui_command(uri, args.port)
    print(f"MLflow UI: {url}  (store {uri}; Ctrl-C stops it)", flush=True)
    if not args.no_browser and has_browser():
        open_when_up(url, args.port)
    os.execvpe(command[0], command, env)  # this process becomes mlflow: Ctrl-C and kill reach it directly


if __name__ == "__main__":
    sys.exit(ui_main(sys.argv[1:]))
