"""The batch stream: one source per batch, sharded over devices × DataLoader workers, resumable exactly.

How a batch comes to be (everything below is a pure function of the seed and the recorded positions):

1. **Source**: batch ``t`` (counted from the start of training, the same on every device) comes from source
   ``SourceSampler(t)``, drawn with probability ∝ size^α.
2. **Shard**: each device has ``W`` logical workers; batch ``t`` is built by logical worker ``t mod W``, from
   shard ``rank · W + t mod W`` of ``J = world size · W`` shards. In every pass (epoch) over a source its
   blocks are shuffled (parquet: row groups shuffled, then the blocks inside each, so a shard reads one row
   group at a time) and dealt round-robin to the J shards, so each row belongs to exactly one shard: no
   duplicates, no gaps.
3. **Pool**: a shard reads its blocks (rows shuffled within a block) into pools of ``pool_batches`` batches of
   usable rows, draws each row's k hard negatives, then either sorts the pool by length (bucketing: less
   padding) or shuffles it, cuts it into batches and emits them in random order. A pass ends with the
   shard's last, possibly smaller pool; the fewer than ``batch_size`` random rows that do not fill a batch
   there sit out that pass.
4. **Position**: a shard's position in a source is ``[pass, block, row, batches emitted from the pool]``;
   with the sampler's counter ``t`` it is all a resumed run needs to rebuild the same batches.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.sources import NOT_BAD_DATA, SKIP_REASONS, DataError, Row, Source, make_row

log = logging.getLogger(__name__)

# Distinct first seed words keep the random streams of the different decisions independent.
SAMPLER, PASS_ORDER, BLOCK_ORDER, POOL, DIRECTION, NEGATIVES = range(6)
SAMPLER_CHUNK = 4096
LOGGED_SKIPS = 5  # per stream, the first skipped rows are logged with file and line


class SourceSampler:
    """Which source batch ``t`` comes from: probability ∝ size^α, a pure function of ``(seed, t)``.

    The choice sequence is therefore identical on every device and after a resume (its "state" is ``t``).

    Args:
        sizes: rows per source (after caps).
        alpha: 1 samples ∝ size (the paper); 0 uniformly; in between up-weights small sources.
        seed: the run's seed.

    Example:
        >>> sampler = SourceSampler([100, 400, 1600], alpha=0.5, seed=0)
        >>> sampler.probabilities.round(4).tolist()
        [0.1429, 0.2857, 0.5714]
    """

    def __init__(self, sizes: Sequence[int], alpha: float, seed: int) -> None:
        weights = np.asarray(sizes, dtype=np.float64) ** alpha
        self.probabilities = weights / weights.sum()
        self.seed = seed
        self._chunk: tuple[int, np.ndarray] | None = None

    def __call__(self, t: int) -> int:
        chunk, within = divmod(t, SAMPLER_CHUNK)
        if self._chunk is None or self._chunk[0] != chunk:
            rng = np.random.default_rng([self.seed, SAMPLER, chunk])
            self._chunk = (chunk, rng.choice(len(self.probabilities), SAMPLER_CHUNK, p=self.probabilities))
        return int(self._chunk[1][within])


@dataclass(frozen=True)
class StreamOptions:
    """How shards cut sources into batches.

    Args:
        batch_size: rows per device batch.
        pool_batches: batches per pool (the span of shuffling and of length bucketing).
        bucketing: sort each pool by length before cutting it into batches.
        strict: a skipped row (other than a duplicate) raises :class:`DataError` instead of being counted.
        seed: the run's seed.
    """

    batch_size: int
    pool_batches: int = 16
    bucketing: bool = False
    strict: bool = False
    seed: int = 0


class SourceStream:
    """One shard's endless sequence of batches from one source (see the module docstring).

    Args:
        source: the source.
        shard / num_shards: this shard and the number of shards (devices × workers).
        options: batching options.
        position: ``[pass, block, row, batches emitted]`` to start from (a checkpoint's), default the start.
    """

    def __init__(self, source: Source, shard: int, num_shards: int, options: StreamOptions,
                 position: Sequence[int] | None = None) -> None:
        self.source, self.shard, self.num_shards, self.options = source, shard, num_shards, options
        self.position = list(position) if position is not None else [0, 0, 0, 0]
        self._pool: tuple[list[list[Row]], Counter, list[int]] | None = None
        self._pass_blocks: tuple[int, np.ndarray] | None = None
        self._block: tuple[int, int, list] | None = None
        self._logged = 0

    def next_batch(self) -> tuple[list[Row], Counter, list[int]]:
        """``(rows, skips to report, position after this batch)``.

        A pool's skip counts are reported with its first batch only, so a pool rebuilt after a resume does not
        count its skipped rows twice.
        """
        if self._pool is None:
            self._pool = self._build_pool()
        batches, skips, end = self._pool
        emitted = self.position[3]
        rows = batches[emitted]
        reported = skips if emitted == 0 else Counter()
        if emitted + 1 == len(batches):
            self.position, self._pool = [*end, 0], None
        else:
            self.position[3] = emitted + 1
        return rows, reported, list(self.position)

    def _build_pool(self) -> tuple[list[list[Row]], Counter, list[int]]:
        batch_size = self.options.batch_size
        skips: Counter = Counter()
        while True:
            start = self.position[:3]
            rows, end = self._fill(*start, skips)
            if len(rows) >= batch_size:
                return self._arrange(rows, start), skips, end
            if start[1:] == [0, 0]:
                raise DataError(f"{self.source.path}: shard {self.shard} of {self.num_shards} found fewer than "
                                f"{batch_size} usable rows in a whole pass over source {self.source.name!r} "
                                f"({self.source.size} rows, skipped {dict(skips)}); the source is too small for "
                                "this batch size and number of devices × workers")
            self.position = [*end, 0]  # the pass's tail is shorter than a batch: go on with the next pass

    def _fill(self, pass_: int, cursor: int, offset: int, skips: Counter) -> tuple[list[Row], list[int]]:
        """Up to one pool of usable rows from ``(pass, block, row)``; returns them and the position after."""
        blocks = self._blocks(pass_)
        wanted = self.options.batch_size * self.options.pool_batches
        rows: list[Row] = []
        queries, passages = set(), set()
        while len(rows) < wanted and cursor < len(blocks):
            block_rows = self._read(pass_, *blocks[cursor])
            while offset < len(block_rows) and len(rows) < wanted:
                index, values = block_rows[offset]
                offset += 1
                row = make_row(index, values, self.source.negatives_per_row)
                if not isinstance(row, str) and (row.query in queries or row.passage in passages):
                    row = "duplicate"
                if isinstance(row, str):
                    self._skip(index, row, skips)
                    continue
                queries.add(row.query)
                passages.add(row.passage)
                rows.append(row)
            if offset == len(block_rows):
                cursor, offset = cursor + 1, 0
        return rows, [pass_, cursor, offset] if cursor < len(blocks) else [pass_ + 1, 0, 0]

    def _arrange(self, rows: list[Row], start: list[int]) -> list[list[Row]]:
        """Draws hard negatives, then sorts (bucketing) or shuffles the pool, cuts it and shuffles the batches."""
        seed, source, size = self.options.seed, self.source, self.options.batch_size
        rng = np.random.default_rng([seed, POOL, source.key, self.shard, *start])
        k = source.negatives_per_row
        if k:  # a stream of their own: the batches' queries and passages do not depend on k (with/without runs)
            draw = np.random.default_rng([seed, NEGATIVES, source.key, self.shard, *start])
            rows = [Row(row.query, row.passage,
                        tuple(row.negatives[i] for i in draw.choice(len(row.negatives), k, replace=False)), row.index)
                    for row in rows]
        count = len(rows) // size
        order = rng.permutation(len(rows))[: count * size]  # at a pass's end, random rows wait for the next
        if self.options.bucketing:
            order = sorted(order, key=lambda i: rows[i].length())
        batches = [[rows[i] for i in order[b * size: (b + 1) * size]] for b in range(count)]
        return [batches[b] for b in rng.permutation(count)]

    def _blocks(self, pass_: int) -> np.ndarray:
        """This shard's blocks ``[m, 3]`` in pass ``pass_``: shuffled groups, capped, dealt round-robin to shards."""
        if self._pass_blocks is None or self._pass_blocks[0] != pass_:
            source = self.source
            rng = np.random.default_rng([self.options.seed, PASS_ORDER, source.key, pass_])
            groups = rng.permutation(len(source.group_starts) - 1)
            if len(groups) == len(source.blocks):  # one block per group (JSONL)
                order = groups
            else:  # one parquet row group after the other, its blocks shuffled: each group is decoded once
                starts = source.group_starts
                order = np.concatenate([starts[g] + rng.permutation(starts[g + 1] - starts[g]) for g in groups])
            blocks = source.blocks[order]
            if source.cap is not None:  # the pass ends after cap rows; its last block is cut short
                ends = np.cumsum(blocks[:, 1] - blocks[:, 0])
                blocks = blocks[: int(np.searchsorted(ends, source.cap)) + 1]
                blocks[-1, 1] -= max(0, int(ends[len(blocks) - 1]) - source.cap)
            self._pass_blocks = (pass_, blocks[self.shard:: self.num_shards])
        return self._pass_blocks[1]

    def _read(self, pass_: int, start: int, stop: int, locator: int) -> list:
        """The block's rows in this pass's shuffled order (the last block read stays cached)."""
        if self._block is None or self._block[:2] != (pass_, start):
            rows = self.source.read(int(start), int(stop), int(locator))
            order = np.random.default_rng([self.options.seed, BLOCK_ORDER, self.source.key, pass_, int(start)])
            self._block = (pass_, start, [rows[i] for i in order.permutation(len(rows))])
        return self._block[2]

    def _first_bad_row(self, index: int, reason: str) -> tuple[int, str]:
        """The first unusable row in file order up to ``index`` (rows are read in shuffled order, so the row found
        first need not be the first in the file): one sequential read of the blocks before it, only on this error."""
        for start, stop, locator in self.source.blocks:
            if start > index:
                break
            for row_index, values in self.source.read(int(start), int(stop), int(locator)):
                row = make_row(row_index, values, self.source.negatives_per_row)
                if isinstance(row, str) and row not in NOT_BAD_DATA and row_index < index:
                    return row_index, row
        return index, reason

    def _skip(self, index: int, reason: str, skips: Counter) -> None:
        if self.options.strict and reason not in NOT_BAD_DATA:
            index, reason = self._first_bad_row(index, reason)
            raise DataError(f"{self.source.where(index)}: {reason} ({SKIP_REASONS[reason]}); data.strict is on "
                            f"(the first unusable row of the file)")
        skips[reason] += 1
        if self._logged < LOGGED_SKIPS and reason not in NOT_BAD_DATA:
            self._logged += 1
            log.warning("skipped %s: %s (%s)", self.source.where(index), reason, SKIP_REASONS[reason])


class PairBatches(IterableDataset):
    """Endless stream of tokenized batches, each from one source, for one device; tokenizes in its workers.

    Args:
        sources: the training sources (with their task, negatives per row and cap set).
        tokenize: ``(queries, passages, negatives) -> dict`` of tensors
            (a :class:`~datamodules.tokenization.BatchTokenizer`).
        options: batching options.
        alpha: source sampling exponent.
        rank / world_size: this device and the number of devices.
        num_workers: the DataLoader's workers (0 and 1 both mean one stream per device).
        start_batch: the first batch index to yield (a resumed run's).
        positions: ``{logical worker: {source name: position}}`` recorded by the DataModule.

    Each yielded batch holds the tokenizer's tensors plus ``source``, ``language``, ``in_batch``,
    ``batch_index``, ``padding_fraction``, ``skipped`` (new skip counts) and ``data_state`` (the position
    after this batch), which the DataModule records.

    Example:
        >>> dataset = PairBatches(list(sources.values()), tokenize, StreamOptions(batch_size=32), alpha=0.5)
        >>> batch = next(iter(dataset))  # {"input_ids": ..., "source": "de", "in_batch": True, ...}
    """

    def __init__(self, sources: Sequence[Source], tokenize: Callable[..., dict], options: StreamOptions,
                 alpha: float, rank: int = 0, world_size: int = 1, num_workers: int = 0, start_batch: int = 0,
                 positions: dict[int, dict[str, list[int]]] | None = None) -> None:
        self.sources = list(sources)
        self.tokenize, self.options = tokenize, options
        self.sampler = SourceSampler([source.size for source in self.sources], alpha, options.seed)
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.start_batch = start_batch
        self.positions = positions or {}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if workers != self.num_workers:
            raise RuntimeError(f"PairBatches built for {self.num_workers} workers runs in {workers}")
        # The DataLoader restarts at worker 0 after a resume, so shards follow t mod W, not the worker id.
        logical = (self.start_batch + worker) % workers
        shard, num_shards = self.rank * workers + logical, self.world_size * workers
        positions = self.positions.get(logical, {})
        streams: dict[str, SourceStream] = {}
        for t in itertools.count(self.start_batch + worker, workers):
            source = self.sources[self.sampler(t)]
            stream = streams.get(source.name)
            if stream is None:
                stream = streams[source.name] = SourceStream(source, shard, num_shards, self.options,
                                                             positions.get(source.name))
            rows, skipped, position = stream.next_batch()
            yield self.collate(t, source, rows, skipped, {"worker": logical, "position": position})

    def collate(self, t: int, source: Source, rows: list[Row], skipped: Counter, state: dict) -> dict:
        queries, passages = [row.query for row in rows], [row.passage for row in rows]
        if source.bidirectional and np.random.default_rng([self.options.seed, DIRECTION, t]).random() < 0.5:
            queries, passages = passages, queries
        negatives = [list(row.negatives) for row in rows] if source.negatives_per_row else None
        batch = self.tokenize(queries, passages, negatives)
        mask = batch.get("attention_mask")
        padding = 1.0 - float(mask.sum()) / mask.numel() if mask is not None else 0.0
        return {**batch, "source": source.name, "language": source.language, "in_batch": source.in_batch,
                "batch_index": t, "padding_fraction": padding, "skipped": dict(skipped), "data_state": state}
