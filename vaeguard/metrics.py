"""Disentanglement metrics: how a latent code lines up with the factors that generated the data.

``codes`` are arrays of shape (n_samples, n_codes) (e.g. ``det.transform(X)``, the
posterior means), ``factors`` of shape (n_samples, n_factors) hold the known generative
factors as integers (or values that :func:`mutual_information_gap` bins). Scores follow
the definitions of their papers and of ``disentanglement_lib`` (Locatello et al. 2019):

- :func:`active_units` — dimensions whose posterior means vary across the data
  (Burda et al. 2016);
- :func:`mutual_information_gap` — MIG (Chen et al. 2018);
- :func:`dci` — disentanglement, completeness, informativeness (Eastwood & Williams 2018);
- :func:`factor_vae_score` — the majority-vote classifier of Kim & Mnih (2018).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import mutual_info_score
from sklearn.utils import check_random_state

#: A dimension is active when its posterior means vary across the data by more than this variance.
ACTIVE_UNIT_VARIANCE = 0.01


def _as_2d(name: str, values: np.ndarray, n_rows: int | None = None) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name} must have shape (n_samples, n_columns) with n_samples ≥ 2, got {a.shape}")
    if n_rows is not None and a.shape[0] != n_rows:
        raise ValueError(f"codes and factors must have the same rows: {n_rows} codes, {a.shape[0]} factor rows")
    if not np.isfinite(a).all():
        row, col = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} holds {a[row, col]} at row {row}, column {col}")
    return a


def active_units(codes: np.ndarray, threshold: float = ACTIVE_UNIT_VARIANCE) -> int:
    """Latent dimensions in use: those whose values vary across the data, Var > ``threshold``.

    With ``codes`` the posterior means of the data, a dimension whose mean does not move
    with x carries no information about it (its posterior is the prior's everywhere).

    >>> active_units(np.c_[np.linspace(-1, 1, 50), np.zeros(50)])
    1
    """
    a = _as_2d("codes", codes)
    return int((a.var(axis=0) > threshold).sum())


def _discretize(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Each column in ``n_bins`` equal-width bins (columns with few distinct values kept as they are)."""
    out = np.empty(values.shape, dtype=np.int64)
    for j, column in enumerate(values.T):
        distinct = np.unique(column)
        if len(distinct) <= n_bins:
            out[:, j] = np.searchsorted(distinct, column)
        else:
            edges = np.histogram_bin_edges(column, bins=n_bins)
            out[:, j] = np.digitize(column, edges[1:-1])
    return out


def mutual_information_matrix(codes: np.ndarray, factors: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """I(code_i; factor_k) in nats, shape (n_codes, n_factors), codes binned in ``n_bins`` equal-width bins."""
    c = _discretize(_as_2d("codes", codes), n_bins)
    f = _discretize(_as_2d("factors", factors, c.shape[0]), n_bins)
    return np.array([[mutual_info_score(f[:, k], c[:, i]) for k in range(f.shape[1])] for i in range(c.shape[1])])


def mutual_information_gap(codes: np.ndarray, factors: np.ndarray, n_bins: int = 20) -> float:
    """MIG: the mean over factors of (largest − second largest I(code; factor)) / H(factor), in [0, 1].

    1 means each factor is captured by one code dimension alone; 0 that no dimension
    stands out (or the code carries nothing). Factors that never vary are left out.
    """
    mi = mutual_information_matrix(codes, factors, n_bins)
    f = _discretize(_as_2d("factors", factors), n_bins)
    entropy = np.array([mutual_info_score(col, col) for col in f.T])
    keep = entropy > 0
    if not keep.any():
        raise ValueError("every factor is constant: MIG is undefined")
    top = np.vstack([mi, np.zeros_like(mi)]) if mi.shape[0] < 2 else np.sort(mi, axis=0)[::-1][:2]
    return float(np.mean((top[0] - top[1])[keep] / entropy[keep]))


def _normalised_entropy(weights: np.ndarray, axis: int) -> np.ndarray:
    """Entropy of each slice of ``weights`` (made a distribution along ``axis``), base = its length."""
    p = weights / np.maximum(weights.sum(axis=axis, keepdims=True), 1e-12)
    size = weights.shape[axis]
    if size < 2:
        return np.zeros(weights.shape[1 - axis])
    logs = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -(p * logs).sum(axis=axis) / np.log(size)


def dci(
    codes: np.ndarray, factors: np.ndarray, *, test_size: float = 0.3, random_state: int | None = 0
) -> dict[str, float]:
    """Disentanglement, completeness and informativeness (Eastwood & Williams 2018).

    A random forest per factor predicts the (integer) factor from the codes; its feature
    importances fill the matrix R (n_codes, n_factors). Every split considers every code
    dimension (``max_features=None``), so importance does not leak to dimensions that are
    noise, as it does when each split must pick among a random few.

    - disentanglement: Σ_i ρ_i (1 − H_K(R_i·)), ρ_i the code's share of all importance —
      each code dimension predicts one factor;
    - completeness: mean_k (1 − H_D(R_·k)) — each factor is predicted by one dimension;
    - informativeness: mean held-out accuracy of the forests.

    Returns a dict with those three keys, each in [0, 1].
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    c = _as_2d("codes", codes)
    f = _discretize(_as_2d("factors", factors, c.shape[0]), 20)
    rng = check_random_state(random_state)
    importance = np.zeros((c.shape[1], f.shape[1]))
    accuracy = []
    for k in range(f.shape[1]):
        if len(np.unique(f[:, k])) < 2:
            continue
        c_tr, c_te, f_tr, f_te = train_test_split(c, f[:, k], test_size=test_size, random_state=rng)
        forest = RandomForestClassifier(
            n_estimators=50, max_depth=8, max_features=None, min_samples_leaf=5, random_state=rng
        ).fit(c_tr, f_tr)
        importance[:, k] = forest.feature_importances_
        accuracy.append(forest.score(c_te, f_te))
    if not accuracy:
        raise ValueError("every factor is constant: DCI is undefined")
    used = importance[:, importance.sum(axis=0) > 0]
    share = used.sum(axis=1) / max(used.sum(), 1e-12)
    disentanglement = float((share * (1 - _normalised_entropy(used, axis=1))).sum())
    completeness = float(np.mean(1 - _normalised_entropy(used, axis=0)))
    return {
        "disentanglement": disentanglement,
        "completeness": completeness,
        "informativeness": float(np.mean(accuracy)),
    }


def factor_vae_score(
    encode: Callable[[np.ndarray], np.ndarray],
    generate: Callable[[np.ndarray, np.random.Generator], np.ndarray],
    factor_sizes: list[int] | tuple[int, ...],
    *,
    n_votes: int = 800,
    batch_size: int = 64,
    random_state: int | None = 0,
) -> float:
    """The FactorVAE score (Kim & Mnih 2018): accuracy of a majority-vote classifier, in [0, 1].

    For each vote a factor k is chosen and held at a random value while the others vary:
    ``generate(factors, rng)`` renders a batch from an integer factor array (batch, K) and
    ``encode`` maps it to codes. The codes, divided by their standard deviation over
    random data, vote for the dimension of least variance; the score is the accuracy of
    mapping each dimension to its most frequent factor, counted on half of the votes
    and evaluated on the other half. Collapsed dimensions (variance < 0.05 on random
    data) are left out, as in the paper.
    """
    rng = np.random.default_rng(random_state)
    sizes = np.asarray(factor_sizes, dtype=np.int64)

    def random_factors(n: int) -> np.ndarray:
        return np.stack([rng.integers(0, s, size=n) for s in sizes], axis=1)

    reference = _as_2d("codes", encode(generate(random_factors(max(1000, 10 * batch_size)), rng)))
    scale = reference.std(axis=0)
    active = scale**2 > 0.05
    if not active.any():
        return 0.0
    votes = np.zeros((n_votes, 2), dtype=np.int64)
    varying = np.flatnonzero(sizes > 1)
    for v in range(n_votes):
        k = int(rng.choice(varying))
        factors = random_factors(batch_size)
        factors[:, k] = rng.integers(0, sizes[k])
        codes = _as_2d("codes", encode(generate(factors, rng)))[:, active] / scale[active]
        votes[v] = (int(np.argmin(codes.var(axis=0))), k)
    half = n_votes // 2
    table = np.zeros((int(active.sum()), len(sizes)), dtype=np.int64)
    np.add.at(table, (votes[:half, 0], votes[:half, 1]), 1)
    assigned = table.argmax(axis=1)
    return float(np.mean(assigned[votes[half:, 0]] == votes[half:, 1]))
