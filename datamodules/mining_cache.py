"""The encodings of hard-negative mining, cached on disk per model and role, so a killed run resumes."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from contracts.atomic import write_atomic

TextEncoder = Callable[[list[str], str], np.ndarray]
"""``encoder(texts, role) -> [n, d]`` embeddings; ``role`` (``query`` or ``passage``) picks the prompt prefix."""


class EmbeddingCache:
    """Encodings on disk, per role: ``<role>/<n>.json`` (the texts) and ``<role>/<n>.npy`` (float32 ``[len, d]``).

    Missing texts are encoded sorted by length (less padding) in chunks of ``chunk`` texts; a chunk's ``.npy`` is
    written last, by rename, so a chunk without it was interrupted and is encoded again. Texts shared by several
    sources (the English pool of every locale) are encoded once.

    Args:
        directory: the cache of one model (``.mining/cache/<model digest>``, :func:`contracts.digest.digest`).
        encoder: ``(texts, role) -> embeddings``; called only for missing texts, so a finished run never needs
            the model (the command's encoder loads it on its first call).
        batch_size: texts per encoder call.
        chunk: texts per saved chunk.
        progress: show a progress bar.
    """

    def __init__(self, directory: Path, encoder: TextEncoder, batch_size: int, chunk: int, progress: bool) -> None:
        self.directory, self.encoder = Path(directory), encoder
        self.batch_size, self.chunk, self.progress = batch_size, chunk, progress
        self.loaded: dict[str, tuple[dict[str, tuple[int, int]], list[np.ndarray]]] = {}
        self.encoded = 0  # texts encoded (not read from disk) by this process
        self.seconds = 0.0

    def _load(self, role: str) -> tuple[dict[str, tuple[int, int]], list[np.ndarray]]:
        if role not in self.loaded:
            where: dict[str, tuple[int, int]] = {}
            arrays: list[np.ndarray] = []
            for path in sorted((self.directory / role).glob("*.npy")):
                texts_file = path.with_suffix(".json")
                texts = json.loads(texts_file.read_text(encoding="utf-8")) if texts_file.is_file() else None
                array = np.load(path)
                if texts is None or len(texts) != len(array):
                    continue  # a chunk from an older, interrupted write: encoded again
                where.update((text, (len(arrays), row)) for row, text in enumerate(texts))
                arrays.append(array)
            self.loaded[role] = (where, arrays)
        return self.loaded[role]

    def embed(self, texts: list[str], role: str, label: str) -> np.ndarray:
        """``[len(texts), d]`` embeddings of ``texts`` (duplicates allowed), encoding only what the cache lacks;
        ``label`` names the progress bar (the source)."""
        where, arrays = self._load(role)
        missing = sorted(set(texts) - set(where), key=lambda text: (len(text), text))
        if missing:
            self._encode(missing, role, label, where, arrays)
        return np.stack([arrays[chunk][row] for chunk, row in (where[text] for text in texts)])

    def _encode(self, missing: list[str], role: str, label: str, where: dict, arrays: list) -> None:
        from tqdm import tqdm

        folder = self.directory / role
        folder.mkdir(parents=True, exist_ok=True)
        number = max((int(path.stem) for path in folder.glob("*.json")), default=-1) + 1
        with tqdm(total=len(missing), desc=f"{label}: encode {role} texts", unit="text",
                  disable=not self.progress, file=sys.stderr) as bar:
            for start in range(0, len(missing), self.chunk):
                texts = missing[start: start + self.chunk]
                started = time.perf_counter()
                parts = []
                for first in range(0, len(texts), self.batch_size):
                    parts.append(self.encoder(texts[first: first + self.batch_size], role))
                    bar.update(len(parts[-1]))
                self.seconds += time.perf_counter() - started
                self.encoded += len(texts)
                array = np.concatenate(parts).astype(np.float32)
                stem = folder / f"{number:06d}"
                write_atomic(stem.with_suffix(".json"), json.dumps(texts, ensure_ascii=False))
                write_atomic(stem.with_suffix(".npy"), array)
                where.update((text, (len(arrays), row)) for row, text in enumerate(texts))
                arrays.append(array)
                number += 1
