"""Generation and resynthesis through the latent space: the aggregate posterior, paths, attribute vectors.

:class:`LatentSpaceMixin` gives the estimators ``inverse_transform`` (codes back to data),
``interpolate``, ``traverse``, ``attribute_vector`` and ``resynthesize``; the estimator's
``sample(source="aggregate")`` draws codes from :class:`AggregatePosterior`, a Gaussian
mixture fitted at ``fit`` time to the training rows' posterior means. Sampling from the
prior N(0, I) visits regions the encoder never uses when the aggregate posterior
q(z) = E_x[q(z|x)] differs from the prior (holes, collapsed dimensions); the mixture does
not.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_is_fitted

#: Most mixture components of the aggregate posterior (fewer for small data: one per 200 rows).
AGGREGATE_COMPONENTS = 10
#: Posterior means used to fit it (a random subset of larger training sets).
AGGREGATE_ROWS = 20_000


@dataclass
class AggregatePosterior:
    """A Gaussian mixture over latent codes: ``weights`` (m,), ``means`` (m, k), ``covariances`` (m, k, k)."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    @classmethod
    def fit(cls, codes: np.ndarray, random_state: int) -> AggregatePosterior:
        """Fit to posterior means ``codes`` (n, k): up to :data:`AGGREGATE_COMPONENTS` full-covariance components."""
        from sklearn.mixture import GaussianMixture

        if len(codes) > AGGREGATE_ROWS:
            codes = codes[np.random.default_rng(random_state).choice(len(codes), AGGREGATE_ROWS, replace=False)]
        components = int(np.clip(len(codes) // 200, 1, AGGREGATE_COMPONENTS))
        gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, random_state=random_state)
        gmm.fit(codes.astype(np.float64))
        return cls(gmm.weights_, gmm.means_, gmm.covariances_)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` codes (n, k) drawn from the mixture."""
        counts = rng.multinomial(n, self.weights / self.weights.sum())
        parts = [
            rng.multivariate_normal(mean, cov, size=c, method="cholesky")
            for mean, cov, c in zip(self.means, self.covariances, counts, strict=True)
            if c
        ]
        return rng.permutation(np.concatenate(parts))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "aggregate.weights": self.weights,
            "aggregate.means": self.means,
            "aggregate.covariances": self.covariances,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> AggregatePosterior | None:
        if "aggregate.weights" not in arrays:
            return None
        return cls(arrays["aggregate.weights"], arrays["aggregate.means"], arrays["aggregate.covariances"])


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation between codes ``a`` and ``b`` (k,) at fractions ``t`` (s,), shape (s, k).

    Follows the great circle between the directions and interpolates the norms linearly,
    which keeps the path in the shell where N(0, I) puts its mass (White 2016); falls back
    to the straight line when the codes are (anti)parallel or one is zero.
    """
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    t = np.asarray(t, dtype=np.float64)[:, None]
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    cos = float(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))
    omega = np.arccos(cos)
    if np.sin(omega) < 1e-6:
        return (1 - t) * a + t * b
    direction = (np.sin((1 - t) * omega) * (a / na) + np.sin(t * omega) * (b / nb)) / np.sin(omega)
    return direction * ((1 - t) * na + t * nb)


class LatentSpaceMixin:
    """Estimator methods that decode chosen latent codes, through the host's public ``transform`` (codes of
    samples) and ``inverse_transform`` (samples of codes)."""

    def _codes_of(self, X: Any, name: str, condition: Any = None) -> np.ndarray:
        codes = np.asarray(self.transform(X, condition=condition))
        if codes.ndim != 2 or len(codes) == 0:
            raise ValueError(f"{name} must hold at least one sample")
        return codes

    def _one_code(self, x: Any, name: str, condition: Any = None) -> np.ndarray:
        """The posterior mean of one sample given alone (a row, one image) or as a batch of one."""
        data = x if isinstance(x, pd.DataFrame) else np.asarray(x)
        if not isinstance(data, pd.DataFrame):
            one = (self.n_features_in_,) if self.image_shape_ is None else tuple(self.image_shape_)
            if data.shape == one:
                data = data[None]
        codes = self._codes_of(data, name, condition)
        if len(codes) != 1:
            raise ValueError(f"{name} must be one sample, got {len(codes)}")
        return codes[0]

    def interpolate(
        self, x_a: Any, x_b: Any, steps: int = 8, method: str = "slerp", condition: Any = None
    ) -> np.ndarray | pd.DataFrame:
        """Decoded points on the path between the codes of samples ``x_a`` and ``x_b``, ends included.

        Parameters
        ----------
        x_a, x_b : one sample each (a row or one image, alone or as a batch of one)
        steps : int ≥ 2, default=8
        method : {"slerp", "linear"}, default="slerp"
            Spherical (see :func:`slerp`) or straight-line interpolation of the posterior means.
        condition : optional
            For a conditional model, the one condition both ends are encoded and the path
            decoded under.

        Returns
        -------
        ``steps`` samples in the form of :meth:`inverse_transform`.
        """
        if not isinstance(steps, Integral) or steps < 2:
            raise ValueError(f"steps must be an integer ≥ 2, got {steps!r}")
        if method not in ("slerp", "linear"):
            raise ValueError(f"method must be 'slerp' or 'linear', got {method!r}")
        a, b = self._one_code(x_a, "x_a", condition), self._one_code(x_b, "x_b", condition)
        t = np.linspace(0.0, 1.0, int(steps))
        path = slerp(a, b, t) if method == "slerp" else (1 - t[:, None]) * a + t[:, None] * b
        return self.inverse_transform(path, condition=condition)

    def traverse(
        self, x: Any, dim: int, values: Any = (-2.0, -1.0, 0.0, 1.0, 2.0), condition: Any = None
    ) -> np.ndarray | pd.DataFrame:
        """Sample ``x`` decoded with latent dimension ``dim`` set to each of ``values`` (the others kept).

        Returns ``len(values)`` samples in the form of :meth:`inverse_transform`: what that
        one dimension controls. A conditional model encodes and decodes under the one
        ``condition``.
        """
        check_is_fitted(self)
        if not isinstance(dim, Integral) or not 0 <= dim < self.latent_dim_:
            raise ValueError(f"dim must be an integer in [0, {self.latent_dim_ - 1}], got {dim!r}")
        grid = np.asarray(values, dtype=np.float64).reshape(-1)
        if grid.size == 0 or not np.isfinite(grid).all():
            raise ValueError("values must be a non-empty list of finite numbers")
        codes = np.repeat(self._one_code(x, "x", condition)[None], grid.size, axis=0)
        codes[:, dim] = grid
        return self.inverse_transform(codes, condition=condition)

    def attribute_vector(self, X: Any, labels: Any, condition: Any = None) -> np.ndarray:
        """Mean code of the samples with the attribute minus the mean code of those without, (latent_dim,).

        ``labels`` (one boolean per sample of ``X``) marks which samples have it; both groups
        must be non-empty. Add it to codes with :meth:`resynthesize`. ``condition``: the
        samples' conditions, for a conditional model.
        """
        flags = np.asarray(labels)
        codes = self._codes_of(X, "X", condition)
        if flags.shape != (len(codes),) or not np.isin(flags, [0, 1, True, False]).all():
            raise ValueError(f"labels must be {len(codes)} booleans, one per sample of X")
        flags = flags.astype(bool)
        if flags.all() or not flags.any():
            raise ValueError("labels must mark some samples True and some False")
        return codes[flags].mean(axis=0) - codes[~flags].mean(axis=0)

    def resynthesize(self, X: Any, vector: Any, alpha: float = 1.0, condition: Any = None) -> np.ndarray | pd.DataFrame:
        """Samples of ``X`` decoded at their codes moved by ``alpha`` · ``vector`` (e.g. an attribute vector).

        ``condition``: the samples' conditions (encoding and decoding), for a conditional model.
        """
        v = np.asarray(vector, dtype=np.float64)
        if v.shape != (self.latent_dim_,) or not np.isfinite(v).all():
            raise ValueError(f"vector must be {self.latent_dim_} finite numbers, got shape {v.shape}")
        if not isinstance(alpha, Real) or not np.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        out = self.inverse_transform(self._codes_of(X, "X", condition) + float(alpha) * v, condition=condition)
        if isinstance(out, pd.DataFrame) and isinstance(X, pd.DataFrame):
            out.index = X.index
        return out
