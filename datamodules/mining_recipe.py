"""The hard-negative recipe on embeddings, and its options (``mine.<key>``).

An embedding model retrieves each query's top ``top_k`` passages from its source's passage pool, the first
``skip_top`` ranks are dropped (likely false negatives), candidates must score below ``max_score`` and below
``max_ratio`` times the positive's score, and the best ``keep`` survivors become ``negative_1`` …
``negative_keep``. Translation data needs one more rule: rows that share a query or passage text (compared by
:func:`text_key`) are one group (union-find), and no member of the positive's group — the positive itself, a copy
of it, another translation of the same English source — is ever a negative.

Retrieval is exact: a chunked matmul and ``topk`` over L2-normalised embeddings. The pools here (a source's
distinct passages, ~16 k for the largest gettext locale) are far below the size where an approximate index pays.
"""

from __future__ import annotations

import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPTION_PREFIX = "mine."
BACKBONE = "backbone"
RULES = ("positive", "same_group", "skip_top", "max_score", "max_ratio", "keep")
"""Removal rules, in the order a removed candidate is attributed: each counts under the first rule that removes it."""
QUERY_CHUNK = 512  # queries per retrieval matmul: bounds memory at QUERY_CHUNK × pool floats


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
