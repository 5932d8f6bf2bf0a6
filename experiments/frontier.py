"""``python -m experiments.frontier RUN [--mode compat|factorized] [--no-latency] [--no-mlflow]``
(``make frontier RUN=outputs/<NAME>/<timestamp>``): the quality-versus-cost frontier of a trained run.

Every cell of the run's latest probe table gets its analytic costs from the plugins (parameters of the exported
model in ``--mode``, encoder FLOPs per token, bytes per stored vector: :mod:`lightning_modules.costs`); the cells on a
frontier of any task then get their encode latency measured on this machine (:mod:`experiments.latency`). Per task:
a text table (printed), ``<run_dir>/frontier/frontier_<task>.{json,png}``, and in the run's MLflow run the table as
``frontier_<task>.json`` (an MLflow table: the UI's artifact view renders it) and the plot as ``frontier_<task>.png``
at the artifact root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

FRONTIER_DIR = "frontier"


class FrontierError(ValueError):
    """A run that has no frontier (no checkpoint, no probe table); the message names what is missing."""


def checkpoint_of(run: str | Path) -> Path:
    """The checkpoint of ``RUN``: a ``.ckpt`` file as given, or a run folder's ``checkpoints/last.ckpt`` (else its
    newest checkpoint)."""
    run = Path(run)
    if run.is_file():
        return run
    checkpoints = run / "checkpoints"
    if (checkpoints / "last.ckpt").is_file():
        return checkpoints / "last.ckpt"
    found = sorted(checkpoints.glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise FrontierError(f"RUN={run} is neither a checkpoint nor a run folder with checkpoints/*.ckpt "
                            f"(run folders are outputs/<NAME>/<timestamp>)")
    return found[-1]


def latest_probe_table(run_dir: Path) -> tuple[dict, Path]:
    """The probe table of the latest step of the run (training's ``probe/`` or ``make probe``'s
    ``probe/checkpoint/``; a tie goes to ``make probe``'s)."""
    from evaluation import report

    files = [report.latest_table_file(run_dir / report.PROBE_DIR),
             report.latest_table_file(run_dir / report.PROBE_DIR / report.CHECKPOINT_DIR)]
    tables = [(json.loads(file.read_text()), order, file) for order, file in enumerate(files) if file]
    if not tables:
        raise FrontierError(f"{run_dir} has no probe table (probe/probe_step_<n>.json): train with probing on or run "
                            f"`make probe CKPT={run_dir}/checkpoints/last.ckpt` first")
    table, _, file = max(tables, key=lambda entry: (entry[0]["step"], entry[1]))
    return table, file


@dataclasses.dataclass
class RunFrontier:
    """A run's cells with their scores (the latest probe table) and costs, measured latencies added on demand."""

    run: object
    """The :class:`~experiments.loading.LoadedRun`."""
    table: dict
    table_file: Path
    mode: str
    costs: dict[str, dict[str, float | None]]
    texts: list[str] | None = None
    encoders: dict = dataclasses.field(default_factory=dict)
    """Latency measurements by :func:`experiments.latency.encoder_key`."""

    @property
    def tasks(self) -> list[str]:
        return list(self.table["tasks"])

    def rows(self, task: str) -> list[dict]:
        from evaluation.pareto import frontier_rows, scores

        return frontier_rows(scores(self.table, task), self.costs)

    def measure(self, names: list[str]) -> None:
        """Adds ``latency_ms`` to the costs of the cells ``names`` (each distinct encoder exported and timed once)."""
        from experiments.latency import measure, probe_texts

        missing = [name for name in names if self.costs[name]["latency_ms"] is None]
        if not missing:
            return
        if self.texts is None:
            self.texts = probe_texts(self.run.config)
        cells = [self.run.model.cell(name) for name in missing]
        for name, latency in measure(self.run.model, cells, self.texts, self.mode, known=self.encoders).items():
            self.costs[name]["latency_ms"] = latency


def load_frontier(run: str | Path, mode: str = "compat", table_file: Path | None = None) -> RunFrontier:
    """The run's cells, scores (``table_file``, default the latest probe table) and analytic costs (no latency
    yet)."""
    from experiments.loading import load_run
    from lightning_modules.costs import cell_cost

    loaded = load_run(checkpoint_of(run))
    if table_file is None:
        table, table_file = latest_probe_table(loaded.run_dir)
    else:
        table = json.loads(Path(table_file).read_text())
    context = loaded.model.tokenize.max_length
    costs = {}
    for cell in loaded.model.cells():
        if any(scored["name"] == cell.name for scored in table["cells"]):
            costs[cell.name] = {**cell_cost(loaded.model.module, cell, context, mode).summary(), "latency_ms": None}
    missing = [scored["name"] for scored in table["cells"] if scored["name"] not in costs]
    if missing:
        raise FrontierError(f"{table_file} scores cells the run does not have ({', '.join(missing[:3])}): a table of "
                            f"another run?")
    return RunFrontier(loaded, table, table_file, mode, costs)


def measure_frontier_latency(frontier: RunFrontier) -> None:
    """Measures the cells on an analytic frontier of any task (their latency frontier is then among them)."""
    from evaluation.pareto import frontier_cells

    on_a_frontier = set().union(*(frontier_cells(frontier.rows(task)) for task in frontier.tasks))
    frontier.measure(sorted(on_a_frontier))


def safe_name(task: str) -> str:
    return "".join(char if char.isalnum() or char in "._-" else "_" for char in task)


def write(frontier: RunFrontier, out: Path) -> dict[str, tuple[list[dict], Path, Path]]:
    """Per task: its rows, ``frontier_<task>.json`` and ``frontier_<task>.png`` in ``out``."""
    from evaluation.pareto import plot

    out.mkdir(parents=True, exist_ok=True)
    run_name = f"{frontier.run.run_dir.parent.name}-{frontier.run.run_dir.name}"
    written = {}
    for task in frontier.tasks:
        rows = frontier.rows(task)
        table = out / f"frontier_{safe_name(task)}.json"
        table.write_text(json.dumps({"task": task, "mode": frontier.mode, "probe_table": str(frontier.table_file),
                                     "step": frontier.table["step"], "rows": rows}, indent=1))
        written[task] = (rows, table, plot(task, {run_name: rows}, out / f"frontier_{safe_name(task)}.png",
                                           f"{run_name} step {frontier.table['step']}"))
    return written


def log_table(client, run_id: str, rows: list[dict], artifact_file: str) -> None:
    """``rows`` as an MLflow table artifact (rendered by the UI); a table of that name logged before is replaced,
    not appended to (``log_table`` appends)."""
    import pandas

    frame = pandas.DataFrame(rows)
    if artifact_file not in {entry.path for entry in client.list_artifacts(run_id)}:
        client.log_table(run_id, frame, artifact_file)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, artifact_file)
        frame.to_json(path, orient="split", index=False)  # log_table's own format
        client.log_artifact(run_id, str(path))


def log_to_mlflow(frontier: RunFrontier, written: dict) -> str | None:
    """Logs each task's table and plot at the run's artifact root; returns the MLflow run id (None: the run has
    none)."""
    from mlflow import MlflowClient

    from experiments.mlflow_logger import RUN_ID_FILE

    run_id_file = frontier.run.run_dir / RUN_ID_FILE
    if not run_id_file.is_file():
        return None
    client, run_id = MlflowClient(frontier.run.config.tracking.uri), run_id_file.read_text().strip()
    for task, (rows, _, png) in written.items():
        log_table(client, run_id, rows, f"frontier_{safe_name(task)}.json")
        client.log_artifact(run_id, str(png))
    return run_id


def overlay(table_a: Path, table_b: Path, out: Path, task: str | None = None) -> list[Path]:
    """``frontier_<task>.png`` in ``out`` for every task both tables have (or ``task``): the analytic frontiers of the
    runs the two probe tables belong to, overlaid (``make compare``). Raises :class:`FrontierError` when a table is
    not in a run folder with a checkpoint."""
    from evaluation.comparison import run_dir_of, run_label
    from evaluation.pareto import plot

    sides = []
    for table_file in (table_a, table_b):
        run_dir = run_dir_of(Path(table_file))
        if run_dir is None:
            raise FrontierError(f"{table_file} is not in a run folder: no costs to draw a frontier with")
        sides.append((run_label(Path(table_file)), load_frontier(run_dir, table_file=Path(table_file))))
    tasks = [name for name in sides[0][1].tasks if name in sides[1][1].tasks and (task is None or name == task)]
    return [plot(name, {label: frontier.rows(name) for label, frontier in sides},
                 out / f"frontier_{safe_name(name)}.png", "A vs B") for name in tasks]


def main(argv: list[str]) -> int:
    from lightning_modules.cell_export import MODES

    parser = argparse.ArgumentParser(prog="python -m experiments.frontier", description=__doc__.split("\n")[1])
    parser.add_argument("run", help="outputs/<NAME>/<timestamp> or a checkpoint in it")
    parser.add_argument("--mode", default="compat", choices=MODES, help="export mode the parameters are counted for")
    parser.add_argument("--no-latency", action="store_true", help="analytic costs only")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the run's MLflow run")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from evaluation.pareto import format_rows
    from experiments.config import ConfigError
    from experiments.loading import RunLoadError

    try:
        frontier = load_frontier(args.run, args.mode)
    except (FrontierError, RunLoadError, ConfigError) as error:
        print(f"frontier error: {error}", file=sys.stderr)
        return 2
    if not args.no_latency:
        measure_frontier_latency(frontier)
    written = write(frontier, frontier.run.run_dir / FRONTIER_DIR)
    for task, (rows, table, png) in written.items():
        print(format_rows(task, rows), end="\n\n")
    print(f"probe table: {frontier.table_file} (step {frontier.table['step']}); parameters counted for "
          f"MODE={frontier.mode}; latency: ms per 1,000 probe texts, batch 32, frontier cells only")
    print(f"tables and plots: {frontier.run.run_dir / FRONTIER_DIR}")
    if not args.no_mlflow:
        run_id = log_to_mlflow(frontier, written)
        if run_id:
            print(f"logged to MLflow run {run_id} ({frontier.run.config.tracking.uri}): frontier_<task>.json "
                  f"(table) and frontier_<task>.png at the artifact root")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
