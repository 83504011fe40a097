"""Input scaling with its log-Jacobian, so that scores stay log-densities in the user's units."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

#: An impossible value (off its column's lattice, or below the column's support) costs this
#: many nats on top of the probability of its nearest lattice point: as much as a value
#: 14 σ out in a normal column, so an impossible value ranks as very unusual wherever it is.
IMPOSSIBLE_VALUE_NATS = 100.0

#: A lattice's step must be at least 1/this of the column's interquartile range: finer grids
#: (a continuous quantity recorded to a few decimals) are densities.
MAX_LATTICE_CELLS = 1000

#: Share of a column's training values that may lie off its lattice (a stray 3.5 among
#: counts): at most this share of the rows and of the distinct values, rounded down, so a
#: column with 100 distinct values or more tolerates one stray value. A rare value that
#: many rows share is data, not a stray: it keeps the finer lattice that holds it.
MAX_OFF_LATTICE_SHARE = 0.01

#: Candidate steps are the smallest and the commonest gaps between distinct values,
#: divided by 1 .. this.
MAX_STEP_DIVISOR = 10


@dataclass(frozen=True)
class ColumnLattice:
    """How one numeric column is modelled, and why.

    ``kind`` is "lattice" (values origin + k·step, scored by cell masses), "continuous"
    (a density) or "constant". ``lower`` is the smallest possible value of a lattice
    column: 0 for whole numbers whose training values start at 0 (counts, flags), NaN
    (unbounded) otherwise — a min-max scaled column also starts at 0, but its values are
    not whole numbers, and a value below its training range is merely unusual. ``upper``
    is the largest possible value (NaN: unbounded); only a two-valued column has one: its
    two values are its only cells (a flag, a one-hot or bag-of-words indicator). ``reason``
    says in words why.
    """

    kind: str
    step: float
    origin: float
    lower: float
    reason: str
    upper: float = np.nan


def cell_tolerance(values: np.ndarray, step: float | np.ndarray) -> np.ndarray:
    """How far (in cells) a value may sit from a lattice point and count as on it: 1e-4 of a cell,
    more for values so large relative to the step that float32 rounding reaches that far."""
    return np.minimum(np.maximum(1e-4, 1e-6 * np.abs(values) / step), 0.1)


def _on_grid_share(values: np.ndarray, counts: np.ndarray, step: float) -> tuple[int, float, np.ndarray]:
    """(rows on the best lattice of ``step``, its origin, the mask of ``values`` on it) for distinct ``values``."""
    k = (values - values[0]) / step
    residue = k - np.floor(k)
    key = np.round(residue * 1e4).astype(np.int64) % 10_000  # residues agreeing to 1e-4 of a cell
    keys, inverse = np.unique(key, return_inverse=True)
    weight = np.bincount(inverse, weights=counts)
    best = keys[int(np.argmax(weight))] / 1e4
    distance = np.abs(residue - best)
    on = np.minimum(distance, 1 - distance) <= cell_tolerance(values, step)
    origin = float(values[int(np.flatnonzero(on)[0])]) if on.any() else float(values[0])
    return int(counts[on].sum()), origin, on


def _candidate_steps(values: np.ndarray, smallest: float) -> np.ndarray:
    """Steps worth testing: the smallest and commonest gaps (≥ ``smallest``) divided by 1 .. MAX_STEP_DIVISOR."""
    gaps = np.diff(values)
    gaps = gaps[gaps >= smallest]
    if gaps.size == 0:
        return gaps
    rounded = np.round(gaps / gaps.min(), 6)
    levels, frequency = np.unique(rounded, return_counts=True)
    picked = np.union1d(levels[:8], levels[np.argsort(-frequency, kind="stable")[:8]]) * gaps.min()
    steps = (picked[:, None] / np.arange(1, MAX_STEP_DIVISOR + 1)[None, :]).ravel()
    # gaps of float32 data carry rounding: also try each step as a decimal of 3 significant
    # digits, and stretched so that it divides the whole range exactly
    digits = 10.0 ** (2 - np.floor(np.log10(steps)))
    span = values[-1] - values[0]
    steps = np.concatenate([steps, np.round(steps * digits) / digits, span / np.maximum(np.round(span / steps), 1)])
    steps = steps[steps >= smallest * (1 - 1e-9)]
    if steps.size == 0:
        return steps
    top = steps.max()
    # steps within 1e-7 of each other once: the first of them, so a gap as it is found
    # wins over the same step rounded or stretched
    _, first = np.unique(np.round(steps / top, 7), return_index=True)
    return np.sort(steps[first])[::-1]  # largest first


def significant_figures(values: np.ndarray) -> np.ndarray:
    """The fewest significant figures (1–15) that write each value exactly as float64 does (0 for 0)."""
    out = np.zeros(len(values), dtype=int)
    for i, v in enumerate(np.asarray(values, dtype=np.float64)):
        if v != 0:
            out[i] = next((s for s in range(1, 16) if float(f"{v:.{s - 1}e}") == v), 17)
    return out


#: On-lattice values whose significant figures are read to judge a column's rounding (evenly spaced, sorted).
SIGNIFICANT_FIGURE_SAMPLE = 1000


def significant_figures_rounding(distinct: np.ndarray, on_values: np.ndarray) -> int | None:
    """The significant figures of a column rounded to them rather than to a fixed step, else None.

    A column recorded to a few significant figures (0.01513, 0.007882) lies on the step of
    its typical values' last digit except for its smallest values, which have more
    decimals: they are off that step only because they are small. Such a column is
    continuous, not a lattice with a few impossible values, when the values off the step
    (1) are all below the decade of the median value on it, (2) are at least half of the
    distinct values in their own decades, and (3) are written with as many significant
    figures as the values on the step (at most the most any has, at least one fewer than
    their median). A stray 3.5 among whole counts fails (2) (1, 2, 3, ... share its decade
    and are whole), a lone 0.005 among values to two decimals fails (3).
    """
    off, on = np.abs(distinct[~on_values]), np.abs(distinct[on_values])
    on_nonzero = on[on != 0]
    if off.size == 0 or on_nonzero.size == 0 or (off == 0).any():
        return None
    if off.max() >= 10.0 ** np.floor(np.log10(np.median(on_nonzero))):
        return None
    low, high = 10.0 ** np.floor(np.log10(off.min())), 10.0 ** (np.floor(np.log10(off.max())) + 1)
    in_band = int(((on >= low) & (on < high)).sum()) + off.size
    if off.size < 0.5 * in_band:
        return None
    sample = on_nonzero[
        np.unique(np.linspace(0, on_nonzero.size - 1, min(on_nonzero.size, SIGNIFICANT_FIGURE_SAMPLE)).astype(int))
    ]
    on_figures, off_figures = significant_figures(sample), significant_figures(off)
    most = int(on_figures.max())
    return most if off_figures.max() <= most and off_figures.min() >= int(np.median(on_figures)) - 1 else None


def find_lattice(
    column: np.ndarray, *, forced: bool = False, max_off_share: float = MAX_OFF_LATTICE_SHARE
) -> ColumnLattice:
    """Whether the training values of one column (NaN = missing) lie on a regular lattice.

    A column with exactly two distinct values is a binary lattice: those two values are its
    only cells (``lower`` and ``upper``); named in ``discrete_columns`` (``forced``) it is an
    ordinary lattice instead (a count that happened to take two values). Otherwise the step
    Δ is the largest candidate (the smallest and commonest gaps between distinct values,
    divided by 1..10) such that all but ``max_off_share`` of the values (rounded down; of
    the rows and of the distinct values) are origin + k·Δ; a lattice must also be coarse, Δ ≥ IQR / 1000 (the
    interquartile range; the standard deviation when it is 0), so that neither the sample
    size nor one far-out value (both leave the IQR alone) changes the decision. With
    ``forced`` (the column was named in ``discrete_columns``) any step is accepted.
    """
    values = np.asarray(column, dtype=np.float64)
    values = values[~np.isnan(values)]
    distinct, counts = np.unique(values, return_counts=True)
    if distinct.size < 2:
        what = "no observed value" if distinct.size == 0 else f"one value ({distinct[0]:g}) in every row"
        return ColumnLattice("constant", 0.0, 0.0, np.nan, what)
    if distinct.size == 2 and not forced:
        low, high = (float(v) for v in distinct)
        why = (
            f"two values, {low:.6g} ({counts[0]} rows) and {high:.6g} ({counts[1]} rows): a binary column, "
            "scored by the masses of its two cells; any other value is impossible"
        )
        return ColumnLattice("lattice", high - low, low, low, why, upper=high)
    n = int(counts.sum())
    allowed = int(max_off_share * n)
    q25, q75 = np.percentile(values, [25, 75])
    spread, spread_name = float(q75 - q25), "interquartile range"
    if spread <= 0:
        spread, spread_name = float(scale_free_moments(values[:, None])[1][0]), "standard deviation"
    smallest = 1e-9 * float(np.max(np.abs(distinct))) if forced else spread / MAX_LATTICE_CELLS
    if not forced and spread_name == "interquartile range":
        inside = int(np.searchsorted(distinct, q75, "right") - np.searchsorted(distinct, q25, "left"))
        if inside > MAX_LATTICE_CELLS + 1 + allowed:  # more distinct values than a coarse lattice has cells
            return ColumnLattice(
                "continuous",
                0.0,
                0.0,
                np.nan,
                f"{inside} distinct values within the interquartile range ({spread:.6g}): not a lattice of at "
                f"most {MAX_LATTICE_CELLS} cells there",
            )
    for step in _candidate_steps(distinct, smallest):
        on, origin, on_values = _on_grid_share(distinct, counts, float(step))
        if n - on <= allowed and (~on_values).sum() <= int(max_off_share * distinct.size):
            figures = None if forced or on == n else significant_figures_rounding(distinct, on_values)
            if figures is not None:
                return ColumnLattice(
                    "continuous",
                    0.0,
                    0.0,
                    np.nan,
                    f"values rounded to {figures} significant figures, not to a fixed step: the {n - on} smallest "
                    f"(e.g. {distinct[~on_values][0]:.6g}) are off the step {float(step):.6g} that the others share",
                )
            # the step that the extreme values on the lattice span exactly (1, not 0.99999992)
            span = float(distinct[on_values][-1] - origin)
            step = span / round(span / float(step)) if span > 0 else float(step)
            cells = spread / step
            off = f"; {n - on} off it (scored as impossible)" if on < n else ""
            why = f"{on} of {n} values are {origin:.6g} + k·{step:.6g}{off}; {cells:.3g} cells per {spread_name}"
            lower = np.nan
            if distinct[0] == 0.0 and origin == 0.0 and step >= 1 and step == round(step):
                lower = 0.0  # counts and flags: whole numbers from 0 up
                why += "; whole numbers from 0 up (a negative value is impossible)"
            return ColumnLattice("lattice", step, origin, lower, why)
    if forced:
        raise ValueError(
            f"values such as {distinct[0]:g}, {distinct[1]:g}, ..., {distinct[-1]:g} are not on a regular lattice"
        )
    return ColumnLattice(
        "continuous",
        0.0,
        0.0,
        np.nan,
        f"no step of at least 1/{MAX_LATTICE_CELLS} of the {spread_name} ({spread:.6g}) holds "
        f"{100 * (1 - max_off_share):g}% of the values",
    )


@dataclass
class Standardizer:
    """x ↦ (x − center) / scale per column, with lattice-valued columns snapped to their lattice.

    If the model's density of the standardised data is p_s, the density of the original
    data is p_x(x) = p_s((x − c)/s) · Π 1/s_j, so :attr:`log_jacobian` = −Σ log s_j (nats)
    is added to every score. Lattice columns (``step`` > 0: values origin + k·step) are
    modelled by cell masses, which do not change under rescaling, so they add nothing to
    the log-Jacobian; their cell width in standardised units is :attr:`bin_widths`, and a
    column with a ``lower`` bound (not NaN) has no cells below it. A value off its
    column's lattice or below its bound is impossible (:meth:`impossible`): it is scored as
    the nearest lattice point, :data:`IMPOSSIBLE_VALUE_NATS` less likely.
    Constant columns keep scale 1 (no rescaling).
    """

    center: np.ndarray
    scale: np.ndarray
    origin: np.ndarray | None = None
    step: np.ndarray | None = None
    lower: np.ndarray | None = None
    columns: list[ColumnLattice] | None = None
    upper: np.ndarray | None = None

    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        *,
        detect_lattice: bool | np.ndarray = False,
        categorical: np.ndarray | None = None,
        names: list[str] | None = None,
    ) -> Standardizer:
        """Center and scale from the column means and standard deviations of ``X`` (n, d).

        ``detect_lattice``: True finds the lattice columns (:func:`find_lattice`); a boolean
        mask (d,) makes exactly those columns lattices (a ``ValueError`` naming a column
        whose values are not on one); False makes every column continuous.
        """
        X = np.asarray(X, dtype=np.float64)
        d = X.shape[1]
        names = names or [f"column {j}" for j in range(d)]
        center, scale = scale_free_moments(X)
        # constant: no spread, or a spread below the float resolution of the values
        # (relative, so a column of scale 1e-13 or 1e-300 is data, not a constant)
        constant = (scale == 0) | (scale <= 1e-12 * np.abs(center))
        scale[constant] = 1.0
        categorical = np.zeros(d, bool) if categorical is None else np.asarray(categorical, bool)
        forced = isinstance(detect_lattice, np.ndarray)
        columns = []
        for j in range(d):
            if categorical[j]:
                columns.append(ColumnLattice("categorical", 1.0, 0.0, 0.0, "categories, coded 0 .. K−1"))
            elif constant[j]:
                columns.append(
                    ColumnLattice("constant", 0.0, 0.0, np.nan, "one value in every row (to float precision)")
                )
            elif forced and detect_lattice[j]:
                try:
                    columns.append(find_lattice(X[:, j], forced=True))
                except ValueError as exc:
                    raise ValueError(f"column {names[j]} is named in discrete_columns but its {exc}") from None
            elif forced or not detect_lattice:
                why = "not named in discrete_columns" if forced else "discrete_columns='none'"
                columns.append(ColumnLattice("continuous", 0.0, 0.0, np.nan, why))
            else:
                columns.append(find_lattice(X[:, j]))
        step = np.array([c.step if c.kind in ("lattice", "categorical") else 0.0 for c in columns])
        center[categorical], scale[categorical] = 0.0, 1.0  # category codes: not rescaled (no log-Jacobian)
        if not step.any():
            return cls(center, scale, columns=columns)
        origin = np.array([c.origin for c in columns])

        def bound(side: str) -> np.ndarray | None:  # the lattices' lower or upper bounds, None if there are none
            values = np.array([getattr(c, side) if c.kind == "lattice" else np.nan for c in columns])
            return values if np.isfinite(values).any() else None

        return cls(center, scale, origin, step, bound("lower"), columns, bound("upper"))

    def lattices(self, kinds: list[str], reasons: list[str]) -> list[ColumnLattice]:
        """Per-column records from this standardizer's arrays, with the given kinds and reasons."""
        d = len(self.scale)
        step = self.step if self.step is not None else np.zeros(d)
        origin = self.origin if self.origin is not None else np.zeros(d)
        lower = self.lower if self.lower is not None else np.full(d, np.nan)
        upper = self.upper if self.upper is not None else np.full(d, np.nan)
        return [
            ColumnLattice(kinds[j], float(step[j]), float(origin[j]), float(lower[j]), reasons[j], float(upper[j]))
            for j in range(d)
        ]

    @property
    def discrete(self) -> np.ndarray:
        """Boolean mask of the lattice-valued columns."""
        return np.zeros(self.scale.shape, bool) if self.step is None else self.step > 0

    @property
    def bin_widths(self) -> np.ndarray:
        """Lattice cell width per column in standardised units (0 for continuous columns)."""
        return np.zeros_like(self.scale) if self.step is None else self.step / self.scale

    @property
    def lattice_floor(self) -> np.ndarray | None:
        """The lowest possible cell per column in standardised units (NaN: unbounded), or None if none is bounded."""
        return self._standardised_bound(self.lower)

    @property
    def lattice_ceiling(self) -> np.ndarray | None:
        """The highest possible cell per column in standardised units (NaN: unbounded), or None if none is bounded."""
        return self._standardised_bound(self.upper)

    def _standardised_bound(self, bound: np.ndarray | None) -> np.ndarray | None:
        if bound is None or not np.isfinite(bound).any():
            return None
        return (bound - self.center) / self.scale

    @property
    def log_jacobian(self) -> float:
        """−Σ log scale_j over continuous columns: nats added to a standardised-space log-density."""
        return float(-np.log(self.scale[~self.discrete]).sum())

    def log_jacobian_rows(self, observed: np.ndarray | None, n_rows: int) -> np.ndarray:
        """Per-row log-Jacobian, shape (n_rows,): only observed continuous entries count.

        ``observed`` is the (n_rows, d) mask of observed entries, or None for complete data.
        """
        if observed is None:
            return np.full(n_rows, self.log_jacobian)
        weights = np.where(self.discrete, 0.0, -np.log(self.scale))
        return observed.astype(np.float64) @ weights

    def _cells(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(k, nearest integer to k) with x = origin + k·step, for the lattice columns of ``X``."""
        d = self.discrete
        k = (X[:, d] - self.origin[d]) / self.step[d]
        return k, np.floor(k + 0.5)

    def snap(self, X: np.ndarray) -> np.ndarray:
        """Values of lattice columns moved to the nearest lattice point (halves round up)."""
        X = np.asarray(X, dtype=np.float64)
        if self.step is None or not self.discrete.any():
            return X
        d = self.discrete
        X = X.copy()
        X[:, d] = self.origin[d] + self._cells(X)[1] * self.step[d]
        return X

    def to_support(self, X: np.ndarray) -> np.ndarray:
        """The nearest possible values: lattice columns snapped and moved within their bounds.

        A lattice of decimal numbers (origin and step with at most :data:`MAX_DECIMALS`
        decimal places) gives its values rounded to those places, so a price on a 0.01 grid
        reads 15.06, not origin + k·step's 15.059999999999999.
        """
        X = self._within_bounds(self.snap(X))
        if self.step is not None:
            for j in np.flatnonzero(self.discrete):
                places = decimal_places(self.origin[j], self.step[j])
                if places is not None:
                    X[:, j] = np.round(X[:, j], places)
        return X

    def _within_bounds(self, X: np.ndarray) -> np.ndarray:
        """``X`` (snapped, a copy) with the values of bounded lattice columns moved within their bounds."""
        for bound, nearer in ((self.lower, np.maximum), (self.upper, np.minimum)):
            if bound is not None:
                bounded = np.isfinite(bound)
                X[:, bounded] = nearer(X[:, bounded], bound[bounded])
        return X

    def integer_columns(self) -> np.ndarray:
        """Boolean mask (d,) of the lattice columns whose every value is a whole number (whole origin and step)."""
        if self.step is None:
            return np.zeros(len(self.center), bool)
        return self.discrete & (decimal_places_of(self.origin) == 0) & (decimal_places_of(self.step) == 0)

    def impossible(self, X: np.ndarray) -> np.ndarray:
        """Boolean mask (n, d) of the values off their column's lattice or outside its bounds (NaN: False)."""
        X = np.asarray(X, dtype=np.float64)
        out = np.zeros(X.shape, bool)
        if self.step is None or not self.discrete.any():
            return out
        d = self.discrete
        k, nearest = self._cells(X)
        bad = np.abs(k - nearest) > cell_tolerance(X[:, d], self.step[d])
        if self.lower is not None:
            bad |= X[:, d] < self.lower[d] - 0.5 * self.step[d]
        if self.upper is not None:
            bad |= X[:, d] > self.upper[d] + 0.5 * self.step[d]
        out[:, d] = bad & ~np.isnan(X[:, d])
        return out

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Standardised values; a lattice value is moved to the nearest possible one (its impossibility is
        :meth:`impossible`'s to mark)."""
        return (self._within_bounds(self.snap(X)) - self.center) / self.scale

    def inverse_transform(self, Z: np.ndarray) -> np.ndarray:
        return np.asarray(Z, dtype=np.float64) * self.scale + self.center


#: The most decimal places a lattice's origin and step may have for its values to be given rounded to them.
MAX_DECIMALS = 12


def decimal_places_of(values: np.ndarray) -> np.ndarray:
    """The fewest decimal places (≤ :data:`MAX_DECIMALS`) that write each value exactly (to 1e-9 of a unit in the
    last place), −1 where none does (1/3, π)."""
    values = np.atleast_1d(np.asarray(values, dtype=np.float64))
    out = np.full(values.shape, -1)
    for places in range(MAX_DECIMALS, -1, -1):
        rounded = np.round(values, places)
        exact = np.abs(values - rounded) <= 1e-9 * 10.0**-places + 4 * np.spacing(np.abs(values))
        out = np.where(exact, places, out)
    return out


def decimal_places(*values: float) -> int | None:
    """The decimal places that write all ``values`` exactly, or None where some value needs more than
    :data:`MAX_DECIMALS`."""
    places = decimal_places_of(np.array(values))
    return None if (places < 0).any() else int(places.max())


def column_types(columns: list[ColumnLattice], names: list[str]) -> pd.DataFrame:
    """One row per column (index ``names``): kind, step, origin, lower and upper bound, and the reason."""
    frame = pd.DataFrame(
        [[c.kind, c.step, c.origin, c.lower, c.upper, c.reason] for c in columns],
        columns=["kind", "step", "origin", "lower", "upper", "reason"],
        index=pd.Index(names, name="column"),
    )
    continuous = frame["kind"].isin(["continuous", "constant"]).to_numpy()
    frame.loc[continuous, ["step", "origin"]] = np.nan
    return frame


def scale_free_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations of ``X`` (n, d), NaN left out, at any magnitude.

    Each column is divided by its largest absolute value before the moments are taken
    and the results multiplied back, so values near 1e200 do not overflow when squared
    and values near 1e-300 do not underflow to a zero spread. All-NaN columns give NaN.
    """
    with np.errstate(all="ignore"):
        magnitude = np.nanmax(np.abs(X), axis=0) if X.shape[0] else np.ones(X.shape[1])
    magnitude = np.where(np.isfinite(magnitude) & (magnitude > 0), magnitude, 1.0)
    unit = X / magnitude
    return np.nanmean(unit, axis=0) * magnitude, np.nanstd(unit, axis=0) * magnitude


def lattice_steps(X: np.ndarray, max_off_share: float = MAX_OFF_LATTICE_SHARE) -> np.ndarray:
    """Lattice step Δ per column of ``X`` (n, d) by :func:`find_lattice`, or 0 for a continuous column."""
    X = np.asarray(X, dtype=np.float64)
    return np.array([find_lattice(X[:, j], max_off_share=max_off_share).step for j in range(X.shape[1])])


def _is_numeric(dtype: Any) -> bool:
    return bool(pd.api.types.is_numeric_dtype(dtype)) and not pd.api.types.is_bool_dtype(dtype)


#: An object or string column whose observed cells are numbers but for at most this share
#: is a numeric column with bad cells (a stray "n/a" in a CSV), not a categorical one.
MAX_BAD_CELL_SHARE = 0.01


def _mostly_numbers(column: pd.Series) -> bool:
    """Whether a text column holds numbers apart from at most :data:`MAX_BAD_CELL_SHARE` of its cells."""
    if pd.api.types.is_bool_dtype(column.dtype) or isinstance(column.dtype, pd.CategoricalDtype):
        return False  # an explicit category dtype says what the user means
    observed = column[column.notna()]
    if observed.map(lambda v: isinstance(v, bool)).any():
        return False
    not_numbers = int(pd.to_numeric(observed, errors="coerce").isna().sum())
    return len(observed) > 0 and not_numbers < len(observed) and not_numbers <= MAX_BAD_CELL_SHARE * len(observed)


def _as_numbers(column: pd.Series, name: str) -> pd.Series:
    """A numeric column as float64; cells that are not numbers become missing (NaN), with a warning naming them."""
    numbers = pd.to_numeric(column, errors="coerce").astype(np.float64)
    bad = numbers.isna().to_numpy() & column.notna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        warnings.warn(
            f"column {name!r}: {int(bad.sum())} cell(s) are not numbers (first: row {column.index[i]!r}, "
            f"{column.iloc[i]!r}); they are treated as missing values",
            UserWarning,
            stacklevel=4,
        )
    return numbers


#: A text or categorical column with at least this many distinct values, one for at least
#: :data:`ID_DISTINCT_SHARE` of its rows, identifies rows rather than describing them.
ID_MIN_DISTINCT, ID_DISTINCT_SHARE = 20, 0.5
#: Names (lower case) that, on a two-valued column, say "the anomaly labels".
LABEL_NAMES = frozenset(
    {"label", "labels", "target", "y", "is_anomaly", "anomaly", "is_outlier", "outlier", "ground_truth", "class_label"}
)


def check_feature_columns(X: pd.DataFrame) -> None:
    """Refuse, in one line naming the column, the two table mistakes a fit would learn silently.

    - an id left among the features: a text or categorical column with a distinct value on
      (nearly) every row would become thousands of categories that say nothing about the
      next row (:data:`ID_MIN_DISTINCT`, :data:`ID_DISTINCT_SHARE`);
    - the anomaly labels left among the features: a two-valued column named like a label
      (:data:`LABEL_NAMES`); a model trained on it learns the answer, and scoring unlabelled
      rows has nothing to read.
    """
    for name in X.columns:
        column = X[name]
        observed = column[column.notna()]
        if (
            not _is_numeric(column.dtype)
            and not pd.api.types.is_bool_dtype(column.dtype)
            and not _mostly_numbers(column)
        ):
            distinct = observed.astype(str).nunique()
            if distinct >= ID_MIN_DISTINCT and distinct >= ID_DISTINCT_SHARE * len(observed):
                raise ValueError(
                    f"column {str(name)!r} has {distinct} distinct values in {len(observed)} rows: it identifies rows "
                    "rather than describing them; leave it out of the features (on the command line: "
                    f"--id-column {name})"
                )
        if str(name).strip().lower() in LABEL_NAMES and observed.nunique() == 2:
            raise ValueError(
                f"column {str(name)!r} looks like the anomaly labels (two values, named like a label): a model trained "
                "on it learns the answer; leave it out of the features (evaluate reads it: --label-column "
                f"{name}), or rename it if it is a feature"
            )


@dataclass
class ColumnCoder:
    """Codes a DataFrame's categorical and boolean columns as integers, and back.

    ``vocabularies[j]`` is None for a numeric column, else the sorted labels (as
    strings) of column ``j``: a value is coded by its position, a missing value as NaN.
    Booleans are categories ``["False", "True"]``. A text column whose cells are numbers
    but for a few (at most :data:`MAX_BAD_CELL_SHARE`) is numeric: its other cells are
    missing values, reported by a warning.
    """

    columns: list[str]
    vocabularies: list[list[str] | None]

    @staticmethod
    def needed(X: Any) -> bool:
        """Whether ``X`` is a DataFrame with a non-numeric column."""
        return isinstance(X, pd.DataFrame) and any(not _is_numeric(t) for t in X.dtypes)

    @classmethod
    def fit(cls, X: pd.DataFrame) -> ColumnCoder:
        """Read the columns' kinds and the categories' vocabularies off ``X``."""
        vocabularies: list[list[str] | None] = []
        for name in X.columns:
            column = X[name]
            if _is_numeric(column.dtype) or _mostly_numbers(column):
                vocabularies.append(None)
                continue
            observed = column[column.notna()]
            bad = observed[~observed.map(lambda v: isinstance(v, (str, bool, int, float, np.generic)))]
            if len(bad):
                raise ValueError(
                    f"column {str(name)!r} holds a {type(bad.iloc[0]).__name__} at row {bad.index[0]!r}; "
                    "categorical columns need strings, numbers or booleans"
                )
            labels = sorted({str(v) for v in observed})
            if pd.api.types.is_bool_dtype(column.dtype):
                labels = ["False", "True"]
            if not labels:
                raise ValueError(f"column {str(name)!r} has no observed values (all missing) to learn from")
            vocabularies.append(labels if len(labels) >= 2 else [*labels, "<other>"])
        return cls([str(c) for c in X.columns], vocabularies)

    @property
    def n_categories(self) -> list[int]:
        """Levels per column; 0 for numeric columns."""
        return [0 if v is None else len(v) for v in self.vocabularies]

    @property
    def categorical(self) -> np.ndarray:
        return np.array([v is not None for v in self.vocabularies])

    def encode(self, X: pd.DataFrame, handle_unknown: str = "error") -> pd.DataFrame:
        """Numeric frame: categories as their codes, missing as NaN.

        ``handle_unknown="error"`` refuses a category not seen in training (naming the
        column, row and value); ``"ignore"`` treats it as missing.
        """
        if list(map(str, X.columns)) != self.columns:
            raise ValueError(f"X has columns {list(map(str, X.columns))}; the model was fitted on {self.columns}")
        out = {}
        for name, vocab in zip(self.columns, self.vocabularies, strict=True):
            column = X[name] if name in X.columns else X.iloc[:, self.columns.index(name)]
            if vocab is None:
                out[name] = _as_numbers(column, name)
                continue
            lookup = {label: float(i) for i, label in enumerate(vocab)}
            missing = column.isna().to_numpy()
            labels = column.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
            codes = labels.map(lookup)
            unknown = codes.isna().to_numpy() & ~missing
            if unknown.any() and handle_unknown == "error":
                i = int(np.flatnonzero(unknown)[0])
                raise ValueError(
                    f"column {name!r}, row {X.index[i]!r}: category {labels.iloc[i]!r} was not seen in training "
                    "(handle_unknown='ignore' treats unseen categories as missing)"
                )
            out[name] = codes.astype(np.float64)
        return pd.DataFrame(out, index=X.index)

    def decode(self, codes: np.ndarray) -> pd.DataFrame:
        """A frame with the categories' labels back in place of their codes."""
        frame = pd.DataFrame(codes, columns=self.columns)
        for name, vocab in zip(self.columns, self.vocabularies, strict=True):
            if vocab is not None:
                idx = np.clip(np.round(frame[name].to_numpy()), 0, len(vocab) - 1).astype(int)
                frame[name] = pd.Categorical.from_codes(idx, categories=vocab)
        return frame


#: Elementwise work on images runs over blocks of this many values, so that its temporaries stay in the CPU's
#: cache: 20 × faster than whole-array temporaries on 10,000 28 × 28 images (0.94 → 0.05 s for
#: :meth:`PixelLevels.impossible`, measured in session 27).
ELEMENTWISE_BLOCK = 1 << 15


def _blockwise(fn: Callable[[np.ndarray], np.ndarray], values: np.ndarray, dtype: Any) -> np.ndarray:
    """``fn`` (elementwise) of ``values`` (any shape) computed a block of :data:`ELEMENTWISE_BLOCK` values at a time."""
    flat = np.asarray(values).reshape(-1)
    out = np.empty(flat.shape, dtype=dtype)
    for start in range(0, flat.size, ELEMENTWISE_BLOCK):
        out[start : start + ELEMENTWISE_BLOCK] = fn(flat[start : start + ELEMENTWISE_BLOCK])
    return out.reshape(np.shape(values))


#: Integer image dtypes with at most this many values are modelled over their whole range (uint8: 256 levels).
MAX_DTYPE_LEVELS = 1024


@dataclass
class PixelLevels:
    """Image values ↔ integer levels 0 .. n_levels−1, with value = origin + level·step.

    Binary images (two distinct values, or bool) have two levels. Images of a small integer
    dtype (uint8, int8) are otherwise modelled over the dtype's whole range, so any value
    the dtype can hold can be scored. Other images are on a lattice
    when their values are origin + k·step (:func:`lattice_steps` over all pixels); the
    levels then run from the smallest to the largest value seen in training.
    """

    origin: float
    step: float
    n_levels: int
    dtype: str

    @classmethod
    def fit(cls, images: np.ndarray, dtype: Any) -> PixelLevels | None:
        """The levels of ``images`` (float64 values, any shape), or None for continuous pixel values."""
        dtype = np.dtype(dtype)
        values = np.unique(images[~np.isnan(images)])
        if dtype == np.bool_ or values.size == 2:  # binary images, whatever their dtype: two levels
            low, high = (0.0, 1.0) if values.size < 2 else (float(values[0]), float(values[1]))
            return cls(low, high - low, 2, dtype.str)
        if np.issubdtype(dtype, np.integer) and int(np.iinfo(dtype).max) - int(np.iinfo(dtype).min) < MAX_DTYPE_LEVELS:
            info = np.iinfo(dtype)
            return cls(float(info.min), 1.0, int(info.max) - int(info.min) + 1, dtype.str)
        step = float(lattice_steps(values[:, None], max_off_share=0.0)[0]) if values.size >= 2 else 0.0
        if step <= 0:
            return None
        return cls(float(values[0]), step, int(np.round((values[-1] - values[0]) / step)) + 1, dtype.str)

    def to_levels(self, images: np.ndarray) -> np.ndarray:
        """Levels (float64, NaN kept) of ``images`` (any shape): the nearest level, within 0 .. n_levels−1.

        A value off the levels (:meth:`impossible`) gets the nearest level; scoring charges
        it :data:`IMPOSSIBLE_VALUE_NATS`.
        """

        def levels(block: np.ndarray) -> np.ndarray:
            return np.clip(np.floor((block - self.origin) / self.step + 0.5), 0, self.n_levels - 1)

        return _blockwise(levels, images, np.float64)

    def impossible(self, images: np.ndarray) -> np.ndarray:
        """Boolean mask (same shape) of the values that are not one of the levels (NaN: False)."""

        def off_levels(block: np.ndarray) -> np.ndarray:
            levels = (block - self.origin) / self.step
            nearest = np.floor(levels + 0.5)
            off = np.abs(levels - nearest) > cell_tolerance(block, self.step)
            return (off | (nearest < 0) | (nearest >= self.n_levels)) & ~np.isnan(block)

        return _blockwise(off_levels, images, np.bool_)

    def to_values(self, levels: np.ndarray) -> np.ndarray:
        """Images in the user's units and dtype from (possibly fractional) levels, rounded to the nearest level."""
        dtype = np.dtype(self.dtype)
        out = dtype if dtype == np.bool_ or np.issubdtype(dtype, np.number) else np.dtype(np.float64)

        def values(block: np.ndarray) -> np.ndarray:
            value = self.origin + np.clip(np.round(block), 0, self.n_levels - 1) * self.step
            return value > 0.5 if dtype == np.bool_ else value.astype(out)

        return _blockwise(values, levels, out)
