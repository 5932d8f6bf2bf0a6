"""Load a finished (or checkpointed) run: its resolved config, rebuilt module and weights, as an EmbeddingModel."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from contracts.config_error import error_line
from experiments.config import Config
from lightning_modules.embedding_model import EmbeddingModel
from lightning_modules.cell_export import Origin
from lightning_modules.module import plugin_cells
from contracts.cells import Cell


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


def checkpoint_file(checkpoint: str | Path) -> Path:
    """``checkpoint`` if it is a checkpoint file inside a run folder.

    Raises:
        RunLoadError: a run folder, a sharded checkpoint folder or a missing file, with what to pass instead.
    """
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
    return checkpoint


def typed_config(loaded: dict) -> DictConfig:
    """A run's saved config typed like a composed one; build() validates the model and plugin sections again."""
    schema = OmegaConf.structured(Config)
    return OmegaConf.merge(schema, _known_keys(schema, loaded))


def run_config(checkpoint: str | Path) -> tuple[Path, DictConfig]:
    """``(run_dir, config)`` of ``<run_dir>/checkpoints/<name>.ckpt``, cheap (no weights built), so tools check their
    arguments against the run first: the run's ``config.yaml``, or where it is gone the config the checkpoint
    carries (read memory-mapped).

    Raises:
        RunLoadError: not a checkpoint file inside a run folder with its config.
    """
    from callbacks.run_config import CONFIG_KEY

    checkpoint = checkpoint_file(checkpoint)
    run_dir = checkpoint.parent.parent
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        return run_dir, typed_config(OmegaConf.to_container(OmegaConf.load(config_file)))
    try:
        carried = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get(CONFIG_KEY)
    except Exception:  # noqa: BLE001 - load_run reports an unreadable checkpoint
        carried = None
    if carried is None:
        raise RunLoadError(f"{checkpoint}: no run config at {config_file} (expected <run_dir>/checkpoints/*.ckpt)")
    return run_dir, typed_config(carried)


def run_cells(config: DictConfig) -> list[Cell]:
    """The deployable cells of a run from its config alone: its plugins on its backbone's shape (no weights)."""
    from experiments.run import build_plugins, describe_backbone

    info = describe_backbone(config)
    return plugin_cells(build_plugins(config, info), info)


def load_run(checkpoint: str | Path) -> LoadedRun:
    """Rebuilds the module of ``<run_dir>/checkpoints/<name>.ckpt`` from the config the checkpoint carries
    (:mod:`callbacks.run_config`; an older checkpoint: ``<run_dir>/config.yaml``), loads its weights (tensors only:
    a checkpoint never runs code) and puts it in eval mode.

    Raises:
        RunLoadError: not a checkpoint file inside a run folder with its config, or weights of another config.
    """
    from callbacks.run_config import CONFIG_KEY
    from experiments.run import build

    checkpoint = checkpoint_file(checkpoint)
    run_dir = checkpoint.parent.parent
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling refuses anything but tensors and plain containers
        first_line = error_line(error, 300)
        raise RunLoadError(f"{checkpoint} cannot be read as a checkpoint of tensors ({first_line}); "
                           f"nothing in it was executed") from None
    config_file = run_dir / "config.yaml"
    if CONFIG_KEY in state:
        loaded, origin = state[CONFIG_KEY], f"the config {checkpoint} carries"
    elif config_file.is_file():
        loaded, origin = OmegaConf.to_container(OmegaConf.load(config_file)), str(config_file)
    else:
        raise RunLoadError(f"{checkpoint}: no run config at {config_file} (expected <run_dir>/checkpoints/*.ckpt)")
    config = typed_config(loaded)
    module, datamodule = build(config)
    try:
        module.load_state_dict(state["state_dict"])
    except (RuntimeError, KeyError) as error:  # size mismatch, missing or unexpected keys
        first_line = error_line(error, 300)
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), "")
        raise RunLoadError(f"{checkpoint} does not fit the model of {origin}: it was trained with another config "
                           f"({(detail[:300] or first_line)}); pass the checkpoint of that run") from None
    return LoadedRun(EmbeddingModel(module.eval(), datamodule.tokenize), config, run_dir, checkpoint,
                     int(state.get("global_step", 0)))
