"""The batch layouts the model reads, shared by the data side (which tokenizes into them) and the evaluation (which
encodes probe texts in them): :func:`pad` (one right-padded row per text) and :func:`pack` (several texts per row,
attention kept inside each text by :mod:`lightning_modules.packing`)."""

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
