"""Read the MLflow store: a terminal table comparing runs, and the MLflow UI launcher.

    python -m experiments.runs_table [--suite smoke | --experiment NAME ...] [--uri URI]   # make runs [SUITE=smoke]
    python -m experiments.runs_table ui [--port 5000] [--uri URI | --run RUN_DIR] [--experiment NAME]   # make ui

The table has one row per run (oldest first): its name and status, the steps it logged, the params that differ
between the runs of the table (``axes`` summarises which Matryoshka plugins a run trains), and its key metrics:
final losses (mean of the last 10 logged values), throughput, peak memory, training wall time, and the probe's
headline metrics (``final/<task>/{full,grid_mean}``: the same keys in every probed run, whatever its axes).
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

# (column, metrics in order of preference, how): "tail" = mean of the last logged values (one step is noisy),
# "last" = the latest value.
METRIC_COLUMNS = (
    ("loss", ("train/loss",), "tail"),
    ("loss_in_batch", ("train/loss_in_batch",), "tail"),
    ("loss_hard", ("train/loss_hard",), "tail"),
    ("loss_distill", ("train/loss_distill",), "tail"),
    ("samples/s", ("run/device/samples_per_sec",), "tail"),
    ("tokens/s", ("run/device/items_per_sec",), "tail"),
    # device memory when on CUDA
    ("peak_MB", ("run/memory/device/peak_cuda_mb", "run/memory/device/peak_rss_mb"), "last"),
    ("wall_s", ("train/elapsed_s",), "last"),
)
# Params that name or place a run rather than say what it trains; the run column already shows the name.
HIDDEN_PARAMS = ("name", "tracking.run_name", "tracking.experiment", "output_dir")
MAX_CELL = 28
SEARCH_PAGE = 1000  # runs read to find an experiment's metric keys


def axes_of(params: dict[str, str]) -> str:
    """``mll+mrl+mel`` from a run's ``plugins.<name>.*`` params (see :func:`~experiments.run_metadata.axes_name`)."""
    from experiments.run_metadata import axes_name

    return axes_name({key.split(".")[1] for key in params if key.startswith("plugins.") and key.count(".") >= 2})


def differing_params(all_params: Sequence[dict[str, str]]) -> list[str]:
    """Param keys whose value differs between runs ('-' where a run lacks it), except :data:`HIDDEN_PARAMS` and
    plugin options that differ only by presence (the ``axes`` column shows which plugins a run has)."""
    keys = sorted(set().union(*all_params) - set(HIDDEN_PARAMS))
    columns = []
    for key in keys:
        values = [params.get(key, "-") for params in all_params]
        if len(set(values)) < 2:
            continue
        if key == "plugins" or key.startswith("plugins."):
            if len({value for value in values if value != "-"}) < 2:
                continue
        columns.append(key)
    return columns


def headline_keys(metric_keys: set[str]) -> list[str]:
    """The probe's headline metrics (``final/...``, see :func:`evaluation.report.final_summary`), mean over tasks
    first."""
    return sorted((key for key in metric_keys if key.startswith("final/")),
                  key=lambda key: (not key.startswith("final/mean_main_score/"), key))


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    text = str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def run_table(client, runs) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` comparing ``runs`` (MLflow Run objects with their params and latest metric values); only
    the ``tail`` columns fetch metric histories, each once (the loss history also gives the steps column)."""
    from experiments.run_summary import tail_mean

    histories = SimpleNamespace(get_metric_history=functools.cache(client.get_metric_history))
    runs = sorted(runs, key=lambda run: run.info.start_time or 0)
    all_params = [run.data.params for run in runs]
    param_columns = differing_params(all_params)
    present = set().union(*(run.data.metrics for run in runs))
    metric_columns = [(column, keys, how) for column, keys, how in METRIC_COLUMNS if present & set(keys)]
    metric_columns += [(key, (key,), "last") for key in headline_keys(present)]
    header = ["run", "status", "steps", "axes", *param_columns, *[column for column, *_ in metric_columns]]
    rows = []
    for run in runs:
        run_id, metrics = run.info.run_id, run.data.metrics
        history = histories.get_metric_history(run_id, "train/loss") if "train/loss" in metrics else []
        steps = max(metric.step for metric in history) + 1 if history else 0
        row = [run.info.run_name, run.info.status, steps, axes_of(run.data.params),
               *[run.data.params.get(key, "-") for key in param_columns]]
        for _, keys, how in metric_columns:
            key = next((key for key in keys if key in metrics), None)
            if key is None:
                row.append(math.nan)
            else:
                row.append(tail_mean(histories, run_id, key) if how == "tail" else float(metrics[key]))
        rows.append([row[0], *map(_cell, row[1:])])  # run names are never shortened
    return header, rows


def format_table(header: list[str], rows: list[list[str]], max_width: int | None = None) -> str:
    """Aligned text: one line per run, or, when that is wider than ``max_width`` (default: the terminal), one line
    per column with the runs side by side."""
    table = _aligned(header, rows)
    limit = max_width or shutil.get_terminal_size((160, 40)).columns
    if max(map(len, table.splitlines())) <= limit:
        return table
    columns = [[name, *[row[i] for row in rows]] for i, name in enumerate(header) if i > 0]
    return _aligned(["", *[row[0] for row in rows]], columns)


def _aligned(header: list[str], rows: list[list[str]]) -> str:
    """The table laid out by rich: numeric columns right-aligned, nothing wrapped or cut, no colour."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    numeric = [all(re.fullmatch(r"-?[\d.e+-]+|-", row[i]) for row in rows) for i in range(len(header))]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, right in zip(header, numeric):
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    text = io.StringIO()
    Console(file=text, width=100_000, color_system=None, highlight=False, soft_wrap=False).print(table)
    return "\n".join(line.rstrip() for line in text.getvalue().splitlines())


def print_runs(uri: str, experiments: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Prints one table per MLflow experiment (all experiments with runs when ``experiments`` is None); returns the
    number of runs shown. An experiment that does not exist is named with the ones that do."""
    from mlflow import MlflowClient
    from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD

    client = MlflowClient(uri)
    known = {experiment.name: experiment for experiment in client.search_experiments()}
    names = list(experiments) if experiments else sorted(known)
    missing = [name for name in names if name not in known]
    if missing:
        raise SystemExit(f"no MLflow experiment {', '.join(missing)} in {uri}; there are: {', '.join(sorted(known))}")
    # One search for all tables (params and latest metric values); the client's, because mlflow.search_runs searches
    # the process-wide tracking URI.
    runs_of = defaultdict(list)
    for run in (client.search_runs([known[name].experiment_id for name in names],
                                   max_results=SEARCH_MAX_RESULTS_THRESHOLD) if names else []):
        runs_of[run.info.experiment_id].append(run)
    shown = 0
    for name in names:
        runs = runs_of[known[name].experiment_id]
        if not runs and not experiments:
            continue
        print(f"\nMLflow experiment {name!r} ({uri}): {len(runs)} runs", file=out)
        if runs:
            print(format_table(*run_table(client, runs)), file=out)
        shown += len(runs)
    return shown


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


def runs_page_url(base: str, experiment_id: str | None, view: str | None = None) -> str:
    """The URL of an experiment's runs table in the model-training view of the MLflow UI at ``base`` (MLflow 3.17
    opens on its GenAI view otherwise), in the saved view ``view`` (see :func:`save_headline_view`); the experiments
    list when ``experiment_id`` is None."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return f"{base}/{RUNS_ROUTE.format(experiment_id)}" + (f"&viewStateShareKey={view}" if view else "")


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

    from experiments.tracking import is_remote

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


def ui_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.runs_table ui",
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
    from experiments.tracking import is_remote

    if is_remote(uri):
        url = runs_page_url(uri, experiment_to_open(uri, experiment))
        raise SystemExit(f"{uri} is an MLflow server already: open {url}")
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
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


def main(argv: list[str]) -> int:
    import argparse

    if argv[:1] == ["ui"]:
        return ui_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m experiments.runs_table", description="Compare runs from MLflow")
    parser.add_argument("--suite", action="append", default=[], help="a suite name (MLflow experiment suite-<name>)")
    parser.add_argument("--experiment", action="append", default=[], help="an MLflow experiment name")
    parser.add_argument("--uri", default=None, help="tracking store (default: tracking.uri of base.yaml)")
    args = parser.parse_args(argv)
    names = [f"suite-{suite}" for suite in args.suite] + args.experiment
    uri = args.uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"no MLflow store at {uri} yet: train something first (make exp NAME=tiny)", file=sys.stderr)
        return 1
    if not print_runs(uri, names or None):
        print(f"no runs in {uri}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
