"""Regularizers: β-VAE, β-TCVAE's KL decomposition and its estimators, FactorVAE's discriminator."""

import math

import numpy as np
import pytest
import torch

from vaeguard import VAEAnomalyDetector
from vaeguard.components.regularizers import (
    BetaTCVAE,
    BetaVAE,
    FactorVAE,
    log_density_gaussian,
    log_importance_weights_mss,
    permute_dimensions,
)
from vaeguard.objectives import TrainingTerms, kl_per_dimension
from vaeguard.plugins import get_part


def terms(mu, logvar, z, dataset_size=None, kl_weight=1.0):
    mu, logvar, z = (torch.as_tensor(a, dtype=torch.float64) for a in (mu, logvar, z))
    n = dataset_size or len(mu)
    return TrainingTerms(
        x=torch.zeros(len(mu), 1),
        mask=None,
        mu=mu,
        logvar=logvar,
        z=z,
        recon=torch.zeros(len(mu), dtype=torch.float64),
        kl=kl_per_dimension(mu, logvar),
        kl_weight=kl_weight,
        dataset_size=n,
        generator=torch.Generator().manual_seed(0),
    )


def draw(mu, logvar, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=g, dtype=torch.float64)


def test_builtins_are_registered_through_the_hook():
    assert get_part("regularizers", "beta") is BetaVAE
    assert get_part("regularizers", "tc") is BetaTCVAE
    assert get_part("regularizers", "factor") is FactorVAE


def test_beta_penalty_turns_the_kl_weight_into_beta():
    mu, logvar = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64) * 0.3
    t = terms(mu, logvar, draw(mu, logvar), kl_weight=0.5)
    kl = t.kl.sum(-1).mean()
    assert torch.allclose(BetaVAE(beta=4).penalty(t, 0), 3 * 0.5 * kl)
    assert torch.allclose(BetaVAE(beta=1).penalty(t, 0), torch.zeros((), dtype=torch.float64))
    with pytest.raises(ValueError, match="beta must be a finite number"):
        BetaVAE(beta=-1)


@pytest.mark.parametrize("estimator", ["mss", "mws"])
def test_the_three_terms_sum_to_the_sampled_kl(estimator):
    """MI + TC + dimension-wise KL = log q(z|x) − log p(z) for any estimate of log q(z) (telescoping)."""
    mu, logvar = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64) * 0.3 - 1
    z = draw(mu, logvar)
    mi, tc, dw = BetaTCVAE(estimator=estimator).decomposition(terms(mu, logvar, z, dataset_size=1000))
    log_q = log_density_gaussian(z, mu, logvar).sum(-1)
    log_p = log_density_gaussian(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
    assert torch.allclose(mi + tc + dw, log_q - log_p)


def test_identical_posteriors_carry_no_information_and_no_total_correlation():
    """Every row has the same factorised posterior: q(z) = q(z|x), so MI = TC = 0 exactly (N = M)."""
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64).repeat(50, 1)
    logvar = torch.tensor([[-1.0, 0.0, -2.0]], dtype=torch.float64).repeat(50, 1)
    mi, tc, _ = BetaTCVAE().decomposition(terms(mu, logvar, draw(mu, logvar)))
    assert torch.allclose(mi, torch.zeros(50, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(tc, torch.zeros(50, dtype=torch.float64), atol=1e-12)


def test_total_correlation_matches_the_gaussian_closed_form():
    """Codes μ = (u, u) or (u, v), u, v ~ N(0, 4), posteriors N(μ, 0.5²): the aggregate posterior is Gaussian
    with correlation ρ = 4 / 4.25 (or 0), whose total correlation is −½ log(1 − ρ²)."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1024, 1, generator=g, dtype=torch.float64) * 2
    v = torch.randn(1024, 1, generator=g, dtype=torch.float64) * 2
    logvar = torch.full((1024, 2), math.log(0.5**2), dtype=torch.float64)
    tc = {
        name: BetaTCVAE().decomposition(terms(mu, logvar, draw(mu, logvar)))[1].mean().item()
        for name, mu in {"copied": torch.cat([u, u], 1), "independent": torch.cat([u, v], 1)}.items()
    }
    rho = 4 / 4.25
    assert tc["copied"] == pytest.approx(-0.5 * math.log(1 - rho**2), rel=0.08)
    assert abs(tc["independent"]) < 0.05


def test_mss_weights_are_a_distribution_giving_each_row_its_own_share():
    w = log_importance_weights_mss(8, 1000, torch.device("cpu"), torch.float64).exp()
    assert torch.allclose(w.sum(1), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(torch.diagonal(w), torch.full((8,), 1 / 1000, dtype=torch.float64))


def test_permuting_dimensions_keeps_each_marginal_and_breaks_dependence():
    z = torch.arange(200, dtype=torch.float64).reshape(100, 2)
    shuffled = permute_dimensions(z, torch.Generator().manual_seed(0))
    for d in range(2):
        assert torch.equal(shuffled[:, d].sort().values, z[:, d].sort().values)
    assert not torch.equal(shuffled, z)


def test_factor_vae_discriminator_learns_to_detect_dependence():
    """On codes with z2 = z1 the discriminator's TC estimate grows positive as it trains; the VAE gets a gradient."""
    reg = FactorVAE(gamma=1.0, learning_rate=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        u = torch.randn(128, 1, generator=g)
        z = torch.cat([u, u], 1).requires_grad_(True)
        mu = z.detach()
        t = terms(mu, torch.zeros_like(mu), z)
        t.z = z
        penalty = reg.penalty(t, step)
        reg.update(t, step)  # the training loop's call after the VAE's step
    assert penalty.item() > 1.0
    penalty.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    before = [p.clone() for p in reg.discriminator.parameters()]
    reg.penalty(t, -1)  # the penalty alone (as validation evaluates it) trains nothing
    with torch.no_grad():
        reg.penalty(t, -1)
    assert all(torch.equal(a, b) for a, b in zip(before, reg.discriminator.parameters(), strict=True))


def test_the_training_loop_trains_factor_vaes_discriminator_after_each_step():
    from vaeguard.training import TrainingConfig, train

    calls = []

    class Spy(FactorVAE):
        def update(self, terms, step):
            calls.append(step)
            super().update(terms, step)

    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    from vaeguard.components.encoders import mlp
    from vaeguard.components.likelihoods import GaussianLikelihood
    from vaeguard.model import VAE

    enc, dec = mlp((4,), 2, 1, hidden_dims=[8])
    reg = Spy(gamma=1.0)
    config = TrainingConfig(epochs=2, batch_size=50, regularizer=reg)
    train(VAE(enc, dec, GaussianLikelihood((4,)), 2), x, config, generator=torch.Generator(), device="cpu")
    assert calls == list(range(8))  # 180 training rows in batches of 50: 4 steps per epoch


def test_estimator_takes_regularizers_by_name_and_stores_them(tmp_path):
    X = np.random.default_rng(0).normal(size=(300, 6))
    params = {"regularizer": "tc", "regularizer_params": {"beta": 6}, "kl_schedule": "cyclical", "free_bits": 0.1}
    det = VAEAnomalyDetector(epochs=5, random_state=0, **params).fit(X)
    assert np.isfinite(det.score_samples(X)).all()
    det.save(tmp_path / "m.h5")
    from vaeguard import load

    back = load(tmp_path / "m.h5")
    assert back.get_params()["regularizer"] == "tc" and back.get_params()["regularizer_params"] == {"beta": 6}
    assert back.kl_schedule == "cyclical" and back.free_bits == 0.1
    assert back.active_units_ == det.active_units_
    np.testing.assert_array_equal(back.kl_per_dimension_, det.kl_per_dimension_)
    with pytest.raises(ValueError, match="unknown regularizer 'nope'"):
        VAEAnomalyDetector(epochs=1, regularizer="nope").fit(X)
    with pytest.raises(ValueError, match="does not take these regularizer_params"):
        VAEAnomalyDetector(epochs=1, regularizer="beta", regularizer_params={"gamma": 2}).fit(X)
    with pytest.raises(ValueError, match="without a regularizer"):
        VAEAnomalyDetector(epochs=1, regularizer_params={"beta": 2}).fit(X)


def test_beta_below_one_keeps_more_information_in_the_code():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 2)) @ rng.normal(size=(2, 8)) + 0.3 * rng.normal(size=(600, 8))
    kl = {
        beta: VAEAnomalyDetector(
            epochs=40,
            latent_dim=4,
            n_models=1,
            random_state=0,
            trim_fraction=0.0,
            regularizer="beta",
            regularizer_params={"beta": beta},
        )
        .fit(X)
        .kl_per_dimension_.sum()
        for beta in (0.2, 1.0, 5.0)
    }
    assert kl[0.2] > kl[1.0] > kl[5.0]


def test_latent_usage_streams_the_same_numbers_as_numpy():
    X = np.random.default_rng(0).normal(size=(700, 5))
    det = VAEAnomalyDetector(epochs=3, latent_dim=3, random_state=0).fit(X)
    codes = det.transform(X)
    np.testing.assert_allclose(det.latent_variance_, codes.var(axis=0), rtol=1e-6, atol=1e-9)
    assert det.active_units_ == int((codes.var(axis=0) > 0.01).sum())


def test_factor_vae_training_is_reproducible():
    """The discriminator is initialised from the run's seed: the same seed gives the same model."""
    X = np.random.default_rng(0).normal(size=(300, 4))
    fits = [VAEAnomalyDetector(epochs=3, random_state=5, regularizer="factor").fit(X) for _ in range(2)]
    np.testing.assert_array_equal(fits[0].transform(X), fits[1].transform(X))
