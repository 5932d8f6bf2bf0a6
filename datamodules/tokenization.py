"""Tokenization, the data side of the batch dict: raw texts in, the padded or packed layout the model reads.

The layouts (:func:`~contracts.batch_layout.pad`, :func:`~contracts.batch_layout.pack`) live in
:mod:`contracts.batch_layout`, shared with the evaluation. :class:`BatchTokenizer` runs in the DataLoader workers.
"""

from __future__ import annotations

from torch import Tensor

from contracts.batch_layout import pack, pad


class BatchTokenizer:
    """Turns raw texts into one padded batch (picklable, so it runs in DataLoader workers).

    Layout of a training batch: queries, then passages, then each query's hard negatives in order, so the
    whole batch is ONE forward; ``texts`` lists the raw texts (without prefixes) in the same order. Encoders get
    the tokenizer's own special tokens. Decoders always end in EOS, appended here and kept in the attention mask
    even when ``eos == pad``; padding is on the right. With ``packing`` a training batch is packed instead
    (:func:`~contracts.batch_layout.pack`: several texts per row, ``batch["packing"]`` the layout);
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
