"""Learning curves: the final evaluation's main score of a run's key cells at every probe step (runs probed with
``probe.final.every_probe``, the long MEL pair of ``make paper``), so a reader sees whether a verdict still moves."""

from __future__ import annotations

from pathlib import Path

from evaluation.claims import axes


def key_cells(table: dict) -> set[str]:
    """The cells a learning curve follows: the run's full cell and those that cut one axis only (the rank ladder of
    the long MEL pair, a layer or width ladder elsewhere)."""
    top = {key: values[0] for key, values in axes(table).items()}
    return {cell["name"] for cell in table["cells"]
            if sum(value != top[key] for key, value in cell["tags"].items()) <= 1}


def curve(tables: list[dict]) -> dict:
    """``{"steps": [...], "cells": {cell: {task: [main score per step]}}}`` of a run's probe tables, in step order,
    for its :func:`key_cells`."""
    tables = sorted(tables, key=lambda table: table["step"])
    keys = key_cells(tables[-1])
    cells: dict[str, dict[str, list[float]]] = {}
    for table in tables:
        for cell in (cell for cell in table["cells"] if cell["name"] in keys):
            for task, scores in cell["scores"].items():
                cells.setdefault(cell["name"], {}).setdefault(task, []).append(scores["main_score"])
    return {"steps": [table["step"] for table in tables], "cells": cells}


def draw(curves: dict[str, list[dict]], tasks: list[str], path: Path) -> None:
    """The learning curves ``{role: [curve per seed]}``: per task a panel with the main score of each cell (mean over
    seeds, each seed faint) against the step, one colour per cell and one line style per role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks) + 2.5, 4), squeeze=False,
                                  layout="constrained")
    cells = sorted({cell for seeds in curves.values() for run in seeds for cell in run["cells"]})
    colours = {cell: plt.cm.viridis(index / max(1, len(cells) - 1)) for index, cell in enumerate(cells)}
    styles = ["-", "--", ":", "-."]
    for panel, task in zip(panels[0], tasks):
        for style, (role, seeds) in zip(styles, sorted(curves.items())):
            for cell in cells:
                series = [run["cells"][cell][task] for run in seeds if task in run["cells"].get(cell, {})]
                if not series:
                    continue
                steps = seeds[0]["steps"]
                for values in series:
                    panel.plot(steps, [100 * value for value in values], style, color=colours[cell], alpha=0.2)
                mean = [100 * sum(values) / len(series) for values in zip(*series)]
                panel.plot(steps, mean, style, color=colours[cell], label=f"{role} {cell}")
        panel.set_title(task)
        panel.set_xlabel("step")
        panel.set_ylabel("nDCG@10 (points)")
        panel.grid(alpha=0.3)
    figure.legend(*panels[0][0].get_legend_handles_labels(), fontsize=7, loc="outside right upper")
    figure.savefig(path, dpi=110)
    plt.close(figure)
