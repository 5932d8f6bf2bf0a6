"""The paper's claims, decided on probe tables by one rule (:data:`RULE`, :func:`holds`) on 95 % intervals: what
``make paper`` writes on the results page.

Each side of a claim is a role's tables (one per seed) of one grid of cells. Full-cell costs compare each role's own
*real* full cell (:func:`top_cell`: every axis at its largest setting, an axis left untruncated left out of the
name), so a baseline is scored untruncated; a role that trains MEL has no uncompressed cell (its top rank R is
below the width d) and its full cell is rank R (:func:`uncompressed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contracts.cells import ALWAYS_NAMED, cell_name, cut_tags
from evaluation.bootstrap import percentile_interval, resampled_means
from evaluation.comparison import CompareError, cell_scores, compare, paired_arrays
from evaluation.report import table_full_settings

CLEAR_SHARE = 0.05  # "clearly" / "markedly" more: at least 5 points more of the run's own full-cell score kept
FULL_COST = 1.0  # points an axis may cost at the full cell (claims 1-3)
COST_3DML = 2.0  # points 3D-ML may cost at the full cell (claim 4)

RULE = ("A claim passes when the 95 % interval of each quantity it names lies on the claimed side: \"better\" when "
        "the interval's low end is above 0, \"keeps ≥ 5 points more\" when it is above +5, \"costs < 1 point\" when "
        "the interval's worst (low) end is above −1, \"within 1 point\" when the whole interval lies inside (−1, +1). "
        "Intervals: paired bootstrap over queries, hierarchical over seeds (seeds, then queries), 10,000 resamples. "
        "Full-cell costs compare each run's real full cell (every axis at its largest setting; the baseline's "
        "embedding untruncated). Without per-query scores (tables probed before they were kept) the point estimate "
        "decides and the page says so.")


@dataclass
class Claim:
    """One row of the claims table: ``passed`` is None when the runs it needs are missing."""

    number: int
    axis: str
    statement: str
    value: str
    passed: bool | None


@dataclass(frozen=True)
class Estimate:
    """A measured quantity in points, with its 95 % interval when the tables have per-query scores."""

    value: float
    interval: tuple[float, float] | None

    def text(self) -> str:
        """``+7.7 pt [5.1, 10.2]`` (``+7.7 pt`` without an interval)."""
        return f"{self.value:+.2f} pt" + (f" [{self.interval[0]:+.2f}, {self.interval[1]:+.2f}]" if self.interval else "")


def holds(estimate: Estimate, above: float | None = None, below: float | None = None) -> bool:
    """THE claim rule (:data:`RULE`, written on the page): the interval (or, without one, the point estimate) lies
    above ``above`` and below ``below``."""
    low, high = estimate.interval or (estimate.value, estimate.value)
    return (above is None or low > above) and (below is None or high < below)


def axes(table: dict) -> dict[str, list]:
    """The values of each tag among ``table``'s cells, largest first (``{"layer": [4, 2, 1], "rank": [384, ...]}``)."""
    values: dict[str, set] = {}
    for cell in table["cells"]:
        for key, value in cell["tags"].items():
            values.setdefault(key, set()).add(value)
    return {key: sorted(found, reverse=True) for key, found in values.items()}


def common_axes(tables: list[dict]) -> dict[str, list]:
    """The values of each tag that every table's cells have, largest first: the suite's common grid (a baseline
    truncated afterwards also has its untruncated rank, which the runs that train MEL lack)."""
    per_table = [axes(table) for table in tables]
    return {key: [value for value in per_table[0][key] if all(value in other.get(key, ()) for other in per_table)]
            for key in per_table[0]}


def top_cell(table: dict, **tags) -> str:
    """The name of ``table``'s cell with ``tags`` and the largest value of every other axis: with no ``tags`` the
    run's real full cell (``layer_4/dim_384`` for a baseline, ``layer_4/dim_384/rank_192`` for a MEL run)."""
    top = {key: tags.get(key, values[0]) for key, values in axes(table).items()}
    return cell_name(top, table_full_settings(table))


def uncompressed(table: dict) -> bool:
    """Whether the run's real full cell cuts nothing beyond layer and width (False: MEL trained, top rank below d)."""
    top = {key: values[0] for key, values in axes(table).items()}
    return set(cut_tags(top, table_full_settings(table))) <= set(ALWAYS_NAMED)


def mean_scores(tables: list[dict], task: str) -> dict[str, float]:
    """``{cell: score}``, the mean over ``tables`` (seeds) of ``task``'s main score, for cells every table has."""
    per_table = [cell_scores(table, task, Path(f"table{index}")) for index, table in enumerate(tables)]
    return {name: sum(scores[name][1] for scores in per_table) / len(per_table)
            for name in per_table[0] if all(name in scores for scores in per_table)}


class Evidence:
    """Two roles' scores on one task, each the mean over its tables (seeds), with bootstrap samples of every cell of
    each side when every table has per-query scores (:func:`evaluation.bootstrap.resampled_means`, paired over
    queries, hierarchical over seeds): a quantity may compare different cells of A and B (two real full cells).

    Args:
        a, b: the reference's and the tested role's tables.
        task: the probe task whose main score is compared.
    """

    def __init__(self, a: list[dict], b: list[dict], task: str) -> None:
        self.a, self.b = mean_scores(a, task), mean_scores(b, task)
        try:
            paired = paired_arrays(a, b, [task], list(self.a), ([Path("A")] * len(a), [Path("B")] * len(b)),
                                   list(self.b))
        except CompareError:
            self.samples = None
        else:
            self.samples = resampled_means(paired)

    def _estimate(self, statistic) -> Estimate:
        """``statistic(scores of A, scores of B)`` (each indexable by cell, per resample when bootstrapped), in
        points."""
        value = 100 * statistic(self.a, self.b)
        if self.samples is None:
            return Estimate(value, None)
        columns = [{cell: samples[:, index] for index, cell in enumerate(side)}
                   for samples, side in zip(self.samples, (self.a, self.b))]
        low, high = percentile_interval(100 * statistic(*columns))
        return Estimate(value, (float(low), float(high)))

    def difference(self, cell: str, cell_a: str | None = None) -> Estimate:
        """B at ``cell`` − A at ``cell_a`` (default the same cell)."""
        return self._estimate(lambda a, b: b[cell] - a[cell_a or cell])

    def kept_gain(self, cell: str, full_a: str, full_b: str) -> Estimate:
        """How much more of its own full-cell score B keeps at ``cell`` than A does (points of share)."""
        return self._estimate(lambda a, b: b[cell] / b[full_b] - a[cell] / a[full_a])


def kept_shares(evidence: Evidence, cells: dict[str, str], full_a: str, full_b: str) -> tuple[list[str], bool]:
    """For each ``{label: cell}``: the share of its full-cell score each side keeps and B's gain with its interval,
    as text, and whether B keeps at least :data:`CLEAR_SHARE` more at every one of them (:func:`holds`)."""
    parts, clear = [], True
    for label, cell in cells.items():
        gain = evidence.kept_gain(cell, full_a, full_b)
        clear = clear and holds(gain, above=100 * CLEAR_SHARE)
        parts.append(f"{label}: {evidence.b[cell] / evidence.b[full_b]:.1%} vs {evidence.a[cell] / evidence.a[full_a]:.1%} "
                     f"({gain.text()})")
    return parts, clear


def claim_mrl(baseline: list[dict], mrl: list[dict], task: str) -> tuple[str, bool]:
    """Claim 1 on the widest ladder widths at or below d/8 and d/16, each role's full cell its real one."""
    evidence, grid = Evidence(baseline, mrl, task), common_axes([baseline[0], mrl[0]])
    full_a, full_b = top_cell(baseline[0]), top_cell(mrl[0])
    width = grid["dim"][0]
    dims = {fraction: max((d for d in grid["dim"] if d <= width / fraction), default=min(grid["dim"]))
            for fraction in (8, 16)}
    parts, clear = kept_shares(evidence, {f"d/{fraction} (dim {dim})": top_cell(mrl[0], dim=dim)
                                          for fraction, dim in dims.items()}, full_a, full_b)
    cost = evidence.difference(full_b, full_a)
    return "; ".join(parts) + f"; full {cost.text()}", clear and holds(cost, above=-FULL_COST)


def claim_mll(baseline: list[dict], mll: list[dict], task: str) -> tuple[str, bool]:
    """Claim 2 at exits 1 and 2 (the two shallowest) at full width and rank."""
    evidence, grid = Evidence(baseline, mll, task), common_axes([baseline[0], mll[0]])
    exits = sorted(grid["layer"])[:2]
    deltas = [evidence.difference(top_cell(mll[0], layer=layer), top_cell(baseline[0], layer=layer))
              for layer in exits]
    cost = evidence.difference(top_cell(mll[0]), top_cell(baseline[0]))
    value = "; ".join(f"exit {layer}: {delta.text()}" for layer, delta in zip(exits, deltas))
    return f"{value}; full {cost.text()}", all(holds(delta, above=0) for delta in deltas) and holds(cost,
                                                                                                   above=-FULL_COST)


def claim_mel(mel_fixed: list[dict], mel: list[dict], task: str) -> tuple[str, bool]:
    """Claim 3 at every rank below R, against the fixed-rank factorisation truncated afterwards."""
    evidence, grid = Evidence(mel_fixed, mel, task), common_axes([mel_fixed[0], mel[0]])
    full = top_cell(mel[0], rank=grid["rank"][0])
    parts, clear = kept_shares(evidence, {f"rank {rank}": top_cell(mel[0], rank=rank) for rank in grid["rank"][1:]},
                               full, full)
    at_rank = evidence.difference(full)
    return "; ".join(parts) + f"; at R {at_rank.text()}", clear and holds(at_rank, above=-FULL_COST, below=FULL_COST)


def claim_3dml(baseline: list[dict], model: list[dict], task: str) -> tuple[str, bool]:
    """Claim 4 over the common grid; the full-cell cost against the baseline's real full cell."""
    stats = compare(baseline, model, task)["groups"]["all"]
    full = top_cell(model[0])
    cost = Evidence(baseline, model, task).difference(full, top_cell(baseline[0]))
    if stats["better"] is not None:  # most cells: significantly better (interval above 0) in more than half
        most = stats["better"] > stats["cells"] / 2
        counted = f"better in {stats['better']}/{stats['cells']} cells, worse in {stats['worse']}"
    else:
        most = stats["higher"] > stats["cells"] / 2
        counted = f"higher in {stats['higher']}/{stats['cells']} cells"
    label = "full" if uncompressed(model[0]) else f"full ({full})"
    return f"{counted} (mean {stats['mean_delta']:+.2f} pt); {label} {cost.text()}", most and holds(cost,
                                                                                                 above=-COST_3DML)


# The claims of the paper: number, axis, the roles (reference, tested), what is claimed, how it is measured.
CLAIMS = [
    (1, "MRL", ("baseline", "mrl"), f"`mrl` keeps ≥ {CLEAR_SHARE:.0%} more of its full-cell score than `baseline` "
                                    f"sliced afterwards at d/8 and d/16; full cell costs < {FULL_COST:g} point",
     claim_mrl),
    (2, "MLL", ("baseline", "mll"), f"`mll` beats `baseline` at exits 1 and 2; full depth costs < {FULL_COST:g} point",
     claim_mll),
    (3, "MEL", ("mel_fixed", "mel"), f"below R, `mel` keeps ≥ {CLEAR_SHARE:.0%} more of its rank-R score than "
                                     f"`mel_fixed` truncated afterwards; at R within {FULL_COST:g} point", claim_mel),
    (4, "3D-ML", ("baseline", "3dml"), f"`3dml` beats `baseline` sliced afterwards in most cells; full cell costs "
                                       f"< {COST_3DML:g} points (against the baseline's untruncated full cell)",
     claim_3dml),
]


def claims(runs: dict[str, list[dict]], task: str, only_run: bool = False) -> list[Claim]:
    """The pass/fail claims of the paper on ``task``'s main score, each side the mean over its tables (seeds), each
    decided by :func:`holds` on its 95 % intervals.

    Args:
        runs: probe tables per role (``baseline``, ``mrl``, ``mll``, ``mel``, ``mel_fixed``, ``3dml``).
        task: the probe task whose main score is compared.
        only_run: leave out the claims whose roles are missing (else they are rows saying "not run").
    """
    present = {name: tables for name, tables in runs.items() if tables and task in tables[0].get("tasks", {})}
    rows = []
    for number, axis, (reference, tested), statement, measure in CLAIMS:
        if reference in present and tested in present:
            rows.append(Claim(number, axis, statement, *measure(present[reference], present[tested], task)))
        elif not only_run:
            rows.append(Claim(number, axis, statement, "not run", None))
    return rows


def seed_agreement(runs_by_seed: list[dict[str, list[dict]]], task: str, only_run: bool = False) -> dict[int, str]:
    """``{claim: "2/3"}``: in how many seeds the claim passes on that seed's runs alone."""
    outcomes = [claims(runs, task, only_run) for runs in runs_by_seed]
    return {claim.number: f"{sum(rows[index].passed is True for rows in outcomes)}/{len(outcomes)}"
            for index, claim in enumerate(outcomes[0])}
