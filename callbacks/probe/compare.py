"""``python -m callbacks.probe.compare A [A ...] --vs B [B ...] [--task NAME] [--out DIR]`` (``make compare A=...
B=...``): two runs' probe tables cell by cell, or two sets of runs (seeds) by their mean per cell.

An ablation asks "is B better than A in the cells I care about", not only at the full and cheapest cell. This prints,
for all common cells and for each value of every axis but layer and dim (``rank_64``, ``precision_binary``), how
many cells B scores higher and lower, the mean, smallest and largest difference in points, the difference at that
group's full and cheapest cell, and a two-sided sign-test p-value (cells of one run share weights, so read it as a
guide, not as independent trials). It writes ``compare.json`` and ``compare.png``: one layers × dims heatmap of
B − A per group of the probe's own heatmaps (every tag but layer and dim).

A and B are probe tables (``probe_step_<n>.json``) or run folders, one or more each (their mean per cell, e.g. over
seeds; only cells every table has are compared); a run folder's table is the latest one of
``make probe`` (``<run_dir>/probe/checkpoint``) or, without one, of training (``<run_dir>/probe``).

With ``--mlflow`` the comparison is also logged as an MLflow run of its own in B's experiment and store (read from
B's run folder): ``compare.json`` and ``compare.png`` at its root, the metrics ``compare/<group>/<stat>`` and the
tags ``compare.a`` / ``compare.b`` (the tables) and ``compare.b_run_id``, so the UI shows the per-cell comparison
next to the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from callbacks.probe.prober import summary
from callbacks.probe.report import CHECKPOINT_DIR, FILE_PREFIX, PROBE_DIR, grid_panel, heatmap_groups
from datamodules.atomic import replacing, write_atomic
from lightning_modules.views import view_name

MEAN = "mean_main_score"
CELL_KEYS = ("name", "tags", "bytes", "scores", MEAN)


class CompareError(ValueError):
    """A path or table that cannot be compared; the message names it."""


def table_file(path: str | Path) -> Path:
    """The probe table of ``path``: itself if a file, else the latest of ``make probe``, else of training."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CompareError(f"{path}: no such probe table or run folder")
    for folder in (path / PROBE_DIR / CHECKPOINT_DIR, path / PROBE_DIR):
        tables = sorted(folder.glob(f"{FILE_PREFIX}*.json"), key=lambda file: int(file.stem.removeprefix(FILE_PREFIX)))
        if tables:
            return tables[-1]
    raise CompareError(f"{path}: no {FILE_PREFIX}<n>.json in {path / PROBE_DIR / CHECKPOINT_DIR} or {path / PROBE_DIR}")


def load_table(path: str | Path) -> tuple[dict, Path]:
    file = table_file(path)
    try:
        table = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CompareError(f"{file}: not a JSON probe table ({error})") from None
    if not isinstance(table, dict) or not isinstance(table.get("cells"), list):
        raise CompareError(f"{file}: not a probe table (no 'cells' list)")
    for index, cell in enumerate(table["cells"]):
        missing = [key for key in CELL_KEYS if key not in cell] + [f"tags.{key}" for key in ("layer", "dim")
                                                                    if key not in cell.get("tags", {})]
        if missing:
            raise CompareError(f"{file}: cells[{index}] lacks {', '.join(missing)} (a probe table's cells have "
                               f"{', '.join(CELL_KEYS)})")
    return table, file


def cell_scores(table: dict, task: str | None, file: Path) -> dict[str, tuple[dict, float]]:
    """``{cell name: (cell, score)}``: the cell's mean main score, or ``task``'s main score."""
    if task is not None and task not in table.get("tasks", {}):
        raise CompareError(f"--task {task}: not in {file} (its tasks: {', '.join(table.get('tasks', {})) or 'none'})")
    return {cell["name"]: (cell, cell[MEAN] if task is None else cell["scores"][task]["main_score"])
            for cell in table["cells"] if task is None or task in cell["scores"]}


def sign_test(higher: int, lower: int) -> float:
    """Two-sided exact sign test of ``higher`` against ``lower`` (ties left out): P(a split at least this uneven)."""
    from scipy.stats import binomtest

    trials = higher + lower
    return 1.0 if trials == 0 else float(binomtest(higher, trials, 0.5).pvalue)


def group_stats(pairs: list[tuple[dict, float, float]]) -> dict:
    """Counts, differences (B − A, in points) and the sign test of ``[(cell of A, score A, score B), ...]``."""
    deltas = [100 * (b - a) for _, a, b in pairs]
    higher, lower = sum(delta > 0 for delta in deltas), sum(delta < 0 for delta in deltas)
    by_name = {cell["name"]: 100 * (b - a) for cell, a, b in pairs}
    ends = summary([cell for cell, _, _ in pairs])
    return {"cells": len(deltas), "higher": higher, "lower": lower, "mean_delta": sum(deltas) / len(deltas),
            "min_delta": min(deltas), "max_delta": max(deltas), "sign_test_p": sign_test(higher, lower),
            "full": {"cell": ends["full"]["cell"], "delta": by_name[ends["full"]["cell"]]},
            "cheapest": {"cell": ends["cheapest"]["cell"], "delta": by_name[ends["cheapest"]["cell"]]}}


def compare(a: list[dict], b: list[dict], task: str | None = None,
            files: tuple[list[Path], list[Path]] | None = None) -> dict:
    """B − A over the cells that every table has, each side's score the mean over its tables (e.g. seeds):
    ``{"groups": {"all": stats, "precision_binary": stats, ...}, "deltas": {cell: points}, "only_a": [...],
    "only_b": [...]}`` (see :func:`group_stats`)."""
    files = files or ([Path(f"A{i}") for i in range(len(a))], [Path(f"B{i}") for i in range(len(b))])
    sides = [[cell_scores(table, task, file) for table, file in zip(tables, side_files)]
             for tables, side_files in ((a, files[0]), (b, files[1]))]
    every = sides[0] + sides[1]
    common = [name for name in every[0] if all(name in scores for scores in every)]
    if not common:
        raise CompareError(f"{', '.join(map(str, files[0] + files[1]))} share no probe cell "
                           f"(A: {', '.join(list(every[0])[:3])}...; B: {', '.join(list(sides[1][0])[:3])}...)")

    def mean(side: list[dict], name: str) -> float:
        return sum(scores[name][1] for scores in side) / len(side)

    pairs = [(every[0][name][0], mean(sides[0], name), mean(sides[1], name)) for name in common]
    groups = {"all": pairs}
    for pair in pairs:
        for key, value in pair[0]["tags"].items():
            if key not in ("layer", "dim"):
                groups.setdefault(view_name({key: value}), []).append(pair)
    left_out = [list(dict.fromkeys(name for scores in side for name in scores if name not in common)) for side in sides]
    return {"a": [str(file) for file in files[0]], "b": [str(file) for file in files[1]], "score": task or MEAN,
            "steps": [[table.get("step") for table in a], [table.get("step") for table in b]],
            "groups": {label: group_stats(members) for label, members in groups.items()},
            "deltas": {cell["name"]: 100 * (score_b - score_a) for cell, score_a, score_b in pairs},
            "only_a": left_out[0], "only_b": left_out[1]}


def format_comparison(result: dict) -> str:
    lines = [f"B − A in points of {result['score']}" + (", each side the mean of its tables" if
                                                          len(result["a"]) + len(result["b"]) > 2 else ""),
             *(f"{side.upper()}: {file} (step {step})" for side in ("a", "b")
               for file, step in zip(result[side], result["steps"][side == "b"])),
             f"{'group':<18} {'cells':>5} {'B higher':>8} {'lower':>5} {'mean':>7} {'min':>7} {'max':>7} "
             f"{'full':>7} {'cheapest':>8} {'sign p':>7}"]
    for label, stats in result["groups"].items():
        lines.append(f"{label:<18} {stats['cells']:>5} {stats['higher']:>8} {stats['lower']:>5} "
                     f"{stats['mean_delta']:>+7.2f} {stats['min_delta']:>+7.2f} {stats['max_delta']:>+7.2f} "
                     f"{stats['full']['delta']:>+7.2f} {stats['cheapest']['delta']:>+8.2f} {stats['sign_test_p']:>7.3f}")
    for side in ("a", "b"):
        if result[f"only_{side}"]:
            lines.append(f"not in every table, left out: {len(result[f'only_{side}'])} cells of {side.upper()}, e.g. "
                         f"{result[f'only_{side}'][0]}")
    return "\n".join(lines)


def heatmaps(a: dict, result: dict, path: Path) -> None:
    """One panel per group of the probe heatmaps (e.g. ``rank_64/precision_binary``): layers × dims of B − A in
    points, red where B is lower and blue where higher, on one colour scale for all panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    deltas = result["deltas"]
    groups = {label: [cell for cell in cells if cell["name"] in deltas] for label, cells in heatmap_groups(a).items()}
    groups = {label: cells for label, cells in groups.items() if cells}
    limit = max(abs(delta) for delta in deltas.values()) or 1.0
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    layers_max = max(len({cell["tags"]["layer"] for cell in cells}) for cells in groups.values())
    dims_max = max(len({cell["tags"]["dim"] for cell in cells}) for cells in groups.values())
    figure = Figure(figsize=(1.5 + 0.7 * dims_max * columns, 1.2 + (0.5 * layers_max + 0.9) * rows),
                    layout="constrained")
    FigureCanvasAgg(figure)
    for index, (label, cells) in enumerate(groups.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        image = grid_panel(axes, cells, lambda cell: deltas[cell["name"]], "RdBu", (-limit, limit), "+.1f",
                           fontsize=7)
        values = [deltas[cell["name"]] for cell in cells]
        axes.set_title(f"{label}\nB higher in {sum(value > 0 for value in values)}/{len(values)}, "
                       f"mean {sum(values) / len(values):+.2f}", fontsize=8)
    figure.colorbar(image, ax=figure.axes, label="B − A (points)", shrink=0.8)
    names = [", ".join(run_label(Path(file)) for file in result[side]) for side in ("a", "b")]
    figure.suptitle(f"B − A, {result['score']}\nA: {names[0]}\nB: {names[1]}", fontsize=8)
    with replacing(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")


def run_label(file: Path) -> str:
    """``precision_20261127-160948`` for ``.../precision/20261127-160948/probe/checkpoint/probe_step_360.json``
    (the run folder above ``probe/``, or the table's folder)."""
    run_dir = run_dir_of(file) or file.parent
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{run_dir.parent.name}_{run_dir.name}")


def default_out(files_a: list[Path], files_b: list[Path]) -> Path:
    """``outputs/compare/<A>__vs__<B>``, each side named by its first run (``+2``: and two more tables)."""
    def label(files: list[Path]) -> str:
        return run_label(files[0]) + (f"+{len(files) - 1}" if len(files) > 1 else "")

    return Path("outputs", "compare", f"{label(files_a)}__vs__{label(files_b)}")


def run_dir_of(file: Path) -> Path | None:
    """The run folder of a probe table (the folder above ``probe/``), None for a table outside a run folder."""
    return next((parent.parent for parent in file.parents if parent.name == PROBE_DIR), None)


def log_comparison(result: dict, out: Path, files_b: list[Path]) -> tuple[str, str]:
    """Logs the comparison as a new MLflow run in the experiment and store of B's (first) run; returns
    ``(tracking uri, run id)``.

    Raises:
        CompareError: when B is not inside a run folder with ``config.yaml``.
    """
    from mlflow import MlflowClient

    from experiments.runs import run_store
    from experiments.tracking import DESCRIPTION_TAG, RUN_ID_FILE

    run_dir = run_dir_of(files_b[0])
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        raise CompareError(f"--mlflow: {files_b[0]} is not in a run folder with config.yaml (outputs/<NAME>/<ts>), "
                           f"so there is no MLflow store and experiment to log to")
    uri, experiment = run_store(run_dir)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    names = [", ".join(run_label(Path(file)) for file in result[side]) for side in ("a", "b")]
    tags = {"compare.a": " ".join(result["a"])[:5000], "compare.b": " ".join(result["b"])[:5000],
            DESCRIPTION_TAG: f"B − A in points of {result['score']}, cell by cell.\nA: {names[0]}\nB: {names[1]}"}
    if (run_dir / RUN_ID_FILE).is_file():
        tags["compare.b_run_id"] = (run_dir / RUN_ID_FILE).read_text().strip()
    run = client.create_run(experiment_id, run_name=f"compare {names[0]} vs {names[1]}"[:250], tags=tags)
    stats = {f"compare/{group}/{key}": float(value) for group, entry in result["groups"].items()
             for key, value in entry.items() if isinstance(value, (int, float))}
    stats.update({f"compare/{group}/{end}_delta": entry[end]["delta"] for group, entry in result["groups"].items()
                  for end in ("full", "cheapest")})
    for key, value in stats.items():
        client.log_metric(run.info.run_id, key, value)
    for name in ("compare.json", "compare.png"):
        client.log_artifact(run.info.run_id, str(out / name))
    client.set_terminated(run.info.run_id)
    return uri, run.info.run_id


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m callbacks.probe.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", nargs="+", help="probe tables (.json) or run folders: the reference (several: their mean)")
    parser.add_argument("--vs", nargs="+", required=True, metavar="B",
                        help="probe tables or run folders compared with A (several: their mean)")
    parser.add_argument("--task", help="compare this task's main score (default: the mean over tasks)")
    parser.add_argument("--out", help="folder for compare.json and compare.png (default: outputs/compare/<A>__vs__<B>)")
    parser.add_argument("--mlflow", action="store_true",
                        help="also log the comparison as an MLflow run in B's experiment (B must be in a run folder)")
    options = parser.parse_args(argv)
    try:
        loaded = [[load_table(path) for path in paths] for paths in (options.a, options.vs)]
        (a, files_a), (b, files_b) = ([list(column) for column in zip(*side)] for side in loaded)
        result = compare(a, b, options.task, (files_a, files_b))
    except CompareError as error:
        print(error, file=sys.stderr)
        return 2
    out = Path(options.out) if options.out else default_out(files_a, files_b)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "compare.json", json.dumps(result, indent=1))
    heatmaps(a[0], result, out / "compare.png")
    print(format_comparison(result))
    print(f"\nper-cell differences and heatmaps: {out}")
    if options.mlflow:
        try:
            uri, run_id = log_comparison(result, out, files_b)
        except CompareError as error:
            print(error, file=sys.stderr)
            return 2
        print(f"logged as MLflow run {run_id} ({uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
