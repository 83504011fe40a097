"""ADBench's four synthetic anomaly types (Han et al. 2022, §4.3), made from a set's normal rows.

Each generator takes the normal rows of a real table and returns a new labelled table
``(X, y)`` with as many normal and anomalous rows as the original had, so that a detector
is judged on what *kind* of anomaly it finds:

- ``local``: normals drawn from a Gaussian mixture fitted to the normal rows (components
  chosen by BIC), anomalies from the same mixture with every covariance scaled by
  ``alpha`` = 5: rows near the normal clusters but too spread out.
- ``clustered``: the same mixture with every mean scaled by ``alpha`` = 5 (in the
  min-max unit cube of the normal rows, as ADBench does on scaled data): a dense cluster
  of anomalies away from the normal ones.
- ``global``: normals from the mixture, anomalies uniform over the normal rows' range
  widened by 10 % of it at each end: scattered rows, most of them far off.
- ``dependency``: normals are the real normal rows (their dependence structure is the
  real one), anomalies take every column independently from that column's marginal
  (a resampled value plus Gaussian kernel noise of Scott's bandwidth): every value is
  ordinary, their combination is not. ADBench fits a vine copula for the normals and
  per-column KDEs for the anomalies; the real rows stand in for the copula here (no
  copula library is a dependency), the per-column KDE is the same.

The mixture is fitted to at most :data:`FIT_ROWS` rows (a random subsample) with at most
:data:`MAX_COMPONENTS` components, so campaign-sized tables take seconds.
"""

from __future__ import annotations

import numpy as np
from sklearn.mixture import GaussianMixture

KINDS = ("local", "clustered", "global", "dependency")
#: ADBench's scale factor for the covariances (local) and the means (clustered).
ALPHA = 5.0
#: How far (a share of each column's range) global anomalies reach beyond the normal range.
GLOBAL_MARGIN = 0.1
FIT_ROWS = 2000
MAX_COMPONENTS = 9


def _unit_cube(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X`` min-max scaled column by column, with the columns' minimum and range (constant columns: range 1)."""
    low = X.min(axis=0)
    span = X.max(axis=0) - low
    span = np.where(span > 0, span, 1.0)
    return (X - low) / span, low, span


def fit_mixture(U: np.ndarray, rng: np.random.Generator) -> GaussianMixture:
    """A full-covariance Gaussian mixture on the rows of ``U``, the number of components chosen by BIC."""
    seed = int(rng.integers(2**31 - 1))
    fit_rows = U[rng.permutation(len(U))[:FIT_ROWS]]
    best, best_bic = None, np.inf
    for k in range(1, max(1, min(MAX_COMPONENTS, len(fit_rows) // 50)) + 1):
        gm = GaussianMixture(k, covariance_type="full", reg_covar=1e-6, random_state=seed).fit(fit_rows)
        bic = gm.bic(fit_rows)
        if bic < best_bic:
            best, best_bic = gm, bic
    return best


def _draw(gm: GaussianMixture, n: int, rng: np.random.Generator, *, mean_scale=1.0, cov_scale=1.0) -> np.ndarray:
    """``n`` rows from ``gm`` with its means and covariances scaled (the mixture itself is left as it is)."""
    counts = rng.multinomial(n, gm.weights_)
    parts = [
        rng.multivariate_normal(mean_scale * gm.means_[k], cov_scale * gm.covariances_[k], size=c, method="eigh")
        for k, c in enumerate(counts)
        if c
    ]
    rows = np.concatenate(parts) if parts else np.empty((0, gm.means_.shape[1]))
    return rows[rng.permutation(len(rows))]


def independent_marginals(X: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rows whose columns are drawn independently from per-column Gaussian KDEs of ``X`` (Scott's bandwidth)."""
    m = len(X)
    bandwidth = X.std(axis=0) * m ** (-1 / 5)
    picks = rng.integers(0, m, size=(n, X.shape[1]))
    return X[picks, np.arange(X.shape[1])] + rng.normal(size=(n, X.shape[1])) * bandwidth


def synthetic_anomalies(X: np.ndarray, y: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A table of ``kind`` anomalies made from the normal rows of ``(X, y)``: ``(X_new, y_new)``, same counts.

    ``y`` marks anomalies with 1; only the rows with ``y == 0`` are used. The rows come
    back shuffled; ``seed`` fixes everything.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    rng = np.random.default_rng(seed)
    normal = X[y == 0]
    n_normal, n_anomalous = len(normal), int((y != 0).sum())
    if kind == "dependency":
        rows_n, rows_a = normal, independent_marginals(normal, n_anomalous, rng)
    else:
        U, low, span = _unit_cube(normal)
        gm = fit_mixture(U, rng)
        rows_n = _draw(gm, n_normal, rng)
        if kind == "global":
            rows_a = rng.uniform(-GLOBAL_MARGIN, 1 + GLOBAL_MARGIN, size=(n_anomalous, X.shape[1]))
        else:
            scale = {"local": {"cov_scale": ALPHA}, "clustered": {"mean_scale": ALPHA}}[kind]
            rows_a = _draw(gm, n_anomalous, rng, **scale)
        rows_n, rows_a = low + rows_n * span, low + rows_a * span
    X_new = np.concatenate([rows_n, rows_a])
    y_new = np.r_[np.zeros(len(rows_n), dtype=int), np.ones(len(rows_a), dtype=int)]
    order = rng.permutation(len(y_new))
    return X_new[order], y_new[order]
