"""Input scaling with its log-Jacobian, so that scores stay log-densities in the user's units."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class Standardizer:
    """x ↦ (x − center) / scale per column, with lattice-valued columns snapped to their lattice.

    If the model's density of the standardised data is p_s, the density of the original
    data is p_x(x) = p_s((x − c)/s) · Π 1/s_j, so :attr:`log_jacobian` = −Σ log s_j (nats)
    is added to every score. Lattice columns (``step`` > 0: values origin + k·step) are
    modelled by cell masses, which do not change under rescaling, so they add nothing to
    the log-Jacobian; their cell width in standardised units is :attr:`bin_widths`.
    Constant columns keep scale 1 (no rescaling).
    """

    center: np.ndarray
    scale: np.ndarray
    origin: np.ndarray | None = None
    step: np.ndarray | None = None

    @classmethod
    def fit(cls, X: np.ndarray, *, detect_lattice: bool = False, categorical: np.ndarray | None = None) -> Standardizer:
        """Center and scale from the column means and standard deviations of ``X`` (n, d).

        With ``detect_lattice``, columns whose values lie on a regular grid
        (:func:`lattice_steps`) are marked discrete.
        """
        X = np.asarray(X, dtype=np.float64)
        center, scale = scale_free_moments(X)
        # constant: no spread, or a spread below the float resolution of the values
        # (relative, so a column of scale 1e-13 or 1e-300 is data, not a constant)
        constant = (scale == 0) | (scale <= 1e-12 * np.abs(center))
        scale[constant] = 1.0
        if categorical is not None and categorical.any():
            # category codes: not rescaled, a lattice of step 1 (so no log-Jacobian)
            center[categorical], scale[categorical] = 0.0, 1.0
            origin, step = np.nanmin(X, axis=0), lattice_steps(X) if detect_lattice else np.zeros(X.shape[1])
            origin[categorical], step[categorical] = 0.0, 1.0
            return cls(center, scale, origin, step)
        if not detect_lattice:
            return cls(center, scale)
        return cls(center, scale, np.nanmin(X, axis=0), lattice_steps(X))

    @property
    def discrete(self) -> np.ndarray:
        """Boolean mask of the lattice-valued columns."""
        return np.zeros(self.scale.shape, bool) if self.step is None else self.step > 0

    @property
    def bin_widths(self) -> np.ndarray:
        """Lattice cell width per column in standardised units (0 for continuous columns)."""
        return np.zeros_like(self.scale) if self.step is None else self.step / self.scale

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

    def snap(self, X: np.ndarray) -> np.ndarray:
        """Values of lattice columns moved to the nearest lattice point (the cell they fall in)."""
        X = np.asarray(X, dtype=np.float64)
        if self.step is None or not self.discrete.any():
            return X
        d = self.discrete
        X = X.copy()
        X[:, d] = self.origin[d] + np.round((X[:, d] - self.origin[d]) / self.step[d]) * self.step[d]
        return X

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (self.snap(X) - self.center) / self.scale

    def inverse_transform(self, Z: np.ndarray) -> np.ndarray:
        return np.asarray(Z, dtype=np.float64) * self.scale + self.center


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


#: A column is on a lattice when its values are a + k·Δ and the range spans at most this many steps.
MAX_LATTICE_STEPS = 1024


def lattice_steps(X: np.ndarray, max_steps: int = MAX_LATTICE_STEPS) -> np.ndarray:
    """Lattice step Δ per column of ``X`` (n, d), or 0 for a continuous column.

    A column is discrete when all its values are a + k·Δ for integers k, with
    Δ the smallest gap between distinct values and (max − min)/Δ ≤ ``max_steps``.
    Constant columns count as continuous (one value says nothing about a lattice); missing
    values (NaN) are left out.
    """
    X = np.asarray(X, dtype=np.float64)
    steps = np.zeros(X.shape[1])
    for j in range(X.shape[1]):
        column = X[:, j]
        values = np.unique(column[~np.isnan(column)])
        if values.size < 2:
            continue
        gaps = np.diff(values)
        step = gaps.min()
        span = (values[-1] - values[0]) / step
        if span > max_steps:
            continue
        k = (values - values[0]) / step
        if np.all(np.abs(k - np.round(k)) < 1e-6 * max(1.0, span)):
            steps[j] = step
    return steps


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
        step = float(lattice_steps(values[:, None])[0]) if values.size >= 2 else 0.0
        if step <= 0:
            return None
        return cls(float(values[0]), step, int(np.round((values[-1] - values[0]) / step)) + 1, dtype.str)

    def to_levels(self, images: np.ndarray) -> np.ndarray:
        """Levels (float64, NaN kept) of ``images`` of shape (n, C, H, W).

        Raises ``ValueError`` naming the image and pixel of the first value that is not one
        of the levels.
        """
        levels = (images - self.origin) / self.step
        rounded = np.round(levels)
        bad = (np.abs(levels - rounded) > 1e-6 * max(1.0, self.n_levels)) | (rounded < 0) | (rounded >= self.n_levels)
        bad &= ~np.isnan(images)
        if bad.any():
            i, c, y, x = (int(v) for v in np.argwhere(bad)[0])
            top = self.origin + (self.n_levels - 1) * self.step
            raise ValueError(
                f"image {i}, pixel (channel {c}, row {y}, column {x}) holds {images[i, c, y, x]:g}, which is not "
                f"one of the {self.n_levels} levels the model knows ({self.origin:g}, {self.origin + self.step:g}, "
                f"..., {top:g}); pass images of an integer dtype such as uint8 to model the dtype's whole range"
            )
        return rounded

    def to_values(self, levels: np.ndarray) -> np.ndarray:
        """Images in the user's units and dtype from (possibly fractional) levels, rounded to the nearest level."""
        levels = np.clip(np.round(levels), 0, self.n_levels - 1)
        values = self.origin + levels * self.step
        dtype = np.dtype(self.dtype)
        if dtype == np.bool_:
            return values > 0.5
        return values.astype(dtype) if np.issubdtype(dtype, np.number) else values
