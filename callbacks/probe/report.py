"""A probe table as MLflow metrics, files in the run folder (JSON, CSV, one heatmap per rank) and text.

Files of the probe at step n, in ``<run_dir>/probe/``: ``probe_step_<n>.json`` (the full table, see
:meth:`~callbacks.probe.prober.Prober.run`, plus its flat ``rows``), ``probe_step_<n>.csv`` (those rows: one per
cell and task, a column per score) and ``probe_step_<n>_<group>.png`` (layers × dims heatmaps of each task's main
score, one file per rank).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

from datamodules.atomic import replacing, write_atomic
from lightning_modules.views import view_name

PROBE_DIR = "probe"
CHECKPOINT_DIR = "checkpoint"  # make probe's tables: <run_dir>/probe/checkpoint, beside those of training
FILE_PREFIX = "probe_step_"
MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def metrics(table: dict, extra: list[str]) -> dict[str, float]:
    """``probe/<task>/<metric>/<cell>`` for each task's main score and the ``extra`` scores it reports, the summaries
    ``probe/mean_main_score/{full,cheapest}`` and ``probe/seconds``."""
    logged = {}
    for cell in table["cells"]:
        for task, scores in cell["scores"].items():
            main = table["tasks"][task]["main_score"]
            for metric in dict.fromkeys([main, *extra]):
                if isinstance(scores.get(metric), float):
                    logged[f"probe/{task}/{metric}/{cell['name']}"] = scores[metric]
    for label, entry in table["summary"].items():
        logged[f"probe/mean_main_score/{label}"] = entry["mean_main_score"]
    logged["probe/seconds"] = table["seconds"]
    return logged


def heatmap_groups(table: dict) -> dict[str, list[dict]]:
    """Cells grouped by every tag but layer and dim (one heatmap each: ``rank_128``, or ``squash_tanh/rank_128``)."""
    groups: dict[str, list[dict]] = {}
    for cell in table["cells"]:
        rest = {key: value for key, value in cell["tags"].items() if key not in ("layer", "dim")}
        groups.setdefault(view_name(rest), []).append(cell)
    return groups


def grid_panel(axes, cells: list[dict], value: Callable[[dict], float | None], cmap: str,
               limits: tuple[float, float], number: str, text_color: Callable[[float], str] = lambda value: "black",
               fontsize: int = 8):
    """One heatmap of ``value(cell)`` (None: an empty square): layers (rows) × dims (columns, widest first, ticks
    with bytes per vector), each square annotated with ``format(value, number)``. Returns the image (colour bars)."""
    layers = sorted({cell["tags"]["layer"] for cell in cells})
    dims = sorted({cell["tags"]["dim"] for cell in cells}, reverse=True)
    storage = {cell["tags"]["dim"]: cell["bytes"] for cell in cells}
    grid = [[math.nan] * len(dims) for _ in layers]
    for cell in cells:
        cell_value = value(cell)
        if cell_value is not None:
            grid[layers.index(cell["tags"]["layer"])][dims.index(cell["tags"]["dim"])] = cell_value
    image = axes.imshow(grid, cmap=cmap, vmin=limits[0], vmax=limits[1], aspect="auto")
    for row, values in enumerate(grid):
        for column, cell_value in enumerate(values):
            if not math.isnan(cell_value):
                axes.text(column, row, format(cell_value, number), ha="center", va="center", fontsize=fontsize,
                          color=text_color(cell_value))
    axes.set_xticks(range(len(dims)), [f"{d}\n{storage[d]} B" for d in dims], fontsize=fontsize)
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("dim")
    axes.set_ylabel("layer")
    return image


def heatmap(table: dict, group: str, cells: list[dict], path: Path) -> None:
    """One panel per task (see :func:`grid_panel`), each square annotated with the main score."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = {cell["tags"]["layer"] for cell in cells}
    dims = {cell["tags"]["dim"] for cell in cells}
    tasks = list(table["tasks"])
    figure = Figure(figsize=(1.2 + 0.75 * len(dims) * len(tasks), 1.0 + 0.55 * len(layers)), layout="constrained")
    FigureCanvasAgg(figure)
    for i, task in enumerate(tasks):
        axes = figure.add_subplot(1, len(tasks), i + 1)
        grid_panel(axes, cells, lambda cell: cell["scores"][task]["main_score"] if task in cell["scores"] else None,
                   "viridis", (0.0, 1.0), ".2f", lambda value: "black" if value > 0.6 else "white")
        axes.set_title(f"{task}\n{table['tasks'][task]['main_score']}", fontsize=9)
    figure.suptitle(f"step {table['step']} · {group}", fontsize=10)
    with replacing(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")


def rows(table: dict) -> list[dict]:
    """Flat rows, one per cell and task: ``step``, the cell's tags, ``bytes`` per vector, ``task``, ``main_score``,
    every other score and ``main_score/<subset>`` per subset (the CSV, and the JSON table's ``rows``)."""
    flat = []
    for cell in table["cells"]:
        for task, scores in cell["scores"].items():
            row = {"step": table["step"], **cell["tags"], "bytes": cell["bytes"], "task": task,
                   "main_score": scores["main_score"]}
            row.update({metric: value for metric, value in scores.items() if metric not in ("main_score", "subsets")})
            row.update({f"main_score/{subset}": value for subset, value in scores["subsets"].items()})
            flat.append(row)
    return flat


def write(table: dict, out: str | Path) -> list[Path]:
    """Writes the JSON table (with its flat ``rows``), the CSV and the heatmaps into ``out`` (training:
    ``<run_dir>/probe``); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{FILE_PREFIX}{table['step']}"
    flat = rows(table)
    paths = [out / f"{stem}.json", out / f"{stem}.csv"]
    write_atomic(paths[0], json.dumps({**table, "rows": flat}, indent=1))
    columns = list(dict.fromkeys(key for row in flat for key in row))
    with replacing(paths[1]) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    for group, cells in heatmap_groups(table).items():
        if table["tasks"]:
            path = out / f"{stem}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', group)}.png"
            heatmap(table, group, cells, path)
            paths.append(path)
    return paths


def log_to_mlflow(client, run_id: str, logged: dict[str, float], step: int, files: list[Path],
                  artifact_path: str | None = None) -> None:
    """Metrics at ``step`` (in batches MLflow accepts) and the files as artifacts under ``artifact_path`` (default
    ``probe/step_<n>``)."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    entries = [Metric(key, value, stamp, step) for key, value in logged.items()]
    for start in range(0, len(entries), MLFLOW_BATCH):
        client.log_batch(run_id, metrics=entries[start: start + MLFLOW_BATCH])
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path or f"{PROBE_DIR}/step_{step}")


def latest_table(run_dir: str | Path) -> dict | None:
    """The probe table of the latest step in ``run_dir/probe`` (e.g. for a model card), None without any."""
    tables = sorted(Path(run_dir, PROBE_DIR).glob(f"{FILE_PREFIX}*.json"),
                    key=lambda path: int(path.stem.removeprefix(FILE_PREFIX)))
    return json.loads(tables[-1].read_text()) if tables else None


def format_table(table: dict) -> str:
    """A text table: one row per cell, one column per task's main score and their mean."""
    tasks = list(table["tasks"])
    width = max([len(cell["name"]) for cell in table["cells"]] + [4])
    header = f"{'cell':<{width}}  {'bytes':>6}  " + "  ".join(f"{task[:22]:>22}" for task in tasks) + "      mean"
    lines = [f"probe at step {table['step']} ({table['seconds']:.1f} s)", header]
    for cell in table["cells"]:
        scores = "  ".join(f"{cell['scores'][task]['main_score']:>22.4f}" if task in cell["scores"] else f"{'-':>22}"
                           for task in tasks)
        lines.append(f"{cell['name']:<{width}}  {cell['bytes']:>6}  {scores}  {cell['mean_main_score']:8.4f}")
    for task, error in table["errors"].items():
        lines.append(f"failed: {task}: {error}")
    return "\n".join(lines)
