"""Built-in likelihoods: normalised (checked by quadrature and summation), bounded, consistent."""

import math
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vaeguard.components.likelihoods import (
    LOG_SCALE_MAX,
    LOG_SCALE_MIN,
    BernoulliLikelihood,
    CategoricalLikelihood,
    DiagGaussianLikelihood,
    GaussianLikelihood,
    discretized_normal_log_prob,
    log_ndtr,
    soft_clamp,
    soft_clamp_inverse,
)


def integrate_1d(lik, params, lo=-60.0, hi=60.0, n=200001) -> float:
    x = torch.linspace(lo, hi, n, dtype=torch.float64)[:, None]
    p = lik.log_prob(x, params.expand(n, *params.shape[1:])).exp()
    return torch.trapezoid(p, x[:, 0]).item()


@pytest.mark.parametrize("raw_scale", [-8.0, -2.0, 0.0, 1.5, 9.0])
def test_gaussian_integrates_to_one_even_at_the_bounds(raw_scale):
    lik = GaussianLikelihood((1,)).double()
    with torch.no_grad():
        lik.raw_log_scale.fill_(raw_scale)
    scale = lik.log_scale.exp().item()
    assert math.exp(LOG_SCALE_MIN) <= scale <= math.exp(LOG_SCALE_MAX)
    params = torch.tensor([[[0.3]]], dtype=torch.float64)
    span = max(12 * scale, 1.0)
    mass = integrate_1d(lik, params, 0.3 - span, 0.3 + span, n=400001)
    assert mass == pytest.approx(1.0, abs=1e-4)


def test_diag_gaussian_integrates_to_one_and_bounds_its_scale():
    lik = DiagGaussianLikelihood((1,)).double()
    for raw in (-50.0, 0.0, 50.0):
        params = torch.tensor([[[1.0], [raw]]], dtype=torch.float64)
        scale = math.exp(soft_clamp(torch.tensor(raw), LOG_SCALE_MIN, LOG_SCALE_MAX).item())
        span = max(12 * scale, 1.0)
        assert integrate_1d(lik, params, 1 - span, 1 + span, n=400001) == pytest.approx(1.0, abs=1e-4)
    huge = lik.log_prob(
        torch.tensor([[1e6]], dtype=torch.float64), torch.tensor([[[0.0], [-50.0]]], dtype=torch.float64)
    )
    assert torch.isfinite(huge).all()


def test_gaussian_matches_the_closed_form_density_and_sums_features():
    lik = GaussianLikelihood((3,)).double()
    with torch.no_grad():
        lik.raw_log_scale.copy_(
            soft_clamp_inverse(
                torch.log(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)), LOG_SCALE_MIN, LOG_SCALE_MAX
            )
        )
    x = torch.tensor([[0.1, -1.0, 3.0]], dtype=torch.float64)
    mu = torch.tensor([[[0.0, 0.5, 1.0]]], dtype=torch.float64)
    sig = np.array([0.5, 1.0, 2.0])
    expected = np.sum(-0.5 * ((x.numpy() - mu.numpy()[:, 0]) / sig) ** 2 - np.log(sig) - 0.5 * math.log(2 * math.pi))
    assert lik.log_prob(x, mu).item() == pytest.approx(expected, abs=1e-5)
    per = lik.per_feature_log_prob(x, mu)
    assert per.shape == (1, 3) and per.sum().item() == pytest.approx(expected, abs=1e-5)
    mask = torch.tensor([[True, False, True]])
    assert lik.log_prob(x, mu, mask).item() == pytest.approx((per[0, 0] + per[0, 2]).item())


def test_bernoulli_masses_sum_to_one():
    lik = BernoulliLikelihood((2,))
    logits = torch.tensor([[[0.3, -40.0]]])
    states = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    total = lik.log_prob(states, logits.expand(4, 1, 2)).exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-6)


def test_categorical_masses_sum_to_one_and_support_is_checked():
    lik = CategoricalLikelihood((2,), n_categories=3)
    params = torch.randn(1, 3, 2)
    states = torch.cartesian_prod(torch.arange(3.0), torch.arange(3.0))
    assert lik.log_prob(states, params.expand(9, 3, 2)).exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert lik.encoder_input(states).shape == (9, 2, 3)
    assert lik.sample(params).shape == (1, 2)
    with pytest.raises(ValueError, match=r"row 0, column 1 holds 1.5"):
        lik.check_support(np.array([[0, 1.5]]))
    with pytest.raises(ValueError, match="n_categories >= 2"):
        CategoricalLikelihood((2,), n_categories=1)


def test_soft_clamp_inverse_round_trips():
    y = torch.linspace(-5.9, 3.9, 50, dtype=torch.float64)
    torch.testing.assert_close(soft_clamp(soft_clamp_inverse(y, -6.0, 4.0), -6.0, 4.0), y)


def test_means_and_samples_have_the_event_shape():
    for lik, params in [
        (GaussianLikelihood((4,)), torch.zeros(5, 1, 4)),
        (DiagGaussianLikelihood((4,)), torch.zeros(5, 2, 4)),
        (BernoulliLikelihood((4,)), torch.zeros(5, 1, 4)),
    ]:
        assert lik.mean(params).shape == (5, 4)
        assert lik.sample(params).shape == (5, 4)
        assert lik.log_prob(torch.zeros(5, 4), params).shape == (5,)


@settings(max_examples=60, deadline=None)
@given(
    loc=st.floats(-50, 50),
    log_scale=st.floats(LOG_SCALE_MIN, LOG_SCALE_MAX),
    width=st.floats(1e-4, 5.0),
    offset=st.floats(0, 1),
)
def test_cell_masses_of_a_lattice_sum_to_one(loc, log_scale, width, offset):
    # cells [k·w + o − w/2, k·w + o + w/2] tile the line, so their masses must sum to 1
    scale = math.exp(log_scale)
    lo_k = math.floor((loc - 40 * scale - offset) / width) - 1
    hi_k = math.ceil((loc + 40 * scale - offset) / width) + 1
    if hi_k - lo_k > 200_000:
        return  # cells far narrower than σ: covered by the narrow-cell branch test
    k = torch.arange(lo_k, hi_k + 1, dtype=torch.float64)
    x = k * width + offset
    lp = discretized_normal_log_prob(
        x,
        torch.tensor(loc, dtype=torch.float64),
        torch.tensor(scale, dtype=torch.float64),
        torch.tensor(width, dtype=torch.float64),
    )
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-6)
    assert (lp <= 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(loc=st.floats(-20, 20), log_scale=st.floats(-3, 2), width=st.floats(1e-4, 5.0), floor=st.floats(-10, 10))
def test_cells_from_a_floor_up_sum_to_one(loc, log_scale, width, floor):
    # a lattice with a lower bound: the floor cell takes all mass below it, so the cells
    # floor, floor + w, ... carry all the probability (a count column's masses at 0, 1, 2, ...)
    scale = math.exp(log_scale)
    hi_k = math.ceil((max(loc, floor) + 40 * scale - floor) / width) + 1
    if hi_k > 200_000:
        return
    x = floor + width * torch.arange(0, hi_k + 1, dtype=torch.float64)
    t = partial(torch.tensor, dtype=torch.float64)
    lp = discretized_normal_log_prob(x, t(loc), t(scale), t(width), t(floor))
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-6)
    # the floor cell's mass is Φ((floor + w/2 − μ)/σ), by the normal CDF
    from scipy.stats import norm

    assert lp[0].item() == pytest.approx(norm.logcdf((floor + width / 2 - loc) / scale), rel=1e-6, abs=1e-9)


def test_cell_mass_matches_the_normal_cdf_in_both_tails():
    from scipy.stats import norm

    def exact(z: float, h: float = 0.25) -> float:
        # log(Φ(z+h) − Φ(z−h)) evaluated in the tail where it is accurate
        if z > 0:
            return norm.logsf(z - h) + np.log(-np.expm1(norm.logsf(z + h) - norm.logsf(z - h)))
        return norm.logcdf(z + h) + np.log(-np.expm1(norm.logcdf(z - h) - norm.logcdf(z + h)))

    f64 = {"dtype": torch.float64}
    for z in [-30.0, -8.0, -1.0, 0.0, 2.0, 9.0, 30.0]:
        lp = discretized_normal_log_prob(
            torch.tensor(z, **f64), torch.tensor(0.0, **f64), torch.tensor(1.0, **f64), torch.tensor(0.5, **f64)
        ).item()
        assert lp == pytest.approx(exact(z), rel=1e-6, abs=1e-9), z


def test_log_ndtr_matches_the_normal_cdf_from_the_far_lower_tail_to_the_upper_one():
    from scipy.stats import norm

    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        t = torch.linspace(-300.0, 40.0, 68001, dtype=dtype)  # across the switch to the series (-30 / -10.6)
        exact = norm.logcdf(t.double().numpy())
        np.testing.assert_allclose(log_ndtr(t).double().numpy(), exact, rtol=tol, atol=tol)


def test_logistic_symbol_tables_have_gradients_and_the_coders_fast_path_gives_the_same_values():
    """The coder computes the tables without autograd from edges at ±∞ in place (∞ · 0 would make a gradient
    NaN); with autograd they come from the finite edges: finite-difference gradients (gradcheck) and the same
    values to the bit."""
    from vaeguard.components.likelihoods import DiscretizedLogisticLikelihood

    lik = DiscretizedLogisticLikelihood((3,), n_levels=8)
    params = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params[:, 1] = params[:, 1] - 2.0  # log scales around e^-2: cells of every size
    assert torch.autograd.gradcheck(lik.symbol_probabilities, (params.clone().requires_grad_(True),))
    with torch.no_grad():
        fast = lik.symbol_probabilities(params)
    assert torch.equal(fast, lik.symbol_probabilities(params.clone().requires_grad_(True)).detach())
    assert torch.allclose(fast.sum(-1), torch.ones(4, 3, dtype=torch.float64), atol=1e-15)


def test_log_ndtr_gradient_is_the_inverse_mills_ratio_and_the_same_inside_vmap():
    """d/dt log Φ(t) = φ(t)/Φ(t), exactly (scipy), on both sides of the switch to the series; outside vmap the
    series is computed only for the values in the far tail (selected), inside it for all (no selection): the two
    paths must give the same values and gradients to the bit."""
    from scipy.stats import norm

    t = torch.cat([torch.linspace(-200.0, 10.0, 4201, dtype=torch.float64), torch.tensor([-30.5, -29.5])])
    x = t.clone().requires_grad_(True)
    log_ndtr(x).sum().backward()
    exact = np.exp(norm.logpdf(t.numpy()) - norm.logcdf(t.numpy()))
    np.testing.assert_allclose(x.grad.numpy(), exact, rtol=1e-10, atol=1e-14)
    rows = t.reshape(-1, 1).repeat(1, 3)  # vmap over the rows: the where-path
    mapped = torch.func.vmap(log_ndtr)(rows)
    assert torch.equal(mapped, log_ndtr(rows))
    grad_mapped = torch.func.vmap(torch.func.grad(lambda r: log_ndtr(r).sum()))(rows)
    assert torch.equal(grad_mapped[:, 0], x.grad)


def test_cell_mass_gradients_in_float32_match_float64_in_both_tails():
    # training runs in float32: a far-out row's gradient must point the right way with the right size
    # (the difference of two float32 log_ndtr got it wrong by orders of magnitude beyond ~10 sigma)
    z = [-300.0, -60.0, -12.0, -10.0, -9.0, -4.0, -0.3, 0.0, 0.7, 5.0, 11.0, 40.0, 300.0]
    grads = {}
    for dtype in (torch.float32, torch.float64):
        loc = torch.zeros(len(z), dtype=dtype, requires_grad=True)
        scale = torch.full((len(z),), 0.5, dtype=dtype, requires_grad=True)
        x = torch.tensor(z, dtype=dtype) * 0.5
        discretized_normal_log_prob(x, loc, scale, torch.tensor(0.25, dtype=dtype)).sum().backward()
        grads[dtype] = (loc.grad.double(), scale.grad.double())
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64], strict=True):
        torch.testing.assert_close(g32, g64, rtol=1e-4, atol=1e-4)


def test_cell_masses_are_the_same_inside_vmap_where_the_far_tail_is_not_selected():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (400,), generator=g).double()
    loc = torch.randn(3, 400, generator=g, dtype=torch.float64) * 30  # many cells in the far tails
    scale = torch.rand(3, 400, generator=g, dtype=torch.float64) + 0.1
    width, floor = torch.full((400,), 1.0, dtype=torch.float64), torch.zeros(400, dtype=torch.float64)

    def one(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return discretized_normal_log_prob(x, loc, scale, width, floor)

    batched = torch.func.vmap(one)(loc, scale)
    torch.testing.assert_close(
        batched, torch.stack([one(*p) for p in zip(loc, scale, strict=True)]), rtol=1e-13, atol=0
    )
    assert (batched < -100).any()


def test_cell_mass_gradients_are_finite_for_narrow_and_wide_cells():
    loc = torch.tensor([0.0, 0.0, 3.0], requires_grad=True)
    scale = torch.tensor([1.0, 1.0, 1e-3], requires_grad=True)
    width = torch.tensor([1e-7, 2.0, 1.0])
    lp = discretized_normal_log_prob(torch.tensor([0.1, 40.0, 0.0]), loc, scale, width)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def _logistic_table(lik, params):
    """log P(level k) for every level k, shape (n_levels, *params batch/event shape)."""
    levels = range(lik.n_levels)
    shape = params.shape[:1] + params.shape[2:]
    return torch.stack(
        [lik.per_feature_log_prob(torch.full(shape, float(k), dtype=params.dtype), params) for k in levels]
    )


@pytest.mark.parametrize("n_levels", [2, 17, 256])
def test_discretized_logistic_masses_sum_to_one_even_in_the_tails(n_levels):
    from vaeguard.components.likelihoods import DiscretizedLogisticLikelihood

    lik = DiscretizedLogisticLikelihood((4,), n_levels=n_levels).double()
    torch.manual_seed(0)
    params = torch.randn(6, 2, 4, dtype=torch.float64) * 3
    params[0, 1], params[1, 1] = -50.0, 50.0  # log s at (beyond) both bounds
    params[2, 0], params[3, 0] = -40.0, 40.0  # μ far outside [−1, 1]
    table = _logistic_table(lik, params)
    assert torch.isfinite(table).all()
    assert torch.allclose(table.exp().sum(0), torch.ones(6, 4, dtype=torch.float64), atol=1e-10)
    levels = torch.arange(n_levels, dtype=torch.float64)[:, None, None]
    assert torch.allclose(lik.mean(params), (table.exp() * levels).sum(0), atol=1e-8)


def test_discretized_logistic_samples_follow_its_masses_and_gradients_stay_finite():
    from vaeguard.components.likelihoods import DiscretizedLogisticLikelihood

    lik = DiscretizedLogisticLikelihood((3,), n_levels=5).double()
    params = torch.tensor([[[0.1, -0.9, 0.7], [-1.0, -3.0, 0.5]]], dtype=torch.float64)
    torch.manual_seed(1)
    draws = lik.sample(params.expand(40000, 2, 3))
    frequencies = torch.stack([(draws == k).double().mean(0) for k in range(5)])
    assert torch.allclose(frequencies, _logistic_table(lik, params)[:, 0].exp(), atol=0.01)
    extreme = torch.tensor([[[-30.0, 30.0, 0.0], [-40.0, -40.0, 40.0]]], dtype=torch.float64, requires_grad=True)
    lik.log_prob(torch.tensor([[4.0, 0.0, 2.0]], dtype=torch.float64), extreme).sum().backward()
    assert torch.isfinite(extreme.grad).all()


def test_discretized_logistic_names_values_outside_its_levels():
    from vaeguard.components.likelihoods import DiscretizedLogisticLikelihood

    lik = DiscretizedLogisticLikelihood((2,), n_levels=17)
    lik.check_support(np.array([[0.0, 16.0], [np.nan, 3.0]]))
    with pytest.raises(ValueError, match=r"integers in \[0, 17\); sample 1, element 0 holds 17"):
        lik.check_support(np.array([[0.0, 1.0], [17.0, 3.0]]))


@pytest.mark.parametrize("n_levels", [2, 17, 256])
def test_symbol_tables_are_the_masses_the_likelihood_scores(n_levels):
    from vaeguard.components.likelihoods import DiscretizedLogisticLikelihood, Likelihood

    lik = DiscretizedLogisticLikelihood((1, 3, 3), n_levels=n_levels).double()
    params = torch.randn(4, 2, 1, 3, 3, dtype=torch.float64) * 3
    table = lik.symbol_probabilities(params)
    assert table.shape == (4, 1, 3, 3, n_levels)
    assert torch.allclose(table, Likelihood.symbol_probabilities(lik, params), atol=1e-12)  # the generic loop
    assert torch.allclose(table.sum(-1), torch.ones(4, 1, 3, 3, dtype=torch.float64), atol=1e-12)
    categorical = CategoricalLikelihood((5,), n_categories=4).double()
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    assert torch.allclose(
        categorical.symbol_probabilities(logits), Likelihood.symbol_probabilities(categorical, logits), atol=1e-12
    )
    assert DiagGaussianLikelihood((2,)).n_symbols is None
    with pytest.raises(ValueError, match="density"):
        DiagGaussianLikelihood((2,)).symbol_probabilities(torch.zeros(1, 2, 2))


@settings(max_examples=60, deadline=None)
@given(
    loc=st.floats(-20, 20),
    log_scale=st.floats(-3, 2),
    width=st.sampled_from([2.0**k for k in range(-8, 3)]),
    floor=st.integers(-80, 80).map(lambda k: k / 8),  # exact in the buffers' float32
)
def test_a_two_valued_column_is_a_probit_over_its_two_cells(loc, log_scale, width, floor):
    # A binary column (floor and ceiling one step apart) beside a count lattice and a
    # continuous column: its two masses are Φ(±(μ − m)/σ) with m the cells' midpoint, by
    # the normal CDF, and sum to one; the other columns keep their own terms, in their places.
    from scipy.stats import norm

    scale = math.exp(log_scale)
    lik = DiagGaussianLikelihood(
        (3,),
        bin_widths=[1.0, width, 0.0],
        lattice_floor=[0.0, floor, None],
        lattice_ceiling=[None, floor + width, None],
    )
    plain = DiagGaussianLikelihood((3,), bin_widths=[1.0, width, 0.0], lattice_floor=[0.0, floor, None])
    x = torch.tensor([[2.0, floor, 0.3], [0.0, floor + width, -1.0]], dtype=torch.float64)
    params = torch.tensor([[loc, loc, loc], [math.log(scale)] * 3], dtype=torch.float64).expand(2, 2, 3)
    lp = lik.per_feature_log_prob(x, params)
    scale = lik.loc_scale(params)[1][0, 1].item()  # σ as the likelihood reads it (soft-clamped)
    expected = norm.logcdf((floor + width / 2 - loc) / scale), norm.logsf((floor + width / 2 - loc) / scale)
    assert lp[0, 1].item() == pytest.approx(expected[0], rel=1e-6, abs=1e-9)
    assert lp[1, 1].item() == pytest.approx(expected[1], rel=1e-6, abs=1e-9)
    assert torch.logsumexp(lp[:, 1], 0).item() == pytest.approx(0.0, abs=1e-6)
    others = plain.per_feature_log_prob(x, params)
    torch.testing.assert_close(lp[:, [0, 2]], others[:, [0, 2]])


def test_two_cell_columns_keep_finite_gradients_and_the_config_round_trips():
    lik = DiagGaussianLikelihood(
        (4,),
        bin_widths=[0.5, 0.0, 2.0, 1.0],
        lattice_floor=[-1.0, None, 0.0, 0.0],
        lattice_ceiling=[-0.5, None, 2.0, None],
    )
    again = DiagGaussianLikelihood((4,), **lik.config())
    params = torch.tensor([[[30.0, 0.0, -30.0, 1.0], [-5.0, 0.0, 3.0, 0.0]]], requires_grad=True)
    x = torch.tensor([[-1.0, 0.2, 2.0, 3.0]])
    lp = lik.per_feature_log_prob(x, params)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(params.grad).all()
    torch.testing.assert_close(again.per_feature_log_prob(x, params), lp)
    # a table of flags only (no column gathered): the same terms as those columns beside others
    flags = DiagGaussianLikelihood((2,), bin_widths=[0.5, 2.0], lattice_floor=[-1.0, 0.0], lattice_ceiling=[-0.5, 2.0])
    torch.testing.assert_close(flags.per_feature_log_prob(x[:, [0, 2]], params[..., [0, 2]]), lp[..., [0, 2]])
    with pytest.raises(ValueError, match=r"lattice_ceiling\[0\] = 1.0: a ceiling is given only one lattice step"):
        DiagGaussianLikelihood((2,), bin_widths=[0.5, 0.0], lattice_floor=[0.0, None], lattice_ceiling=[1.0, None])


def _lattice_cases(dtype):
    """Cells of every kind: a continuous column, a half-step lattice (with values 60 σ out), one with
    a floor, cells narrower than NARROW_BIN σ, a floor at 0 with wide cells, a fine lattice 80 σ
    below the mean."""
    g = torch.Generator().manual_seed(0)
    n = 2000
    widths = torch.tensor([0.0, 0.5, 0.5, 1e-6, 2.0, 0.1], dtype=torch.float64)
    floor = torch.tensor([math.nan, math.nan, -1.0, math.nan, 0.0, math.nan], dtype=torch.float64)
    step = torch.where(widths > 0, widths, torch.ones_like(widths))
    x = torch.round(3 * torch.randn(n, 6, generator=g, dtype=torch.float64) / step) * step
    x[:, 2], x[:, 4] = x[:, 2].clamp(min=-1.0), x[:, 4].clamp(min=0.0)
    x[::7, 1], x[::11, 5] = 60.0, -80.0
    loc = 3 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    log_scale = 0.7 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x, loc, log_scale, widths, floor))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lattice_log_prob_has_the_cell_masses_values_and_their_exact_gradient(dtype):
    """lattice_log_prob (training's path: one autograd node, the gradient in closed form) gives
    discretized_normal_log_prob's values to the bit, and the gradient autograd gets by
    differentiating the cell masses: in float64 to 1e-9 relative (both are exact formulas
    evaluated to ~1e-13; the far tail's φ/mass loses a few digits through the exponent), in
    float32 within 1e-2 of float64's (rounding of values up to 80² σ² in the exponent)."""
    from vaeguard.components.likelihoods import lattice_log_prob

    x, loc, log_scale, widths, floor = _lattice_cases(dtype)

    def value_and_gradient(fn, dt):
        loc_ = loc.detach().to(dt).clone().requires_grad_(True)
        log_scale_ = log_scale.detach().to(dt).clone().requires_grad_(True)
        value = fn(x.to(dt), loc_, log_scale_.exp(), widths.to(dt), floor.to(dt))
        value.sum().backward()
        return value.detach(), loc_.grad.double(), log_scale_.grad.double()

    plain = value_and_gradient(discretized_normal_log_prob, dtype)
    closed = value_and_gradient(lattice_log_prob, dtype)
    assert torch.equal(plain[0], closed[0])
    reference = value_and_gradient(discretized_normal_log_prob, torch.float64)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-2
    for got, want in zip(closed[1:], reference[1:], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * 1e-3)


def test_lattice_log_prob_keeps_autograd_where_the_data_needs_a_gradient_or_vmap_runs_it():
    """The closed-form node gives no gradient to x: where x requires one, or inside torch.func
    transforms, the plain operations run (values and gradients then as discretized_normal_log_prob's)."""
    from vaeguard.components.likelihoods import lattice_log_prob

    x, loc, log_scale, widths, floor = _lattice_cases(torch.float64)
    x = x[:50].clone().requires_grad_(True)
    lattice_log_prob(x, loc[:50], log_scale[:50].exp(), widths, floor).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    batched = torch.func.vmap(lambda lo, s: lattice_log_prob(x.detach(), lo, s, widths, floor))(
        loc[:50].expand(3, 50, 6), log_scale[:50].exp().expand(3, 50, 6)
    )
    assert torch.equal(
        batched[0], discretized_normal_log_prob(x.detach(), loc[:50], log_scale[:50].exp(), widths, floor)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_binary_columns_gradient_in_closed_form_is_the_inverse_mills_ratio(dtype):
    """A two-cell (binary) column's log Φ(±(μ − m)/σ) under autograd is one node whose gradient is
    φ/Φ in closed form: the values are the plain path's to the bit, the gradient autograd's through
    log_ndtr (float64: 1e-9 relative; float32 within 1e-2 of it, values 60 σ out included)."""
    from vaeguard.components.likelihoods import _two_cell_log_prob

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3000, generator=g) < 0.5).double()
    loc = 4 * torch.randn(3000, generator=g, dtype=torch.float64)
    loc[::13] = 60.0  # the far tail for the rows at 0
    log_scale = 0.7 * torch.randn(3000, generator=g, dtype=torch.float64)
    midpoint = torch.tensor(0.5, dtype=torch.float64)

    def value_and_gradient(dt, plain):
        loc_ = loc.detach().to(dt).clone().requires_grad_(True)
        log_scale_ = log_scale.detach().to(dt).clone().requires_grad_(True)
        with torch.enable_grad():
            args = (x.to(dt), loc_, log_scale_.exp(), midpoint.to(dt))
            if plain:  # inside vmap: the plain operations
                value = torch.func.vmap(_two_cell_log_prob, in_dims=(0, 0, 0, None))(*args)
            else:
                value = _two_cell_log_prob(*args)
        value.sum().backward()
        return value.detach(), loc_.grad.double(), log_scale_.grad.double()

    closed, plain = value_and_gradient(dtype, False), value_and_gradient(dtype, True)
    assert torch.equal(closed[0], plain[0])
    reference = value_and_gradient(torch.float64, True)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-2
    for got, want in zip(closed[1:], reference[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * 1e-3)
