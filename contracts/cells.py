"""Cells and their names: the deployable (layer, dim, other axes) settings of a run, shared by the model (which
trains and encodes them), the evaluation (which scores them) and the CLIs (which name them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


def view_name(tags: Mapping[str, object]) -> str:
    """Metric-name fragment of a view, e.g. ``layer_4/dim_64/rank_128``.

    ``key_value`` rather than ``key=value``: MLflow rejects ``=`` in metric names (only alphanumerics,
    ``_ - . / : space``), and Lightning's MLflow logger would otherwise rewrite it silently.
    """
    return "/".join(f"{key}_{value}" for key, value in tags.items()) or "full"


def vector_bytes(width: int, bits_per_value: int) -> int:
    """Bytes of one stored vector, packed (64-d binary: 8 bytes)."""
    return -(-width * bits_per_value // 8)


@dataclass(frozen=True)
class Cell:
    """One deployable model of a run: its tags (``layer``, ``dim``, then every other axis in plugin order, e.g.
    ``rank``, ``ffn``, ``precision``) and the bytes one stored vector costs.

    Example:
        >>> Cell({"layer": 2, "dim": 64, "rank": 64}, 256).name
        'layer_2/dim_64/rank_64'
    """

    tags: dict[str, object]
    bytes: int

    @property
    def name(self) -> str:
        return view_name(self.tags)

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
