"""``python -m datamodules.mining NAME [mine.key=value ...] [key=value ...]`` (``make mine SOURCE=NAME``): hard negatives.

Mines hard negatives for every training source of experiment ``NAME`` (the locales of a built-in corpus, built
on demand as training builds it, or the files of a ``folder`` corpus) with the recipe of the ML-Embed data: an
embedding model retrieves each query's top ``top_k`` passages from its source's passage pool, the first
``skip_top`` ranks are dropped (likely false negatives), candidates must score below ``max_score`` and below
``max_ratio`` times the positive's score, and the best ``keep`` survivors become ``negative_1`` …
``negative_keep``. Translation data needs one more rule: rows that share a query or passage text (compared by
:func:`text_key`) are one group (union-find), and no member of the positive's group — the positive itself, a copy
of it, another translation of the same English source — is ever a negative.

Retrieval is exact: a chunked matmul and ``topk`` over L2-normalised embeddings. The pools here (a source's
distinct passages, ~16 k for the largest gettext locale) are far below the size where an approximate index pays.

Output, in the paper's folder layout (``data.corpus=folder``)::

    <out>/<source>.jsonl        {"query", "passage", "negative_1" … "negative_<keep>"}; a row has at least
                                min_negatives negatives, missing ones are null (the loader drops them)
    <out>/sources.yaml          {<source>: {task: retrieval, language: ...}}
    <out>/report.json, report.md  per source: queries, candidates, removals per rule, negatives per row,
                                throughput, a sample to read
    <out>/.mining/cache/        encodings (.npy chunks), per model; .mining/stats/: per-source results

Resumable: encodings are saved chunk by chunk and a source's file is written at once (temporary file and
rename), so re-running a killed command continues where it stopped; a source mined with the same settings is
skipped. Rows with fewer than ``min_negatives`` surviving negatives are left out and counted (default: the
experiment's ``data.negatives.retrieval``): every written row then yields the k negatives training draws, and a
run with ``data.negatives.retrieval=0`` on the same folder sees exactly the same query/passage batches.

Example:
    .venv/bin/python -m datamodules.mining quickstart mine.max_queries=1000 mine.max_pool=4000 mine.max_score=0.9
    make exp NAME=quickstart ARGS="data.corpus=folder data.dir=data/mined/quickstart resume=false"
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import sys
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.atomic import write_atomic
from datamodules.sources import SIDECAR_NAME, UNKNOWN_LANGUAGE, DataError, Source, make_row
from experiments.config import ConfigError, _merge, available_experiments, compose, run_command

log = logging.getLogger(__name__)

MINED_DIR = "data/mined"
STATE_DIR = ".mining"  # not a *.jsonl / *.parquet file: the DataModule never reads it as a source
OPTION_PREFIX = "mine."
BACKBONE = "backbone"
RULES = ("positive", "same_group", "skip_top", "max_score", "max_ratio", "keep")
"""Removal rules, in the order a removed candidate is attributed: each counts under the first rule that removes it."""
QUERY_CHUNK = 512  # queries per retrieval matmul: bounds memory at QUERY_CHUNK × pool floats
SHOWN_NEGATIVES = 3  # per sample row in the report


@dataclass
class MiningConfig:
    """Mining options, given as ``mine.<key>=value`` (every other ``key=value`` overrides the experiment)."""

    model: str = BACKBONE
    """``backbone``: the experiment's ``model`` section with all its blocks (``model.num_layers`` cuts the model
    for training; the miner is the whole pretrained model); or a training checkpoint
    (``outputs/<NAME>/<timestamp>/checkpoints/last.ckpt``), encoded at its full cell (all layers, full width,
    largest MEL rank)."""
    out: str | None = None
    """Output folder; null: ``data/mined/<NAME>``."""
    top_k: int = 100
    """Candidates retrieved per query."""
    skip_top: int = 5
    """The first ranks dropped (likely unlabelled positives)."""
    max_score: float = 0.8
    """Candidates must score (cosine) below this (the paper's 0.8). Scales differ by model: multilingual-e5-small
    scores positives ≈ 0.90 and its 100th candidate ≈ 0.84, so 0.8 removes nearly everything there; use 0.9."""
    max_ratio: float = 0.95
    """... and below this fraction of the positive's score."""
    keep: int = 24
    """Negatives kept per row (the best survivors)."""
    min_negatives: int | None = None
    """Rows with fewer survivors are left out (counted); null: the experiment's ``data.negatives.retrieval``."""
    max_queries: int | None = None
    """Rows mined per source (a seeded random sample, in file order); null: all."""
    max_pool: int | None = None
    """Passages a source's queries retrieve from; null: every distinct passage of the source (the paper). A cap
    keeps the mined rows' positives plus the other passages of smallest seeded text hash: the same English texts
    in every locale, so one encoding serves them all."""
    batch_size: int = 64
    """Texts per forward."""
    cache_chunk: int = 2048
    """Texts per saved encoding chunk: a killed run loses at most one chunk of work."""
    samples: int = 3
    """Rows per source shown in the report."""
    progress: bool = True
    """Progress bars while encoding."""
    overwrite: bool = False
    """Write into an output folder that holds files mining did not write (a mined ``<source>.jsonl`` may replace
    one of them); an input folder is refused either way."""


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


def compose_mining(name: str, args: list[str]) -> tuple[DictConfig, MiningConfig]:
    """The experiment's config (``key=value`` overrides) and the mining options (``mine.key=value``), validated.

    Raises:
        ConfigError: naming the key (``mine.top_k``, ``data.direction``, ...) and what is allowed.
    """
    options = [arg[len(OPTION_PREFIX):] for arg in args if arg.startswith(OPTION_PREFIX)]
    config = compose(name, [arg for arg in args if not arg.startswith(OPTION_PREFIX)])
    try:
        dotlist = OmegaConf.from_dotlist(options)
    except OmegaConfBaseException as error:
        raise ConfigError("ARGS", f"cannot parse mining options {options}: {error}") from None
    mining = OmegaConf.to_object(_merge(OmegaConf.structured(MiningConfig), dotlist, "ARGS", prefix=OPTION_PREFIX))
    if mining.min_negatives is None:
        mining.min_negatives = int(config.data.negatives.get("retrieval", 0))
    validate_mining(mining, config)
    return config, mining


def validate_mining(mining: MiningConfig, config: DictConfig) -> None:
    """Value checks of the mining options; raises ConfigError naming ``mine.<key>``."""
    def check(key: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(OPTION_PREFIX + key, f"{getattr(mining, key)!r} not allowed: {allowed}")

    check("top_k", mining.top_k >= 1, "must be >= 1")
    check("skip_top", 0 <= mining.skip_top < mining.top_k, f"must be in [0, mine.top_k) = [0, {mining.top_k})")
    check("max_score", -1.0 <= mining.max_score <= 1.0, "must be a cosine in [-1, 1]")
    check("max_ratio", mining.max_ratio > 0, "must be > 0 (a fraction of the positive's score)")
    room = mining.top_k - mining.skip_top
    check("keep", 1 <= mining.keep <= room, f"must be in [1, mine.top_k - mine.skip_top] = [1, {room}]")
    check("min_negatives", 0 <= mining.min_negatives <= mining.keep,
          f"must be in [0, mine.keep] = [0, {mining.keep}] (default: data.negatives.retrieval)")
    check("max_queries", mining.max_queries is None or mining.max_queries >= 1, "must be >= 1 (or null: all rows)")
    check("max_pool", mining.max_pool is None or mining.max_pool >= 1, "must be >= 1 (or null: every passage)")
    check("batch_size", mining.batch_size >= 1, "must be >= 1")
    check("cache_chunk", mining.cache_chunk >= 1, "must be >= 1")
    check("samples", mining.samples >= 0, "must be >= 0")
    check("model", mining.model == BACKBONE or Path(mining.model).is_file(),
          f"`{BACKBONE}` (the experiment's backbone) or a checkpoint file (outputs/<NAME>/<timestamp>/checkpoints/"
          "last.ckpt)")
    if config.data.direction == "both":
        raise ConfigError("data.direction", "both not allowed for mining: a mined folder has one direction; "
                          "choose xx2en or en2xx")


# ---------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------


def text_key(text: str) -> str:
    """A text as compared for "the same text": NFKC, case-folded, letters, digits and combining marks only (so
    whitespace and punctuation do not count; marks stay because Indic vowel signs are marks)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in folded if unicodedata.category(ch)[0] in "LNM") or " ".join(folded.split())


class TextGroups:
    """Union-find over :func:`text_key` s: a row joins its query's and its passage's groups, so rows connected
    by a shared query or passage text are one group (e.g. every translation of one English source).

    Example:
        >>> groups = TextGroups([("Datei öffnen", "Open file"), ("Öffne Datei", "Open file."), ("Ja", "Yes")])
        >>> groups.group("Öffne Datei") == groups.group("Datei öffnen") != groups.group("Yes")
        True
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.ids: dict[str, int] = {}
        self.parent: list[int] = []
        for query, passage in pairs:
            self._union(self._id(text_key(query)), self._id(text_key(passage)))

    def _id(self, key: str) -> int:
        if key not in self.ids:
            self.ids[key] = len(self.parent)
            self.parent.append(len(self.parent))
        return self.ids[key]

    def _find(self, node: int) -> int:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]  # path halving
            node = self.parent[node]
        return node

    def _union(self, a: int, b: int) -> None:
        self.parent[self._find(a)] = self._find(b)

    def group(self, text: str) -> int:
        """The group of a text; a text of no row is a group of its own."""
        return self._find(self._id(text_key(text)))

    def sizes(self) -> Counter:
        """Texts (distinct keys) per group."""
        return Counter(self._find(node) for node in range(len(self.parent)))


@dataclass
class Selection:
    """What :func:`select_negatives` keeps and removes.

    Args:
        negatives: per query, the kept pool indices, best first.
        scores: their cosine scores.
        positive_scores: each query's cosine with its positive.
        candidates: candidates retrieved in all (queries × min(top_k, pool)).
        removed: candidates removed per rule (``RULES``).
    """

    negatives: list[list[int]]
    scores: list[list[float]]
    positive_scores: list[float]
    candidates: int
    removed: Counter


@torch.no_grad()
def select_negatives(queries: torch.Tensor, positives: torch.Tensor, pool: torch.Tensor, pool_keys: torch.Tensor,
                     pool_groups: torch.Tensor, mining: MiningConfig) -> Selection:
    """The recipe on embeddings: exact top ``top_k`` by cosine, then the removal rules of ``RULES``.

    Args:
        queries: ``[n, d]`` query embeddings (normalised here).
        positives: ``[n]`` each query's positive, an index into ``pool``.
        pool: ``[m, d]`` passage embeddings (normalised here).
        pool_keys: ``[m]`` an id of each passage's :func:`text_key`: equal to the positive's removes it as
            ``positive`` (the positive itself or a copy).
        pool_groups: ``[m]`` each passage's :class:`TextGroups` group: equal to the positive's removes it as
            ``same_group`` (a translation of the positive).
        mining: top_k, skip_top, max_score, max_ratio, keep.
    """
    queries, pool = F.normalize(queries.float(), dim=-1), F.normalize(pool.float(), dim=-1)
    depth = min(mining.top_k, len(pool))
    ranks = torch.arange(depth)
    selection = Selection([], [], [], len(queries) * depth, Counter({rule: 0 for rule in RULES}))
    for start in range(0, len(queries), QUERY_CHUNK):
        positive = positives[start: start + QUERY_CHUNK]
        scores = queries[start: start + QUERY_CHUNK] @ pool.T
        positive_scores = scores.gather(1, positive[:, None]).squeeze(1)
        values, indices = scores.topk(depth, dim=1)
        rules = {"positive": pool_keys[indices] == pool_keys[positive][:, None],
                 "same_group": pool_groups[indices] == pool_groups[positive][:, None],
                 "skip_top": (ranks < mining.skip_top).expand_as(values),
                 "max_score": values >= mining.max_score,
                 "max_ratio": values >= mining.max_ratio * positive_scores[:, None]}
        alive = torch.ones_like(values, dtype=torch.bool)
        for rule, hit in rules.items():
            selection.removed[rule] += int((alive & hit).sum())
            alive &= ~hit
        surplus = alive & (alive.cumsum(1) > mining.keep)
        selection.removed["keep"] += int(surplus.sum())
        alive &= ~surplus
        for row in range(len(values)):
            selection.negatives.append(indices[row][alive[row]].tolist())
            selection.scores.append(values[row][alive[row]].tolist())
        selection.positive_scores += positive_scores.tolist()
    return selection


# ---------------------------------------------------------------------------
# Encoding, cached on disk
# ---------------------------------------------------------------------------


class Encoder:
    """``encoder(texts, role) -> [n, d]`` float32 normalised embeddings (``role``: ``query`` or ``passage``, which
    picks the tokenizer's prefix), from the experiment's backbone or a checkpoint's full cell; eval mode, no grad."""

    def __init__(self, config: DictConfig, mining: MiningConfig) -> None:
        from experiments.loading import RunLoadError, load_run
        from lightning_modules.embedding_model import EmbeddingModel

        if mining.model == BACKBONE:
            from experiments.run import build

            backbone_config = config.copy()
            backbone_config.plugins, backbone_config.model.num_layers = {}, None
            module, datamodule = build(backbone_config)  # no run: the pretrained backbone
            self.model = EmbeddingModel(module.eval(), datamodule.tokenize)
        else:
            try:
                self.model = load_run(mining.model).model
            except RunLoadError as error:
                raise ConfigError(OPTION_PREFIX + "model", str(error)) from None
        self.model.batch_size = mining.batch_size  # one forward per encoder call: mining batches the texts
        self.cell = self.model.full_cell()

    def __call__(self, texts: list[str], role: str) -> np.ndarray:
        return self.model.encode(texts, self.cell, role).float().numpy()


def model_fingerprint(config: DictConfig, mining: MiningConfig) -> dict:
    """What decides the encodings, known without loading the model (the cache's and the settings' key)."""
    if mining.model == BACKBONE:
        model = OmegaConf.to_container(config.model, resolve=True) | {"num_layers": None}
        return {"backbone": model, "seed": config.seed}  # the seed initialises the random tiny test backbones
    checkpoint = Path(mining.model).resolve()
    return {"checkpoint": str(checkpoint), "bytes": checkpoint.stat().st_size,
            "mtime_ns": checkpoint.stat().st_mtime_ns}


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:12]


class EmbeddingCache:
    """Encodings on disk, per role: ``<role>/<n>.json`` (the texts) and ``<role>/<n>.npy`` (float32 ``[len, d]``).

    Missing texts are encoded sorted by length (less padding) in chunks of ``chunk`` texts; a chunk's ``.npy`` is written last, by rename, so a chunk without it was interrupted and
    is encoded again. Texts shared by several sources (the English pool of every locale) are encoded once.

    Args:
        directory: the cache of one model (``.mining/cache/<model digest>``).
        encoder: returns the ``(texts, role) -> embeddings`` function; called only once a text is missing, so a
            finished run never loads the model.
        batch_size: texts per encoder call.
        chunk: texts per saved chunk.
        progress: show a progress bar.
    """

    def __init__(self, directory: Path, encoder: Callable[[], Callable[[list[str], str], np.ndarray]],
                 batch_size: int, chunk: int, progress: bool) -> None:
        self.directory, self.get_encoder = Path(directory), encoder
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
        encoder = self.get_encoder()
        with tqdm(total=len(missing), desc=f"{label}: encode {role} texts", unit="text",
                  disable=not self.progress, file=sys.stderr) as bar:
            for start in range(0, len(missing), self.chunk):
                texts = missing[start: start + self.chunk]
                started = time.perf_counter()
                parts = []
                for first in range(0, len(texts), self.batch_size):
                    parts.append(encoder(texts[first: first + self.batch_size], role))
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


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def mining_sources(config: DictConfig) -> dict[str, Source]:
    """The experiment's training sources (a built-in corpus is built first, as training builds it)."""
    from datamodules.pairs import TranslationPairsDataModule
    from datamodules.sources import corpus_sources, folder_sources

    data = config.data
    try:
        TranslationPairsDataModule(data, tokenize=None, seed=config.seed).prepare_data()
        if data.corpus == "folder":
            return folder_sources(Path(data.dir), None if data.sources is None else list(data.sources))
        return corpus_sources(Path(data.dir), list(data.locales), data.direction)
    except DataError as error:
        raise ConfigError(error.key, str(error)) from None


def read_pairs(source: Source) -> tuple[list[tuple[str, str]], Counter]:
    """Every usable ``(query, passage)`` of a source in file order, and the unusable rows per skip reason."""
    pairs, skipped = [], Counter()
    for start, stop, locator in source.blocks:
        for index, values in source.read(int(start), int(stop), int(locator)):
            row = make_row(index, values, 0)
            if isinstance(row, str):
                skipped[row] += 1
            else:
                pairs.append((row.query, row.passage))
    return pairs, skipped


def source_settings(source: Source, mining: MiningConfig, model: dict, seed: int) -> dict:
    """Everything that decides a source's output: a finished source with equal settings is not mined again."""
    recipe = {key: getattr(mining, key) for key in ("top_k", "skip_top", "max_score", "max_ratio", "keep",
                                                    "min_negatives", "max_queries", "max_pool")}
    stat = source.path.stat()
    return {"input": {"path": str(source.path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "fields": list(source.fields[:2])},
            "model": model, "recipe": recipe, "seed": seed}


# ---------------------------------------------------------------------------
# Mining
# ---------------------------------------------------------------------------


def pool_passages(pairs: list[tuple[str, str]], rows: list[tuple[str, str]], max_pool: int | None,
                  seed: int) -> list[str]:
    """The passages ``rows`` retrieve from, sorted: every distinct passage of the source (``max_pool`` null), or
    the rows' positives plus the other passages of smallest seeded text hash, ``max_pool`` in all (never fewer
    than the positives). Hashing the text, not its position, picks the same texts in every source that has them."""
    passages = {passage for _, passage in pairs}
    if max_pool is None or len(passages) <= max_pool:
        return sorted(passages)
    positives = {passage for _, passage in rows}
    others = sorted(passages - positives, key=lambda text: (zlib.crc32(f"{seed} {text}".encode("utf-8")), text))
    return sorted(positives.union(others[: max(0, max_pool - len(positives))]))


def mine_source(source: Source, cache: EmbeddingCache, mining: MiningConfig, seed: int) -> tuple[list[dict], dict]:
    """``(output rows, statistics)`` of one source."""
    started = time.perf_counter()
    encoded_before, seconds_before = cache.encoded, cache.seconds
    pairs, unusable = read_pairs(source)
    if not pairs:
        raise ConfigError("data.dir", f"{source.path}: no usable row to mine (skipped: {dict(unusable)})")
    groups = TextGroups(pairs)
    chosen = range(len(pairs))
    if mining.max_queries is not None and len(pairs) > mining.max_queries:
        rng = np.random.default_rng([seed, source.key])
        chosen = np.sort(rng.choice(len(pairs), mining.max_queries, replace=False)).tolist()
    rows = [pairs[i] for i in chosen]
    pool_texts = pool_passages(pairs, rows, mining.max_pool, seed)
    position = {text: i for i, text in enumerate(pool_texts)}
    key_ids: dict[str, int] = {}
    pool_keys = torch.tensor([key_ids.setdefault(text_key(text), len(key_ids)) for text in pool_texts])
    pool_groups = torch.tensor([groups.group(text) for text in pool_texts])

    pool = cache.embed(pool_texts, "passage", source.name)
    queries = cache.embed([query for query, _ in rows], "query", source.name)
    selection = select_negatives(torch.from_numpy(queries), torch.tensor([position[p] for _, p in rows]),
                                 torch.from_numpy(pool), pool_keys, pool_groups, mining)

    written = [i for i, negatives in enumerate(selection.negatives) if len(negatives) >= mining.min_negatives]
    out = []
    for i in written:
        texts = [pool_texts[n] for n in selection.negatives[i]]
        out.append({"query": rows[i][0], "passage": rows[i][1],  # every row has every field: null when missing
                    **{f"negative_{j + 1}": texts[j] if j < len(texts) else None for j in range(mining.keep)}})
    shown = sorted(np.random.default_rng([seed, source.key, 1]).permutation(len(written))[: mining.samples])
    sample = [{"query": rows[i][0], "positive": rows[i][1], "positive_score": round(selection.positive_scores[i], 4),
               "negatives": [{"text": pool_texts[n], "score": round(score, 4)} for n, score in
                             zip(selection.negatives[i][:SHOWN_NEGATIVES], selection.scores[i])]}
              for i in (written[j] for j in shown)]
    per_row = Counter(len(negatives) for negatives in selection.negatives)
    seconds = time.perf_counter() - started
    encoded, encode_seconds = cache.encoded - encoded_before, cache.seconds - seconds_before
    stats = {
        "language": source.language, "input": str(source.path), "rows_in_source": len(pairs),
        "unusable_rows": dict(unusable), "queries": len(rows), "passages_in_source": len({p for _, p in pairs}),
        "pool": len(pool_texts),
        "groups": len(set(pool_groups.tolist())), "largest_group": max(groups.sizes().values(), default=0),
        "candidates": selection.candidates, "candidates_per_query": selection.candidates / max(1, len(rows)),
        "removed": dict(selection.removed), "rows_written": len(out), "rows_too_few_negatives": len(rows) - len(out),
        "negatives_per_row": {str(count): per_row[count] for count in sorted(per_row)},
        "mean_negatives_per_row": sum(len(n) for n in selection.negatives) / max(1, len(rows)),
        "mean_negatives_per_written_row": sum(len(selection.negatives[i]) for i in written) / max(1, len(out)),
        "mean_positive_score": float(np.mean(selection.positive_scores)),
        "texts_encoded": encoded, "encode_seconds": round(encode_seconds, 3), "seconds": round(seconds, 3),
        "queries_per_s": len(rows) / seconds if seconds else 0.0,
        "texts_encoded_per_s": encoded / encode_seconds if encode_seconds else 0.0,
        "sample": sample,
    }
    return out, stats


def mine(config: DictConfig, mining: MiningConfig, encoder: Callable | None = None) -> dict:
    """Mines every source of ``config`` into ``mining.out`` (resumable) and writes the report; returns it.

    Args:
        encoder: ``(texts, role) -> embeddings``; default: an :class:`Encoder` of ``mining.model``, built only if
            some source still needs encoding.
    """
    out = Path(mining.out or f"{MINED_DIR}/{config.name}")
    sources = mining_sources(config)
    check_output_folder(out, sources, mining.overwrite)
    model = model_fingerprint(config, mining)
    cache = EmbeddingCache(out / STATE_DIR / "cache" / digest(model),
                           functools.cache(lambda: encoder if encoder is not None else Encoder(config, mining)),
                           mining.batch_size, mining.cache_chunk, mining.progress)
    stats_dir = out / STATE_DIR / "stats"
    for name, source in sources.items():
        settings = source_settings(source, mining, model, config.seed)
        stats_file = stats_dir / f"{name}.json"
        done = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else None
        if done is not None and done["settings"] == settings and (out / f"{name}.jsonl").is_file() == bool(
                done["rows_written"]):
            log.info("mining: %s already mined with these settings (%s); skipped", name, out / f"{name}.jsonl")
            continue
        rows, stats = mine_source(source, cache, mining, config.seed)
        if stats["rows_too_few_negatives"] > stats["queries"] / 2:
            rule = max(("skip_top", "max_score", "max_ratio"), key=stats["removed"].get)
            log.warning("mining: %s: %d of %d rows kept fewer than %d negatives; mine.%s removed the most (%.0f per "
                        "query; positives score %.2f on average, so this model's cosines may need other thresholds)",
                        name, stats["rows_too_few_negatives"], stats["queries"], mining.min_negatives, rule,
                        stats["removed"][rule] / stats["queries"], stats["mean_positive_score"])
        target = out / f"{name}.jsonl"
        if rows:
            write_atomic(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        else:
            log.warning("mining: no row of %s kept %d negatives; no file written", name, mining.min_negatives)
            target.unlink(missing_ok=True)
        write_atomic(stats_file, json.dumps({"settings": settings, **stats}, ensure_ascii=False, indent=1))
        write_sidecar(out, stats_dir)
        log.info("mining: %s: %d rows, %.1f queries/s -> %s", name, stats["rows_written"], stats["queries_per_s"],
                 target)
    return write_report(out, stats_dir, config, mining, list(sources))


def check_output_folder(out: Path, sources: dict[str, Source], overwrite: bool) -> None:
    """Refuses an output folder that holds a source being mined, or (unless ``overwrite``) any file this command
    did not write: its reports, ``sources.yaml``, ``.mining/`` and the ``<source>.jsonl`` files it has stats for.

    Raises:
        ConfigError: naming ``mine.out``, the folder and the files in the way.
    """
    inputs = sorted({source.path.resolve().parent for source in sources.values()})
    if out.resolve() in inputs:
        raise ConfigError(OPTION_PREFIX + "out", f"{out} holds the sources being mined; choose another folder "
                                                 f"(default: {MINED_DIR}/<NAME>)")
    if overwrite or not out.is_dir():
        return
    mined = {f"{path.stem}.jsonl" for path in (out / STATE_DIR / "stats").glob("*.json")}
    ours = {STATE_DIR, SIDECAR_NAME, "report.json", "report.md", *mined}
    foreign = sorted(path.name for path in out.iterdir() if path.name not in ours and ".tmp-" not in path.name)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(OPTION_PREFIX + "out", f"{out} holds files mining did not write ({shown}); choose an "
                                                 f"empty or new folder, or mine.overwrite=true to write beside (and "
                                                 f"over) them")


def _finished(stats_dir: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(stats_dir.glob("*.json"))}


def write_sidecar(out: Path, stats_dir: Path) -> None:
    """``sources.yaml`` for the sources written so far (the DataModule refuses entries without a file)."""
    import yaml

    declared = {name: {"task": "retrieval", **({"language": stats["language"]}
                                               if stats["language"] != UNKNOWN_LANGUAGE else {})}
                for name, stats in _finished(stats_dir).items() if (out / f"{name}.jsonl").is_file()}
    write_atomic(out / SIDECAR_NAME, yaml.safe_dump(declared, sort_keys=True, allow_unicode=True))


def write_report(out: Path, stats_dir: Path, config: DictConfig, mining: MiningConfig, names: list[str]) -> dict:
    """``report.json`` and ``report.md`` over this run's sources (mined now or before)."""
    finished = _finished(stats_dir)
    sources = {name: {key: value for key, value in finished[name].items() if key != "settings"}
               for name in names if name in finished}
    total = {key: sum(stats[key] for stats in sources.values())
             for key in ("queries", "rows_written", "rows_too_few_negatives", "candidates", "texts_encoded",
                         "encode_seconds", "seconds")}
    total["removed"] = {rule: sum(stats["removed"][rule] for stats in sources.values()) for rule in RULES}
    total["queries_per_s"] = total["queries"] / total["seconds"] if total["seconds"] else 0.0
    total["texts_encoded_per_s"] = total["texts_encoded"] / total["encode_seconds"] if total["encode_seconds"] else 0.0
    report = {"experiment": config.name, "out": str(out), "model": mining.model,
              "options": dataclasses.asdict(mining), "total": total, "sources": sources}
    write_atomic(out / "report.json", json.dumps(report, ensure_ascii=False, indent=1))
    write_atomic(out / "report.md", report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    """The report for a human: one table row per source, the removals, negatives per row, and a sample."""
    options = report["options"]
    recipe = ", ".join(f"{key} {options[key]}" for key in ("top_k", "skip_top", "max_score", "max_ratio", "keep",
                                                           "min_negatives", "max_queries", "max_pool"))
    lines = [f"# Hard negatives for `{report['experiment']}`", "",
             f"Model: `{report['model']}`. Recipe: {recipe}. Removed candidates count under the first rule that "
             f"removes them, in the order {', '.join(RULES)}. Seconds and throughput are the pass that mined the "
             "source: encodings it found in the cache cost it nothing.", "",
             "| source | queries | pool | candidates/query | " + " | ".join(f"{rule}/query" for rule in RULES)
             + " | rows written | too few | negatives/row | s | queries/s | texts encoded/s |",
             "|---" * (10 + len(RULES)) + "|"]
    rows = [*report["sources"].items(), ("**total**", report["total"])]
    for name, stats in rows:
        queries = max(1, stats["queries"])
        removed = " | ".join(f"{stats['removed'][rule] / queries:.1f}" for rule in RULES)
        pool = stats.get("pool", "")
        mean = f"{stats['mean_negatives_per_written_row']:.1f}" if "mean_negatives_per_written_row" in stats else ""
        lines.append(f"| {name} | {stats['queries']} | {pool} | {stats['candidates'] / queries:.1f} | {removed} | "
                     f"{stats['rows_written']} | {stats['rows_too_few_negatives']} | {mean} | {stats['seconds']:.0f} | "
                     f"{stats['queries_per_s']:.1f} | {stats['texts_encoded_per_s']:.1f} |")
    lines += ["", "## Negatives per row (before the min_negatives cut)", ""]
    lines += [f"- {name}: " + ", ".join(f"{count}: {rows}" for count, rows in stats["negatives_per_row"].items())
              for name, stats in report["sources"].items()]
    lines += ["", "## Sample", ""]
    for name, stats in report["sources"].items():
        for sample in stats["sample"]:
            lines += [f"**{name}** query: {sample['query']}", f"- positive ({sample['positive_score']:.3f}): "
                      f"{sample['positive']}"]
            lines += [f"- negative {i + 1} ({negative['score']:.3f}): {negative['text']}"
                      for i, negative in enumerate(sample["negatives"])]
            lines.append("")
    return "\n".join(lines) + "\n"


def mine_and_report(name: str, args: list[str]) -> int:
    config, mining = compose_mining(name, args)
    report = mine(config, mining)
    out, total = report["out"], report["total"]
    encoded = (f"{total['texts_encoded']} texts encoded, {total['texts_encoded_per_s']:.1f}/s" if total["texts_encoded"]
               else "every encoding from the cache")
    print(f"\nmined {total['rows_written']} rows from {total['queries']} queries in {total['seconds']:.0f} s "
          f"({total['queries_per_s']:.1f} queries/s; {encoded}) into {out}")
    print(f"report: {out}/report.md\ntrain with and without the mined negatives (identical query/passage batches):")
    print(f'  make exp NAME={name} ARGS="data.corpus=folder data.dir={out} resume=false"')
    print(f'  make exp NAME={name} ARGS="data.corpus=folder data.dir={out} data.negatives.retrieval=0 resume=false"')
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    options = ", ".join(f"{field.name}={field.default}" for field in dataclasses.fields(MiningConfig))
    return run_command(argv, "python -m datamodules.mining NAME [mine.key=value ...] [key=value ...]",
                       f"experiments: {', '.join(available_experiments())}\nmining options (mine.key=value): "
                       f"{options}", mine_and_report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
