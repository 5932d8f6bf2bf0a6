"""Backbone adapter: a Hugging Face model that returns pooled embeddings at every exit from ONE forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_modules.packing import (VARLEN, additive, block_mask, last_token_pool_packed, mean_pool_packed,
                                       use_varlen_attention, varlen_available)
from lightning_modules.views import EmbeddingBundle

Family = Literal["encoder", "decoder"]


@dataclass(frozen=True)
class BackboneInfo:
    """What configs are validated against, known before any weights load."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    family: Family
    intermediate_size: int
    """Hidden units of each block's feed-forward layer."""
    max_positions: int | None = None
    """Longest sequence the position embeddings cover (None: not limited or not known)."""


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Encoder pooling: mean over the tokens the attention mask keeps."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def last_token_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Decoder pooling: the last kept token (the EOS) of each right-padded sequence."""
    last = attention_mask.sum(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Backbone(nn.Module):
    """Wraps a Hugging Face base model (``BertModel``, ``XLMRobertaModel``, ``Qwen3Model``, ...).

    Args:
        model: the base model (no LM head), returning all hidden states on request.
        family: ``encoder`` (mean pooling) or ``decoder`` (last-token pooling, final norm on every exit).
    """

    def __init__(self, model: nn.Module, family: Family) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.exit_norm = getattr(model, "norm", None) if family == "decoder" else None
        if family == "decoder" and self.exit_norm is None:
            raise ValueError(f"decoder backbone {type(model).__name__} has no final `norm` module to apply at exits")

    @property
    def info(self) -> BackboneInfo:
        config = self.model.config
        return BackboneInfo(config.hidden_size, config.num_hidden_layers, config.vocab_size, self.family,
                            config.intermediate_size, getattr(config, "max_position_embeddings", None))

    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def replace_input_embeddings(self, module: nn.Module) -> None:
        self.model.set_input_embeddings(module)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, packing: dict | None = None) -> EmbeddingBundle:
        """Every exit's pooled embeddings of a padded batch, or of a packed one (``packing``: the layout of
        :func:`contracts.batch_layout.pack`; pooled per text, in the texts' order)."""
        if packing is not None:
            return self._forward_packed(input_ids, packing)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        pool_fn = last_token_pool if self.family == "decoder" else mean_pool
        return self._bundle(output, lambda hidden: pool_fn(hidden, attention_mask))

    def _forward_packed(self, input_ids: Tensor, packing: dict) -> EmbeddingBundle:
        position_ids, sequence_ids = packing["position_ids"], packing["sequence_ids"]
        config = self.model.config
        if input_ids.is_cuda and config._attn_implementation == "sdpa" and varlen_available():
            use_varlen_attention(self.model)  # padded calls (probe, export) still run sdpa
        # The varlen kernel has no attention dropout (BERT's default is 0.1): the block mask has.
        dropout = getattr(config, "attention_dropout", 0.0) or getattr(config, "attention_probs_dropout_prob", 0.0)
        if config._attn_implementation == VARLEN and not (self.training and dropout):
            # One flattened sequence cut into segments; the 4D placeholder passes transformers' mask code untouched
            # (its packed-sequence detection would sync with the host), varlen attention ignores it.
            segments = {"cu_seq_lens_q": packing["cu_seqlens"], "cu_seq_lens_k": packing["cu_seqlens"],
                        "max_length_q": packing["max_length"], "max_length_k": packing["max_length"]}
            placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
            output = self.model(input_ids=input_ids.reshape(1, -1), attention_mask=placeholder,
                                position_ids=position_ids.reshape(1, -1), output_hidden_states=True, **segments)
        else:
            mask = block_mask(sequence_ids, causal=self.family == "decoder")
            if config._attn_implementation == "eager":
                mask = additive(mask, self.model.dtype)
            output = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                output_hidden_states=True)
        last_index = packing["last_index"]
        if self.family == "decoder":
            return self._bundle(output, lambda hidden: last_token_pool_packed(hidden, last_index))
        return self._bundle(output, lambda hidden: mean_pool_packed(hidden, sequence_ids, len(last_index)))

    def _bundle(self, output, pool) -> EmbeddingBundle:
        # The last exit is the model's own final output (already normed for decoders).
        hidden_states = (*output.hidden_states[:-1], output.last_hidden_state)
        return EmbeddingBundle(hidden_states, pool, self.exit_norm)
