"""The quality-versus-cost frontier of a run: per task, every cell's final score against each of its costs, the
Pareto-optimal cells marked; as rows, a text table and a plot (one panel per cost, runs overlaid for ``make compare``).

A cell is *on the frontier of a cost* when no other cell costs at most as much and scores at least as high, one of
them strictly. Costs are those of :data:`lightning_modules.costs.COSTS`; a cell without a number for a cost (a
latency not measured) takes no part in that cost's frontier.
"""

from __future__ import annotations

from pathlib import Path

from lightning_modules.costs import COSTS

MEAN = "mean"
"""The score name of the mean main score over the table's tasks (``make pick`` without ``TASK``)."""
LABELS = {"params": "parameters", "flops": "FLOPs / token", "bytes": "bytes / vector",
          "latency_ms": "ms / 1,000 texts"}


def scores(table: dict, task: str) -> dict[str, float]:
    """``{cell name: score}`` of a probe table: the task's main score, or the mean main score for :data:`MEAN`."""
    if task == MEAN:
        return {cell["name"]: cell["mean_main_score"] for cell in table["cells"]}
    if task not in table["tasks"]:
        raise ValueError(f"TASK={task} is not a task of the probe table; its tasks: {', '.join(table['tasks'])}")
    return {cell["name"]: cell["scores"][task]["main_score"] for cell in table["cells"] if task in cell["scores"]}


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """The names whose ``(cost, score)`` no other point dominates (costs no more, scores no less, one strictly)."""
    def dominated(cost: float, score: float) -> bool:
        return any(other_cost <= cost and other_score >= score and (other_cost < cost or other_score > score)
                   for other_cost, other_score in points.values())

    return {name for name, (cost, score) in points.items() if not dominated(cost, score)}


def frontier_rows(cell_scores: dict[str, float], costs: dict[str, dict[str, float | None]]) -> list[dict]:
    """One row per scored cell: ``cell``, ``score``, every cost (None where unknown) and ``frontier``, the costs it is
    Pareto-optimal for (space-separated); sorted by score, best first, ties cheaper first."""
    on = {key: pareto({name: (costs[name][key], score) for name, score in cell_scores.items()
                       if costs[name].get(key) is not None}) for key in COSTS}
    rows = [{"cell": name, "score": score, **{key: costs[name].get(key) for key in COSTS},
             "frontier": " ".join(key for key in COSTS if name in on[key])} for name, score in cell_scores.items()]
    return sorted(rows, key=lambda row: (-row["score"], *(row[key] or 0 for key in COSTS)))


def frontier_cells(rows: list[dict]) -> set[str]:
    """The cells on at least one cost's frontier."""
    return {row["cell"] for row in rows if row["frontier"]}


def format_number(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key == "latency_ms":
        return f"{value:.1f}"
    return f"{value / 1e6:.2f}M" if key in ("params", "flops") and value >= 1e5 else f"{value:,.0f}"


def format_rows(task: str, rows: list[dict], only_frontier: bool = False) -> str:
    """A text table of one task: cell, score, the costs, the frontiers each cell is on (``*`` marks a frontier
    cell)."""
    shown = [row for row in rows if row["frontier"]] if only_frontier else rows
    width = max([len(row["cell"]) for row in shown] + [4])
    header = f"  {'cell':<{width}}  {'score':>7}" + "".join(f"  {key:>10}" for key in COSTS) + "  frontier of"
    lines = [f"{task}: {len(rows)} cells, {len(frontier_cells(rows))} on a frontier (*)", header]
    for row in shown:
        costs = "".join(f"  {format_number(key, row[key]):>10}" for key in COSTS)
        lines.append(f"{'*' if row['frontier'] else ' '} {row['cell']:<{width}}  {row['score']:7.4f}{costs}  "
                     f"{row['frontier'] or '-'}")
    return "\n".join(lines)


def plot(task: str, runs: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """One panel per cost with a number: every cell as a dot, each run's frontier as a line with its cells marked
    (several runs: ``make compare`` overlays them, one colour each)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    keys = [key for key in COSTS if any(row[key] is not None for rows in runs.values() for row in rows)]
    columns = min(2, len(keys))
    figure, axes = pyplot.subplots(-(-len(keys) // columns), columns, figsize=(5.5 * columns, 4.0 * -(-len(keys) // 2)),
                                   squeeze=False)
    colours = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel in axes.flat[len(keys):]:
        panel.set_visible(False)
    for panel, key in zip(axes.flat, keys):
        for index, (label, rows) in enumerate(runs.items()):
            colour = colours[index % len(colours)]
            known = [row for row in rows if row[key] is not None]
            panel.scatter([row[key] for row in known], [row["score"] for row in known], s=10, color=colour,
                          alpha=0.35, linewidths=0)
            best = sorted((row for row in known if key in row["frontier"].split()), key=lambda row: row[key])
            panel.plot([row[key] for row in best], [row["score"] for row in best], "o-", color=colour, markersize=4,
                       label=label)
            if len(runs) == 1:
                for row in best:
                    panel.annotate(row["cell"], (row[key], row["score"]), fontsize=5, xytext=(3, -6),
                                   textcoords="offset points")
        values = [row[key] for rows in runs.values() for row in rows if row[key] is not None]
        if min(values) > 0 and max(values) / min(values) > 10:  # bytes span 1 to 1536: log; parameters often 10 %
            panel.set_xscale("log")
        panel.set_xlabel(LABELS[key])
        panel.set_ylabel(f"{task} main score" if task != MEAN else "mean main score")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7, loc="lower right")
    figure.suptitle(" · ".join(filter(None, [title, task, "frontier: no cell cheaper and better"])), fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    pyplot.close(figure)
    return path
