"""Tokenization, the data side of the batch dict: raw texts in, the padded or packed layout the model reads.

The layouts: :func:`pad` (one right-padded row per text) and :func:`pack` (several texts per row, attention kept
inside each text by :mod:`lightning_modules.packing`). :class:`BatchTokenizer` runs in the DataLoader workers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pad(sequences: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """The padded layout: one right-padded row per sequence, ``[N, longest]``."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        input_ids[i, : len(sequence)] = torch.tensor(sequence)
        attention_mask[i, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pack(sequences: list[list[int]], pad_id: int) -> dict[str, Tensor | dict]:
    """Packs token sequences into rows as wide as the longest one (first-fit decreasing).

    Returns ``input_ids`` and ``attention_mask`` (1 on text tokens) of shape ``[rows, width]``, and ``packing``:
    ``position_ids`` and ``sequence_ids`` (``[rows, width]``), ``last_index`` (``[N]``: flat index of each text's
    last token, for last-token pooling), ``cu_seqlens`` (int32 boundaries of the segments of the flattened rows,
    padding tails included, for variable-length attention) and ``max_length`` (the width).

    Example:
        >>> pack([[5, 6, 7], [8], [9, 9]], pad_id=0)["input_ids"].tolist()
        [[5, 6, 7], [9, 9, 8]]
    """
    width = max(len(sequence) for sequence in sequences)
    rows: list[list[int]] = []  # text indices of each row, in placement order
    free: list[int] = []
    for index in sorted(range(len(sequences)), key=lambda i: -len(sequences[i])):
        length = len(sequences[index])
        row = next((r for r, space in enumerate(free) if space >= length), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= length
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    sequence_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    last_index = torch.zeros(len(sequences), dtype=torch.long)
    boundaries = [0]
    for r, members in enumerate(rows):
        start = 0
        for index in members:
            sequence = sequences[index]
            stop = start + len(sequence)
            input_ids[r, start:stop] = torch.tensor(sequence)
            attention_mask[r, start:stop] = 1
            position_ids[r, start:stop] = torch.arange(len(sequence))
            sequence_ids[r, start:stop] = index
            last_index[index] = r * width + stop - 1
            boundaries.append(r * width + stop)
            start = stop
        if start < width:  # the padding tail: its own segment
            position_ids[r, start:] = torch.arange(width - start)
            boundaries.append((r + 1) * width)
    packing = {"position_ids": position_ids, "sequence_ids": sequence_ids, "last_index": last_index,
               "cu_seqlens": torch.tensor(boundaries, dtype=torch.int32), "max_length": width}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "packing": packing}



class BatchTokenizer:
    """Turns raw texts into one padded batch (picklable, so it runs in DataLoader workers).

    Layout of a training batch: queries, then passages, then each query's hard negatives in order, so the
    whole batch is ONE forward; ``texts`` lists the raw texts (without prefixes) in the same order. Encoders get
    the tokenizer's own special tokens. Decoders always end in EOS, appended here and kept in the attention mask
    even when ``eos == pad``; padding is on the right. With ``packing`` a training batch is packed instead
    (:func:`pack`: several texts per row, ``batch["packing"]`` the layout);
    :meth:`encode` always pads.

    Args:
        tokenizer: a Hugging Face fast tokenizer.
        family: ``encoder`` or ``decoder``.
        max_length: tokens per text, EOS/special tokens included.
        query_prefix / passage_prefix: prepended to queries / passages and negatives (e5: ``query: ``).
        packing: pack training batches (``data.packing``).
    """

    def __init__(self, tokenizer, family: str, max_length: int, query_prefix: str = "", passage_prefix: str = "",
                 packing: bool = False):
        if family == "decoder" and tokenizer.eos_token_id is None:
            raise ValueError("decoder tokenizer has no eos_token; every sequence must end in EOS for pooling")
        self.tokenizer = tokenizer
        self.family = family
        self.max_length = max_length
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.packing = packing
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, truncated to ``max_length`` (special tokens / the decoder's EOS included)."""
        if self.family == "encoder":
            return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True,
                             max_length=self.max_length - 1)["input_ids"]
        return [row + [self.tokenizer.eos_token_id] for row in ids]

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """One right-padded batch ``[len(texts), longest]``."""
        return pad(self.token_ids(texts), self.pad_id)

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
        batch = pack(self.token_ids(texts), self.pad_id) if self.packing else self.encode(texts)
        # The raw texts in the same order, for teachers with their own tokenizer (distillation).
        batch["texts"] = [*queries, *passages, *(text for row in negatives for text in row)]
        batch["num_queries"] = len(queries)
        batch["negatives_per_query"] = per_query
        return batch
