"""The exact quadrature of benchmarks/likelihood_accuracy.py against a closed-form marginal."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from linear_gaussian import LinearGaussian

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import likelihood_accuracy as bench


def test_quadrature_is_exact_for_posteriors_near_and_far_from_the_origin():
    # p(x|z) = N(Wz + b, σ²) with a narrow σ: the posterior of a row made from z = (12, −11)
    # lies far outside a fixed ±8 box around the origin (which gave a value off by hundreds
    # of nats), and is narrow (sd ≈ 0.05); rows from the prior sit near the origin.
    truth = LinearGaussian.make(d=5, latent=2, sigma=0.1, seed=3)
    near = truth.sample(4, seed=1)
    far = np.array([[12.0, -11.0]]) @ truth.W.T + truth.b
    X = np.vstack([near, far])
    model = truth.vae(dtype=torch.float64)
    got = bench.exact_log_likelihood(model, torch.from_numpy(X), None)
    np.testing.assert_allclose(got, truth.log_px(X), atol=1e-6)  # the error of a fine midpoint rule
    assert truth.log_px(X)[-1] < -100  # the far row is far: p(z) alone costs ~130 nats there


class _Squared(torch.nn.Module):
    """Decoder mean W (z₁², z₂) + b: the rows' posteriors have two mirror-image modes, z₁ = ±√(·)."""

    def __init__(self, W: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        self.W, self.b = torch.tensor(W), torch.tensor(b)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        features = torch.stack([z[..., 0].square(), z[..., 1]], -1)
        return (features @ self.W.T + self.b).unsqueeze(-2)


def test_quadrature_resolves_narrow_modes_away_from_the_posterior_mean():
    # p(x|z) = N(W(z₁², z₂) + b, 0.1²): a row made from z = (3, 1) has two equal modes, at
    # z₁ = ±3, each of sd 0.015 in z₁ and 0.13 in z₂. Their mean, z₁ = 0, holds no mass (a single fine grid
    # centred there, ±10 sd of the coarse posterior wide, had a spacing of 0.3 and missed
    # both). By symmetry p(x) is twice the integral around one mode, taken here on a fine
    # local grid.
    from vaeguard.components.likelihoods import GaussianLikelihood, soft_clamp_inverse
    from vaeguard.model import VAE

    rng = np.random.default_rng(0)
    W, b, sigma = rng.normal(size=(4, 2)), rng.normal(size=4), 0.1
    likelihood = GaussianLikelihood((4,)).double()
    with torch.no_grad():
        likelihood.raw_log_scale.fill_(float(soft_clamp_inverse(torch.tensor(np.log(sigma)), -6.0, 4.0)))
    model = VAE(torch.nn.Linear(4, 4).double(), _Squared(W, b), likelihood, 2).double().eval()
    z = np.array([3.0, 1.0])
    x = torch.tensor(W @ np.array([z[0] ** 2, z[1]]) + b)[None]
    axis = torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64)  # ±7 sd in z₂, ±70 in z₁
    local = torch.cartesian_prod(axis, axis) + torch.tensor(z)
    cell = 2 * math.log(float(axis[1] - axis[0]))
    with torch.no_grad():
        one_mode = torch.logsumexp(bench._log_joint(model, x, None, local[:, None, :])[:, 0], 0) + cell
    got = bench.exact_log_likelihood(model, x, None)
    assert got[0] == pytest.approx(float(one_mode) + math.log(2), abs=1e-3)
