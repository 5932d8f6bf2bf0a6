"""Per-query main scores of a cell: one value per query whose mean is the task's main score, so two runs can be
compared query by query (:mod:`evaluation.bootstrap`).

mteb computes per-query values internally (pytrec_eval) but returns only their mean, so they are computed again
here from the same embeddings and the same cosine similarities: retrieval nDCG@k per query (vectorised over queries,
checked against torchmetrics' ``retrieval_normalized_dcg``); bitext mining's accuracy as each translation's correctness (its nearest English
sentence of its locale is its source), weighted so that the plain mean over all queries is mteb's mean over
locales. ``test_query_scores_average_to_mteb_s_main_score`` checks the means against mteb's main scores (mteb
rounds retrieval scores to 5 decimals).

Tasks of other kinds or main scores (registry tasks, F1 main scores) have no per-query vector: their comparisons
have no intervals.

Files: beside a probe table ``probe_step_<n>.json`` its vectors are ``probe_step_<n>.queries.npz`` (float32, a
cells × queries matrix per task, with the query ids and cell names), read back by :func:`read_query_scores`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from contracts.atomic import replacing

QUERY_FILE_SUFFIX = ".queries.npz"

Embed = Callable[[list[str], str], torch.Tensor]
"""``embed(texts, role)``: the cell's embeddings of ``texts`` read as ``"query"`` or ``"document"``."""


def retrieval_query_scores(similarities: torch.Tensor, relevance: torch.Tensor, top_k: int,
                           candidates: list[list[int]] | None = None) -> np.ndarray:
    """nDCG@``top_k`` (linear gains) of each query (row) among ``candidates[i]`` (document columns; default: all), for
    all queries at once: one ``topk`` over the similarity matrix, the gains of the top ``top_k`` documents over the
    ideal ones.

    Why not torchmetrics' ``retrieval_normalized_dcg`` per query: ~0.4 ms per call, 0.85 s per task and cell for
    2,000 queries, most of a final evaluation's scoring (84 cells × 2 retrieval tasks). It stays the reference:
    ``test_retrieval_query_scores_equal_torchmetrics_per_query`` checks every value against it. Tied similarities
    (identical documents) are ranked in ``topk``'s order where torchmetrics averages over the tie, as pytrec_eval (mteb)
    breaks ties by document id."""
    scores = similarities.float()
    relevance = relevance.float()
    if candidates is not None:
        allowed = torch.zeros(scores.shape, dtype=torch.bool)
        for row, columns in enumerate(candidates):
            allowed[row, columns] = True
        scores = scores.masked_fill(~allowed, float("-inf"))
        relevance = relevance * allowed
    k = min(top_k, scores.shape[1])
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float32) + 2.0)
    top = scores.topk(k, dim=1)
    gains = relevance.gather(1, top.indices) * torch.isfinite(top.values)  # fewer than k candidates: no gain beyond
    ideal = (relevance.topk(k, dim=1).values * discount).sum(dim=1)
    dcg = (gains * discount).sum(dim=1)
    return torch.where(ideal > 0, dcg / ideal.clamp_min(1e-12), torch.zeros_like(dcg)).numpy().astype(np.float32)


def bitext_query_scores(similarities: list[torch.Tensor]) -> np.ndarray:
    """Per translation, 1 when its most similar English sentence of its subset (row ``i``: column ``i`` is its
    source) is its source, else 0; each subset's values weighted by ``queries / (subsets · subset queries)`` so the
    plain mean is the mean of the subsets' accuracies (mteb's main score)."""
    total = sum(len(subset) for subset in similarities)
    parts = [(subset.argmax(dim=1) == torch.arange(len(subset))).numpy().astype(np.float32)
             * (total / (len(similarities) * len(subset))) for subset in similarities]
    return np.concatenate(parts).astype(np.float32)


def _cosine(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    return F.normalize(queries.float(), dim=-1) @ F.normalize(documents.float(), dim=-1).T


def query_ids(task) -> list[str] | None:
    """The ids of the queries whose scores :func:`task_query_scores` returns, in its order; None when the task has
    no per-query main score."""
    main = task.metadata.main_score
    if task.metadata.type == "BitextMining" and main == "accuracy":
        return [f"{subset}/{index}" for subset, splits in task.dataset.items()
                for split in splits.values() for index in range(len(split))]
    if task.metadata.type == "Retrieval" and re.fullmatch(r"ndcg_at_\d+", main) and set(task.dataset) == {"default"}:
        return [query for split in task.dataset["default"].values() for query in split["queries"]["id"]]
    return None


def task_query_scores(task, embed: Embed) -> np.ndarray | None:
    """The per-query main scores of one cell (``embed``) on a task with data loaded, in :func:`query_ids` order;
    None when the task has no per-query main score."""
    if query_ids(task) is None:
        return None
    if task.metadata.type == "BitextMining":
        return bitext_query_scores([_cosine(embed(list(split["sentence1"]), "query"),
                                            embed(list(split["sentence2"]), "document"))
                                    for splits in task.dataset.values() for split in splits.values()])
    top_k = int(task.metadata.main_score.removeprefix("ndcg_at_"))
    parts = []
    for split in task.dataset["default"].values():
        queries, corpus = split["queries"], split["corpus"]
        document_ids = list(corpus["id"])
        column = {document: index for index, document in enumerate(document_ids)}
        texts = [(f"{title} {text}".strip() if title else text)
                 for title, text in zip(corpus["title"] if "title" in corpus.column_names else [""] * len(corpus),
                                        corpus["text"])]
        similarities = _cosine(embed(list(queries["text"]), "query"), embed(texts, "document"))
        relevance = torch.zeros(similarities.shape, dtype=torch.long)
        ids = list(queries["id"])
        for row, query in enumerate(ids):
            for document, grade in split["relevant_docs"].get(query, {}).items():
                if document in column:
                    relevance[row, column[document]] = int(grade)
        top_ranked = split.get("top_ranked")
        candidates = ([[column[document] for document in top_ranked[query]] for query in ids]
                      if top_ranked else None)
        parts.append(retrieval_query_scores(similarities, relevance, top_k, candidates))
    return np.concatenate(parts)


def query_file(table_file: str | Path) -> Path:
    """``probe_step_<n>.queries.npz`` beside ``probe_step_<n>.json``."""
    table_file = Path(table_file)
    return table_file.with_name(table_file.stem + QUERY_FILE_SUFFIX)


def write_query_scores(path: str | Path, query_scores: dict[str, dict]) -> Path:
    """Writes ``{task: {"ids": [...], "cells": {cell name: vector}}}`` as one compressed npz (by rename)."""
    arrays = {}
    for index, (task, entry) in enumerate(query_scores.items()):
        names = list(entry["cells"])
        arrays[f"task_{index}"] = np.array(task)
        arrays[f"ids_{index}"] = np.array(entry["ids"], dtype=str)
        arrays[f"cells_{index}"] = np.array(names, dtype=str)
        arrays[f"scores_{index}"] = np.stack([np.asarray(entry["cells"][name], dtype=np.float32) for name in names])
    path = Path(path)
    with replacing(path) as temporary, temporary.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def read_query_scores(path: str | Path) -> dict[str, dict]:
    """The per-query scores of a probe table (its ``.json`` or its ``.queries.npz``): ``{task: {"ids": [...],
    "cells": {cell name: float32 vector}}}``; ``{}`` when the table has none (probed before they were kept)."""
    path = Path(path)
    file = path if path.name.endswith(QUERY_FILE_SUFFIX) else query_file(path)
    if not file.is_file():
        return {}
    with np.load(file) as stored:
        return {str(stored[f"task_{index}"]): {
                    "ids": [str(query) for query in stored[f"ids_{index}"]],
                    "cells": dict(zip((str(name) for name in stored[f"cells_{index}"]), stored[f"scores_{index}"]))}
                for index in range(sum(key.startswith("task_") for key in stored.files))}
