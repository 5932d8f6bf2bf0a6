"""A probe table as MLflow metrics, files in the run folder (JSON, CSV, one heatmap per model-side setting) and text.

Files of the probe at step n, in ``<run_dir>/probe/``: ``probe_step_<n>.json`` (the full table, see
:meth:`~evaluation.scoring.Prober.run`, plus its flat ``rows``), ``probe_step_<n>.queries.npz`` (a final table's
per-query scores, see :mod:`evaluation.query_scores`), ``probe_step_<n>.csv`` (those rows: one per
cell and task, a column per score) and ``probe_step_<n>_<group>.png`` (layers × dims heatmaps of each task's main
score, one file per model-side setting: ``full``, ``rank_64``, ... named by the cell naming rule).

At the end of training (and on ``make probe``) the last table is also written as ``probe_final.csv`` and one heatmap
per task and setting, ``probe_final_<task>_<group>.png``, and logged at the root of the MLflow run under those stable
names (two runs that share a setting share the name; MLflow's compare view shows root-level artifacts that all
compared runs share side by side), with the wide table ``probe_final_table.json`` (:func:`wide_rows`: one row per
cell, one column per task; ``mlflow.log_table``, which the UI renders). Its headline metrics (:func:`final_summary`)
are ``final/<task>/{full,grid_mean}`` and ``final/mean_main_score/{full,grid_mean}`` (one value, at the final step)
and the tag ``final.full_cell`` naming the full cell, for the runs table and the parallel-coordinates plot.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

from contracts.atomic import replacing, write_atomic
from contracts.cells import ALWAYS_NAMED, cut_tags, view_name
from evaluation.query_scores import query_file, write_query_scores

PROBE_DIR = "probe"
CHECKPOINT_DIR = "checkpoint"  # make probe's tables: <run_dir>/probe/checkpoint, beside those of training
FILE_PREFIX = "probe_step_"
FINAL_STEM = "probe_final"  # stable names of the final table and heatmaps at the MLflow run's root
FINAL_TABLE = f"{FINAL_STEM}_table.json"  # the wide final table (mlflow.log_table)
MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call
# Tables written before the cell naming rule (no ``full_settings``) named every axis; their only full setting known
# without the run is fp32 precision. docs/tracking.md has the whole name map.
LEGACY_FULL_SETTINGS = {"precision": "fp32"}


def metrics(table: dict, extra: list[str]) -> dict[str, float]:
    """``<task>/<cell>`` (each task's main score: MLflow's chart view gives every task its own section, one chart
    per cell), ``<task>/<metric>/<cell>`` for the ``extra`` scores the task reports, and ``probe/seconds``."""
    logged = {}
    for cell in table["cells"]:
        for task, scores in cell["scores"].items():
            main = table["tasks"][task]["main_score"]
            logged[f"{task}/{cell['name']}"] = scores["main_score"]
            for metric in dict.fromkeys(extra):
                if metric != main and isinstance(scores.get(metric), float):
                    logged[f"{task}/{metric}/{cell['name']}"] = scores[metric]
    logged["probe/seconds"] = table["seconds"]
    return logged


def table_full_settings(table: dict) -> dict:
    """The full settings a probe table's cell names leave out. Tables written before the naming rule carry no
    ``full_settings``: their fp32 precision is the one full setting they are known to name."""
    return table.get("full_settings", LEGACY_FULL_SETTINGS)


def setting_name(table: dict, tags: dict) -> str:
    """The model-side (and other non-grid) part of a cell's name: its cut tags but layer and dim (``rank_64``,
    ``ffn_768/precision_binary``), ``full`` when it cuts none."""
    return view_name({key: value for key, value in cut_tags(tags, table_full_settings(table)).items()
                      if key not in ALWAYS_NAMED})


def heatmap_groups(table: dict) -> dict[str, list[dict]]:
    """Cells grouped by their setting name (:func:`setting_name`: one heatmap each, ``full``, ``rank_128``, ...)."""
    groups: dict[str, list[dict]] = {}
    for cell in table["cells"]:
        groups.setdefault(setting_name(table, cell["tags"]), []).append(cell)
    return groups


def _full_first(value: int | None) -> tuple:
    """Sort key of a layer or dim: None (the axis is not nested: the full model) before every number."""
    return (value is not None, value or 0)


def grid_panel(axes, cells: list[dict], value: Callable[[dict], float | None], cmap: str,
               limits: tuple[float, float], number: str, text_color: Callable[[float], str] = lambda value: "black",
               fontsize: int = 8, colorbar: str | None = None, framed: Callable[[dict], bool] | None = None):
    """One heatmap of ``value(cell)`` (None: an empty square): layers (rows, shallowest first) × dims (columns, widest
    first; ticks with bytes per vector where cells have ``bytes``), each square annotated with
    ``format(value, number)``; a layer or dim tag that is None (axis not nested) reads ``full``. ``colorbar`` labels
    a colour bar beside the panel; ``framed(cell)`` true draws a black frame around the cell's square. Returns the
    image."""
    layers = sorted({cell["tags"]["layer"] for cell in cells}, key=_full_first)
    dims = sorted({cell["tags"]["dim"] for cell in cells}, key=lambda dim: _full_first(-dim if dim else None))
    storage = {cell["tags"]["dim"]: cell.get("bytes") for cell in cells}
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
    if framed is not None:
        from matplotlib.patches import Rectangle

        for cell in cells:
            if framed(cell):
                axes.add_patch(Rectangle((dims.index(cell["tags"]["dim"]) - 0.45, layers.index(cell["tags"]["layer"])
                                          - 0.45), 0.9, 0.9, fill=False, edgecolor="black", linewidth=1.6))

    def label(value: int | None) -> str:
        return "full" if value is None else str(value)

    axes.set_xticks(range(len(dims)), [label(d) + (f"\n{storage[d]} B" if storage[d] is not None else "")
                                       for d in dims], fontsize=fontsize)
    axes.set_yticks(range(len(layers)), [label(layer) for layer in layers])
    axes.set_xlabel("dim")
    axes.set_ylabel("layer")
    if colorbar:
        axes.figure.colorbar(image, ax=axes, label=colorbar, shrink=0.9)
    return image


def grid_figure(panels: int, layers: int, dims: int, columns: int | None = None):
    """An empty matplotlib Figure (no global pyplot state) sized for ``panels`` heatmaps of :func:`grid_panel` of up
    to ``layers`` rows and ``dims`` columns each, ``columns`` panels per row (default: all in one row)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = columns or panels
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(max(4.8, 1.2 + (0.75 * dims + 1.0) * columns), 1.0 + (0.55 * layers + 0.5) * rows),
                    layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path: Path) -> None:
    """Writes ``figure`` to ``path`` as a PNG, by rename (a reader never sees half a file)."""
    with replacing(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")


def heatmap(table: dict, group: str, cells: list[dict], path: Path, run_name: str = "") -> None:
    """One panel per task (see :func:`grid_panel`), each square annotated with the main score, with a colour bar;
    the title names the run, the step and the group."""
    layers = {cell["tags"]["layer"] for cell in cells}
    dims = {cell["tags"]["dim"] for cell in cells}
    tasks = list(table["tasks"])
    figure = grid_figure(len(tasks), len(layers), len(dims))
    for i, task in enumerate(tasks):
        axes = figure.add_subplot(1, len(tasks), i + 1)
        main = table["tasks"][task]["main_score"]
        grid_panel(axes, cells, lambda cell: cell["scores"][task]["main_score"] if task in cell["scores"] else None,
                   "viridis", (0.0, 1.0), ".2f", lambda value: "black" if value > 0.6 else "white", colorbar=main)
        axes.set_title(f"{task}\n{main}", fontsize=9)
    figure.suptitle(" · ".join(filter(None, [run_name, f"step {table['step']}", group])), fontsize=10)
    save_png(figure, path)


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


def write(table: dict, out: str | Path, run_name: str = "", stem: str | None = None,
          json_table: bool = True, per_task: bool = False) -> list[Path]:
    """Writes the JSON table (with its flat ``rows``; unless ``json_table`` is false), the CSV and the heatmaps
    (titled with ``run_name``) into ``out`` (training: ``<run_dir>/probe``) as ``<stem>.json``, ``<stem>.csv``,
    ``<stem>_<group>.png`` (default stem ``probe_step_<n>``), or with ``per_task`` one heatmap per task and group,
    ``<stem>_<task>_<group>.png``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{FILE_PREFIX}{table['step']}"
    flat = rows(table)
    paths = [out / f"{stem}.csv"]
    if json_table:
        paths.insert(0, out / f"{stem}.json")
        per_query = table.get("query_scores")
        plain = {key: value for key, value in table.items() if key != "query_scores"}
        write_atomic(paths[0], json.dumps({**plain, "rows": flat}, indent=1))
        if per_query:
            paths.insert(1, write_query_scores(query_file(paths[0]), per_query))
    columns = list(dict.fromkeys(key for row in flat for key in row))
    with replacing(paths[-1]) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    panels = ([(f"{task}_", {**table, "tasks": {task: table["tasks"][task]}}) for task in table["tasks"]] if per_task
              else [("", table)] if table["tasks"] else [])
    for group, cells in heatmap_groups(table).items():
        for prefix, shown in panels:
            path = out / f"{stem}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', prefix + group)}.png"
            heatmap(shown, group, cells, path, run_name)
            paths.append(path)
    return paths


def wide_rows(table: dict) -> list[dict]:
    """One row per cell: ``cell`` (its name), ``bytes`` per vector, one column per task (its main score) and
    ``mean_main_score``: the final table as MLflow's UI shows it (``mlflow.log_table``)."""
    return [{"cell": cell["name"], "bytes": cell["bytes"],
             **{task: cell["scores"][task]["main_score"] if task in cell["scores"] else None for task in table["tasks"]},
             "mean_main_score": cell["mean_main_score"]} for cell in table["cells"]]


def final_summary(table: dict) -> tuple[dict[str, float], dict[str, str]]:
    """``(metrics, tags)`` of a final table, the headline metrics every probed run shares whatever its axes:

    - ``final/<task>/full``: the task's main score at the run's full cell (deepest, widest, largest model-side
      settings; its name is the tag ``final.full_cell``),
    - ``final/<task>/grid_mean``: the mean of the task's main score over every cell of the run's grid,
    - ``final/mean_main_score/{full,grid_mean}``: the same for the mean over tasks.
    """
    if not table["cells"]:
        return {}, {}
    full = next(cell for cell in table["cells"] if cell["name"] == table["summary"]["full"]["cell"])
    logged = {"final/mean_main_score/full": full["mean_main_score"],
              "final/mean_main_score/grid_mean": _mean([cell["mean_main_score"] for cell in table["cells"]])}
    for task in table["tasks"]:
        scores = [cell["scores"][task]["main_score"] for cell in table["cells"] if task in cell["scores"]]
        if task in full["scores"]:
            logged[f"final/{task}/full"] = full["scores"][task]["main_score"]
        if scores:
            logged[f"final/{task}/grid_mean"] = _mean(scores)
    return logged, {"final.full_cell": full["name"]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def log_final(client, run_id: str, table: dict, out: str | Path, run_name: str = "") -> list[Path]:
    """Writes the final table's CSV and per-task heatmaps as ``probe_final*`` into ``out``, logs them at the MLflow
    run's root with the wide table :data:`FINAL_TABLE` (stable names: a later final probe, e.g. ``make probe``,
    replaces them; every table also stays under ``probe/step_<n>/``, JSON included) and its :func:`final_summary`
    at the table's step. Returns the files."""
    files = write(table, out, run_name, FINAL_STEM, json_table=False, per_task=True)
    logged, tags = final_summary(table)
    log_to_mlflow(client, run_id, logged, table["step"], [], "")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for path in files:
        client.log_artifact(run_id, str(path))
    wide = wide_rows(table)
    if wide:
        client.log_table(run_id, {column: [row[column] for row in wide] for column in wide[0]}, FINAL_TABLE)
    return files


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


def latest_table_file(folder: str | Path) -> Path | None:
    """The ``probe_step_<n>.json`` of the largest ``n`` in ``folder``; None without any. The one place that finds
    probe tables (training's in ``<run_dir>/probe``, ``make probe``'s in ``<run_dir>/probe/checkpoint``)."""
    tables = sorted(Path(folder).glob(f"{FILE_PREFIX}*.json"),
                    key=lambda path: int(path.stem.removeprefix(FILE_PREFIX)))
    return tables[-1] if tables else None


def latest_table(run_dir: str | Path) -> dict | None:
    """The probe table of the latest step in ``run_dir/probe`` (e.g. for a model card), None without any."""
    file = latest_table_file(Path(run_dir, PROBE_DIR))
    return json.loads(file.read_text()) if file else None


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
