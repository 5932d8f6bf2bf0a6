"""``python -m experiments.run NAME [key=value ...]``: compose, validate, build and train one experiment."""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from contracts.atomic import write_atomic
from contracts.config_error import error_line
from datamodules.sources import DataError
from experiments.config import ConfigError, available_experiments, compose, plugin_configs, run_command
from experiments.run_folders import (CHECKPOINT_NAME, RUN_DIR_ENV, check_resume, claim_new_run_folder, new_run_note,
                                     release_new_run_folder, run_directory)
from experiments.run_lock import hold_run_lock
from experiments.mlflow_logger import make_logger
from experiments.mlflow_ui import ui_hint
from experiments.store import check_tracking, fail_fast_http
from experiments.tracking import finish_tracking, log_run_inputs, mark_killed_runs, system_metrics
from lightning_modules.backbone_adapter import BackboneInfo
from lightning_modules.plugins import MatryoshkaPlugin

@dataclass
class TrainResult:
    checkpoint: Path
    run_id: str
    run_dir: Path
    metrics: dict[str, float]
    seconds: float
    is_global_zero: bool = True  # several processes return from a distributed run; one of them reports it
    unlogged: Path | None = None  # metrics the MLflow store did not take, waiting in the run folder


def build_plugins(config: DictConfig, info: BackboneInfo) -> list[MatryoshkaPlugin]:
    """Instantiates every configured plugin; their validation errors name the full config key."""
    plugins = []
    for name, (plugin_class, plugin_config) in plugin_configs(config).items():
        try:
            plugins.append(plugin_class(plugin_config, info, config.seed))
        except ConfigError as error:  # keyed by the option's name
            raise error.under(f"plugins.{name}") from None
    return plugins


def describe_backbone(config: DictConfig) -> BackboneInfo:
    from lightning_modules import backbones

    try:
        info = backbones.describe(config.model)
    except ValueError as error:
        raise ConfigError("model", str(error)) from None
    if info.max_positions is not None and config.model.max_length > info.max_positions:
        raise ConfigError("model.max_length", f"{config.model.max_length} is more than the {info.max_positions} "
                                              f"positions of the {config.model.source} backbone; set "
                                              f"model.max_length<={info.max_positions}")
    return info


def build(config: DictConfig):
    """Everything a run needs, validated before any weights load: ``(module, datamodule)``."""
    import lightning as L

    from datamodules.pairs import TranslationPairsDataModule, check_data_config
    from datamodules.tokenization import BatchTokenizer
    from lightning_modules import backbones
    from lightning_modules.losses import ContrastiveLoss
    from lightning_modules.module import MatryoshkaEmbedder

    info = describe_backbone(config)
    plugins = build_plugins(config, info)
    check_data_config(config.data)
    if config.loss.cache_chunk_size and config.trainer.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError("loss.cache_chunk_size", "gradient caching gives one step the whole batch's gradient; "
                          "raise data.batch_size instead of trainer.accumulate_grad_batches")
    L.seed_everything(config.seed, workers=True, verbose=False)
    backbone, tokenizer = backbones.load(config.model)
    tokenize = BatchTokenizer(tokenizer, info.family, config.model.max_length, config.model.query_prefix,
                              config.model.passage_prefix, config.data.packing)
    loss = ContrastiveLoss(config.loss.temperature, config.loss.hard_negative, config.loss.in_batch, config.loss.gather)
    module = MatryoshkaEmbedder(backbone, plugins, loss, config.optim, config.distributed.activation_checkpointing,
                                config.loss.cache_chunk_size)
    datamodule = TranslationPairsDataModule(config.data, tokenize, config.seed)
    return module, datamodule


def train(config: DictConfig) -> TrainResult:
    """Train one composed experiment config; re-running the same config resumes its last checkpoint."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    started = time.perf_counter()
    if rank_zero_only.rank == 0:  # torchrun / SLURM start every rank at once: one of them creates the store
        check_tracking(config)  # an unusable MLflow store stops the run before any weights load
        mark_killed_runs(config)  # runs whose process died before they could end
    output_dir = Path(config.output_dir)
    existed_before = {folder for folder in (output_dir, output_dir / config.name) if folder.exists()}
    run_dir, resume_from = run_directory(config)
    fresh = resume_from is None and rank_zero_only.rank == 0 and not os.environ.get(RUN_DIR_ENV)
    if fresh:  # the other ranks of a job take rank 0's folder (from RUN_DIR_ENV, or the same time stamp)
        run_dir = claim_new_run_folder(run_dir)
    try:
        return _train_in(config, run_dir, resume_from, started)
    except BaseException:
        if fresh:
            release_new_run_folder(run_dir, existed_before)  # only if nothing was written into it
        raise


def make_trainer(config: DictConfig, run_dir: Path, logger, callbacks: list):
    """``lightning.Trainer`` with the run's logger, callbacks and atomic checkpoint writer; Lightning's refusal of a
    trainer setting (``accelerator=gpu`` without a GPU) is one config error line."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_modules.atomic_checkpoint import AtomicCheckpointIO
    from lightning_modules.distributed import trainer_settings

    trainer_args = OmegaConf.to_container(config.trainer, resolve=True)
    trainer_args.update(trainer_settings(config.distributed.strategy, config.distributed.precision,
                                         config.distributed.sharded_checkpoint,
                                         trainer_args.get("accelerator", "auto")))
    trainer_args["plugins"] = [*(trainer_args.get("plugins") or []), AtomicCheckpointIO()]
    try:
        return L.Trainer(logger=logger, default_root_dir=str(run_dir), callbacks=callbacks, **trainer_args)
    except (MisconfigurationException, RuntimeError, ValueError) as error:
        reason = error_line(error, 300)
        hardware = [key for key in ("accelerator", "devices", "num_nodes") if key in config.trainer]
        key = next((key for key in hardware if key in reason.lower()), hardware[0] if hardware else None)
        if key is None:
            raise ConfigError("trainer", f"lightning.Trainer refuses it: {reason}") from None
        raise ConfigError(f"trainer.{key}", f"lightning.Trainer refuses {key}={config.trainer[key]} on this "
                                            f"machine: {reason}") from None


def _train_in(config: DictConfig, run_dir: Path, resume_from: Path | None, started: float) -> TrainResult:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from callbacks.nonfinite import NonFiniteGuard
    from callbacks.progress import StepProgressBar
    from callbacks.random_state import RandomStateCheckpoint
    from callbacks.run_config import RunConfigInCheckpoint
    from callbacks.run_stats import RunStats, ThroughputRates
    from lightning_modules.atomic_checkpoint import remove_leftovers
    from lightning_modules.flops import peak_flops

    if resume_from is not None:
        check_resume(config, run_dir, resume_from)
    elif rank_zero_only.rank == 0 and not os.environ.get(RUN_DIR_ENV) and (note := new_run_note(config, run_dir)):
        print(note)
    module, datamodule = build(config)
    checkpoint_dir = run_dir / "checkpoints"
    logger = make_logger(config, run_dir)
    callbacks = [
        # Logs run/device/{samples,items,flops}_per_sec (items = real tokens) and train/mfu over a 10-step window.
        ThroughputRates(peak_flops=peak_flops, batch_size_fn=lambda batch: batch["num_queries"],
                        length_fn=lambda batch: int(batch["attention_mask"].sum()), window_size=10),
        # before the checkpoint saves
        NonFiniteGuard(config.checkpoint_every, config.max_nonfinite_steps, checkpoint_dir / CHECKPOINT_NAME),
        RunConfigInCheckpoint(OmegaConf.to_container(config, resolve=True)),  # what a resume checks against
        ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=config.checkpoint_every, save_top_k=0,
                        save_last=True),
        RunStats(),  # train/elapsed_s, run/memory/device/peak_*_mb
        RandomStateCheckpoint(),  # every rank's generators: dropout after a resume draws the straight run's masks
    ]
    if config.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    if config.probe.enabled:  # MTEB probes of every (layer, dim, rank) cell: start, every N steps, end
        from callbacks.probe_schedule import ProbeCallback
        from evaluation.probing import ProbeSession, probe_corpus_dir

        session = ProbeSession(config.probe, probe_corpus_dir(config), config.data.catalog_dir, run_dir,
                               datamodule.tokenize, f"matryoshka-lab/{config.name}", list(config.data.locales))
        callbacks.append(ProbeCallback(session, run_dir, config.probe.every_n_steps, config.probe.at_start,
                                       config.probe.at_end))
    trainer = make_trainer(config, run_dir, logger, callbacks)
    datamodule.trainer = trainer
    datamodule.prepare_data()
    try:
        datamodule.setup("fit")  # unusable data stops the run here, before its folder or MLflow run exists
    except DataError as error:
        raise ConfigError(error.key, str(error)) from None
    inherited = os.environ.get(RUN_DIR_ENV)
    # One training per run folder: rank 0 holds the lock for all ranks of its job.
    with hold_run_lock(run_dir) if rank_zero_only.rank == 0 else nullcontext():
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if rank_zero_only.rank == 0:
            remove_leftovers(checkpoint_dir)  # temporary files of a save killed mid-way (last.ckpt is whole)
        # The settings that train it from now on (a resume changed only CHANGEABLE_ON_RESUME keys: check_resume).
        write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(config, resolve=True))
        if trainer.is_global_zero:
            log_run_inputs(logger, config, run_dir, datamodule.summary())
            logger.replay_unlogged()  # metrics an unreachable server missed before, first: they are the older steps
        os.environ[RUN_DIR_ENV] = str(run_dir)  # copied into the processes Lightning's launcher starts for ranks 1..n
        try:
            # A dead server costs seconds, not minutes of retries; system/* metrics (CPU, memory, GPU) by MLflow's
            # own monitor.
            with fail_fast_http(), system_metrics(logger):
                # weights_only: the resumed checkpoint is unpickled without running code (checked the same way above)
                trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                            weights_only=True)
        finally:
            if inherited is None:
                del os.environ[RUN_DIR_ENV]
        checkpoint = checkpoint_dir / CHECKPOINT_NAME
        trainer.save_checkpoint(checkpoint, weights_only=False)  # the full state: a rerun resumes from it
        metrics = {}
        if trainer.is_global_zero:
            finish_tracking(logger)
            if not module.last_logged:  # no step ran in this session (a finished run again): MLflow's last values
                metrics = logged_metrics(logger)
    metrics.update({key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1})
    metrics.update(module.last_logged)  # the last step's global losses, as written to MLflow
    return TrainResult(checkpoint, logger.run_id, run_dir, metrics, time.perf_counter() - started,
                       trainer.is_global_zero, logger.unlogged_file if logger.unlogged_file.is_file() else None)


def logged_metrics(logger) -> dict[str, float]:
    """The latest value of each metric of the logger's MLflow run; {} when the store does not answer."""
    try:
        return dict(logger.experiment.get_run(logger.run_id).data.metrics)
    except Exception:  # any failure of the store: the summary line then shows nan, the run itself is done
        return {}


def train_and_report(name: str, overrides: list[str]) -> int:
    from callbacks.nonfinite import NonFiniteLossError
    from lightning_modules.atomic_checkpoint import CheckpointWriteError

    config = compose(name, overrides)
    try:
        result = train(config)  # validation errors are raised before any weights load
    except (NonFiniteLossError, DataError, CheckpointWriteError) as error:  # found while training
        print(error, file=sys.stderr)
        return 1
    if not result.is_global_zero:
        return 0
    print(f"\nfinished {config.name} in {result.seconds:.0f} s; final train/loss = "
          f"{result.metrics.get('train/loss', float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint}")
    if result.unlogged is not None:
        steps = len(result.unlogged.read_text().splitlines())
        print(f"not logged: metrics of {steps} steps wait in {result.unlogged}; the same command sends them when "
              f"{config.tracking.uri} takes writes again", file=sys.stderr)
    try:
        print(ui_hint(config.tracking.uri, result.run_id))
    except Exception as error:  # the training is done and saved: a failing store only costs the hint
        reason = error_line(error)
        print(f"the MLflow store {config.tracking.uri} did not answer for the runs-table hint ({reason})",
              file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    return run_command(argv, "python -m experiments.run NAME [key=value ...]",
                       f"experiments: {', '.join(available_experiments())}", train_and_report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
