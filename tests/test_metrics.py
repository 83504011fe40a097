"""Disentanglement metrics on codes whose answer is known: aligned, rotated, collapsed."""

import numpy as np
import pytest
from scipy.stats import special_ortho_group

from vaeguard.metrics import active_units, dci, factor_vae_score, mutual_information_gap


@pytest.fixture(scope="module")
def factors():
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(0, 8, 2000), rng.integers(0, 6, 2000), rng.integers(0, 4, 2000)], axis=1)


def aligned(factors, noise=0.05, seed=0):
    """One code dimension per factor (its value plus a little noise), in factor order."""
    rng = np.random.default_rng(seed)
    return factors + noise * rng.normal(size=factors.shape)


def rotated(factors):
    codes = aligned(factors)
    codes = (codes - codes.mean(0)) / codes.std(0)
    return codes @ special_ortho_group.rvs(3, random_state=3)


def test_active_units_counts_dimensions_that_vary():
    codes = np.c_[np.linspace(-2, 2, 100), np.full(100, 0.3), 0.05 * np.sin(np.arange(100))]
    assert active_units(codes) == 1
    assert active_units(codes, threshold=1e-4) == 2
    with pytest.raises(ValueError, match="row 1, column 0"):
        active_units(np.array([[0.0], [np.nan]]))


def test_mig_is_one_for_an_aligned_code_and_falls_under_rotation_and_collapse(factors):
    assert mutual_information_gap(aligned(factors), factors) > 0.95
    assert mutual_information_gap(rotated(factors), factors) < 0.5
    collapsed = np.c_[aligned(factors)[:, :1], np.zeros((len(factors), 2))]
    # only the first factor has a dimension of its own; the others have none: MIG = 1/3
    assert mutual_information_gap(collapsed, factors) == pytest.approx(1 / 3, abs=0.02)
    assert mutual_information_gap(np.zeros((len(factors), 3)), factors) == 0.0


def test_mig_does_not_care_about_the_order_or_scale_of_dimensions(factors):
    codes = aligned(factors)
    shuffled = codes[:, [2, 0, 1]] * np.array([10.0, -0.1, 3.0])
    assert mutual_information_gap(shuffled, factors) == pytest.approx(mutual_information_gap(codes, factors))


def test_dci_separates_aligned_rotated_and_collapsed_codes(factors):
    good = dci(aligned(factors), factors)
    assert good["disentanglement"] > 0.9 and good["completeness"] > 0.9 and good["informativeness"] > 0.95
    mixed = dci(rotated(factors), factors)
    assert mixed["disentanglement"] < good["disentanglement"] - 0.3
    assert mixed["completeness"] < good["completeness"] - 0.3
    noise = dci(np.random.default_rng(5).normal(size=(len(factors), 3)), factors)
    assert noise["informativeness"] < 0.35  # chance is 1/8, 1/6, 1/4


def test_factor_vae_score_on_known_encoders():
    sizes = (5, 5, 5)

    def generate(f, rng):
        return f.astype(float)

    def identity(x):
        return x + 0.01 * np.random.default_rng(0).normal(size=x.shape)

    rotation = special_ortho_group.rvs(3, random_state=1)
    assert factor_vae_score(identity, generate, sizes, n_votes=200) == 1.0
    assert factor_vae_score(lambda x: identity(x) @ rotation, generate, sizes, n_votes=200) < 0.9
    assert factor_vae_score(lambda x: np.zeros_like(x), generate, sizes, n_votes=50) == 0.0


def test_mismatched_rows_are_named():
    with pytest.raises(ValueError, match="same rows: 10 codes, 9 factor rows"):
        mutual_information_gap(np.zeros((10, 2)), np.zeros((9, 1)))
