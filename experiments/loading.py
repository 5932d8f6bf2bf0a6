"""Load a finished (or checkpointed) run: its resolved config, rebuilt module and weights, as an EmbeddingModel."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from experiments.config import Config
from lightning_modules.embedding_model import EmbeddingModel
from lightning_modules.cell_export import Origin


class RunLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is expected."""


@dataclasses.dataclass
class LoadedRun:
    """A trained model rebuilt from its run folder, in eval mode."""

    model: EmbeddingModel
    config: DictConfig
    run_dir: Path
    checkpoint: Path | None
    global_step: int

    def origin(self) -> Origin:
        backbone = f"{self.config.model.source}" + (f" ({self.config.model.path})" if self.config.model.path else "")
        return Origin(self.config.name, backbone, self.checkpoint, self.global_step, self.run_dir)


def _known_keys(schema: DictConfig, loaded: dict, prefix: str = "") -> dict:
    """``loaded`` without the keys the current schema no longer has (a run config can be older than the code);
    open sections (``plugins``, ``trainer``) are kept whole. Dropped keys are reported on stderr."""
    kept = {}
    for key, value in loaded.items():
        if key not in schema:
            print(f"ignoring `{prefix}{key}` of the run config (not in the current schema)", file=sys.stderr)
        elif isinstance(value, dict) and dataclasses.is_dataclass(OmegaConf.get_type(schema, key)):
            kept[key] = _known_keys(schema[key], value, f"{prefix}{key}.")
        else:
            kept[key] = value
    return kept


def load_run(checkpoint: str | Path) -> LoadedRun:
    """Rebuilds the module of ``<run_dir>/checkpoints/<name>.ckpt`` from ``<run_dir>/config.yaml``, loads its
    weights (tensors only: a checkpoint never runs code) and puts it in eval mode.

    Args:
        checkpoint: a Lightning checkpoint written by ``experiments.run.train``.
    """
    from experiments.run import build

    checkpoint = Path(checkpoint)
    if (checkpoint / "checkpoints").is_dir():
        names = sorted(str(path) for path in (checkpoint / "checkpoints").glob("*.ckpt"))
        raise RunLoadError(f"{checkpoint} is a run folder; pass one of its checkpoints: "
                           + (", ".join(names) if names else "it has none"))
    if checkpoint.is_dir():
        raise RunLoadError(f"{checkpoint} is a sharded (FSDP2) checkpoint folder; this tool reads one file: train "
                           f"with distributed.sharded_checkpoint=false")
    if not checkpoint.is_file():
        raise RunLoadError(f"{checkpoint}: no such checkpoint file")
    run_dir = checkpoint.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise RunLoadError(f"{checkpoint}: no run config at {config_file} (expected <run_dir>/checkpoints/*.ckpt)")
    schema = OmegaConf.structured(Config)
    # Typed like a composed config; build() validates the model and plugin sections again.
    config = OmegaConf.merge(schema, _known_keys(schema, OmegaConf.to_container(OmegaConf.load(config_file))))
    module, datamodule = build(config)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling refuses anything but tensors and plain containers
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunLoadError(f"{checkpoint} cannot be read as a checkpoint of tensors ({first_line[:300]}); "
                           f"nothing in it was executed") from None
    module.load_state_dict(state["state_dict"])
    return LoadedRun(EmbeddingModel(module.eval(), datamodule.tokenize), config, run_dir, checkpoint,
                     int(state.get("global_step", 0)))
