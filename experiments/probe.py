"""``python -m experiments.probe CKPT [probe.key=value ...]`` (``make probe CKPT=... ARGS=...``): probe a checkpoint.

Rebuilds the module from the run's resolved ``config.yaml`` (next to ``checkpoints/``), loads the checkpoint's
weights, scores every cell of the run on the final evaluation's tasks (``probe.final``, with per-query scores;
``probe.final.enabled=false``: the mid-training settings), prints the table, writes ``<run_dir>/probe/checkpoint/probe_step_<n>.*``
(beside the tables of training) and, when the run has an MLflow run id, logs the metrics to that MLflow run at the
checkpoint's step and the files under its artifacts ``probe/checkpoint/step_<n>``; the table also becomes the run's
root-level ``probe_final.csv`` / ``probe_final_<task>_<setting>.png`` and ``final/...`` headline metrics (see
:func:`evaluation.report.log_final`). A run logged before the cell naming rule (docs/tracking.md) gets its metrics
under today's names this way.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

USAGE = "usage: python -m experiments.probe CKPT [--no-mlflow] [probe.key=value ...]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("evaluation").setLevel(logging.INFO)
    from omegaconf import OmegaConf

    from evaluation import report
    from evaluation.probing import check_tasks, probe_corpus_dir
    from evaluation.scoring import Prober
    from experiments.config import ConfigError, validate
    from experiments.loading import RunLoadError, load_run
    from experiments.mlflow_logger import RUN_ID_FILE

    checkpoint, options = argv[0], argv[1:]
    use_mlflow = "--no-mlflow" not in options
    overrides = [option for option in options if option != "--no-mlflow"]
    try:
        bad = [option for option in overrides if not option.startswith("probe.")]
        if bad:
            raise ConfigError("ARGS", f"{bad}: only probe.* settings apply to a trained checkpoint")
        run = load_run(checkpoint)
        config = OmegaConf.merge(run.config, OmegaConf.from_dotlist(overrides))
        validate(config)
        check_tasks(config.probe)
    except (ConfigError, RunLoadError) as error:
        print(error, file=sys.stderr)
        return 2
    import torch

    from evaluation.probing import final_tasks
    from evaluation.scoring import preserved_rng

    try:
        with preserved_rng():
            tasks = final_tasks(config.probe, probe_corpus_dir(config), list(config.data.locales))
    except ValueError as error:  # e.g. no locale of probe.locales has probe pairs
        key = "probe.final.locales" if config.probe.final.enabled else "probe.locales"
        print(ConfigError(key, str(error)), file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = run.model.module.to(device)
    table = Prober(module, run.model.tokenize, tasks, config.probe.batch_size, f"matryoshka-lab/{config.name}",
                   device, config.probe.scoring_processes).run(run.global_step, query_scores=True, progress=True)
    # Beside, not over, the tables written during training (this probe may use other settings).
    out = Path(run.run_dir) / report.PROBE_DIR / report.CHECKPOINT_DIR
    run_id_file = Path(run.run_dir) / RUN_ID_FILE
    client = run_id = None
    run_name = f"{Path(run.run_dir).parent.name}-{Path(run.run_dir).name}"
    if use_mlflow and run_id_file.is_file():
        from mlflow import MlflowClient

        client, run_id = MlflowClient(config.tracking.uri), run_id_file.read_text().strip()
        run_name = client.get_run(run_id).info.run_name
    files = report.write(table, out, run_name)
    print(report.format_table(table))
    print(f"\ntable and heatmaps: {files[0].parent}")
    if client is not None:
        report.log_to_mlflow(client, run_id, report.metrics(table, list(config.probe.metrics)), run.global_step,
                             files, f"{report.PROBE_DIR}/{report.CHECKPOINT_DIR}/step_{run.global_step}")
        report.log_final(client, run_id, table, out, run_name)
        print(f"logged to MLflow run {run_id} ({config.tracking.uri}) at step {run.global_step}, with "
              f"{report.FINAL_STEM}.csv and its heatmaps at the run's root")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
