"""The plugin contract: a Matryoshka axis is one class with up to three hooks; a loss plugin adds a fourth."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from contracts.config_error import ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from lightning_modules.backbone_adapter import Backbone, BackboneInfo
    from contracts.cells import Cell
    from lightning_modules.costs import CellCost
    from lightning_modules.views import EmbeddingBundle, View


@dataclass
class PluginConfig:
    """Base of every plugin's typed config (the block under ``plugins.<name>`` in an experiment)."""


@dataclass
class PosthocConfig(PluginConfig):
    """The config of an axis that can be left out of training and applied afterwards (MEL, FFN, precision)."""

    posthoc: bool = False
    """Train as if the axis were absent (the model untouched: its own embedding, the full FFN width, float vectors)
    and only probe and export its settings afterwards: the "cut a model trained without it" baseline."""


def check_posthoc(config: PosthocConfig, key: str, value: object) -> None:
    """Raises ConfigError when ``posthoc`` comes with a training choice of ``key`` it overrides."""
    if config.posthoc and value is not None:
        raise ConfigError(key, f"{list(value)} has no effect with posthoc: true (nothing of this axis is trained); "
                               f"leave {key} out")


class MatryoshkaPlugin:
    """Base class of a Matryoshka axis.

    A subclass sets ``Config`` (a dataclass of its options, typed: unknown keys and wrong types are
    rejected before any work), validates values in ``__init__`` by raising
    :class:`~contracts.config_error.ConfigError` with the option's name (the run reports it under
    ``plugins.<name>.``), and overrides any of the hooks below. ``stage`` orders ``expand`` calls: plugins that
    choose *which* embedding a view reads (an exit layer) run before plugins that transform it (dims, precision).

    Hooks:
        setup(backbone): change the model once, before the optimizer exists.
        before_forward(step): choose this step's configuration; must be a pure function of (seed, step) so
            every device agrees and a resumed run repeats it. Use :meth:`step_rng`.
        expand(views, bundle): turn each view into nested, weighted, tagged views.
        loss_terms(view, batch): extra loss terms of one view (distillation), added to its contrastive terms:
            weighted by ``view.weight``, summed into the total and logged like them (``train/loss_<term>`` and
            ``train/loss_<term>/<view>``, as means over all devices). Names must differ from ``hard``, ``in_batch``
            and other plugins' terms.
        card_lines(cell): lines this axis adds to the model card of an exported cell (precision: how to store
            the quantized vectors).
        cost(cell, cost, mode): what this axis' value in ``cell`` costs: ``cost`` (a
            :class:`~lightning_modules.costs.CellCost`, as the plugins before this one left it) with this axis' part
            changed. A model-side axis states the parameters and FLOPs per token its setting keeps (MLL: blocks run;
            MEL: the token embedding at rank r in export ``mode``; FFN: the feed-forward part of each block), an
            output-side axis what a stored vector takes (MRL: its width; precision: bits per coordinate).
    and optionally ``step_metrics()`` to log the step's choices (MEL: its rank) and ``full_settings()`` to declare
    the untruncated setting of its tag (precision: ``fp32``), which cell names leave out
    (:func:`~contracts.cells.cut_tags`).

    An axis that changes the network itself (a setting per forward) subclasses :class:`ModelSidePlugin`.
    """

    Config: ClassVar[type[PluginConfig]] = PluginConfig
    stage: ClassVar[int] = 20

    def __init__(self, config: PluginConfig, info: BackboneInfo, seed: int) -> None:
        self.config = config
        self.info = info
        self.seed = seed

    def setup(self, backbone: Backbone) -> None:
        """Change the model once (default: nothing)."""

    def before_forward(self, step: int) -> None:
        """Choose this step's configuration (default: nothing)."""

    def expand(self, views: list[View], bundle: EmbeddingBundle) -> list[View]:
        """Nest each view (default: unchanged)."""
        return views

    def loss_terms(self, view: View, batch: dict) -> dict[str, Tensor]:
        """Extra loss terms of one view, before ``view.weight`` (the module applies it; default: none)."""
        return {}

    def step_metrics(self) -> dict[str, float]:
        """Scalars of this step's configuration to log under ``train/`` (default: none). They must be the same on every
        device (rank 0's are logged); a mean over the batch belongs in :meth:`loss_terms`, which is averaged."""
        return {}

    def card_lines(self, cell: Cell) -> list[str]:
        """Markdown lines for the model card of an exported ``cell`` (default: none)."""
        return []

    def cost(self, cell: Cell, cost: CellCost, mode: str) -> CellCost:
        """``cost`` with what this axis' value in ``cell`` changes (default: nothing; see
        :mod:`lightning_modules.costs`)."""
        return cost

    def full_settings(self) -> dict[str, object]:
        """``{tag: value}`` of the tags this axis adds whose value at some cell is the model not cut along it (a
        cell's name leaves such a tag out: one name per deployable model). Default: none, the tag is always named
        (MLL and MRL's ``layer`` and ``dim`` always are); a model-side axis derives it from :meth:`untouched`."""
        return {}

    def posthoc_settings(self) -> list:
        """The settings of this axis that are probed (and exported) but never trained: applied afterwards to a model
        trained without them (``posthoc: true``, a zero probability or loss weight). Default: none."""
        return []

    def step_rng(self, step: int) -> np.random.Generator:
        """A generator that depends only on (seed, plugin class, step): identical on every device and
        after a resume, independent of any global RNG state."""
        name_entropy = int.from_bytes(type(self).__name__.encode()[:8].ljust(8, b"\0"), "little")
        return np.random.default_rng([self.seed, name_entropy, step])


class ModelSidePlugin(MatryoshkaPlugin):
    """Base class of an axis that changes the network itself: one *setting* per forward (MEL: the token-embedding
    rank; FFN: the feed-forward width).

    A subclass sets ``tag`` (the view tag and cell-name part, e.g. ``rank``), fills ``self.settings`` (the ladder,
    largest first) and ``self.probabilities`` in ``__init__``, and implements:

        current(): the setting the model computes with now (a ``posthoc`` run in training: :meth:`untouched`, so
            its views carry the axis's full setting, which their names leave out).
        set(setting): make the model compute with ``setting``: the only place that writes it.
        export(model, setting, mode): write ``setting`` into ``model``, a copy of the Hugging Face model cut for
            export, so that it computes the cell with plain transformers code; ``mode`` is ``compat`` (no custom
            code) or one of the axis's own ``export_modes`` (MEL: ``factorized``, which keeps its compact form).
            Returns the files to write beside the model and the ``config.json`` entries to update (both may be
            empty).

    Trained versus applied afterwards: training calls :meth:`before_forward`, which sets ``sample(step)`` (a pure
    function of (seed, step): every device agrees, a resumed run repeats it) and leaves it in place through the
    backward pass (activation checkpointing recomputes with it); with ``posthoc: true`` in the config
    (:class:`PosthocConfig`) it sets :meth:`untouched`, the model as if the axis were absent. Tools use :meth:`applied`, which restores the previous setting on
    exit; :meth:`posthoc_settings` names the settings never trained.
    """

    tag: ClassVar[str]
    export_modes: ClassVar[tuple[str, ...]] = ()
    settings: list
    probabilities: list[float]

    @property
    def posthoc(self) -> bool:
        """Training leaves this axis out; its settings are applied only afterwards (probe, export)."""
        return bool(getattr(self.config, "posthoc", False))

    def current(self):
        raise NotImplementedError

    def set(self, setting) -> None:
        raise NotImplementedError

    def export(self, model: nn.Module, setting, mode: str) -> tuple[dict[str, str], dict[str, object]]:
        raise NotImplementedError

    def sample(self, step: int):
        """The setting training uses at global step ``step``."""
        return self.settings[int(self.step_rng(step).choice(len(self.settings), p=self.probabilities))]

    def untouched(self):
        """The setting that computes what the model computes without this axis (FFN: the full width; posthoc MEL:
        the full rank, the model's own embedding), or None when none does (trained MEL: the model's own embedding is
        no rank of its factors). A ``posthoc`` run trains with it; cell names leave it out (:meth:`full_settings`)."""
        return None

    def full_settings(self) -> dict[str, object]:
        """The untouched setting, when there is one: the model not cut along this axis, named without its tag."""
        untouched = self.untouched()
        return {} if untouched is None else {self.tag: untouched}

    def posthoc_settings(self) -> list:
        if self.posthoc:
            return [setting for setting in self.settings if setting != self.untouched()]
        return [setting for setting, probability in zip(self.settings, self.probabilities) if probability == 0]

    def trained_settings(self) -> list:
        """The settings training samples (the others are applied afterwards), largest first."""
        posthoc = self.posthoc_settings()
        return [setting for setting in self.settings if setting not in posthoc]

    @contextmanager
    def applied(self, setting) -> Iterator[None]:
        """The model computes with ``setting`` inside; the previous setting is back on exit."""
        previous = self.current()
        self.set(setting)
        try:
            yield
        finally:
            self.set(previous)

    def before_forward(self, step: int) -> None:
        self.set(self.untouched() if self.posthoc else self.sample(step))

    def expand(self, views: list[View], bundle: EmbeddingBundle) -> list[View]:
        setting = self.current()
        return [view.derive(**{self.tag: setting}) for view in views]

    def step_metrics(self) -> dict[str, float]:
        return {f"{type(self).__name__.lower()}/{self.tag}": float(self.current())}


def ladder_probabilities(key: str, probabilities: list[float] | None, written: list[int], settings: list[int]
                         ) -> list[float]:
    """Sampling probabilities of ``settings`` (the ladder sorted): the given weights, paired with the ladder in the
    order the user wrote it (``written``), or proportional to the value; normalised."""
    explicit = checked_weights(key, probabilities, written)
    weights = settings if explicit is None else [explicit[value] for value in settings]
    return [weight / sum(weights) for weight in weights]


def checked_ladder(key: str, values: list[int], high: int, bound: str, example: list[int]) -> list[int]:
    """Validates a ladder of sizes (dims, layers, ranks): non-empty, each in ``[1, high]``, no repeats."""
    bad = [value for value in values if not 1 <= value <= high]
    if not values or bad:
        raise ConfigError(key, f"{bad or values} not allowed: each value must be an integer in "
                          f"[1, {high}] ({bound}), e.g. {example}")
    if len(set(values)) != len(values):
        raise ConfigError(key, f"{values} has repeated values; each may appear once")
    return list(values)


def checked_weights(key: str, weights: list[float] | None, ladder: list[int]) -> dict[int, float] | None:
    """None when not given, else ``{ladder value: weight}`` for one non-negative weight per ladder entry
    (paired in the order the user wrote them; not all zero)."""
    if weights is None:
        return None
    if len(weights) != len(ladder) or any(weight < 0 for weight in weights) or not any(weights):
        raise ConfigError(key, f"{list(weights)} must be {len(ladder)} non-negative numbers, not all zero, "
                          f"one per entry of {ladder}")
    return dict(zip(ladder, weights))
