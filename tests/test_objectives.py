"""ELBO, closed-form KL, IWAE bound."""

import math

import numpy as np
import pytest
import torch
from linear_gaussian import LinearGaussian

from vaeguard.objectives import (
    CorrelatedGaussian,
    MixtureProposal,
    elbo,
    gaussian_log_prob,
    importance_terms,
    iwae_bound,
    kl_standard_normal,
)


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[-1.0, 0.3, 0.0]], dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * torch.randn(400_000, 3, dtype=torch.float64)
    log_q = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert kl_standard_normal(mu, logvar).item() == pytest.approx((log_q - log_p).mean().item(), abs=0.01)
    assert kl_standard_normal(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0


def test_kl_weight_scales_only_the_kl():
    lg = LinearGaussian.make()
    vae = lg.vae(mean_shift=0.5)
    x = torch.tensor(lg.sample(8), dtype=torch.float32)
    eps = torch.randn(3, 2)
    full, recon, kl = elbo(vae, x, eps)
    half, _, _ = elbo(vae, x, eps, kl_weight=0.5)
    torch.testing.assert_close(full, recon - kl)
    torch.testing.assert_close(half, recon - 0.5 * kl)


def test_iwae_bound_is_tight_for_the_exact_posterior_and_between_elbo_and_log_px():
    lg = LinearGaussian.make()
    X = lg.sample(300)
    x = torch.tensor(X, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    exact = iwae_bound(lg.vae(), x, 5, generator=gen)
    torch.testing.assert_close(exact.double(), torch.tensor(lg.log_px(X)), atol=1e-4, rtol=0)
    poor = lg.vae(mean_shift=1.0, var_scale=0.5)
    iw = iwae_bound(poor, x, 50, generator=gen).mean().item()
    el = elbo(poor, x, torch.randn(200, 2, generator=gen))[0].mean().item()
    assert el < iw < lg.log_px(X).mean()
    assert math.isfinite(iw)


def test_free_bits_charge_the_floor_and_stop_the_gradient_below_it():
    from vaeguard.objectives import free_bits_kl

    kl = torch.tensor([[0.05, 2.0], [0.15, 1.0]], requires_grad=True)  # batch means 0.1 and 1.5
    charged = free_bits_kl(kl, 0.5)
    assert torch.allclose(charged, torch.tensor([0.5 + 2.0, 0.5 + 1.0]))
    charged.sum().backward()
    assert torch.equal(kl.grad, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert torch.equal(free_bits_kl(kl.detach(), 0.0), kl.detach().sum(-1))


def test_iwae_objective_is_the_iwae_bound_and_anneals_only_the_prior_ratio():
    from vaeguard.objectives import iwae_objective, log_importance_weights

    lg = LinearGaussian.make(d=3, latent=2, seed=0)
    vae = lg.vae(mean_shift=0.5)
    x = torch.tensor(lg.sample(20, seed=1), dtype=torch.float32)
    eps = torch.randn(7, 20, 2, generator=torch.Generator().manual_seed(0))
    bound = torch.logsumexp(log_importance_weights(vae, x, eps), 0) - math.log(7)
    torch.testing.assert_close(iwae_objective(vae, x, eps), bound)
    # with the prior ratio switched off, K = 1 is the reconstruction term alone
    one = eps[:1]
    torch.testing.assert_close(iwae_objective(vae, x, one, kl_weight=0.0), elbo(vae, x, one)[1])


def test_iwae_training_tightens_the_bound():
    """Trained on the IWAE bound (K = 8): a higher log p(x), and a looser ELBO (broader posteriors; Cremer et al.)."""
    import numpy as np

    from vaeguard import VAEAnomalyDetector

    rng = np.random.default_rng(0)
    X = np.tanh(rng.normal(size=(800, 2)) @ rng.normal(size=(2, 6))) + 0.05 * rng.normal(size=(800, 6))
    gaps, log_px = {}, {}
    for objective in ("elbo", "iwae"):
        det = VAEAnomalyDetector(
            epochs=60, latent_dim=2, n_models=1, random_state=0, objective=objective, iwae_samples=8, trim_fraction=0.0
        ).fit(X)
        ll = det.log_likelihood(X, n_samples=256)
        log_px[objective], gaps[objective] = float(ll.mean()), float(np.mean(ll - det.elbo(X, n_samples=64)))
    assert log_px["iwae"] > log_px["elbo"] + 0.3  # measured 3.03 vs 2.01 nats
    assert gaps["iwae"] > 2 * gaps["elbo"]  # measured 2.41 vs 0.30 nats


def _posterior(lg: LinearGaussian, X: np.ndarray, shift: float = 0.0, var_scale: float = 1.0):
    means, var = lg.posterior(X)
    sd = np.sqrt(var * var_scale)
    mu = torch.tensor(means + shift * sd)
    return mu, torch.tensor(np.log(var * var_scale)).expand_as(mu).clone()


@torch.no_grad()
def test_a_mixture_of_two_proposals_weighs_each_draw_against_both():
    # Linear-Gaussian model: with the exact posterior p(z|x) as both components every weight
    # is p(x) exactly; two equal components are that one proposal; and with the posterior
    # mixed half and half with a proposal 12 widths off, q_mix ≥ ½ p(z|x) bounds every
    # weight by 2 p(x), so sd(w) ≤ p(x) and the mean of K weights is within 5/√K of p(x)
    # (relative; the balance heuristic is unbiased, Veach & Guibas 1995).
    lg = LinearGaussian.make()
    X = lg.sample(40)
    vae, x = lg.vae(dtype=torch.float64), torch.tensor(X)
    eps = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _posterior(lg, X)
    both = importance_terms(vae, x, eps[:64], proposal=MixtureProposal(exact, exact))[0]
    np.testing.assert_allclose(both.numpy(), np.broadcast_to(lg.log_px(X), (64, 40)), atol=1e-9)
    q = _posterior(lg, X, shift=0.7, var_scale=2.0)
    alone = importance_terms(vae, x, eps[:63], proposal=q)[0]
    torch.testing.assert_close(importance_terms(vae, x, eps[:63], proposal=MixtureProposal(q, q))[0], alone)
    off = _posterior(lg, X, shift=12.0, var_scale=0.5)
    logw = importance_terms(vae, x, eps, proposal=MixtureProposal(off, exact))[0]
    assert logw.max(0).values.sub(torch.tensor(lg.log_px(X))).max() <= math.log(2) + 1e-6
    estimate = torch.logsumexp(logw, 0) - math.log(len(eps))
    np.testing.assert_allclose(estimate.numpy(), lg.log_px(X), atol=5 / math.sqrt(len(eps)))


def test_a_correlated_gaussian_draws_and_scores_by_its_covariance():
    rng = np.random.default_rng(0)
    mean = torch.tensor(rng.normal(size=(4, 3)))
    tril = torch.tensor(np.tril(rng.normal(size=(4, 3, 3)), -1)) + torch.diag_embed(
        torch.tensor(rng.uniform(0.2, 2, (4, 3)))
    )
    q = CorrelatedGaussian(mean, tril)
    eps = torch.tensor(rng.normal(size=(50, 3)))
    z = q.draws(eps)
    torch.testing.assert_close(z[:, 1], mean[1] + eps @ tril[1].T)
    reference = torch.distributions.MultivariateNormal(mean, scale_tril=tril).log_prob(z)
    torch.testing.assert_close(q.log_prob(z), reference)
    # the diagonal case agrees with the (μ, log σ²) form, and the marginal gives the per-axis variances back
    logvar = torch.tensor(rng.normal(size=(4, 3)))
    torch.testing.assert_close(
        gaussian_log_prob(z, CorrelatedGaussian.diagonal(mean, logvar)), gaussian_log_prob(z, (mean, logvar))
    )
    torch.testing.assert_close(q.marginal()[1].exp(), torch.diagonal(tril @ tril.transpose(1, 2), dim1=1, dim2=2))


@torch.no_grad()
def test_the_exact_correlated_posterior_of_rows_with_missing_entries_weighs_every_draw_at_p_x():
    # Hiding entries of a linear-Gaussian row correlates its posterior: with that posterior's
    # full covariance as the proposal every importance weight is p(x_observed) exactly (alone
    # and as both components of a mixture); a diagonal Gaussian with the same mean and per-axis
    # variances is not (its weights scatter).
    lg = LinearGaussian.make(d=6, latent=2, sigma=0.1, seed=4)
    X = lg.sample(30, seed=2)
    observed = np.ones(X.shape, dtype=bool)
    observed[:, [0, 2, 3]] = False
    means, covs = lg.observed_posterior(X, observed)
    assert np.abs(covs[:, 0, 1] / np.sqrt(covs[:, 0, 0] * covs[:, 1, 1])).min() > 0.5  # the case is not trivial
    vae, x, mask = lg.vae(dtype=torch.float64), torch.tensor(X), torch.from_numpy(observed)
    exact = CorrelatedGaussian(torch.tensor(means), torch.linalg.cholesky(torch.tensor(covs)))
    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cov = lg.W @ lg.W.T + lg.sigma**2 * np.eye(lg.d)
    o = observed[0]
    marginal = torch.distributions.MultivariateNormal(torch.tensor(lg.b[o]), torch.tensor(cov[np.ix_(o, o)]))
    log_px = marginal.log_prob(x[:, o]).numpy()
    for proposal in (exact, MixtureProposal(exact, exact)):
        logw = importance_terms(vae, x, eps, mask, proposal=proposal)[0].numpy()
        # every draw's weight is p(x_observed) (to 1e-6: the VAE's σ passes through a soft clamp)
        np.testing.assert_allclose(logw, np.broadcast_to(log_px, logw.shape), rtol=0, atol=1e-5)
    diagonal = importance_terms(vae, x, eps, mask, proposal=exact.marginal())[0]
    assert (diagonal.std(0) > 0.1).all()
