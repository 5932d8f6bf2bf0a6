"""Which folder a run trains in: the run a command continues (``resume: auto | true | false``), the check that a
resume changes only what may change (against the config the checkpoint carries), and the claim of a new folder.
"""

from __future__ import annotations

import itertools
import os
import re
import zipfile
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from contracts.config_error import error_line
from experiments.config import Config, ConfigError
from experiments.run_metadata import BOOKKEEPING_KEYS

CHECKPOINT_NAME = "last.ckpt"
RUN_DIR_ENV = "MATRYOSHKA_RUN_DIR"
# Settings a resumed run may change: where and how it is stored and shown, how long it trains, what the probe
# measures, recomputation for memory. Every other key decides what the checkpoint's weights, optimizer, schedule and
# data position mean.
CHANGEABLE_ON_RESUME = (*(key for key in BOOKKEEPING_KEYS if key not in ("tracking", "name")), "tracking.run_name",
                        "tracking.artifact_dir", "trainer.max_steps", "probe", "max_nonfinite_steps",
                        "distributed.activation_checkpointing", "loss.cache_chunk_size")



def run_directory(config: DictConfig) -> tuple[Path, Path | None]:
    """``(run_dir, checkpoint to resume or None)``. Unless ``resume`` is false, a run of this experiment with a
    checkpoint is continued: with ``resume=auto`` the newest one whose settings that cannot change on resume equal
    the requested ones (:func:`fixed_changes`), with ``resume=true`` the newest one (:func:`check_resume` then stops
    on such a change). Otherwise a new time-stamped folder: earlier runs are never overwritten.

    ``$MATRYOSHKA_RUN_DIR``, when set, is the folder: rank 0 sets it for the ranks Lightning's launcher starts
    (they re-run the same command); a multi-node job script sets it so every node agrees."""
    experiment_dir = Path(config.output_dir) / config.name
    if os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
        checkpoint = run_dir / "checkpoints" / CHECKPOINT_NAME
        return run_dir, checkpoint if config.resume is not False and checkpoint.exists() else None
    if config.resume is not False:
        for run_dir, checkpoint in resumable_runs(experiment_dir):
            if config.resume is True or not fixed_changes(config, trained_config(run_dir, checkpoint) or {}):
                return run_dir, checkpoint
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, count = experiment_dir / stamp, 1
    while run_dir.exists():  # two fresh runs within one second
        count += 1
        run_dir = experiment_dir / f"{stamp}-{count}"
    return run_dir, None


def resumable_runs(experiment_dir: Path) -> list[tuple[Path, Path]]:
    """``(run_dir, checkpoint)`` of every run under ``experiment_dir`` with a checkpoint, newest first."""
    if not experiment_dir.is_dir():
        return []
    runs = ((run_dir, run_dir / "checkpoints" / CHECKPOINT_NAME) for run_dir in sorted(experiment_dir.iterdir(),
                                                                                          reverse=True))
    return [(run_dir, checkpoint) for run_dir, checkpoint in runs if checkpoint.exists()]  # file or shard folder


def new_run_note(config: DictConfig, run_dir: Path) -> str | None:
    """One line for ``resume=auto`` starting ``run_dir`` although runs of the experiment exist: what sets the newest
    one apart; None when there is no earlier run."""
    earlier = resumable_runs(Path(config.output_dir) / config.name)
    if config.resume != "auto" or not earlier:
        return None
    newest, checkpoint = earlier[0]
    changes = fixed_changes(config, trained_config(newest, checkpoint) or {})
    return (f"new run {run_dir}: no run of {config.name} has these settings (newest, {newest.name}: "
            f"{'; '.join(changes)}); resume=true continues the newest one")


class _Absent:
    """A key one of two configs does not have."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def claim_new_run_folder(run_dir: Path) -> Path:
    """Creates the new run folder :func:`run_directory` named, with a ``mkdir`` that fails if it exists: when another
    run took the name since (two runs started in the same second), the next free ``<timestamp>-<n>``.

    Raises:
        ConfigError: ``output_dir`` cannot hold run folders (a file, not writable).
    """
    numbered = re.fullmatch(r"(\d{8}-\d{6})-(\d+)", run_dir.name)  # run_directory's "<timestamp>-<n>"
    stamp, first = (numbered[1], int(numbered[2])) if numbered else (run_dir.name, 1)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        for count in itertools.count(first):
            claimed = run_dir.parent / (stamp if count == 1 else f"{stamp}-{count}")
            try:
                claimed.mkdir()
                return claimed
            except FileExistsError:
                continue
    except OSError as error:
        raise ConfigError("output_dir", f"{run_dir.parent} cannot hold run folders ({type(error).__name__}: "
                                        f"{error.strerror or error}); set output_dir to a writable folder") from None


def release_new_run_folder(run_dir: Path, existed_before: set[Path]) -> None:
    """Removes a claimed run folder that stayed empty (the run stopped before it began) and the parents the claim
    created."""
    for folder in (run_dir, run_dir.parent, run_dir.parent.parent):
        if folder in existed_before:
            return
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            return


def _changeable(key: str) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in CHANGEABLE_ON_RESUME)


def _differences(before: dict, after: dict, defaults: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(key, before, after)`` for every leaf that differs, walking both configs; ``defaults`` stands in for keys
    ``before`` lacks (keys added to the schema since). A block that was null and is now set is one difference."""
    found = []
    for key in set(before) | set(after):
        old, new = before.get(key, defaults.get(key, ABSENT)), after.get(key, ABSENT)
        if isinstance(old, dict) and isinstance(new, dict):
            nested_defaults = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
            found += _differences(old, new, nested_defaults, f"{prefix}{key}.")
        elif str(old) != str(new):  # as strings: a YAML round trip may change a number's type, not its value
            found.append((f"{prefix}{key}", old, new))
    return found


def fixed_changes(config: DictConfig, trained: dict) -> list[str]:
    """``key: before -> after`` for each setting of ``config`` that differs from ``trained`` (the resolved config
    that trained a checkpoint: :func:`trained_config`) and cannot change on resume (:data:`CHANGEABLE_ON_RESUME`),
    sorted by key."""
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    saved = trained
    now = OmegaConf.to_container(config, resolve=True)
    differences = sorted(_differences(saved, now, defaults), key=lambda difference: difference[0])
    return [f"{key}: {old} -> {new}" for key, old, new in differences if not _changeable(key)]


def check_resume(config: DictConfig, run_dir: Path, checkpoint: Path) -> None:
    """Before any weights load: the checkpoint is readable, its weights are finite, and the settings changed since
    the run began are ones a resume can apply (:data:`CHANGEABLE_ON_RESUME`), compared with the config the checkpoint
    carries (:func:`trained_config`), not with the run folder's ``config.yaml``, which a user may have edited or
    deleted.

    Raises:
        ConfigError: naming the checkpoint file, or every key that cannot change with its two values.
    """
    import torch

    state = None
    try:
        if checkpoint.is_dir():  # fsdp2: a folder of shards described by its .metadata
            if not (checkpoint / ".metadata").is_file():
                raise FileNotFoundError(f"no {checkpoint / '.metadata'}")
        elif not zipfile.is_zipfile(checkpoint):
            raise ValueError("not a torch checkpoint: truncated or overwritten")
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # any reason: the file is unusable; say which and leave it (and the run) alone
        reason = error_line(error)
        raise ConfigError("resume", f"cannot read checkpoint {checkpoint} ({reason}); nothing was changed; "
                                    f"resume=false starts a new run") from None
    bad = [key for key, value in (state or {}).get("state_dict", {}).items()
           if value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:  # a sharded checkpoint's weights are checked at the first step after resume (callbacks/nonfinite.py)
        raise ConfigError("resume", f"checkpoint {checkpoint} (step {state.get('global_step')}) holds non-finite "
                                    f"weights (NaN/inf in {len(bad)} tensors, e.g. {bad[0]}): it cannot be resumed; "
                                    f"resume=false starts a new run")
    trained = trained_config(run_dir, checkpoint)
    if trained is None:
        raise ConfigError("resume", f"{checkpoint} carries no config and {run_dir / 'config.yaml'} is missing: "
                                    f"what trained it is unknown, so it is not resumed; resume=false starts a new run")
    fixed = fixed_changes(config, trained)
    if fixed:
        raise ConfigError("resume", f"{run_dir} was trained with other values that cannot change on resume "
                                    f"({'; '.join(fixed)}); resume=false starts a new run with them")


def trained_config(run_dir: Path, checkpoint: Path) -> dict | None:
    """The resolved config that trained ``checkpoint``: the one it carries (:mod:`callbacks.run_config`), else that
    of an older checkpoint's run folder (``config.yaml``), else None."""
    import torch
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    from callbacks.run_config import CONFIG_KEY

    # fsdp2: a folder of shards and Lightning's file of the non-tensor state
    state_file = checkpoint / _METADATA_FILENAME if checkpoint.is_dir() else checkpoint
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=not checkpoint.is_dir())
    except Exception:  # noqa: BLE001 - unreadable: check_resume names the file; the folder's config may still say
        state = {}
    if CONFIG_KEY in state:
        return state[CONFIG_KEY]
    saved_file = run_dir / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(saved_file)) if saved_file.is_file() else None
