"""The exact quadrature of benchmarks/likelihood_accuracy.py against a closed-form marginal."""

import sys
from pathlib import Path

import numpy as np
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
