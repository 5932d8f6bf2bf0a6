"""``python -m experiments.run NAME [key=value ...]``: compose, validate, build and train one experiment."""

from __future__ import annotations

import os
import sys
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from contracts.atomic import write_atomic
from datamodules.sources import DataError
from experiments.config import Config, ConfigError, available_experiments, compose, plugin_configs, run_command
from experiments.run_lock import hold_run_lock
from experiments.runs_table import ui_hint
from experiments.run_metadata import BOOKKEEPING_KEYS, flatten
from experiments.run_summary import log_run_summary
from experiments.tracking import check_tracking, fail_fast_http, log_run_inputs, make_logger, system_metrics
from lightning_modules.backbone_adapter import BackboneInfo
from lightning_modules.plugins import MatryoshkaPlugin

CHECKPOINT_NAME = "last.ckpt"
RUN_DIR_ENV = "MATRYOSHKA_RUN_DIR"
# Settings a resumed run may change: where and how it is stored and shown, how long it trains, what the probe
# measures, recomputation for memory. Every other key decides what the checkpoint's weights, optimizer, schedule and
# data position mean.
CHANGEABLE_ON_RESUME = (*(key for key in BOOKKEEPING_KEYS if key not in ("tracking", "name")), "tracking.run_name",
                        "tracking.artifact_dir", "trainer.max_steps", "probe", "max_nonfinite_steps",
                        "distributed.activation_checkpointing")


@dataclass
class TrainResult:
    checkpoint: Path
    run_id: str
    run_dir: Path
    metrics: dict[str, float]
    seconds: float
    is_global_zero: bool = True  # several processes return from a distributed run; one of them reports it


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
        return backbones.describe(config.model)
    except ValueError as error:
        raise ConfigError("model", str(error)) from None


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
    L.seed_everything(config.seed, workers=True, verbose=False)
    backbone, tokenizer = backbones.load(config.model)
    tokenize = BatchTokenizer(tokenizer, info.family, config.model.max_length, config.model.query_prefix,
                              config.model.passage_prefix, config.data.packing)
    loss = ContrastiveLoss(config.loss.temperature, config.loss.hard_negative, config.loss.in_batch, config.loss.gather)
    module = MatryoshkaEmbedder(backbone, plugins, loss, config.optim, config.distributed.activation_checkpointing)
    datamodule = TranslationPairsDataModule(config.data, tokenize, config.seed)
    return module, datamodule


def run_directory(config: DictConfig) -> tuple[Path, Path | None]:
    """``(run_dir, checkpoint to resume or None)``: the newest run of this experiment when ``resume`` is on and it
    has a checkpoint, else a new time-stamped folder (earlier runs are never overwritten).

    ``$MATRYOSHKA_RUN_DIR``, when set, is the folder: rank 0 sets it for the ranks Lightning's launcher starts
    (they re-run the same command); a multi-node job script sets it so every node agrees."""
    experiment_dir = Path(config.output_dir) / config.name
    if os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
        checkpoint = run_dir / "checkpoints" / CHECKPOINT_NAME
        return run_dir, checkpoint if config.resume and checkpoint.exists() else None
    if config.resume and experiment_dir.is_dir():
        for run_dir in sorted(experiment_dir.iterdir(), reverse=True):
            checkpoint = run_dir / "checkpoints" / CHECKPOINT_NAME
            if checkpoint.exists():  # a file, or a folder of shards (fsdp2)
                return run_dir, checkpoint
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, count = experiment_dir / stamp, 1
    while run_dir.exists():  # two fresh runs within one second
        count += 1
        run_dir = experiment_dir / f"{stamp}-{count}"
    return run_dir, None


def _changeable(key: str) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in CHANGEABLE_ON_RESUME)


def check_resume(config: DictConfig, run_dir: Path, checkpoint: Path) -> None:
    """Before any weights load: the checkpoint is readable, and the settings changed since the run began are ones a
    resume can apply (:data:`CHANGEABLE_ON_RESUME`).

    Raises:
        ConfigError: naming the checkpoint file, or every key that cannot change with its two values.
    """
    import torch

    try:
        if checkpoint.is_dir():  # fsdp2: a folder of shards described by its .metadata
            if not (checkpoint / ".metadata").is_file():
                raise FileNotFoundError(f"no {checkpoint / '.metadata'}")
        elif not zipfile.is_zipfile(checkpoint):
            raise ValueError("not a torch checkpoint: truncated or overwritten")
        else:
            torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # any reason: the file is unusable; say which and leave it (and the run) alone
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError("resume", f"cannot read checkpoint {checkpoint} ({reason}); nothing was changed; "
                                    f"resume=false starts a new run") from None
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    saved = flatten(OmegaConf.to_container(OmegaConf.load(saved_file)))
    now = flatten(OmegaConf.to_container(config, resolve=True))
    fixed = [f"{key}: {saved.get(key, defaults.get(key))} -> {now.get(key)}" for key in sorted(set(saved) | set(now))
             if saved.get(key, defaults.get(key)) != now.get(key) and not _changeable(key)]
    if fixed:
        raise ConfigError("resume", f"{run_dir} was trained with other values that cannot change on resume "
                                    f"({'; '.join(fixed)}); resume=false starts a new run with them")


def train(config: DictConfig) -> TrainResult:
    """Train one composed experiment config; re-running the same config resumes its last checkpoint."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from callbacks.nonfinite import NonFiniteGuard
    from callbacks.progress import StepProgressBar
    from callbacks.run_stats import RunStats, ThroughputRates
    from lightning_modules.distributed import trainer_settings

    started = time.perf_counter()
    if rank_zero_only.rank == 0:  # torchrun / SLURM start every rank at once: one of them creates the store
        check_tracking(config)  # an unusable MLflow store stops the run before any weights load
    run_dir, resume_from = run_directory(config)
    if resume_from is not None:
        check_resume(config, run_dir, resume_from)
    module, datamodule = build(config)
    checkpoint_dir = run_dir / "checkpoints"
    logger = make_logger(config, run_dir)
    trainer_args = OmegaConf.to_container(config.trainer, resolve=True)
    trainer_args.update(trainer_settings(config.distributed.strategy, config.distributed.precision,
                                         config.distributed.sharded_checkpoint, trainer_args.get("accelerator", "auto")))
    callbacks = [
        # Logs run/device/{samples,items,flops}_per_sec (items = real tokens) over a 10-step window.
        ThroughputRates(batch_size_fn=lambda batch: batch["num_queries"],
                        length_fn=lambda batch: int(batch["attention_mask"].sum()), window_size=10),
        NonFiniteGuard(config.checkpoint_every, config.max_nonfinite_steps),  # before the checkpoint saves
        ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=config.checkpoint_every, save_top_k=0,
                        save_last=True),
        RunStats(),  # train/elapsed_s, run/memory/device/peak_*_mb
    ]
    if trainer_args.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    if config.probe.enabled:  # MTEB probes of every (layer, dim, rank) cell: start, every N steps, end
        from callbacks.probe_schedule import ProbeCallback
        from evaluation.probing import ProbeSession, probe_corpus_dir

        session = ProbeSession(config.probe, probe_corpus_dir(config), config.data.catalog_dir, run_dir,
                               datamodule.tokenize, f"matryoshka-lab/{config.name}")
        callbacks.append(ProbeCallback(session, run_dir, config.probe.every_n_steps, config.probe.at_start,
                                       config.probe.at_end))
    trainer = L.Trainer(logger=logger, default_root_dir=str(run_dir), callbacks=callbacks, **trainer_args)
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
        if trainer.is_global_zero:
            with fail_fast_http():
                if logger.replay_unlogged():
                    log_run_summary(logger)  # per-view loss heatmaps
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
    metrics.update(module.last_logged)  # the last step's global losses, as written to MLflow
    return TrainResult(checkpoint, logger.run_id, run_dir, metrics, time.perf_counter() - started,
                       trainer.is_global_zero)


def train_and_report(name: str, overrides: list[str]) -> int:
    from callbacks.nonfinite import NonFiniteLossError

    config = compose(name, overrides)
    try:
        result = train(config)  # validation errors are raised before any weights load
    except (NonFiniteLossError, DataError) as error:  # found while training (data.strict reads rows as it goes)
        print(error, file=sys.stderr)
        return 1
    if not result.is_global_zero:
        return 0
    print(f"\nfinished {config.name} in {result.seconds:.0f} s; final train/loss = "
          f"{result.metrics.get('train/loss', float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint}")
    print(ui_hint(config.tracking.uri, result.run_id))
    return 0


def main(argv: list[str]) -> int:
    return run_command(argv, "python -m experiments.run NAME [key=value ...]",
                       f"experiments: {', '.join(available_experiments())}", train_and_report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
