"""Minimal real data path: English↔xx translation pairs from gettext catalogs, one locale per batch.

Each batch is a pure function of (seed, batch index), so a resumed run continues exactly where it stopped
and every device agrees on the batch's source. Within a source, pairs are visited in a fresh permutation
each epoch (the tail smaller than a global batch is dropped, so a batch never holds one pair twice).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.gettext_corpus import Pair, build_gettext_corpus, load_split

if TYPE_CHECKING:
    from experiments.config import DataConfig
    from lightning_modules.backbone import BatchTokenizer

log = logging.getLogger(__name__)

SOURCE_CHUNK = 4096  # source choices are drawn in chunks, so finding a batch's position is vectorised


class PairBatches(IterableDataset):
    """Endless stream of tokenized batches, each from one source (locale), starting at ``start_batch``.

    Args:
        sources: ``{locale: pairs}``, each with at least ``batch_size · world_size`` pairs.
        batch_size: pairs per device.
        sampling_alpha: source probability ∝ size^alpha.
        direction: ``xx2en``, ``en2xx`` or ``both`` (a random direction per batch).
        tokenize: builds the model's input from raw texts (runs in DataLoader workers).
        seed: the run's seed.
        rank / world_size: this device's slice of each global batch.
        start_batch: index of the first batch to yield (resume).
    """

    def __init__(self, sources: dict[str, list[Pair]], batch_size: int, sampling_alpha: float, direction: str,
                 tokenize: BatchTokenizer, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
        self.names = sorted(sources)
        self.sources = [sources[name] for name in self.names]
        sizes = np.array([len(pairs) for pairs in self.sources], dtype=np.float64)
        self.probabilities = sizes**sampling_alpha / (sizes**sampling_alpha).sum()
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.global_batch = batch_size * world_size
        self.direction, self.tokenize, self.seed = direction, tokenize, seed
        self.start_batch = start_batch

    def _source_choices(self, chunk: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0, chunk]).choice(len(self.sources), SOURCE_CHUNK, p=self.probabilities)

    def locate(self, index: int) -> tuple[int, int]:
        """``(source, k)``: batch ``index`` is the k-th batch drawn from that source."""
        chunk, within = divmod(index, SOURCE_CHUNK)
        source = int(self._source_choices(chunk)[within])
        earlier = sum(int((self._source_choices(c) == source).sum()) for c in range(chunk))
        return source, earlier + int((self._source_choices(chunk)[:within] == source).sum())

    def pairs(self, index: int) -> tuple[str, list[Pair], bool]:
        """Source name, this device's pairs and whether the English side is the passage, for batch ``index``."""
        source, k = self.locate(index)
        pairs = self.sources[source]
        batches_per_epoch = len(pairs) // self.global_batch
        epoch, slot = divmod(k, batches_per_epoch)
        order = np.random.default_rng([self.seed, 1, source, epoch]).permutation(len(pairs))
        start = slot * self.global_batch + self.rank * self.batch_size
        english_passage = (self.direction == "xx2en" or
                           (self.direction == "both" and np.random.default_rng([self.seed, 2, index]).random() < 0.5))
        return self.names[source], [pairs[i] for i in order[start: start + self.batch_size]], english_passage

    def batch(self, index: int) -> dict:
        name, pairs, english_passage = self.pairs(index)
        english, translated = [p.en for p in pairs], [p.xx for p in pairs]
        queries, passages = (translated, english) if english_passage else (english, translated)
        return {**self.tokenize(queries, passages), "source": name, "in_batch": True, "batch_index": index}

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        # DataLoader reads workers round-robin, so striding keeps the batch order.
        index = self.start_batch + worker_id
        while True:
            yield self.batch(index)
            index += workers


class TranslationPairsDataModule(L.LightningDataModule):
    """Builds the gettext corpus once (all locales, git-ignored folder) and streams the configured locales.

    Its state (the next batch index) is saved in Lightning checkpoints, so a resumed run sees exactly the
    batches an uninterrupted run would have seen.
    """

    def __init__(self, config: DataConfig, tokenize: BatchTokenizer, seed: int) -> None:
        super().__init__()
        self.config, self.tokenize, self.seed = config, tokenize, seed
        self.next_batch = 0
        self.sources: dict[str, list[Pair]] = {}
        self.skipped: dict[str, int] = {}

    def prepare_data(self) -> None:
        build_gettext_corpus(self.config.dir, self.config.catalog_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.sources:
            return
        world_size = self.trainer.world_size if self.trainer else 1
        needed = self.config.batch_size * world_size
        for locale in self.config.locales:
            by_english = {pair.en: pair for pair in load_split(self.config.dir, "train", locale)}
            # One pair per English sentence: two translations of one sentence in a batch would be false negatives.
            pairs = list(by_english.values())[: self.config.max_pairs_per_locale]
            if len(pairs) < needed:
                self.skipped[locale] = len(pairs)
                log.warning("skipping locale %s: %d distinct train pairs < global batch %d", locale, len(pairs), needed)
            else:
                self.sources[locale] = pairs
        if not self.sources:
            raise ValueError(f"data.locales {list(self.config.locales)}: no locale has the {needed} distinct train "
                             f"pairs one global batch needs (found {self.skipped}); lower data.batch_size or add locales")

    def train_dataloader(self) -> DataLoader:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = PairBatches(self.sources, self.config.batch_size, self.config.sampling_alpha, self.config.direction,
                              self.tokenize, self.seed, rank, world_size, self.next_batch)
        return DataLoader(dataset, batch_size=None, num_workers=self.config.num_workers,
                          persistent_workers=self.config.num_workers > 0)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is not None and self.trainer.training:
            self.next_batch = batch["batch_index"] + 1
        return batch

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch, "seed": self.seed, "locales": sorted(self.sources)}

    def load_state_dict(self, state: dict) -> None:
        self.next_batch = state["next_batch"]

    def summary(self) -> dict[str, int]:
        """Pairs per source used for training (after skipping), for logs and the run's params."""
        return {locale: len(pairs) for locale, pairs in self.sources.items()}

