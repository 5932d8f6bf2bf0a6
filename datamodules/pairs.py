"""The training DataModule: streams (query, passage, hard negatives) batches, one source per batch.

Sources come from a built-in translation corpus (gettext catalogs of this machine, or the pinned django
package's catalogs; one source per locale) or from a folder of parquet / JSONL files (one source per file).
How batches are drawn, sharded and resumed: :mod:`datamodules.stream`; how files are read: :mod:`datamodules.sources`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from typing import TYPE_CHECKING

import lightning as L
from torch.utils.data import DataLoader

from contracts.config_error import ConfigError
from datamodules.config import DataConfig
from datamodules.gettext_corpus import build_gettext_corpus
from datamodules.sources import (
    DataError,
    Source,
    built_locales,
    check_names,
    corpus_sources,
    folder_sources,
    list_folder,
    read_sidecar,
)
from datamodules.stream import PairBatches, StreamOptions

if TYPE_CHECKING:
    from datamodules.tokenization import BatchTokenizer

log = logging.getLogger(__name__)

STATE_FORMAT = 2


def metric_name(name: str) -> str:
    """A source or language name usable as one level of an MLflow metric key: ASCII letters, digits, ``_ - .``
    (MLflow forbids e.g. ``@`` in ``sr@latin``; Lightning's logger would silently drop ``:`` or non-ASCII)."""
    return re.sub(r"[^A-Za-z0-9_\-.]", "_", name)


def check_data_config(config: DataConfig) -> None:
    """Checks the source and locale names of the ``data`` section against the data before any weights load (its
    values are checked by :class:`DataConfig` itself); raises ConfigError naming the key.

    The files themselves (columns, emptiness) are checked by :meth:`TranslationPairsDataModule.setup`.
    """
    try:
        check_names(config.caps, _cheap_source_names(config), key="data.caps", where=config.dir)
    except (DataError, ImportError) as error:
        raise ConfigError(getattr(error, "key", "data.corpus"), str(error)) from None


def _cheap_source_names(config: DataConfig) -> list[str]:
    """The run's source names, checked as far as possible without reading the data."""
    if config.corpus == "folder":
        if config.direction != "xx2en":
            raise DataError(f"direction {config.direction} applies to the built-in translation corpora only",
                            key="data.direction")
        files = list_folder(config.dir)
        if config.sources is not None:
            check_names(config.sources, list(files), key="data.sources", where=config.dir)
        read_sidecar(config.dir, files)
        return list(config.sources if config.sources is not None else files)
    if config.corpus == "django":
        from datamodules.django_corpus import django_catalog_dirs

        django_catalog_dirs()  # raises ImportError with the install command
    if config.sources is not None:
        raise DataError(f"data.sources selects files of a folder corpus; {config.corpus} sources are chosen "
                        "with data.locales", key="data.sources")
    available = built_locales(config.dir)
    if available is not None:  # else the corpus is built (all locales) before training and checked then
        check_names(config.locales, available, key="data.locales", where=f"{config.dir} (train split)")
    return list(config.locales)


class TimedDataLoader(DataLoader):
    """A DataLoader that records how long the training loop's last ``next()`` waited for a batch."""

    last_wait = 0.0

    def __iter__(self):
        return _TimedIterator(super().__iter__(), self)


class _TimedIterator:
    def __init__(self, iterator, loader: TimedDataLoader) -> None:
        self.iterator, self.loader = iterator, loader

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        batch = next(self.iterator)
        self.loader.last_wait = time.perf_counter() - started
        return batch


class TranslationPairsDataModule(L.LightningDataModule):
    """Streams tokenized batches of (query, passage, hard negatives), one source per batch, resumable exactly.

    Built-in corpora (``data.corpus: gettext | django``) are built once into ``data.dir`` by
    :meth:`prepare_data`; a ``folder`` corpus is read in place. Sources smaller than one global batch are
    skipped with a warning. The DataModule's state — the sampler's batch counter, each shard's position in
    each source, and the running counts — is saved in Lightning checkpoints, so a resumed run sees exactly the
    batches an uninterrupted run would have seen.

    Every training batch gets ``batch["stats"]``, per-step metrics the LightningModule logs, under ``system/`` (MLflow
    shows them apart from the model's metrics): ``run/data/examples/<source>`` and
    ``run/data/examples_language/<language>`` (examples seen, all devices), and this device's
    ``run/data/device/padding_fraction``, ``run/data/device/wait_s`` (time the loop waited for this batch),
    ``run/data/device/wait_fraction`` (waiting / elapsed since the first batch) and
    ``run/data/device/skipped/<source>/<reason>`` (rows skipped).

    Args:
        config: the ``data`` section.
        tokenize: builds the model's input from texts; runs in the DataLoader workers.
        seed: the run's seed.

    Example:
        >>> datamodule = TranslationPairsDataModule(compose("quickstart").data, tokenize, seed=0)
        >>> datamodule.prepare_data(); datamodule.setup("fit")
        >>> batch = next(iter(datamodule.train_dataloader()))  # batch["source"] == "fr", ...
    """

    def __init__(self, config: DataConfig, tokenize: BatchTokenizer, seed: int) -> None:
        super().__init__()
        self.config, self.tokenize, self.seed = config, tokenize, seed
        self.sources: dict[str, Source] = {}
        self.too_small: dict[str, int] = {}
        self.next_batch = 0
        self.positions: dict[int, dict[str, list[int]]] = {}
        self.examples: Counter = Counter()
        self.skipped: dict[str, Counter] = {}
        self.loader: TimedDataLoader | None = None
        self._last_arrival: float | None = None
        self._waited = self._elapsed = 0.0

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def prepare_data(self) -> None:
        if self.config.corpus == "gettext":
            build_gettext_corpus(self.config.dir, self.config.catalog_dir)
        elif self.config.corpus == "django":
            from datamodules.django_corpus import build_django_corpus

            build_django_corpus(self.config.dir)

    def setup(self, stage: str | None = None) -> None:
        if self.sources:
            return
        config = self.config
        try:
            if config.corpus == "folder":
                sources = folder_sources(config.dir, config.sources)
            else:
                sources = corpus_sources(config.dir, list(config.locales), config.direction)
        except DataError as error:
            raise ConfigError(error.key, str(error)) from None
        workers = max(1, config.num_workers)
        needed = config.batch_size * self.world_size * workers
        for name, source in sources.items():
            source.cap = config.caps.get(name, config.max_examples)
            source.negatives_per_row = min(config.negatives.get(source.task, 0), source.num_negative_fields)
            if 0 < source.negatives_per_row < config.negatives.get(source.task, 0):
                log.warning("source %s has %d negative columns; drawing %d per row instead of %d", name,
                            source.num_negative_fields, source.negatives_per_row, config.negatives[source.task])
            if not source.in_batch and not source.negatives_per_row:
                raise ConfigError("data.negatives", f"{source.path}: a {source.task} source trains on hard negatives "
                                  f"only, but it has no negative_* columns or data.negatives.{source.task} is 0")
            if source.size < needed:
                self.too_small[name] = source.size
            else:
                self.sources[name] = source
        if self.too_small:
            log.warning("skipping sources smaller than %d rows (batch size × devices × workers): %s", needed,
                        self.too_small)
        if not self.sources:
            raise ConfigError("data.batch_size", f"no source has the {needed} rows that one batch per shard needs "
                              f"(sizes: {self.too_small}); lower data.batch_size or data.num_workers, or add sources")

    def train_dataloader(self) -> TimedDataLoader:
        workers = self.config.num_workers
        if workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize one batch each
        options = StreamOptions(self.config.batch_size, self.config.pool_batches, self.config.bucketing,
                                self.config.strict, self.seed)
        dataset = PairBatches(list(self.sources.values()), self.tokenize, options, self.config.sampling_alpha,
                              self.rank, self.world_size, workers, self.next_batch, self.positions)
        self.loader = TimedDataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
        return self.loader

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is not None and self.trainer.training:
            self.record(batch)
        return batch

    def record(self, batch: dict) -> None:
        """Takes note of a batch the training loop consumes (position, counts) and attaches its ``stats``."""
        source = batch["source"]
        self.next_batch = batch["batch_index"] + 1
        self.positions.setdefault(batch["data_state"]["worker"], {})[source] = batch["data_state"]["position"]
        self.examples[source] += batch["num_queries"] * self.world_size
        self.skipped.setdefault(source, Counter()).update(batch["skipped"])

        now = time.perf_counter()
        wait = self.loader.last_wait if self.loader is not None else 0.0
        if self._last_arrival is not None:  # the first batch's wait is start-up (workers, first pool)
            self._waited += wait
            self._elapsed += now - self._last_arrival
        self._last_arrival = now
        batch["stats"] = {"run/data/device/padding_fraction": batch["padding_fraction"],
                          "run/data/device/wait_s": wait,
                          "run/data/device/wait_fraction": self._waited / self._elapsed if self._elapsed else 0.0,
                          **self.counts()}

    def counts(self) -> dict[str, float]:
        """Running counts as metrics: examples per source (and per language), skipped rows per source and reason."""
        counts = {f"run/data/examples/{metric_name(name)}": float(self.examples[name]) for name in self.sources}
        languages = {name: source.language for name, source in self.sources.items()}
        if any(language != name for name, language in languages.items()):
            per_language: Counter = Counter()
            for name, language in languages.items():
                per_language[language] += self.examples[name]
            counts.update({f"run/data/examples_language/{metric_name(language)}": float(count)
                           for language, count in per_language.items()})
        counts.update({f"run/data/device/skipped/{metric_name(name)}/{reason}": float(count)
                       for name, reasons in self.skipped.items() for reason, count in reasons.items()})
        return counts

    def state_dict(self) -> dict:
        """The data position. Each device reads its own shards, so positions and skip counts are gathered from
        every rank (Lightning builds checkpoints on all ranks) and stored per rank."""
        per_rank = self._gather({"positions": self.positions,
                                 "skipped": {name: dict(counts) for name, counts in self.skipped.items()}})
        return {"format": STATE_FORMAT, "next_batch": self.next_batch, "seed": self.seed,
                "world_size": self.world_size, "num_workers": max(1, self.config.num_workers),
                "sources": sorted(self.sources), "examples": dict(self.examples), "ranks": per_rank}

    def _gather(self, mine: dict) -> list[dict]:
        import torch.distributed as dist

        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return [mine]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError("the checkpoint's data state is from an older version of the DataModule and cannot "
                             "continue the same batches; start a new run with resume=false")
        layout = (state["world_size"], state["num_workers"])
        if layout != (self.world_size, max(1, self.config.num_workers)):
            raise ValueError(f"the checkpoint was written with {layout[0]} device(s) × {layout[1]} data worker(s); "
                             "resume with the same trainer.devices and data.num_workers to continue the same batches")
        if state["sources"] != sorted(self.sources):
            log.warning("resuming with sources %s; the checkpoint had %s: the batch sequence changes",
                        sorted(self.sources), state["sources"])
        mine = state["ranks"][self.rank]
        self.next_batch = state["next_batch"]
        self.positions = {int(worker): dict(sources) for worker, sources in mine["positions"].items()}
        self.examples = Counter(state["examples"])
        self.skipped = {name: Counter(reasons) for name, reasons in mine["skipped"].items()}

    def summary(self) -> dict[str, int]:
        """Rows per training source (after caps), for logs and the run's params."""
        return {name: source.size for name, source in self.sources.items()}
