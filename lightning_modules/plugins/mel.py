"""MEL: Matryoshka Embedding Learning, nested rank of the token-embedding matrix."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contracts.config_error import ConfigError
from lightning_modules.costs import TOKEN_EMBEDDING, Part
from lightning_modules.plugins.base import (ModelSidePlugin, PosthocConfig, check_posthoc, checked_ladder,
                                           ladder_probabilities)

if TYPE_CHECKING:
    from lightning_modules.backbone_adapter import Backbone, BackboneInfo
    from contracts.cells import Cell
    from lightning_modules.costs import CellCost

FACTORIZED_MODE = "factorized"
FACTORIZED_CODE_FILE = "modeling_factorized.py"
# The head of the modeling file written next to a factorized export; transformers imports the file with
# trust_remote_code=True. It must not import this project (the folder has to load anywhere transformers is
# installed), so the file carries the source of FactorizedEmbedding itself, then the two classes below.
FACTORIZED_CODE_HEAD = '''"""Token embedding kept as two factors, E[ids] = U[ids] @ V (matryoshka-lab, MODE=factorized).

Load with ``AutoModel.from_pretrained(path, trust_remote_code=True)`` or
``SentenceTransformer(path, trust_remote_code=True)``; ``config.matryoshka_rank`` is the rank r. The model type
``{model_type}`` is unknown to transformers on purpose: loading without this file fails instead of silently
building a random full-size embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import {config_base} as _BaseConfig
from transformers import {base} as _Base
'''
FACTORIZED_CODE_TAIL = '''

class {config_name}(_BaseConfig):
    model_type = "{model_type}"


class {name}(_Base):
    config_class = {config_name}

    def __init__(self, config) -> None:
        super().__init__(config)
        rank, vocab, width = config.matryoshka_rank, config.vocab_size, config.hidden_size
        self.set_input_embeddings(FactorizedEmbedding(torch.zeros(vocab, rank), torch.zeros(rank, width)))
'''


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
class MELConfig(PosthocConfig):
    """``posthoc: true``: train the model's own embedding untouched and only probe/export the ranks: a setting r swaps
    in the rank-r truncated SVD of the current embedding and restores it afterwards (the baseline "truncated
    afterwards")."""

    rank: int | None = None
    """Largest rank R kept from the SVD; default ``hidden_size // 2`` (the paper: 512 of 1024)."""
    ranks: list[int] | None = None
    """Rank ladder sampled from; default ``{2^i : i = 6..14, 2^i <= R} ∪ {R}``."""
    probabilities: list[float] | None = None
    """Sampling weight per entry of ``ranks`` (normalised); default proportional to the rank."""


class MEL(ModelSidePlugin):
    """Replaces the token embedding by its SVD factors and trains one sampled rank per step.

    ``setup`` computes ``E = U S Vh`` once and swaps the model's embedding for
    ``U_R = U[:, :R] · diag(S[:R])``, ``V_R = Vh[:R]`` (:class:`FactorizedEmbedding`); the original matrix leaves
    the model, so the optimizer never sees it. Each step uses rank ``r`` drawn from the ladder with
    probability ∝ r (R = 512: ranks 512, 256, 128, 64 with p = 0.533, 0.267, 0.133, 0.067), from a generator
    seeded by (seed, global step): every device draws the same rank and a resumed run repeats the sequence.
    No extra loss term: the step's input embeddings change; views are tagged ``rank=r``.
    Deployed parameters at rank r: ``vocab·r + r·d``. Export writes ``U[:, :r]·V[:r]`` as a plain embedding matrix
    (``compat``) or keeps the two factors (``factorized``, with a short modeling file for ``trust_remote_code``).

    Args:
        config: ``rank``, ``ranks`` and ``probabilities`` (see :class:`MELConfig`).
        info: the backbone's sizes; R must be in ``[1, min(vocab, hidden_size)]``.
        seed: the run's seed, mixed with the step for rank sampling.

    References:
        Zhang et al., "ML-Embed: Inclusive and Efficient Embeddings for a Multilingual World", ICML 2026, §3.

    With ``posthoc: true`` nothing changes in training: the model keeps (and trains) its own embedding matrix, the
    untruncated setting (tagged with the full rank ``min(vocab, d)``, left out of cell names: ``layer_4/dim_384``).
    Only the tools' other settings (probe, export) factorise: inside ``applied(r)`` the embedding is replaced by the
    rank-r truncated SVD of its current weights, and the original module is back on exit. The probe scores the
    untruncated setting as well as every rank.

    Example:
        ``plugins: {mel: {rank: 256}}`` trains ranks 256, 128, 64 with probabilities 4/7, 2/7, 1/7.
        ``plugins: {mel: {rank: 256, posthoc: true}}`` trains the full embedding and probes it and ranks 256, 128, 64.
    """

    Config = MELConfig
    stage = 30
    tag = "rank"
    export_modes = (FACTORIZED_MODE,)

    def __init__(self, config: MELConfig, info: BackboneInfo, seed: int) -> None:
        super().__init__(config, info, seed)
        limit = min(info.vocab_size, info.hidden_size)
        max_rank = info.hidden_size // 2 if config.rank is None else config.rank
        if not 1 <= max_rank <= limit:
            raise ConfigError("rank", f"{max_rank} not allowed: must be an integer in [1, {limit}] "
                              f"(min of vocab {info.vocab_size} and hidden size {info.hidden_size})")
        ranks = checked_ladder("ranks", default_ranks(max_rank) if config.ranks is None else list(config.ranks),
                               max_rank, "plugins.mel.rank", default_ranks(max_rank))
        check_posthoc(config, "probabilities", config.probabilities)
        self.max_rank = max_rank
        self.settings = sorted(ranks, reverse=True)
        self.probabilities = ladder_probabilities("probabilities", config.probabilities, ranks, self.settings)
        # posthoc: the model's own embedding is a setting too, the untruncated one at the matrix's full rank
        # (:meth:`untouched`: training computes with it and its cells are named without a rank, the same deployable
        # model as a run without MEL); never sampled.
        self.full_rank = limit
        if self.posthoc and limit not in self.settings:
            self.settings, self.probabilities = [limit, *self.settings], [0.0, *self.probabilities]
        self.embedding: FactorizedEmbedding | None = None  # the factors: trained, or (posthoc) of the SVD
        self.backbone: Backbone | None = None
        self.trained: nn.Module | None = None  # posthoc: the model's own embedding, restored after a setting
        self._svd_of: tuple | None = None  # posthoc: (weight storage, version) the cached factors were computed from

    def setup(self, backbone: Backbone) -> None:
        self.backbone = backbone
        if self.posthoc:  # training keeps (and trains) the model's own embedding
            self.trained = backbone.input_embeddings()
            return
        self.embedding = FactorizedEmbedding.from_svd(backbone.input_embeddings().weight, self.max_rank)
        backbone.replace_input_embeddings(self.embedding)

    def untouched(self) -> int | None:
        """posthoc: the full rank, the model's own embedding untruncated; trained MEL: None (its embedding is
        replaced by rank-R factors, so no cell is the model not cut along this axis and every name says its rank)."""
        return self.full_rank if self.posthoc else None

    def current(self) -> int:
        """The active rank; the full rank while a posthoc run computes with its own embedding (training)."""
        if self.backbone is None:
            raise RuntimeError("MEL.setup(backbone) must run before the model is used")
        return self.embedding.rank if self.backbone.input_embeddings() is self.embedding else self.full_rank

    def set(self, rank: int) -> None:
        own = self.posthoc and rank == self.full_rank  # posthoc: the model's own embedding, untruncated
        factors = self.trained if own else self._factors()
        if not own:
            factors.rank = rank
        if self.backbone.input_embeddings() is not factors:  # posthoc: swap the factors in, or the embedding back
            self.backbone.replace_input_embeddings(factors)

    def _factors(self) -> FactorizedEmbedding:
        """The factors a setting uses: the trained ones, or (posthoc) the rank-R truncated SVD of the trained
        embedding's current weights, recomputed only after they changed (the optimizer's in-place updates bump the
        tensor's version)."""
        if self.trained is None:
            return self.embedding
        weight = self.trained.weight
        state = (weight.untyped_storage().data_ptr(), weight._version)
        if self.embedding is None or self._svd_of != state:
            self.embedding = FactorizedEmbedding.from_svd(weight, self.max_rank).requires_grad_(False)
            self._svd_of = state
        return self.embedding

    def export(self, model: nn.Module, rank: int, mode: str) -> tuple[dict[str, str], dict[str, object]]:
        if self.posthoc and rank == self.full_rank:
            return {}, {}  # the model's own embedding, untruncated
        factors = self._factors()
        with torch.no_grad():
            if mode != FACTORIZED_MODE:
                model.set_input_embeddings(nn.Embedding.from_pretrained(
                    factors.merged_weight(rank), freeze=False, padding_idx=getattr(model.config, "pad_token_id", None)))
                return {}, {}
            model.set_input_embeddings(FactorizedEmbedding(factors.left[:, :rank].clone(),
                                                           factors.right[:rank].clone()))
        names = {"base": type(model).__name__, "config_base": type(model.config).__name__,
                 "model_type": f"{model.config.model_type}_factorized"}
        names |= {"name": f"Factorized{names['base']}", "config_name": f"Factorized{names['config_base']}"}
        code = FACTORIZED_CODE_FILE.removesuffix(".py")
        source = (FACTORIZED_CODE_HEAD.format(**names) + "\n\n" + inspect.getsource(FactorizedEmbedding)
                  + FACTORIZED_CODE_TAIL.format(**names))
        return ({FACTORIZED_CODE_FILE: source},
                {"model_type": names["model_type"], "architectures": [names["name"]], "matryoshka_rank": rank,
                 "auto_map": {"AutoConfig": f"{code}.{names['config_name']}", "AutoModel": f"{code}.{names['name']}"}})

    def cost(self, cell: Cell, cost: CellCost, mode: str) -> CellCost:
        """The token embedding of the export: the merged ``vocab × d`` matrix (a lookup) in ``compat`` mode; in
        ``factorized`` mode the two factors, ``vocab·r + r·d`` parameters and ``2·r·d`` FLOPs per token."""
        rank, info = cell.tags.get(self.tag, self.settings[0]), self.info  # untagged: the largest rank
        if mode == FACTORIZED_MODE:
            return cost.with_model_part(TOKEN_EMBEDDING, Part(rank * (info.vocab_size + info.hidden_size),
                                                              2 * rank * info.hidden_size))
        return cost.with_model_part(TOKEN_EMBEDDING, Part(info.vocab_size * info.hidden_size, 0))

    def card_lines(self, cell: Cell) -> list[str]:
        rank, info = cell.tags[self.tag], self.info
        if self.posthoc and rank == self.full_rank:
            return []  # the model's own embedding: nothing to say about a rank
        trained = "none: truncated after training" if self.posthoc else self.trained_settings()
        return ["", "## Token embedding (MEL)", "",
                f"Rank {rank} of the SVD factors (trained ranks {trained}): `vocab·r + r·d` = "
                f"{rank * (info.vocab_size + info.hidden_size):,} parameters factorized (`make export MODE=factorized`"
                f", loads with `trust_remote_code=True`), {info.vocab_size * info.hidden_size:,} as the merged matrix "
                f"`U[:, :r]·V[:r]` (`compat`)."]
