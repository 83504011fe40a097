"""Input scaling with its log-Jacobian, so that scores stay log-densities in the user's units."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Standardizer:
    """x ↦ (x − center) / scale per column.

    If the model's density of the standardised data is p_s, the density of the original
    data is p_x(x) = p_s((x − c)/s) · Π 1/s_j, so :attr:`log_jacobian` = −Σ log s_j (nats)
    is added to every score. Constant columns keep scale 1 (no rescaling).
    """

    center: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> Standardizer:
        """Center and scale from the column means and standard deviations of ``X`` (n, d)."""
        X = np.asarray(X, dtype=np.float64)
        center = X.mean(axis=0)
        scale = X.std(axis=0)
        tiny = scale <= 1e-12 * np.maximum(1.0, np.abs(center))
        scale[tiny] = 1.0
        return cls(center, scale)

    @property
    def log_jacobian(self) -> float:
        """−Σ log scale_j: nats added to a standardised-space log-density per sample."""
        return float(-np.log(self.scale).sum())

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.center) / self.scale

    def inverse_transform(self, Z: np.ndarray) -> np.ndarray:
        return np.asarray(Z, dtype=np.float64) * self.scale + self.center


def first_nonfinite(X: np.ndarray) -> tuple[int, int, str] | None:
    """(row, column, "NaN" | "inf") of the first non-finite entry of a 2-D array, or None."""
    bad = ~np.isfinite(X)
    if not bad.any():
        return None
    row, col = (int(i) for i in np.argwhere(bad)[0])
    return row, col, "NaN" if np.isnan(X[row, col]) else "inf"
