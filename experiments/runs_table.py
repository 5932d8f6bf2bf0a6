"""Read the MLflow store: a terminal table comparing runs (the UI launcher: :mod:`experiments.mlflow_ui`).

    python -m experiments.runs_table [--suite smoke | --experiment NAME ...] [--uri URI]   # make runs [SUITE=smoke]

The table has one row per run (oldest first): its name and status, the steps it logged, the params that differ
between the runs of the table (``axes`` summarises which Matryoshka plugins a run trains), and its key metrics:
final losses (mean of the last 10 logged values), throughput, peak memory, training wall time, and the probe's
headline metrics (``final/<task>/{full,grid_mean}``: the same keys in every probed run, whatever its axes).
"""

from __future__ import annotations

import functools
import io
import math
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

from experiments.mlflow_ui import headline_keys

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
# The tag of a run ``make compare ... ARGS=--mlflow`` logged (B's probe tables): a comparison, not a training run.
COMPARISON_TAG = "compare.b"
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
    """Prints one table of training runs per MLflow experiment (all experiments with any when ``experiments`` is
    None; runs of ``make compare --mlflow`` are left out, also from stores where they share B's experiment); returns
    the number of runs shown. An experiment that does not exist is named with the ones that do."""
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
        if COMPARISON_TAG not in run.data.tags:
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


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.runs_table", description="Compare runs from MLflow")
    parser.add_argument("--suite", action="append", default=[], help="a suite name (MLflow experiment suite-<name>)")
    parser.add_argument("--experiment", action="append", default=[], help="an MLflow experiment name")
    parser.add_argument("--uri", default=None, help="tracking store (default: tracking.uri of base.yaml)")
    args = parser.parse_args(argv)
    names = [f"suite-{suite}" for suite in args.suite] + args.experiment
    from experiments.mlflow_ui import default_tracking_uri

    uri = args.uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"no MLflow store at {uri} yet: train something first (make exp NAME=tiny)", file=sys.stderr)
        return 1
    if not print_runs(uri, names or None):
        print(f"no runs in {uri}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
