"""Backbone adapter: a Hugging Face model that returns pooled embeddings at every exit from ONE forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

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
                            config.intermediate_size)

    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def replace_input_embeddings(self, module: nn.Module) -> None:
        self.model.set_input_embeddings(module)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> EmbeddingBundle:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        # The last exit is the model's own final output (already normed for decoders).
        hidden_states = (*output.hidden_states[:-1], output.last_hidden_state)
        pool_fn = last_token_pool if self.family == "decoder" else mean_pool
        return EmbeddingBundle(hidden_states, lambda hidden: pool_fn(hidden, attention_mask), self.exit_norm)


class BatchTokenizer:
    """Turns raw texts into one padded batch (picklable, so it runs in DataLoader workers).

    Layout of a training batch: queries, then passages, then each query's hard negatives in order, so the
    whole batch is ONE forward; ``texts`` lists the raw texts (without prefixes) in the same order. Encoders get
    the tokenizer's own special tokens. Decoders always end in EOS, appended here and kept in the attention mask
    even when ``eos == pad``; padding is on the right.

    Args:
        tokenizer: a Hugging Face fast tokenizer.
        family: ``encoder`` or ``decoder``.
        max_length: tokens per text, EOS/special tokens included.
        query_prefix / passage_prefix: prepended to queries / passages and negatives (e5: ``query: ``).
    """

    def __init__(self, tokenizer, family: Family, max_length: int, query_prefix: str = "", passage_prefix: str = ""):
        if family == "decoder" and tokenizer.eos_token_id is None:
            raise ValueError("decoder tokenizer has no eos_token; every sequence must end in EOS for pooling")
        self.tokenizer = tokenizer
        self.family = family
        self.max_length = max_length
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        if self.family == "encoder":
            return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                       return_tensors="pt", return_token_type_ids=False))
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True,
                             max_length=self.max_length - 1)["input_ids"]
        ids = [row + [self.tokenizer.eos_token_id] for row in ids]
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, queries: list[str], passages: list[str], negatives: list[list[str]] | None = None) -> dict:
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        negatives = negatives or []
        per_query = len(negatives[0]) if negatives else 0
        if negatives and (len(negatives) != len(queries) or any(len(row) != per_query for row in negatives)):
            raise ValueError("hard negatives must be one list per query, all of the same length")
        texts = ([self.query_prefix + text for text in queries]
                 + [self.passage_prefix + text for text in passages]
                 + [self.passage_prefix + text for row in negatives for text in row])
        batch = self.encode(texts)
        # The raw texts in the same order, for teachers with their own tokenizer (distillation).
        batch["texts"] = [*queries, *passages, *(text for row in negatives for text in row)]
        batch["num_queries"] = len(queries)
        batch["negatives_per_query"] = per_query
        return batch
