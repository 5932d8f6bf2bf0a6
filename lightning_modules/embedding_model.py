"""The public API of a trained model: its deployable cells and the embeddings of texts at any of them."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from contracts.cells import Cell, axis_values, parse_cell_name
from lightning_modules.module import MatryoshkaEmbedder

PROMPTS = ("query", "passage")


class TextTokenizer(Protocol):
    """What the model side needs of the data side's tokenizer (:class:`datamodules.tokenization.BatchTokenizer` is
    one): one padded batch of texts, the prompt prefixes, and what export saves with the model (the Hugging Face
    tokenizer, the max length, the family: ``encoder`` or ``decoder``)."""

    tokenizer: Any
    family: str
    max_length: int
    query_prefix: str
    passage_prefix: str

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """``input_ids`` and ``attention_mask`` of one right-padded batch ``[len(texts), longest]``."""


class CellError(ValueError):
    """A cell request that names no cell of the run; the message lists what is allowed."""


def find_cell(cells: list[Cell], name: str | None = None, **tags: object) -> Cell:
    """A cell of ``cells`` by its name (``layer_2/dim_64/rank_64``), or by some of its tags, as a part of a name
    (``find_cell(cells, "layer_2/ffn_384")``) or as keywords (``find_cell(cells, layer=2, dim=64)``), the others
    taken from the full cell; :class:`CellError` names the bad part and the allowed values."""
    if name is not None:
        match = next((cell for cell in cells if cell.name == name), None)
        if match is not None and not tags:
            return match
        try:
            named = parse_cell_name(name)
        except ValueError as error:
            raise CellError(str(error)) from None
        if match is None and set(named) >= set(axis_values(cells)):  # a whole name, of no cell of this run
            raise CellError(f"CELL={name} is not a cell of this run; its cells look like {cells[0].name} with "
                            f"{_allowed(cells)}")
        twice = sorted(set(named) & set(tags))
        if twice:
            raise CellError(f"CELL={name} and the {', '.join(twice)} option name the same axis; give it once")
        tags = {**named, **tags}
    full = max(cells, key=Cell.size)
    allowed = axis_values(cells)
    for key, value in tags.items():
        if key not in allowed:
            raise CellError(f"the run has no {key!r} axis; its axes: {', '.join(allowed)}")
        if value not in allowed[key]:
            raise CellError(f"{key} {value} is not a value of this run; choose one of {allowed[key]}")
    wanted = {**full.tags, **tags}
    match = next((cell for cell in cells if cell.tags == wanted), None)
    if match is None:
        raise CellError(f"no cell {'/'.join(f'{k}_{v}' for k, v in wanted.items())}; {_allowed(cells)}")
    return match


def _allowed(cells: list[Cell]) -> str:
    return "; ".join(f"{key}: {values}" for key, values in axis_values(cells).items())


class EmbeddingModel:
    """A :class:`~lightning_modules.module.MatryoshkaEmbedder` with its tokenizer: texts in, embeddings out.

    Every tool that uses a trained model (the probe, export, mining, benchmarks) goes through this class and the
    module's :meth:`~lightning_modules.module.MatryoshkaEmbedder.cells` /
    :meth:`~lightning_modules.module.MatryoshkaEmbedder.applied`; none knows which plugins made the cells.

    Args:
        module: the trained module (its plugins define the cells).
        tokenize: the run's tokenizer (prefixes, max length, EOS handling).
        batch_size: texts per forward in :meth:`encode`.

    Example:
        >>> model = load_run("outputs/quickstart/<timestamp>/checkpoints/last.ckpt").model  # experiments.loading
        >>> cell = model.cell("layer_2/dim_64/rank_64")
        >>> model.encode(["Datei öffnen"], cell).shape
        torch.Size([1, 64])
    """

    def __init__(self, module: MatryoshkaEmbedder, tokenize: TextTokenizer, batch_size: int = 64) -> None:
        self.module, self.tokenize, self.batch_size = module, tokenize, batch_size

    def cells(self) -> list[Cell]:
        return self.module.cells()

    def full_cell(self) -> Cell:
        """The largest cell: full depth, most bytes per vector, the largest model-side settings."""
        return max(self.cells(), key=Cell.size)

    def cell(self, name: str | None = None, **tags: object) -> Cell:
        """A cell by its name or some of its tags (:func:`find_cell`)."""
        return find_cell(self.cells(), name, **tags)

    def resolve(self, cells: Cell | str | list[Cell | str]) -> list[Cell]:
        requested = cells if isinstance(cells, list) else [cells]
        return [cell if isinstance(cell, Cell) else self.cell(cell) for cell in requested]

    @torch.no_grad()
    def encode(self, texts: list[str], cells: Cell | str | list[Cell | str], prompt: str = "query"
               ) -> Tensor | dict[str, Tensor]:
        """L2-normalised embeddings of ``texts`` at one cell (a ``[n, dim]`` tensor) or at several (``{cell name:
        tensor}``), from one forward per batch and model-side setting.

        Args:
            texts: raw texts; the run's prefix for ``prompt`` is prepended.
            cells: a cell, a cell name, or a list of them.
            prompt: ``query`` or ``passage`` (documents).
        """
        if prompt not in PROMPTS:
            raise ValueError(f"prompt {prompt!r} not allowed; choose one of {', '.join(PROMPTS)}")
        wanted = self.resolve(cells)
        prefix = self.tokenize.query_prefix if prompt == "query" else self.tokenize.passage_prefix
        device = next(self.module.parameters()).device
        chunks: dict[str, list[Tensor]] = {cell.name: [] for cell in wanted}
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenize.encode([prefix + text for text in texts[start: start + self.batch_size]])
            encoded = self.module.encode(batch["input_ids"].to(device), batch["attention_mask"].to(device), wanted)
            for name, embeddings in encoded.items():
                chunks[name].append(embeddings)
        embeddings = {name: torch.cat(parts) for name, parts in chunks.items()}
        return embeddings if isinstance(cells, list) else embeddings[wanted[0].name]
