"""Input scaling with its log-Jacobian, so that scores stay log-densities in the user's units."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    def fit(cls, X: np.ndarray, *, detect_lattice: bool = False) -> Standardizer:
        """Center and scale from the column means and standard deviations of ``X`` (n, d).

        With ``detect_lattice``, columns whose values lie on a regular grid
        (:func:`lattice_steps`) are marked discrete.
        """
        X = np.asarray(X, dtype=np.float64)
        center = np.nanmean(X, axis=0)  # missing values (NaN) are left out
        scale = np.nanstd(X, axis=0)
        tiny = scale <= 1e-12 * np.maximum(1.0, np.abs(center))
        scale[tiny] = 1.0
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
