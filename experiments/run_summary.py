"""The end-of-run summary of a training run in MLflow: every view's final loss, as JSON and layer × dim heatmaps."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.report import grid_figure, grid_panel, save_png

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger

# The per-view loss heatmap averages each view over its last logged values (one step is noisy).
FINAL_WINDOW = 10


def tail_mean(client, run_id: str, key: str, window: int = FINAL_WINDOW) -> float:
    """Mean of the last ``window`` logged values of a metric (by step); NaN when it was never logged."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)[-window:]
    return sum(metric.value for metric in history) / len(history) if history else math.nan


VIEW_PREFIX = "train/loss/"
AXES = ("layer", "dim")


def final_view_losses(client, run_id: str, window: int = FINAL_WINDOW) -> dict[str, float]:
    """``{view name: mean of its last ≤ window logged losses}`` for every ``train/loss/<view>`` metric. Each logged
    value is a step that trained the view (a MEL rank is logged only at the steps that sampled it)."""
    keys = sorted(key for key in client.get_run(run_id).data.metrics if key.startswith(VIEW_PREFIX))
    return {key.removeprefix(VIEW_PREFIX): tail_mean(client, run_id, key, window) for key in keys}


def view_grids(losses: Mapping[str, float]) -> dict[str, dict[tuple[int | None, int | None], float]]:
    """Per-view losses arranged for heatmaps: ``{panel: {(layer, dim): loss}}``. A panel is everything in the view
    name except its layer and dim (``rank_16``, a custom axis' tags, or ``""``); a missing axis is None."""
    grids: dict[str, dict] = {}
    for view, loss in losses.items():
        coordinates, panel = {axis: None for axis in AXES}, []
        for part in view.split("/"):
            axis, _, value = part.partition("_")
            if axis in AXES and value.isdigit():
                coordinates[axis] = int(value)
            elif part != "full":
                panel.append(part)
        grids.setdefault("/".join(panel), {})[(coordinates["layer"], coordinates["dim"])] = loss
    return grids


def heatmap_figure(grid: Mapping[tuple[int | None, int | None], float], title: str):
    """A layer × dim heatmap of losses in the probe heatmaps' layout (shallowest layer first, widest dim first; see
    :func:`evaluation.report.grid_panel`), each cell annotated, with a colour bar (a matplotlib Figure, no
    global pyplot state)."""
    layers, dims = {layer for layer, _ in grid}, {dim for _, dim in grid}
    finite = [value for value in grid.values() if not math.isnan(value)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    figure = grid_figure(1, len(layers), len(dims))
    cells = [{"tags": {"layer": layer, "dim": dim}, "loss": loss} for (layer, dim), loss in grid.items()]
    grid_panel(figure.add_subplot(), cells, lambda cell: cell["loss"], "viridis_r", (low, high), ".3g",
               lambda value: "white" if value > (low + high) / 2 else "black", colorbar="loss")
    figure.axes[0].set_title(title, fontsize=9)
    return figure


def log_run_summary(logger: MLFlowLogger, window: int = FINAL_WINDOW) -> dict[str, float]:
    """End-of-run artifacts: ``plots/final_view_loss.json`` (every view's final loss) and one layer × dim heatmap
    per panel (``plots/final_view_loss_rank_16.png``; ``plots/final_view_loss.png`` without MEL). Views with
    neither a layer nor a dim tag (the baseline) get the JSON only. Returns the per-view losses."""
    client, run_id = logger.experiment, logger.run_id
    losses = final_view_losses(client, run_id, window)
    if not losses:
        return losses
    client.log_text(run_id, json.dumps({"window": window, "losses": losses}, indent=1), "plots/final_view_loss.json")
    run_name = client.get_run(run_id).info.run_name
    with tempfile.TemporaryDirectory() as tmp:
        for panel, grid in view_grids(losses).items():
            if set(grid) == {(None, None)}:
                continue
            suffix = "_" + panel.replace("/", "_") if panel else ""
            path = Path(tmp) / f"final_view_loss{suffix}.png"
            title = f"{run_name} {panel}\nloss per view, mean of its last {window} logged values"
            save_png(heatmap_figure(grid, title), path)
            client.log_artifact(run_id, str(path), "plots")
    return losses
