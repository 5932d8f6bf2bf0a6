"""Cells and their names: the deployable (layer, dim, other axes) settings of a run, shared by the model (which
trains and encodes them), the evaluation (which scores them) and the CLIs (which name them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

ALWAYS_NAMED = ("layer", "dim")  # every cell has an exit and a width: they always open its name


def view_name(tags: Mapping[str, object]) -> str:
    """Metric-name fragment of tags as given, e.g. ``layer_4/dim_64/rank_128`` (``full`` for none); a cell's name is
    :func:`cell_name`, which first leaves out the axes at their full setting.

    ``key_value`` rather than ``key=value``: MLflow rejects ``=`` in metric names (only alphanumerics,
    ``_ - . / : space``), and Lightning's MLflow logger would otherwise rewrite it silently.
    """
    return "/".join(f"{key}_{value}" for key, value in tags.items()) or "full"


def cut_tags(tags: Mapping[str, object], full_settings: Mapping[str, object]) -> dict[str, object]:
    """The tags of the axes a cell cuts: ``layer`` and ``dim`` always, any other axis only where its value differs
    from the axis's full, untruncated setting (``full_settings``, declared by each plugin: precision ``fp32``, the
    backbone's FFN width, the full rank of an embedding truncated only afterwards; an axis without an untruncated
    setting, such as trained MEL, is not in it and is always named).

    The one naming rule of the project: a cell's name names only what it cuts, so one name is one deployable model in
    every run, whichever plugins trained it (``layer_4/dim_384`` of a baseline and of an MRL run; ``.../rank_64`` of a
    MEL run and of a baseline truncated afterwards)."""
    return {key: value for key, value in tags.items()
            if key in ALWAYS_NAMED or key not in full_settings or full_settings[key] != value}


def cell_name(tags: Mapping[str, object], full_settings: Mapping[str, object]) -> str:
    """The name of a cell (see :func:`cut_tags`): ``layer_4/dim_64/rank_128``; ``layer_4/dim_64`` at full rank."""
    return view_name(cut_tags(tags, full_settings))


def parse_cell_name(name: str) -> dict[str, object]:
    """The tags a cell name (or part of one) spells, the inverse of :func:`view_name`: integers and decimals as
    numbers, other values (``precision_int8``) as text.

    Example:
        >>> parse_cell_name("layer_2/rank_64/precision_int8")
        {'layer': 2, 'rank': 64, 'precision': 'int8'}
    """
    tags: dict[str, object] = {}
    for part in name.strip("/").split("/"):
        key, separator, value = part.rpartition("_")
        if not (separator and key and value) or key in tags:
            raise ValueError(f"{name!r} is not a cell name: each part is <axis>_<value> once, e.g. layer_2/dim_64")
        tags[key] = _number(value)
    return tags


def _number(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def vector_bytes(width: int, bits_per_value: int) -> int:
    """Bytes of one stored vector, packed (64-d binary: 8 bytes)."""
    return -(-width * bits_per_value // 8)


class Tags(dict):
    """A cell's tags, read-only and hashable (a plain ``dict`` for everything that reads it: ``==``, ``**``, JSON).

    Example:
        >>> Tags({"layer": 2})["layer"] = 4
        Traceback (most recent call last):
        TypeError: a cell's tags are read-only; build a new Cell
    """

    def _read_only(self, *args, **kwargs):
        raise TypeError("a cell's tags are read-only; build a new Cell")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:
        return hash(frozenset(self.items()))  # equal tags in another order are equal, so hash alike

    def __reduce__(self):
        return Tags, (dict(self),)


@dataclass(frozen=True)
class Cell:
    """One deployable model of a run: its tags (``layer``, ``dim``, then every other axis in plugin order, e.g.
    ``rank``, ``ffn``, ``precision``; each axis of the run, also at its full setting), the bytes one stored vector
    costs and the full setting of each axis that has one (what :func:`cell_name` leaves out). Hashable; its tags are
    read-only (:class:`Tags`), so a cell can key a dict or sit in a set.

    Example:
        >>> Cell({"layer": 2, "dim": 64, "rank": 64}, 256).name
        'layer_2/dim_64/rank_64'
        >>> Cell({"layer": 2, "dim": 64, "precision": "fp32"}, 256, {"precision": "fp32"}).name
        'layer_2/dim_64'
    """

    tags: Mapping[str, object]
    bytes: int
    full_settings: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", Tags(self.tags))
        object.__setattr__(self, "full_settings", Tags(self.full_settings))

    @property
    def name(self) -> str:
        return cell_name(self.tags, self.full_settings)

    @property
    def layer(self) -> int:
        return int(self.tags["layer"])

    @property
    def dim(self) -> int:
        return int(self.tags["dim"])

    def size(self) -> tuple:
        """Orders cells from cheapest to fullest: depth, then bytes per vector, then every other numeric tag
        (a model-side setting such as a rank or an FFN width) in tag order."""
        others = [value for key, value in self.tags.items() if key not in ("layer", "dim")
                  and isinstance(value, (int, float)) and not isinstance(value, bool)]
        return (self.layer, self.bytes, *others)


def axis_values(cells: list[Cell]) -> dict[str, list]:
    """``{tag: its values in first-seen order}`` over ``cells`` (e.g. ``{"layer": [1, 2, 4], "dim": [...], ...}``)."""
    values: dict[str, list] = {}
    for cell in cells:
        for key, value in cell.tags.items():
            if value not in values.setdefault(key, []):
                values[key].append(value)
    return values
