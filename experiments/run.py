"""``python -m experiments.run NAME [key=value ...]``: compose, validate, build and train one experiment."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.config import ConfigError, compose, plugin_configs
from lightning_modules.backbone import BackboneInfo
from lightning_modules.plugins import MatryoshkaPlugin, PluginConfigError

CHECKPOINT_NAME = "last.ckpt"
RUN_ID_FILE = "mlflow_run_id"


@dataclass
class TrainResult:
    checkpoint: Path
    run_id: str
    run_dir: Path
    metrics: dict[str, float]
    seconds: float


def build_plugins(config: DictConfig, info: BackboneInfo) -> list[MatryoshkaPlugin]:
    """Instantiates every configured plugin; their validation errors name the full config key."""
    plugins = []
    for name, (plugin_class, plugin_config) in plugin_configs(config).items():
        try:
            plugins.append(plugin_class(plugin_config, info, config.seed))
        except PluginConfigError as error:
            raise ConfigError(f"plugins.{name}.{error.key}", error.message) from None
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

    from datamodules.pairs import TranslationPairsDataModule
    from lightning_modules import backbones
    from lightning_modules.backbone import BatchTokenizer
    from lightning_modules.losses import ContrastiveLoss
    from lightning_modules.module import MatryoshkaEmbedder

    info = describe_backbone(config)
    plugins = build_plugins(config, info)
    L.seed_everything(config.seed, workers=True, verbose=False)
    backbone, tokenizer = backbones.load(config.model)
    tokenize = BatchTokenizer(tokenizer, info.family, config.model.max_length, config.model.query_prefix,
                              config.model.passage_prefix)
    loss = ContrastiveLoss(config.loss.temperature, config.loss.hard_negative, config.loss.in_batch, config.loss.gather)
    module = MatryoshkaEmbedder(backbone, plugins, loss, config.optim)
    datamodule = TranslationPairsDataModule(config.data, tokenize, config.seed)
    return module, datamodule


def run_directory(config: DictConfig) -> tuple[Path, Path | None]:
    """``(run_dir, checkpoint to resume or None)``: the newest run of this experiment when ``resume`` is on and it
    has a checkpoint, else a new time-stamped folder (earlier runs are never overwritten)."""
    experiment_dir = Path(config.output_dir) / config.name
    if config.resume and experiment_dir.is_dir():
        for run_dir in sorted(experiment_dir.iterdir(), reverse=True):
            checkpoint = run_dir / "checkpoints" / CHECKPOINT_NAME
            if checkpoint.is_file():
                return run_dir, checkpoint
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, count = experiment_dir / stamp, 1
    while run_dir.exists():  # two fresh runs within one second
        count += 1
        run_dir = experiment_dir / f"{stamp}-{count}"
    return run_dir, None


def flatten(container: dict, prefix: str = "") -> dict[str, str]:
    """``{"a.b.c": "value"}`` with the config's exact key names."""
    flat = {}
    for key, value in container.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def make_logger(config: DictConfig, run_dir: Path):
    """MLflow logger for this run; a resumed run continues its MLflow run."""
    from lightning.pytorch.loggers import MLFlowLogger

    if config.tracking.uri.startswith("sqlite:///"):
        Path(config.tracking.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    run_id_file = run_dir / RUN_ID_FILE
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
    return MLFlowLogger(
        experiment_name=config.tracking.experiment,
        run_name=config.tracking.run_name or f"{config.name}-{run_dir.name}",
        tracking_uri=config.tracking.uri,
        artifact_location=Path(config.tracking.artifact_dir).resolve().as_uri(),
        run_id=run_id,
    )


def log_run_inputs(logger, config: DictConfig, run_dir: Path, sources: dict[str, int]) -> None:
    from mlflow.entities import Param

    (run_dir / RUN_ID_FILE).write_text(logger.run_id)
    client, run_id = logger.experiment, logger.run_id
    logged = client.get_run(run_id).data.params
    params = {**flatten(OmegaConf.to_container(config, resolve=True)),
              **{f"corpus.train_pairs.{locale}": str(count) for locale, count in sources.items()}}
    fresh = [Param(key, value) for key, value in params.items() if key not in logged]
    for start in range(0, len(fresh), 100):  # MLflow takes at most 100 params per call
        client.log_batch(run_id, params=fresh[start: start + 100])
    client.log_text(run_id, OmegaConf.to_yaml(config, resolve=True), "config.yaml")


def train(config: DictConfig) -> TrainResult:
    """Train one composed experiment config; re-running the same config resumes its last checkpoint."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor

    from callbacks.progress import StepProgressBar

    started = time.perf_counter()
    module, datamodule = build(config)
    run_dir, resume_from = run_directory(config)
    checkpoint_dir = run_dir / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, run_dir / "config.yaml", resolve=True)
    logger = make_logger(config, run_dir)
    trainer_args = OmegaConf.to_container(config.trainer, resolve=True)
    callbacks = [
        # Logs train/device/{samples,items,flops}_per_sec (items = real tokens) over a 10-step window.
        ThroughputMonitor(batch_size_fn=lambda batch: batch["num_queries"],
                          length_fn=lambda batch: int(batch["attention_mask"].sum()), window_size=10),
        ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=config.checkpoint_every, save_top_k=0,
                        save_last=True),
    ]
    if trainer_args.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    trainer = L.Trainer(logger=logger, default_root_dir=str(run_dir), callbacks=callbacks, **trainer_args)
    datamodule.trainer = trainer
    datamodule.prepare_data()
    datamodule.setup("fit")
    if trainer.is_global_zero:
        log_run_inputs(logger, config, run_dir, datamodule.summary())
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    checkpoint = checkpoint_dir / CHECKPOINT_NAME
    trainer.save_checkpoint(checkpoint)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
    return TrainResult(checkpoint, logger.run_id, run_dir, metrics, time.perf_counter() - started)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        from experiments.config import available_experiments

        print(f"usage: python -m experiments.run NAME [key=value ...]\nexperiments: {', '.join(available_experiments())}")
        return 0 if argv else 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = compose(argv[0], argv[1:])
        result = train(config)  # validation errors are raised before any weights load
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"\nfinished {config.name} in {result.seconds:.0f} s; final train/loss = "
          f"{result.metrics.get('train/loss', float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"MLflow run {result.run_id} in experiment {config.tracking.experiment!r} ({config.tracking.uri}); open it with:\n"
          f"  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui --backend-store-uri {config.tracking.uri} "
          f"--host 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
