"""Checkpoints that are replaced whole or not at all, and a failed write that stops the run.

A new checkpoint is written under a temporary name in the SAME folder as the target (never ``$TMPDIR``, which may be
another filesystem: a rename across filesystems is a copy, and a kill during the copy leaves a truncated file),
flushed to disk with ``fsync``, then renamed over the target, and the folder is synced so the rename survives a power
loss. A folder checkpoint (fsdp2 shards) is written to a sibling folder and swapped in with one atomic
``renameat2(RENAME_EXCHANGE)``. A write that fails removes its temporary file or folder and raises
:class:`CheckpointWriteError`: the target still holds the previous checkpoint, and the run stops saying so.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from contracts.config_error import error_line

RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically
AT_FDCWD = -100


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; ``str()`` is one line naming the file, the reason, and what it still holds."""

    def __init__(self, path: Path, step: int | None, error: BaseException) -> None:
        reason = error_line(error)
        super().__init__(f"cannot write checkpoint {path} at step {step} ({type(error).__name__}: {reason}); the run "
                         f"stopped; {path} still holds {describe_previous(path)}; make it writable (disk space, "
                         f"permissions), then the same command resumes from it")


def describe_previous(path: Path) -> str:
    """What a checkpoint path holds now, for the failure message: ``step N``, a folder, or nothing."""
    try:
        if path.is_dir():
            return "the previous sharded checkpoint"
        return f"step {torch.load(path, map_location='cpu', weights_only=True, mmap=True)['global_step']}"
    except FileNotFoundError:
        return "nothing (no checkpoint was saved before)"
    except Exception:  # unreadable for another reason: the message must still come out
        return "the previous save"


def sync_folder(folder: Path) -> None:
    """``fsync`` of a folder: makes a rename inside it durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_file_atomic(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, rename over ``path``.

    Raises:
        CheckpointWriteError: the temporary file is gone and ``path`` is untouched.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        sync_folder(path.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CheckpointWriteError(path, checkpoint.get("global_step"), error) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def new_sibling_folder(path: Path) -> Path:
    """An empty folder beside ``path`` for the next folder checkpoint (a leftover of a killed save is removed)."""
    sibling = path.with_name(f".{path.name}.new")
    shutil.rmtree(sibling, ignore_errors=True)
    sibling.mkdir(parents=True)
    return sibling


def swap_in_folder(written: Path, path: Path) -> None:
    """Makes the complete folder ``written`` the checkpoint at ``path`` in one atomic step, then removes the old one.

    A process killed at any point leaves ``path`` as the old or the new checkpoint, never a mix or nothing.
    """
    for name in os.listdir(written):
        with open(written / name, "rb") as file:
            os.fsync(file.fileno())
    if path.exists():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(AT_FDCWD, os.fsencode(written), AT_FDCWD, os.fsencode(path), RENAME_EXCHANGE) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"cannot swap {written} and {path}: {os.strerror(error)}")
        sync_folder(path.parent)
        shutil.rmtree(written) if written.is_dir() else written.unlink()  # now the old checkpoint
    else:
        os.rename(written, path)
        sync_folder(path.parent)


def remove_leftovers(folder: Path) -> list[Path]:
    """Removes the temporary files and folders of saves whose process was killed (call while holding the run's
    lock: no save is in progress); returns what was removed."""
    leftovers = [*folder.glob(".*.tmp-*"), *folder.glob(".*.new")]
    for leftover in leftovers:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    return leftovers


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`save_file_atomic` as its writer.

    Example:
        >>> trainer = lightning.Trainer(plugins=[AtomicCheckpointIO()], ...)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_file_atomic(checkpoint, Path(path))
