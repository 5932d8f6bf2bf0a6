"""MEL: Matryoshka Embedding Learning, nested rank of the token-embedding matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.plugins.base import MatryoshkaPlugin, PluginConfig, PluginConfigError, checked_ladder, checked_weights

if TYPE_CHECKING:
    from lightning_modules.backbone import Backbone, BackboneInfo
    from lightning_modules.views import EmbeddingBundle, View


def default_ranks(rank: int) -> list[int]:
    """The paper's ladder, descending: ``{2^i : i = 6..14, 2^i <= r} ∪ {r}``."""
    return sorted({2**i for i in range(6, 15) if 2**i <= rank} | {rank}, reverse=True)


class FactorizedEmbedding(nn.Module):
    """Token embedding ``E ≈ U · V`` whose active rank ``r`` can change every step.

    ``forward`` gathers the rows of the batch's tokens first, ``U[ids, :r] @ V[:r]``: tokens·r·d work instead of
    the vocab·r·d of building the full matrix and indexing it (the reference implementation).

    Args:
        left: ``U[:, :R] · diag(S[:R])``, shape ``[vocab, R]``.
        right: ``Vh[:R]``, shape ``[R, d]``.
    """

    def __init__(self, left: Tensor, right: Tensor) -> None:
        super().__init__()
        self.left = nn.Parameter(left)
        self.right = nn.Parameter(right)
        self.max_rank = left.shape[1]
        self.rank = self.max_rank
        self.num_embeddings, self.embedding_dim = left.shape[0], right.shape[1]

    @classmethod
    def from_svd(cls, weight: Tensor, rank: int) -> FactorizedEmbedding:
        """Truncated SVD of ``weight`` (vocab × d), computed in float32."""
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        left = (u[:, :rank] * s[:rank]).to(weight.dtype).contiguous()
        return cls(left, vh[:rank].to(weight.dtype).contiguous())

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.left)[..., : self.rank] @ self.right[: self.rank]

    def forward_materialized(self, input_ids: Tensor) -> Tensor:
        """The reference's way (builds vocab × d, then indexes); kept for equality tests and ``make bench``."""
        return (self.left[:, : self.rank] @ self.right[: self.rank])[input_ids]

    def merged_weight(self, rank: int | None = None) -> Tensor:
        """``U[:, :r] · V[:r]`` as a plain embedding matrix ("compatibility mode" export)."""
        rank = self.rank if rank is None else rank
        return self.left[:, :rank] @ self.right[:rank]

    def num_parameters(self, rank: int | None = None) -> int:
        """Deployed size at rank ``r``: ``vocab·r + r·d``."""
        rank = self.max_rank if rank is None else rank
        return rank * (self.num_embeddings + self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, max_rank={self.max_rank}, rank={self.rank}"


@dataclass
class MELConfig(PluginConfig):
    rank: int | None = None
    """Largest rank R kept from the SVD; default ``hidden_size // 2`` (the paper: 512 of 1024)."""
    ranks: list[int] | None = None
    """Rank ladder sampled from; default ``{2^i : i = 6..14, 2^i <= R} ∪ {R}``."""
    probabilities: list[float] | None = None
    """Sampling weight per entry of ``ranks`` (normalised); default proportional to the rank."""


class MEL(MatryoshkaPlugin):
    """Replaces the token embedding by its SVD factors and trains one sampled rank per step.

    ``setup`` computes ``E = U S Vh`` once and swaps the model's embedding for
    ``U_R = U[:, :R] · diag(S[:R])``, ``V_R = Vh[:R]`` (:class:`FactorizedEmbedding`); the original matrix leaves
    the model, so the optimizer never sees it. Each step uses rank ``r`` drawn from the ladder with
    probability ∝ r (R = 512: ranks 512, 256, 128, 64 with p = 0.533, 0.267, 0.133, 0.067), from a generator
    seeded by (seed, global step): every device draws the same rank and a resumed run repeats the sequence.
    No extra loss term: the step's input embeddings change; views are tagged ``rank=r``.
    Deployed parameters at rank r: ``vocab·r + r·d``.

    Args:
        config: ``rank``, ``ranks`` and ``probabilities`` (see :class:`MELConfig`).
        info: the backbone's sizes; R must be in ``[1, min(vocab, hidden_size)]``.
        seed: the run's seed, mixed with the step for rank sampling.

    References:
        Zhang et al., "ML-Embed: Inclusive and Efficient Embeddings for a Multilingual World", ICML 2026, §3.

    Example:
        ``plugins: {mel: {rank: 256}}`` trains ranks 256, 128, 64 with probabilities 4/7, 2/7, 1/7.
    """

    Config = MELConfig
    stage = 30

    def __init__(self, config: MELConfig, info: BackboneInfo, seed: int) -> None:
        super().__init__(config, info, seed)
        limit = min(info.vocab_size, info.hidden_size)
        max_rank = info.hidden_size // 2 if config.rank is None else config.rank
        if not 1 <= max_rank <= limit:
            raise PluginConfigError("rank", f"{max_rank} not allowed: must be an integer in [1, {limit}] "
                                    f"(min of vocab {info.vocab_size} and hidden size {info.hidden_size})")
        ranks = checked_ladder("ranks", default_ranks(max_rank) if config.ranks is None else list(config.ranks),
                               max_rank, "plugins.mel.rank", default_ranks(max_rank))
        self.max_rank = max_rank
        self.ranks = sorted(ranks, reverse=True)
        explicit = checked_weights("probabilities", config.probabilities, ranks)
        weights = self.ranks if explicit is None else [explicit[r] for r in self.ranks]
        self.probabilities = [weight / sum(weights) for weight in weights]
        self.embedding: FactorizedEmbedding | None = None

    def setup(self, backbone: Backbone) -> None:
        self.embedding = FactorizedEmbedding.from_svd(backbone.input_embeddings().weight, self.max_rank)
        backbone.replace_input_embeddings(self.embedding)

    def rank_at(self, step: int) -> int:
        """The rank of global step ``step``: a pure function of (seed, step)."""
        return int(self.step_rng(step).choice(self.ranks, p=self.probabilities))

    def before_forward(self, step: int) -> None:
        if self.embedding is None:
            raise RuntimeError("MEL.setup(backbone) must run before the first forward")
        self.embedding.rank = self.rank_at(step)

    def expand(self, views: list[View], bundle: EmbeddingBundle) -> list[View]:
        return [view.derive(rank=self.embedding.rank) for view in views]

    def step_metrics(self) -> dict[str, float]:
        return {"mel/rank": float(self.embedding.rank)}
