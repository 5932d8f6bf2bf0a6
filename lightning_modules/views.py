"""Embedding bundles and the weighted views that Matryoshka plugins expand them into."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from contracts.cells import Cell, cell_name, vector_bytes


@dataclass(frozen=True)
class View:
    """One nested embedding the loss is computed on.

    Args:
        embeddings: ``[num_texts, width]`` pooled, not yet normalised embeddings of every text of the batch
            (queries, then passages, then hard negatives). Plugins slice them; the loss normalises.
        weight: factor of this view's loss in the total.
        tags: the nesting coordinates of this view, in the order plugins added them (``layer``, ``dim``,
            ``rank``, ...). They name metrics and probe cells.
        bits_per_value: storage of one coordinate at deployment (32: float32; the precision axis lowers it), so
            a vector of this view costs ``width · bits_per_value / 8`` bytes.
        full_settings: the run's axes' full settings (``{tag: value}``, from the plugins), which names leave out.
    """

    embeddings: Tensor
    weight: float = 1.0
    tags: dict[str, object] = field(default_factory=dict)
    bits_per_value: int = 32
    full_settings: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The plugins' tags under the cell naming rule (:func:`~contracts.cells.cell_name`)."""
        return cell_name(self.tags, self.full_settings)

    @property
    def bytes_per_vector(self) -> int:
        """Bytes of one stored vector of this view (see :func:`vector_bytes`)."""
        return vector_bytes(self.embeddings.shape[-1], self.bits_per_value)

    def cell(self, num_layers: int) -> Cell:
        """The deployable cell this view trains: its tags after the full depth and width (the defaults of a run
        that does not nest them)."""
        return Cell({"layer": num_layers, "dim": self.embeddings.shape[-1], **self.tags}, self.bytes_per_vector,
                    self.full_settings)

    def derive(self, embeddings: Tensor | None = None, weight_factor: float = 1.0, bits_per_value: int | None = None,
               **tags: object) -> View:
        """A nested view: same data and storage unless replaced, weight multiplied, tags appended."""
        return View(
            embeddings=self.embeddings if embeddings is None else embeddings,
            weight=self.weight * weight_factor,
            tags={**self.tags, **tags},
            bits_per_value=self.bits_per_value if bits_per_value is None else bits_per_value,
            full_settings=self.full_settings,
        )


class EmbeddingBundle:
    """Pooled embeddings at every exit of ONE backbone forward, computed lazily and cached.

    ``layer(l)`` is the embedding read after block ``l`` (1-based; ``num_layers`` is the full model).
    Decoder exits before the last get the model's final norm, so exit ``l`` equals what a model cut to
    ``l`` blocks computes; the norm is applied to the pooled vector (per-token norm, same result, cheaper).
    """

    def __init__(
        self,
        hidden_states: tuple[Tensor, ...],
        pool: Callable[[Tensor], Tensor],
        exit_norm: Callable[[Tensor], Tensor] | None,
    ) -> None:
        self.hidden_states = hidden_states
        self.num_layers = len(hidden_states) - 1
        self._pool = pool
        self._exit_norm = exit_norm
        self._cache: dict[int, Tensor] = {}

    @classmethod
    def of_pooled(cls, pooled: Mapping[int, Tensor], num_layers: int) -> EmbeddingBundle:
        """A bundle of already pooled exits ``{layer: [texts, hidden]}`` (gradient caching: the embeddings of a
        batch embedded chunk by chunk); reading any other exit is an error."""
        bundle = cls((), lambda hidden: hidden, None)
        bundle.num_layers = num_layers
        bundle._cache = dict(pooled)
        return bundle

    def exits_read(self) -> list[int]:
        """The exits read so far, ascending (after the plugins expanded the bundle: the exits the views use)."""
        return sorted(self._cache)

    def layer(self, layer: int) -> Tensor:
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"exit layer {layer} outside the model's blocks 1..{self.num_layers}")
        if layer not in self._cache and not self.hidden_states:
            raise ValueError(f"exit layer {layer} was not pooled in this bundle (pooled: {self.exits_read()})")
        if layer not in self._cache:
            pooled = self._pool(self.hidden_states[layer])
            if self._exit_norm is not None and layer < self.num_layers:
                pooled = self._exit_norm(pooled)
            self._cache[layer] = pooled
        return self._cache[layer]

    def root_view(self, full_settings: dict[str, object] | None = None) -> View:
        """The un-nested view plugins start from: the full-depth, full-width embedding (``full_settings``: the run's
        axes' full settings, carried to every view derived from it)."""
        return View(embeddings=self.layer(self.num_layers), full_settings=dict(full_settings or {}))

