"""The mteb side of a probe: one grid cell as an mteb encoder, evaluated with ``mteb.evaluate`` (cache off).

Imported lazily, inside the probe's RNG guard (mteb reseeds the global generators on import).
"""

from __future__ import annotations

import contextlib
import functools
import io
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from unittest import mock

import mteb
import numpy as np
import torch
import torch.nn.functional as F
from mteb._create_dataloaders import create_dataloader
from mteb._evaluators import retrieval_metrics
from mteb._evaluators.text import bitext_mining_evaluator
from mteb._requires_package import _mteb_distribution
from mteb.abstasks import retrieval
from mteb.abstasks.abstask import AbsTask
from mteb.models import search_wrappers
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.results import task_result
from mteb.types import PromptType
from scipy.integrate import trapezoid
from sklearn.metrics import auc as sklearn_auc
from torch.utils.data import DataLoader, Dataset, SequentialSampler

if TYPE_CHECKING:
    from evaluation.encoding import GridEncoder


def model_meta(name: str, revision: str, embed_dim: int | list[int], n_parameters: int | None,
               uses_prefixes: bool) -> ModelMeta:
    """Real metadata: without it mteb silently substitutes an empty ``ModelMeta``."""
    return ModelMeta(
        loader=None, name=name, revision=revision, release_date=None, languages=None, n_parameters=n_parameters,
        memory_usage_mb=None, max_tokens=None, embed_dim=embed_dim, license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["PyTorch"], similarity_fn_name="cosine",
        use_instructions=uses_prefixes, training_datasets=None)


def input_texts(inputs: DataLoader) -> list[str]:
    """The texts of an mteb dataloader, in order. A sequential loader over a ``datasets.Dataset`` is read as one
    column (per-row iteration costs ~0.1 ms per text, per cell, which dominated small probes)."""
    dataset = inputs.dataset
    if isinstance(inputs.sampler, SequentialSampler) and "text" in getattr(dataset, "column_names", ()):
        texts = list(dataset["text"][:])  # a slice of a datasets Column is one Arrow read, not one per row
    else:
        texts = [text for batch in inputs for text in batch["text"]]
    if not all(isinstance(text, str) for text in texts):
        raise TypeError("the probe encodes plain texts only (got a non-text input)")
    return texts


def prefix(tokenize, prompt_type: PromptType | None) -> str:
    """The run's passage prefix for retrieval documents, its query prefix for everything else (e5's usage)."""
    return tokenize.passage_prefix if prompt_type == PromptType.document else tokenize.query_prefix


class CellModel(AbsEncoder):
    """One grid cell (a layer, a dim, a model-side setting, ...) as an mteb encoder, read from the shared encoding.

    Texts get the run's query prefix, or its passage prefix for documents (e5: ``query: ``/``passage: ``); a task
    that calls ``encode`` without a prompt type (bitext mining) can declare each text's role in ``roles``.
    Embeddings are the cell's slice of the cached encoding, re-normalised; ``similarity`` is the cosine.

    Args:
        encoder: the model-side setting's :class:`~evaluation.encoding.GridEncoder`.
        cell: index into ``encoder.cache.cells`` (resolved at encode time: the first encode discovers the grid).
        meta: the model metadata (its revision names the step, so no result cache can match).
        may_encode: whether a text missing from the cache may be encoded now (only in the warm-up cell: encoding
            is a collective under DDP/FSDP2, and other cells may be scored in forked processes).
        roles: ``{text: prompt type}`` used when mteb passes none.
    """

    def __init__(self, encoder: GridEncoder, cell: int, meta: ModelMeta, may_encode: bool = True,
                 roles: dict[str, PromptType] | None = None) -> None:
        self.encoder, self.cell, self.mteb_model_meta, self.may_encode = encoder, cell, meta, may_encode
        self.roles = roles or {}

    def keys(self, inputs: DataLoader, prompt_type: PromptType | None) -> list[str]:
        """The texts as the model reads them: prefixed by their role."""
        tokenize = self.encoder.tokenize
        return [prefix(tokenize, prompt_type or self.roles.get(text)) + text for text in input_texts(inputs)]

    def encode(self, inputs: DataLoader, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> torch.Tensor:
        texts = self.keys(inputs, prompt_type)
        if self.may_encode:
            self.encoder.encode_missing(texts)
        elif any(text not in self.encoder.cache for text in texts):
            raise RuntimeError(f"{task_metadata.name} asked for texts that were not encoded in its warm-up cell; the "
                               f"other cells are scored from that encoding, on other devices and processes")
        return self.encoder.cache.lookup(texts, self.cell)

    def embed(self, texts: list[str], role: str) -> torch.Tensor:
        """The cell's embeddings of cached ``texts`` read as a ``"query"`` or a ``"document"`` (the
        :data:`~evaluation.query_scores.Embed` of per-query scores)."""
        prompt_type = PromptType.document if role == "document" else PromptType.query
        return self.encoder.cache.lookup([prefix(self.encoder.tokenize, prompt_type) + text for text in texts],
                                         self.cell)

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        return _unit(embeddings1) @ _unit(embeddings2).T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        return (_unit(embeddings1) * _unit(embeddings2)).sum(-1)


def _unit(embeddings) -> torch.Tensor:
    return F.normalize(torch.as_tensor(embeddings), dim=-1)


class TextColumn(Dataset):
    """Texts that read like a one-column ``datasets.Dataset``: ``column["text"]`` is the list, rows are
    ``{"text": ...}`` (what :func:`input_texts` and mteb's loaders read)."""

    column_names = ("text",)

    def __init__(self, texts) -> None:
        self.texts = list(texts[:])  # a datasets Column: one Arrow read

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, key):
        return self.texts if key == "text" else {"text": self.texts[key]}


def text_loader(text, batch_size: int = 32, **kwargs) -> DataLoader:
    """mteb's ``_create_dataloader_from_texts`` without its Arrow dataset: building one per subset and cell
    fingerprints it by pickling every text (~30 ms each; 20 per bitext cell, the largest share of a probe)."""
    return DataLoader(TextColumn(text), batch_size=batch_size)


_prepared_loaders: dict[tuple, DataLoader] = {}


def shared_loader(dataset, **kwargs) -> DataLoader:
    """mteb's ``create_dataloader``, once per dataset content and settings: a retrieval task prepares the same
    queries and corpus (``datasets`` maps) again for every cell. Keyed by the content itself (the filtered queries
    get a new random fingerprint at every evaluation)."""
    content = tuple((name, tuple(map(str, values))) for name, values in dataset[:].items())
    key = (content, kwargs["task_metadata"].name, kwargs.get("prompt_type"), str(kwargs.get("input_column")),
           kwargs.get("batch_size"))
    if key not in _prepared_loaders:
        if len(_prepared_loaders) >= 16:  # a few tasks' queries and corpora; older probes' entries go
            _prepared_loaders.pop(next(iter(_prepared_loaders)))
        _prepared_loaders[key] = create_dataloader(dataset, **kwargs)
    return _prepared_loaders[key]


def trapezoid_auc(x, y) -> float:
    """sklearn's ``auc`` without its input validation (~1 ms per call; mteb's retrieval nAUCs call it 60 times per
    cell): the same scipy ``trapezoid`` for increasing ``x`` (mteb's abstention rates), sklearn's own otherwise."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 1 or x.shape != y.shape or x.shape[0] < 2 or np.any(np.diff(x) < 0):
        return sklearn_auc(x, y)
    return float(trapezoid(y, x))


def queries_with_positives(relevant_docs: dict, queries) -> tuple[dict, Any]:
    """mteb's ``_filter_queries_without_positives`` reading the query ids in one Arrow read (not row by row), and
    returning the queries as they are when it keeps all of them (mteb stores the filtered queries back into the
    task, so every cell after the first filters them again)."""
    kept_docs = {query: documents for query, documents in relevant_docs.items() if len(documents)}
    ids = list(queries["id"][:])
    kept = [i for i, query in enumerate(ids) if query in kept_docs]
    return kept_docs, queries if len(kept) == len(ids) else queries.select(kept)


def no_progress_bar(iterable, *args, **kwargs):
    """tqdm's signature, the iterable itself (mteb's bitext evaluator draws two bars per subset and cell)."""
    return iterable


@functools.cache
def mteb_version() -> SimpleNamespace:
    """What mteb's result handling reads of its distribution, its ``version``, read once (mteb re-parses the
    installed metadata for every result, ~5 ms each)."""
    return SimpleNamespace(version=_mteb_distribution().version)


@contextlib.contextmanager
def light_mteb():
    """mteb (2.26) with lighter equivalents of some of its helpers: :func:`text_loader` and :func:`shared_loader` in
    place of its two loader factories, :func:`trapezoid_auc` for sklearn's ``auc``, :func:`queries_with_positives`,
    no bitext progress bars, :func:`mteb_version` (same texts, same order, same scores:
    ``test_light_mteb_gives_mteb_s_scores``)."""
    replacements = [(bitext_mining_evaluator, "_create_dataloader_from_texts", text_loader),
                    (search_wrappers, "create_dataloader", shared_loader),
                    (retrieval_metrics, "auc", trapezoid_auc),
                    (retrieval, "_filter_queries_without_positives", queries_with_positives),
                    (bitext_mining_evaluator, "tqdm", no_progress_bar),
                    (task_result, "_mteb_distribution", mteb_version)]
    with contextlib.ExitStack() as stack:
        for module, name, light in replacements:
            stack.enter_context(mock.patch.object(module, name, light))
        yield


def evaluate(model: AbsEncoder, task: AbsTask, batch_size: int) -> dict:
    """``{"main_score", <every numeric score averaged over subsets>, "subsets": {subset: main score}}``.

    mteb's result cache is off: a cached result for the same model name and revision would be returned as is.
    Its progress bars (some of which cannot be switched off) are silenced; exceptions propagate. Its data
    loaders and some helpers are the light ones of :func:`light_mteb` (mteb's own cost more than the scoring).
    """
    with contextlib.redirect_stderr(io.StringIO()), light_mteb():
        result = mteb.evaluate(model, task, cache=None, overwrite_strategy="always", show_progress_bar=False,
                               encode_kwargs={"batch_size": batch_size, "show_progress_bar": False})
    splits = result.task_results[0].scores
    rows = {(f"{split}/" if len(splits) > 1 else "") + row["hf_subset"]: row
            for split in splits for row in splits[split]}
    first = next(iter(rows.values()))
    numeric = [key for key, value in first.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
               and all(isinstance(row.get(key), (int, float)) for row in rows.values())]
    scores = {key: float(sum(row[key] for row in rows.values()) / len(rows)) for key in numeric}
    scores["subsets"] = {subset: float(row["main_score"]) for subset, row in rows.items()}
    return scores
