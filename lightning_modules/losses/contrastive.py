"""Hard-negative and in-batch InfoNCE losses on cosine similarity, as in ML-Embed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.losses.gather import GATHER_MODES, gather_positives


class ContrastiveLoss:
    """Sum of two separate softmaxes over cosine similarities divided by the temperature τ.

    - hard-negative: each query against ``[its positive, its own hard negatives]``, target 0;
    - in-batch: each query against every positive of the global batch (all devices), target its own.

    The hard-negative term needs negatives in the batch; the in-batch term can be switched off per source
    (clustering / classification data in the paper). Embeddings are L2-normalised here, so every MRL
    truncation is re-normalised before the cosine.

    Args:
        temperature: τ (paper: 0.05).
        hard_negative: compute the hard-negative term when the batch has negatives.
        in_batch: compute the in-batch term.
        gather: cross-device positives, ``none`` | ``local`` | ``full`` (see :func:`gather_positives`).

    References:
        Zhang et al., "ML-Embed: Inclusive and Efficient Embeddings for a Multilingual World", ICML 2026, §3.

    Example:
        >>> loss = ContrastiveLoss(temperature=0.05)
        >>> parts = loss(embeddings, num_queries=8, negatives_per_query=7)  # {"hard": ..., "in_batch": ...}
    """

    def __init__(self, temperature: float = 0.05, hard_negative: bool = True, in_batch: bool = True,
                 gather: str = "full") -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not (hard_negative or in_batch):
            raise ValueError("at least one of hard_negative and in_batch must be on")
        if gather not in GATHER_MODES:
            raise ValueError(f"gather mode {gather!r}; allowed: {', '.join(GATHER_MODES)}")
        self.temperature = temperature
        self.hard_negative = hard_negative
        self.in_batch = in_batch
        self.gather = gather

    def __call__(self, embeddings: Tensor, num_queries: int, negatives_per_query: int = 0,
                 in_batch: bool = True) -> dict[str, Tensor]:
        """Loss terms for one view, or for a stack of views of equal width (one value per view).

        Args:
            embeddings: ``[B + B + B·k, width]``: queries, positives, then each query's k negatives; or
                ``[views, B + B + B·k, width]`` for several views at once (terms are then ``[views]``).
            num_queries: B.
            negatives_per_query: k (0: no hard-negative term).
            in_batch: this batch's source allows in-batch negatives.
        """
        stacked = embeddings if embeddings.dim() == 3 else embeddings.unsqueeze(0)
        expected = num_queries * (2 + negatives_per_query)
        if stacked.shape[1] != expected:
            raise ValueError(f"{stacked.shape[1]} embeddings, expected {expected} for {num_queries} queries "
                             f"with {negatives_per_query} negatives each")
        num_views = stacked.shape[0]
        normed = F.normalize(stacked, dim=-1)
        queries, positives = normed[:, :num_queries], normed[:, num_queries: 2 * num_queries]
        terms: dict[str, Tensor] = {}
        if self.hard_negative and negatives_per_query:
            negatives = normed[:, 2 * num_queries:].reshape(num_views, num_queries, negatives_per_query, -1)
            candidates = torch.cat([positives.unsqueeze(2), negatives], dim=2)
            logits = torch.einsum("vbd,vbkd->vbk", queries, candidates) / self.temperature
            terms["hard"] = _mean_cross_entropy(logits, torch.zeros(num_queries, dtype=torch.long,
                                                                    device=logits.device))
        if self.in_batch and in_batch:
            # Rows of the batch first, so devices concatenate their positives along the batch.
            gathered, offset = gather_positives(positives.transpose(0, 1).contiguous(), self.gather)
            logits = queries @ gathered.permute(1, 2, 0) / self.temperature
            terms["in_batch"] = _mean_cross_entropy(logits, torch.arange(num_queries, device=logits.device) + offset)
        if not terms:
            raise ValueError("no loss term applies: the batch has no hard negatives and in-batch loss is off")
        return terms if embeddings.dim() == 3 else {name: value[0] for name, value in terms.items()}

    def per_view(self, embeddings: list[Tensor], num_queries: int, negatives_per_query: int = 0,
                 in_batch: bool = True) -> list[dict[str, Tensor]]:
        """The terms of each view: views of equal width are stacked and computed together (a few batched kernels
        instead of a few per view, which dominates a GPU step with dozens of views)."""
        groups: dict[tuple, list[int]] = {}
        for index, view_embeddings in enumerate(embeddings):
            groups.setdefault(tuple(view_embeddings.shape), []).append(index)
        results: list[dict[str, Tensor]] = [{} for _ in embeddings]
        for indices in groups.values():
            terms = self(torch.stack([embeddings[index] for index in indices]), num_queries, negatives_per_query,
                         in_batch)
            for position, index in enumerate(indices):
                results[index] = {name: value[position] for name, value in terms.items()}
        return results


def _mean_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of ``[views, B, classes]`` logits against the same ``[B]`` targets: one mean per view."""
    num_views, num_queries = logits.shape[:2]
    losses = F.cross_entropy(logits.flatten(0, 1), targets.repeat(num_views), reduction="none")
    return losses.view(num_views, num_queries).mean(dim=1)
