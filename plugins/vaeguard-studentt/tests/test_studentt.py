"""The Student-t plugin: normalised, heavy-tailed, learned ν, reachable by name once installed."""

import math

import numpy as np
import pytest
import torch
from vaeguard_studentt import DF_MAX, DF_MIN, StudentTLikelihood

from vaeguard import VAEAnomalyDetector
from vaeguard.plugins import PluginRegistry, make_plugin_manager


def test_registered_through_its_entry_point():
    reg = PluginRegistry(make_plugin_manager())
    assert reg.get("likelihoods", "studentt") is StudentTLikelihood
    info = {i.name: i for i in reg.plugins()}["studentt"]
    assert info.source == "vaeguard-studentt"


@pytest.mark.parametrize("df", [2.5, 5.0, 50.0])
def test_density_integrates_to_one(df):
    lik = StudentTLikelihood((1,), initial_df=df).double()
    x = torch.linspace(-3000, 3000, 2_000_001, dtype=torch.float64)[:, None]
    p = lik.log_prob(x, torch.zeros(x.shape[0], 1, 1, dtype=torch.float64)).exp()
    # the tails beyond ±3000 hold a negligible mass for ν ≥ 2.5 at unit scale
    assert torch.trapezoid(p, x[:, 0]).item() == pytest.approx(1.0, abs=2e-4)
    assert lik.df.item() == pytest.approx(df, rel=1e-5)


def test_heavier_tails_than_the_gaussian():
    lik = StudentTLikelihood((1,), initial_df=3.0)
    far = lik.log_prob(torch.tensor([[10.0]]), torch.zeros(1, 1, 1)).item()
    gauss = -0.5 * 100 - 0.5 * math.log(2 * math.pi)
    assert far > gauss + 30


def test_degrees_of_freedom_are_learned_and_bounded():
    lik = StudentTLikelihood((2,))
    assert lik.raw_df.requires_grad
    with torch.no_grad():
        lik.raw_df.fill_(1e4)
    assert lik.df.min().item() >= DF_MIN and lik.df.max().item() <= DF_MAX
    with pytest.raises(ValueError, match="initial_df"):
        StudentTLikelihood((1,), initial_df=1.0)


def test_fits_heavy_tailed_data_better_than_a_gaussian():
    rng = np.random.default_rng(0)
    X = rng.standard_t(2.5, size=(2000, 3))
    X_test = rng.standard_t(2.5, size=(1000, 3))
    common = {"random_state": 0, "epochs": 60, "trim_fraction": 0.0, "n_models": 1}  # one maximum-likelihood fit each
    t = VAEAnomalyDetector(likelihood="studentt", **common).fit(X).score_samples(X_test).mean()
    g = VAEAnomalyDetector(likelihood="gaussian", **common).fit(X).score_samples(X_test).mean()
    assert t > g + 0.3, (t, g)
    # and the learned ν moved towards the truth (2.5) from its start (5)
    det = VAEAnomalyDetector(likelihood="studentt", **common).fit(X)
    assert det.model_.likelihood.df.mean().item() < 5.0
