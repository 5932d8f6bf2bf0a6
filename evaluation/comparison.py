"""Two runs' probe tables cell by cell, or two sets of runs (seeds) by their mean per cell, with 95 % intervals
(the command: :mod:`experiments.compare`, ``make compare A=... B=...``).

An ablation asks "is B better than A in the cells I care about", not only at the full and cheapest cell.
:func:`compare` gives, per common cell, B − A in points with a 95 % interval from a paired bootstrap over queries
(:mod:`evaluation.bootstrap`; hierarchical, seeds then queries, when a side has several tables), and, for all cells
and for each value of every axis but layer and dim (``rank_64``, ``precision_binary``): how many cells B scores
significantly better, worse or indistinguishably (the interval above 0, below 0, or holding 0), how many higher
and lower at all, the mean, smallest and largest difference, and the difference at that group's full and cheapest
cell. The cells of one run are nested views of one model, so they are counted, not tested as independent trials.
:func:`heatmaps` draws one layers × dims heatmap of B − A per group of the probe's own heatmaps (every tag but
layer and dim), framing the cells whose interval excludes 0.

Intervals need the per-query scores that final probes keep beside their tables
(:mod:`evaluation.query_scores`); a table without them (probed before they were kept, or a registry task) gives
differences without intervals, and the summary says why.

A and B are probe tables (``probe_step_<n>.json``) or run folders, one or more each (their mean per cell, e.g. over
seeds; only cells every table has are compared); a run folder's table is the latest one of
``make probe`` (``<run_dir>/probe/checkpoint``) or, without one, of training (``<run_dir>/probe``).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from evaluation.bootstrap import LEVEL, RESAMPLES, difference_intervals
from evaluation.query_scores import read_query_scores
from evaluation.scoring import summary
from evaluation.report import (CHECKPOINT_DIR, FILE_PREFIX, LEGACY_FULL_SETTINGS, PROBE_DIR, grid_figure,
                               grid_panel, heatmap_groups, latest_table_file, save_png)
from contracts.cells import cell_name, view_name

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
        latest = latest_table_file(folder)
        if latest is not None:
            return latest
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
    renamed = {}
    if "full_settings" not in table:  # written before the naming rule: its names as today's (docs/tracking.md)
        for cell in table["cells"]:
            renamed[cell["name"]] = cell["name"] = cell_name(cell["tags"], LEGACY_FULL_SETTINGS)
    query_scores = read_query_scores(file)
    for entry in query_scores.values():  # their cells keyed by the same names as the table's
        entry["cells"] = {renamed.get(name, name): scores for name, scores in entry["cells"].items()}
    if query_scores:
        table["query_scores"] = query_scores
    return table, file


def cell_scores(table: dict, task: str | None, file: Path) -> dict[str, tuple[dict, float]]:
    """``{cell name: (cell, score)}``: the cell's mean main score, or ``task``'s main score."""
    if task is not None and task not in table.get("tasks", {}):
        raise CompareError(f"--task {task}: not in {file} (its tasks: {', '.join(table.get('tasks', {})) or 'none'})")
    return {cell["name"]: (cell, cell[MEAN] if task is None else cell["scores"][task]["main_score"])
            for cell in table["cells"] if task is None or task in cell["scores"]}


def group_stats(pairs: list[tuple[dict, float, float]], intervals: dict[str, tuple[float, float]]) -> dict:
    """Counts and differences (B − A, in points) of ``[(cell of A, score A, score B), ...]``; with ``intervals``
    (``{cell: (low, high)}`` in points) also how many cells are significantly ``better``, ``worse`` or
    ``indistinguishable`` (None without intervals)."""
    deltas = [100 * (b - a) for _, a, b in pairs]
    by_name = {cell["name"]: 100 * (b - a) for cell, a, b in pairs}
    ends = summary([cell for cell, _, _ in pairs])
    verdicts = [significance(intervals[cell["name"]]) for cell, _, _ in pairs] if intervals else None
    return {"cells": len(deltas), "higher": sum(delta > 0 for delta in deltas),
            "lower": sum(delta < 0 for delta in deltas), "mean_delta": sum(deltas) / len(deltas),
            "min_delta": min(deltas), "max_delta": max(deltas),
            **{label: (verdicts.count(sign) if verdicts is not None else None)
               for label, sign in (("better", 1), ("worse", -1), ("indistinguishable", 0))},
            "full": {"cell": ends["full"]["cell"], "delta": by_name[ends["full"]["cell"]]},
            "cheapest": {"cell": ends["cheapest"]["cell"], "delta": by_name[ends["cheapest"]["cell"]]}}


def significance(interval: tuple[float, float]) -> int:
    """1 when the interval lies above 0 (B better), -1 below 0 (B worse), 0 when it holds 0."""
    low, high = interval
    return 1 if low > 0 else -1 if high < 0 else 0


def query_arrays(tables: list[dict], task: str, cells: list[str], file_names: list[Path]) -> np.ndarray:
    """``[tables, cells, queries]`` per-query scores of ``task``; CompareError naming the first table without them."""
    for table, file in zip(tables, file_names):
        entry = table.get("query_scores", {}).get(task)
        if entry is None:
            raise CompareError(f"{file} has no per-query scores for {task} (probed before final probes kept them, or "
                               f"a task without them; `make probe CKPT=...` re-probes a checkpoint with them)")
        missing = [cell for cell in cells if cell not in entry["cells"]]
        if missing:
            raise CompareError(f"{file} has no per-query scores of {task} at {missing[0]}")
    return np.stack([np.stack([table["query_scores"][task]["cells"][cell] for cell in cells]) for table in tables])


def paired_arrays(a: list[dict], b: list[dict], tasks: list[str], cells: list[str],
                  files: tuple[list[Path], list[Path]], cells_b: list[str] | None = None
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per task ``(A, B)`` per-query scores, each ``[tables, cells, queries]``, for
    :func:`evaluation.bootstrap.resampled_means` (B's cells: ``cells_b``, default ``cells``). Raises CompareError when
    a table lacks them or the sides were scored on different queries."""
    paired = []
    for name in tasks:
        sides = (query_arrays(a, name, cells, files[0]), query_arrays(b, name, cells_b or cells, files[1]))
        ids = [table["query_scores"][name]["ids"] for table in a + b]
        if any(other != ids[0] for other in ids[1:]):
            raise CompareError(f"{name}: the tables were scored on different queries (another probe set), so their "
                               f"queries cannot be paired")
        paired.append(sides)
    return paired


def intervals(a: list[dict], b: list[dict], task: str | None, cells: list[str],
              files: tuple[list[Path], list[Path]], resamples: int = RESAMPLES) -> tuple[dict, str]:
    """``({cell: (low, high)} of B − A in points, a line saying how)`` from a paired bootstrap over the queries
    (hierarchical when a side has several tables); ``({}, why not)`` when a table lacks per-query scores or the two
    sides were scored on different queries."""
    tasks = [task] if task else list(a[0].get("tasks", {}))
    try:
        paired = paired_arrays(a, b, tasks, cells, files)
    except CompareError as error:
        return {}, f"no intervals: {error}"
    low, high = difference_intervals(paired, resamples)
    found = {cell: (100 * float(lo), 100 * float(hi)) for cell, lo, hi in zip(cells, low, high)}
    queries = ", ".join(f"{name} {sides[0].shape[2]:,}" for name, sides in zip(tasks, paired))
    how = (f"{LEVEL:.0%} intervals: paired bootstrap over queries ({queries}; {resamples:,} resamples, one draw "
           f"shared by A and B and by every cell)")
    if len(a) > 1 or len(b) > 1:
        how += f"; hierarchical: seeds, then queries (A {len(a)} tables, B {len(b)})"
    return found, how


def compare(a: list[dict], b: list[dict], task: str | None = None,
            files: tuple[list[Path], list[Path]] | None = None) -> dict:
    """B − A over the cells that every table has, each side's score the mean over its tables (e.g. seeds):
    ``{"groups": {"all": stats, "precision_binary": stats, ...}, "deltas": {cell: points}, "intervals": {cell:
    (low, high)}, "intervals_note": how (or why none), "only_a": [...], "only_b": [...]}`` (see :func:`group_stats`,
    :func:`intervals`)."""
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
    found, how = intervals(a, b, task, common, files)
    groups = {"all": pairs}
    for pair in pairs:
        for key, value in pair[0]["tags"].items():
            if key not in ("layer", "dim"):
                groups.setdefault(view_name({key: value}), []).append(pair)
    left_out = [list(dict.fromkeys(name for scores in side for name in scores if name not in common)) for side in sides]
    return {"a": [str(file) for file in files[0]], "b": [str(file) for file in files[1]], "score": task or MEAN,
            "steps": [[table.get("step") for table in a], [table.get("step") for table in b]],
            "groups": {label: group_stats(members, found) for label, members in groups.items()},
            "deltas": {cell["name"]: 100 * (score_b - score_a) for cell, score_a, score_b in pairs},
            "intervals": found, "intervals_note": how,
            "only_a": left_out[0], "only_b": left_out[1]}


def format_comparison(result: dict) -> str:
    """The summary per group (significant-cell counts when there are intervals), then every cell's difference with
    its interval (``*``: the interval excludes 0)."""
    lines = [f"B − A in points of {result['score']}" + (", each side the mean of its tables" if
                                                          len(result["a"]) + len(result["b"]) > 2 else ""),
             *(f"{side.upper()}: {file} (step {step})" for side in ("a", "b")
               for file, step in zip(result[side], result["steps"][side == "b"])),
             result["intervals_note"],
             f"{'group':<18} {'cells':>5} {'better':>6} {'worse':>5} {'indist.':>7} {'higher':>6} {'lower':>5} "
             f"{'mean':>7} {'min':>7} {'max':>7} {'full':>7} {'cheapest':>8}"]

    def count(value: int | None) -> str:
        return "-" if value is None else str(value)

    for label, stats in result["groups"].items():
        lines.append(f"{label:<18} {stats['cells']:>5} {count(stats['better']):>6} {count(stats['worse']):>5} "
                     f"{count(stats['indistinguishable']):>7} {stats['higher']:>6} {stats['lower']:>5} "
                     f"{stats['mean_delta']:>+7.2f} {stats['min_delta']:>+7.2f} {stats['max_delta']:>+7.2f} "
                     f"{stats['full']['delta']:>+7.2f} {stats['cheapest']['delta']:>+8.2f}")
    width = max(len(name) for name in result["deltas"])
    lines.append(f"{'cell':<{width}} {'B − A':>7}  {LEVEL:.0%} interval" if result["intervals"] else
                 f"{'cell':<{width}} {'B − A':>7}")
    for name, delta in result["deltas"].items():
        interval = result["intervals"].get(name)
        lines.append(f"{name:<{width}} {delta:>+7.2f}" + (
            f"  [{interval[0]:+.2f}, {interval[1]:+.2f}]{' *' if significance(interval) else ''}" if interval else ""))
    for side in ("a", "b"):
        if result[f"only_{side}"]:
            lines.append(f"not in every table, left out: {len(result[f'only_{side}'])} cells of {side.upper()}, e.g. "
                         f"{result[f'only_{side}'][0]}")
    return "\n".join(lines)


def heatmaps(a: dict, result: dict, path: Path, names: tuple[str, str] | None = None) -> None:
    """One panel per group of the probe heatmaps (e.g. ``rank_64/precision_binary``): layers × dims of B − A in
    points, red where B is lower and blue where higher, on one colour scale for all panels; a black frame marks a
    cell whose 95 % interval excludes 0. ``names``: how the title calls A and B (default: their run folders)."""
    deltas = result["deltas"]
    significant = {name for name, interval in result["intervals"].items() if significance(tuple(interval))}
    groups = {label: [cell for cell in cells if cell["name"] in deltas] for label, cells in heatmap_groups(a).items()}
    groups = {label: cells for label, cells in groups.items() if cells}
    limit = max(abs(delta) for delta in deltas.values()) or 1.0
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    layers_max = max(len({cell["tags"]["layer"] for cell in cells}) for cells in groups.values())
    dims_max = max(len({cell["tags"]["dim"] for cell in cells}) for cells in groups.values())
    figure = grid_figure(len(groups), layers_max, dims_max, columns)
    for index, (label, cells) in enumerate(groups.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        image = grid_panel(axes, cells, lambda cell: deltas[cell["name"]], "RdBu", (-limit, limit), "+.1f",
                           fontsize=7, framed=lambda cell: cell["name"] in significant)
        values = [deltas[cell["name"]] for cell in cells]
        if result["intervals"]:
            signs = [significance(result["intervals"][cell["name"]]) for cell in cells]
            counts = f"B better in {signs.count(1)}, worse in {signs.count(-1)} of {len(values)} (framed)"
        else:
            counts = f"B higher in {sum(value > 0 for value in values)}/{len(values)} (no intervals)"
        axes.set_title(f"{label}\n{counts}, mean {sum(values) / len(values):+.2f}", fontsize=8)
    figure.colorbar(image, ax=figure.axes, label="B − A (points)", shrink=0.8)
    names = names or [", ".join(run_label(Path(file)) for file in result[side]) for side in ("a", "b")]
    figure.suptitle(f"B − A, {result['score']}\nA: {names[0]}\nB: {names[1]}", fontsize=8)
    save_png(figure, path)


def run_label(file: Path) -> str:
    """``precision_20261127-160948`` for ``.../precision/20261127-160948/probe/checkpoint/probe_step_360.json``
    (the run folder above ``probe/``, or the table's folder)."""
    run_dir = run_dir_of(file) or file.parent
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{run_dir.parent.name}_{run_dir.name}")


def run_dir_of(file: Path) -> Path | None:
    """The run folder of a probe table (the folder above ``probe/``), None for a table outside a run folder."""
    return next((parent.parent for parent in file.parents if parent.name == PROBE_DIR), None)
