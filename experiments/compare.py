"""``python -m experiments.compare A [A ...] --vs B [B ...] [--task NAME] [--out DIR] [--mlflow]`` (``make compare
A=... B=...``): two runs' probe tables cell by cell (what is compared: :mod:`evaluation.comparison`).

It prints the comparison and writes ``compare.json`` and ``compare.png`` (B − A heatmaps) to ``--out`` (default
``outputs/compare/<A>__vs__<B>``).

With ``--mlflow`` the comparison is also logged as an MLflow run of its own in B's store (read from B's run folder),
in the experiment ``<B's experiment>/compare`` (beside the training runs, not among them: ``make runs`` lists
training runs only): ``compare.json`` and ``compare.png`` at its root, the metrics ``compare/<group>/<stat>`` and
the tags ``compare.a`` / ``compare.b`` (the tables) and ``compare.b_run_id``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation.comparison import (CompareError, compare, format_comparison, heatmaps, load_table, run_dir_of,
                                     run_label)
from contracts.atomic import write_atomic
from experiments.mlflow_logger import RUN_ID_FILE
from experiments.mlflow_ui import run_store
from experiments.runs_table import COMPARISON_TAG
from experiments.tracking import DESCRIPTION_TAG


COMPARE_EXPERIMENT_SUFFIX = "/compare"


def default_out(files_a: list[Path], files_b: list[Path]) -> Path:
    """``outputs/compare/<A>__vs__<B>``, each side named by its first run (``+2``: and two more tables)."""
    def label(files: list[Path]) -> str:
        return run_label(files[0]) + (f"+{len(files) - 1}" if len(files) > 1 else "")

    return Path("outputs", "compare", f"{label(files_a)}__vs__{label(files_b)}")


def log_comparison(result: dict, out: Path, files_b: list[Path]) -> tuple[str, str]:
    """Logs the comparison as a new MLflow run in the store of B's (first) run, in the experiment
    ``<B's experiment>/compare`` (its artifacts in a ``compare`` folder of B's experiment's); returns
    ``(tracking uri, run id)``.

    Raises:
        CompareError: when B is not inside a run folder with ``config.yaml``.
    """
    from mlflow import MlflowClient

    run_dir = run_dir_of(files_b[0])
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        raise CompareError(f"--mlflow: {files_b[0]} is not in a run folder with config.yaml (outputs/<NAME>/<ts>), "
                           f"so there is no MLflow store and experiment to log to")
    uri, experiment = run_store(run_dir)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(f"{experiment}{COMPARE_EXPERIMENT_SUFFIX}")
    if found is None:
        trained = client.get_experiment_by_name(experiment)
        location = f"{trained.artifact_location.rstrip('/')}/compare" if trained else None
        experiment_id = client.create_experiment(f"{experiment}{COMPARE_EXPERIMENT_SUFFIX}", location)
    else:
        experiment_id = found.experiment_id
    names = [", ".join(run_label(Path(file)) for file in result[side]) for side in ("a", "b")]
    tags = {"compare.a": " ".join(result["a"])[:5000], COMPARISON_TAG: " ".join(result["b"])[:5000],
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
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", nargs="+", help="probe tables (.json) or run folders: the reference (several: their mean)")
    parser.add_argument("--vs", nargs="+", required=True, metavar="B",
                        help="probe tables or run folders compared with A (several: their mean)")
    parser.add_argument("--task", help="compare this task's main score (default: the mean over tasks)")
    parser.add_argument("--out", help="folder for compare.json and compare.png (default: outputs/compare/<A>__vs__<B>)")
    parser.add_argument("--mlflow", action="store_true",
                        help="also log the comparison as an MLflow run in <B's experiment>/compare (B must be in a run "
                             "folder)")
    options = parser.parse_args(argv)
    try:
        loaded = [[load_table(path) for path in paths] for paths in (options.a, options.vs)]
        (a, files_a), (b, files_b) = ([list(column) for column in zip(*side)] for side in loaded)
        result = compare(a, b, options.task, (files_a, files_b))
        out = Path(options.out) if options.out else default_out(files_a, files_b)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "compare.json", json.dumps(result, indent=1))
        heatmaps(a[0], result, out / "compare.png")
        print(format_comparison(result))
        print(f"\nper-cell differences and heatmaps: {out}")
        try:  # the runs' quality-versus-cost frontiers, overlaid (needs their run folders and checkpoints)
            from experiments.frontier import FrontierError, overlay
            from experiments.loading import RunLoadError

            plots = overlay(files_a[0], files_b[0], out, options.task)
            print(f"frontiers overlaid: {', '.join(str(path) for path in plots)}")
        except (FrontierError, RunLoadError) as error:
            print(f"no frontier overlay: {error}")
        if options.mlflow:  # after the files: a run folder's absence stops only the logging
            uri, run_id = log_comparison(result, out, files_b)
            print(f"logged as MLflow run {run_id} ({uri})")
    except CompareError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
