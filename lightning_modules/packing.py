"""Packed (padding-free) batches: several texts share one row, each attending only to itself.

The data side builds the layout (:func:`contracts.batch_layout.pack`); this module runs the model on it.

A padded batch of N texts is ``[N, longest]``; a packed one is ``[R, longest]`` with R ≤ N rows filled first-fit
by decreasing length, so the padding left is what does not fill the last slots of each row. Each token carries its
text's index (``sequence_ids``, -1 on padding) and its position inside the text (``position_ids``, restarting at 0),
so position embeddings / RoPE and pooling see each text exactly as in the padded batch.

Attention is confined to each text in one of two ways, both equal to the padded forward:

- **block mask** (CPU, any ``sdpa`` / ``eager`` model): a 4D ``[R, 1, W, W]`` mask, block-diagonal for encoders,
  block-causal for decoders. Transformers passes a 4D mask through unchanged.
- **varlen** (CUDA with ``torch.nn.attention.varlen``): the rows are flattened into one sequence and the attention
  kernel gets the segment boundaries (``cu_seqlens``), FlashAttention-style; no mask, no work on other texts.
  Transformers hands the ``cu_seq_lens_*`` / ``max_length_*`` keyword arguments to the attention function.

Padding tokens form their own segment (they attend to each other, never to a text), so no row of the attention
is empty (an all-masked softmax row would be NaN, and NaN reaches every gradient in the backward pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

VARLEN = "packed_varlen"
"""Name of the attention implementation registered by :func:`use_varlen_attention`."""


def block_mask(sequence_ids: Tensor, causal: bool) -> Tensor:
    """``[rows, 1, width, width]`` boolean mask (True: attend): each token sees the tokens of its own text
    (and, when ``causal``, only those before it); padding sees padding."""
    mask = sequence_ids[:, None, :, None] == sequence_ids[:, None, None, :]
    if causal:
        width = sequence_ids.shape[-1]
        mask &= torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
    return mask


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as the additive bias ``eager`` attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def mean_pool_packed(hidden: Tensor, sequence_ids: Tensor, num_texts: int) -> Tensor:
    """``[num_texts, hidden]``: mean over each text's tokens of packed hidden states ``[..., hidden]``."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = sequence_ids.reshape(-1)
    slot = torch.where(ids >= 0, ids, num_texts)  # padding goes to a spare slot that is dropped
    sums = flat.new_zeros(num_texts + 1, flat.shape[-1]).index_add(0, slot, flat)[:num_texts]
    counts = flat.new_zeros(num_texts + 1).index_add(0, slot, flat.new_ones(slot.shape))[:num_texts]
    return sums / counts.clamp_min(1.0).unsqueeze(-1)


def last_token_pool_packed(hidden: Tensor, last_index: Tensor) -> Tensor:
    """``[num_texts, hidden]``: each text's last token (its EOS) from packed hidden states ``[..., hidden]``."""
    return hidden.reshape(-1, hidden.shape[-1])[last_index]


def varlen_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0, cu_seq_lens_q: Tensor | None = None,
                     max_length_q: int | None = None, **kwargs) -> tuple[Tensor, None]:
    """Attention over the segments of one flattened sequence (``query``: ``[1, heads, tokens, head_dim]``).

    Transformers' attention-function signature; calls without segment boundaries (padded batches: the probe,
    export) go to ``sdpa`` unchanged. On CUDA it runs ``torch.nn.attention.varlen.varlen_attn``; elsewhere a loop
    of per-segment ``scaled_dot_product_attention`` (the reference the tests compare with).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        raise ValueError(f"varlen attention has no dropout (attention dropout {dropout}); set it to 0 for packing")
    causal = getattr(module, "is_causal", False)
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # [tokens, heads, head_dim]
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                          window_size=(-1, 0) if causal else (-1, -1), enable_gqa=k.shape[1] != q.shape[1])
    else:
        bounds = cu_seq_lens_q.tolist()
        out = torch.cat([
            F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                           is_causal=causal, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
            .transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:])])
    return out.unsqueeze(0), None  # [1, tokens, heads, head_dim], as transformers' attention functions return


def varlen_available() -> bool:
    """Whether this torch has the variable-length attention kernel (CUDA builds of torch ≥ 2.10)."""
    return torch.cuda.is_available() and hasattr(torch.nn.attention, "varlen")


def use_varlen_attention(model) -> None:
    """Switches an ``sdpa`` Hugging Face model to :func:`varlen_attention` (padded calls still run ``sdpa``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, sdpa_mask)  # padded calls
    model.set_attn_implementation(VARLEN)
