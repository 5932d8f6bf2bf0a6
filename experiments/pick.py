"""``python -m experiments.pick RUN --budget "bytes<=128 latency_ms<=40" [--task NAME] [--mode compat|factorized]
[--out DIR] [--register NAME]`` (``make pick RUN=... BUDGET=... [TASK=...] [REGISTER=...]``): export the best cell of a
run that fits a budget.

The best cell is the one with the highest score (the task's main score, or the mean over the probe's tasks) among the
cells whose every cost is within its bound; ties go to the cheaper (fewer parameters, then FLOPs, bytes, latency).
A latency bound measures every cell (each distinct encoder once: depth and model-side setting). It prints why
(score, costs, the runner-up) and exports the cell as ``make export`` does; a budget no cell meets exits with status 1
and one line naming the cheapest cell and its costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

from lightning_modules.costs import COSTS

BOUND = re.compile(r"(?P<key>[a-z_]+)(?P<op><=|<)(?P<value>[0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)(?P<unit>[kMG]?)")
UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}
EXAMPLE = 'BUDGET="bytes<=128 latency_ms<=40"'


class BudgetError(ValueError):
    """A budget that cannot be read; the message names the bad part and the allowed keys."""


@dataclasses.dataclass(frozen=True)
class Bound:
    key: str
    strict: bool
    limit: float
    written: str = dataclasses.field(default="", compare=False)
    """The bound as the user wrote it (``params<=50M``)."""

    def allows(self, value: float) -> bool:
        return value < self.limit if self.strict else value <= self.limit

    def __str__(self) -> str:
        return self.written or f"{self.key}{'<' if self.strict else '<='}{self.limit:g}"


def parse_budget(text: str) -> list[Bound]:
    """``"bytes<=128 latency_ms<40 params<=50M"`` as bounds (keys: :data:`~lightning_modules.costs.COSTS`; units
    k, M, G; each key once)."""
    bounds = []
    for part in text.replace(",", " ").split():
        match = BOUND.fullmatch(part)
        if match is None or match["key"] not in COSTS:
            raise BudgetError(f"BUDGET part {part!r} not understood: write key<=number (or <) with key one of "
                              f"{', '.join(COSTS)}, e.g. {EXAMPLE}")
        bounds.append(Bound(match["key"], match["op"] == "<", float(match["value"]) * UNITS[match["unit"]], part))
    if not bounds:
        raise BudgetError(f"BUDGET is empty: give at least one bound with a key of {', '.join(COSTS)}, e.g. {EXAMPLE}")
    keys = [bound.key for bound in bounds]
    if len(set(keys)) != len(keys):
        raise BudgetError(f"BUDGET {text!r} bounds a key twice; give each of {', '.join(COSTS)} at most once")
    return bounds


@dataclasses.dataclass
class Choice:
    best: str | None
    runner_up: str | None
    fitting: int
    """How many cells fit."""
    cheapest: str
    """The cheapest cell by the budget's keys in order (what a budget no cell meets is told)."""


def order_key(name: str, scores: dict[str, float], costs: dict) -> tuple:
    """Best first; ties: cheaper first (parameters, FLOPs, bytes, latency)."""
    return (-scores[name], *(costs[name][key] if costs[name][key] is not None else float("inf") for key in COSTS))


def choose(frontier, bounds: list[Bound], task: str) -> Choice:
    """The best and second-best cells of ``frontier`` (a :class:`~experiments.frontier.RunFrontier`) within
    ``bounds``, scored by ``task``. A latency bound measures every cell first (each distinct encoder once)."""
    from evaluation.pareto import scores as table_scores

    scores = table_scores(frontier.table, task)
    costs = frontier.costs
    if any(bound.key == "latency_ms" for bound in bounds):
        frontier.measure(list(scores))
    fitting = sorted((name for name in scores if all(bound.allows(costs[name][bound.key]) for bound in bounds)),
                     key=lambda name: order_key(name, scores, costs))
    cheapest = min(scores, key=lambda name: tuple(costs[name][bound.key] for bound in bounds)
                   + order_key(name, scores, costs)[1:])
    return Choice(*(fitting + [None, None])[:2], len(fitting), cheapest)


def describe(name: str, costs: dict, score: float | None = None) -> str:
    from evaluation.pareto import format_number

    parts = [] if score is None else [f"score {score:.4f}"]
    parts += [f"{key} {format_number(key, costs[key])}" for key in COSTS if costs[key] is not None]
    return f"{name} ({', '.join(parts)})"


def main(argv: list[str]) -> int:
    from lightning_modules.cell_export import MODES

    parser = argparse.ArgumentParser(prog="python -m experiments.pick",
                                     description="export the best cell of a run that fits a budget")
    parser.add_argument("run", help="outputs/<NAME>/<timestamp> or a checkpoint in it")
    parser.add_argument("--budget", required=True, help=f"bounds on {', '.join(COSTS)}, e.g. {EXAMPLE}")
    parser.add_argument("--task", help="score by this probe task's main score (default: the mean over tasks)")
    parser.add_argument("--mode", default="compat", choices=MODES)
    parser.add_argument("--out", help="output folder (default: <run_dir>/export/<cell>-<mode>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing export folder")
    parser.add_argument("--register", metavar="NAME", help="also register the cell as a new version of NAME in MLflow")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        bounds = parse_budget(args.budget)
    except BudgetError as error:
        print(f"pick error: {error}", file=sys.stderr)
        return 2
    from evaluation.pareto import MEAN, scores as table_scores
    from experiments.config import ConfigError
    from experiments.export import default_out, register_export, report
    from experiments.frontier import FrontierError, load_frontier
    from experiments.loading import RunLoadError
    from experiments.registry import RegistryError
    from lightning_modules.cell_export import ExportError, export_cell

    task = args.task or MEAN
    try:
        frontier = load_frontier(args.run, args.mode)
        scores = table_scores(frontier.table, task)
    except (FrontierError, RunLoadError, ConfigError, ValueError) as error:
        print(f"pick error: {error}", file=sys.stderr)
        return 2
    choice = choose(frontier, bounds, task)
    budget = " ".join(str(bound) for bound in bounds)
    if choice.best is None:
        print(f"pick: no cell of {len(scores)} meets BUDGET=\"{budget}\"; the cheapest is "
              f"{describe(choice.cheapest, frontier.costs[choice.cheapest])}", file=sys.stderr)
        return 1
    frontier.measure([name for name in (choice.best, choice.runner_up) if name])
    costs = frontier.costs
    print(f"picked {describe(choice.best, costs[choice.best], scores[choice.best])}")
    print(f"  why: the highest {task if task != MEAN else 'mean main score over ' + ', '.join(frontier.tasks)} "
          f"of the {choice.fitting} of {len(scores)} cells within {budget} (probe step {frontier.table['step']}, "
          f"parameters for MODE={args.mode}, latency in ms per 1,000 probe texts, batch 32)")
    if choice.runner_up:
        gap = scores[choice.best] - scores[choice.runner_up]
        print(f"  runner-up: {describe(choice.runner_up, costs[choice.runner_up], scores[choice.runner_up])}, "
              f"{gap:.4f} lower")
    else:
        print("  runner-up: none (one cell fits)")
    run = frontier.run
    cell = run.model.cell(choice.best)
    out = Path(args.out) if args.out else default_out(run.run_dir, cell, args.mode)
    try:
        result = export_cell(run.model, out, cell, run.origin(), args.mode, args.overwrite)
        report(run, result)
        if args.register:
            cell_scores = {name: value for name in frontier.tasks
                           if (value := table_scores(frontier.table, name).get(choice.best)) is not None}
            register_export(run, result, args.register, cell_scores, costs[choice.best],
                            {"budget": budget, "picked_by": task})
    except (ExportError, RegistryError) as error:
        print(f"pick error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
