"""Atomic file replacement: a reader (or a killed writer) sees the old file or the whole new one, never a part."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` and renames it over ``path`` when the block ends without an error; on
    an error the temporary file is removed. The temporary name ends in ``.tmp-<pid>``, never in the real suffix, so
    a leftover of a killed process is not read as data (``*.jsonl`` sources); give writers the format explicitly.

    Example:
        >>> with replacing(Path("plots/loss.png")) as temporary:
        ...     figure.savefig(temporary, format="png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, content: str | bytes | np.ndarray) -> None:
    """Writes text (UTF-8), bytes or a numpy array (``.npy``) to ``path`` through :func:`replacing`."""
    with replacing(path) as temporary, open(temporary, "wb") as file:
        if isinstance(content, np.ndarray):
            np.save(file, content)
        else:
            file.write(content.encode("utf-8") if isinstance(content, str) else content)
