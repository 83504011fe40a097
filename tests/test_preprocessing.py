import math

import numpy as np
import pandas as pd
import pytest

from vaeguard import VAEAnomalyDetector
from vaeguard.preprocessing import Standardizer, find_lattice, lattice_steps


def test_log_jacobian_converts_densities_to_data_units():
    # A standard normal in standardised units is N(m, s²) in data units: densities differ by 1/s.
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, size=(100_000, 1))
    st = Standardizer.fit(X)
    x = np.array([[4.0]])
    z = st.transform(x)[0, 0]
    log_p_data = -0.5 * z**2 - 0.5 * math.log(2 * math.pi) + st.log_jacobian
    s = st.scale[0]
    expected = -0.5 * ((4.0 - st.center[0]) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
    assert math.isclose(log_p_data, expected, rel_tol=1e-12)
    np.testing.assert_allclose(st.inverse_transform(st.transform(X[:5])), X[:5])


def test_constant_columns_keep_unit_scale():
    st = Standardizer.fit(np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]]))
    assert st.scale[1] == 1.0 and np.isfinite(st.log_jacobian)


@pytest.mark.parametrize("magnitude", [1e-300, 1e-13, 1.0, 1e154, 1e200, 1e300])
def test_moments_are_scale_free(magnitude):
    # The same column at any magnitude: mean and spread scale with it (no overflow when
    # squared near 1e200, no underflow to a zero spread near 1e-300), and it stays data,
    # not a constant.
    base = np.array([[1.0], [2.0], [4.0], [np.nan], [7.0]])
    st = Standardizer.fit(base * magnitude)
    np.testing.assert_allclose(st.center, [3.5 * magnitude], rtol=1e-12)
    np.testing.assert_allclose(st.scale, [np.sqrt(5.25) * magnitude], rtol=1e-12)
    np.testing.assert_allclose(st.transform(base * magnitude), Standardizer.fit(base).transform(base), rtol=1e-12)
    assert math.isclose(st.log_jacobian, -math.log(np.sqrt(5.25)) - math.log(magnitude), rel_tol=1e-12)


def test_a_spread_below_the_values_float_resolution_is_constant():
    # 1e6 plus noise of 1e-7 is 1e6 to within float64's resolution (~1e-10 there): constant.
    X = 1e6 + 1e-7 * np.random.default_rng(0).normal(size=(50, 1))
    assert Standardizer.fit(X).scale[0] == 1.0


def test_lattice_steps_find_grids_and_leave_continuous_columns():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3, size=500).astype(float)
    scaled_grid = rng.integers(0, 17, size=500) / 16.0  # optdigits-like, after min-max scaling
    continuous = rng.normal(size=500)
    constant = np.full(500, 2.0)
    wide = rng.integers(0, 10**6, size=500).astype(float)  # too many steps to be a lattice
    steps = lattice_steps(np.column_stack([counts, scaled_grid, continuous, constant, wide]))
    assert steps[0] == 1.0 and abs(steps[1] - 1 / 16) < 1e-12
    assert steps[2] == 0 and steps[3] == 0 and steps[4] == 0


def test_the_lattice_decision_does_not_flip_with_one_row_or_with_n():
    rng = np.random.default_rng(0)
    ints = rng.integers(0, 500, size=1000).astype(float)
    assert find_lattice(ints).step == 1.0
    assert find_lattice(np.r_[ints, 2000.0]).step == 1.0  # one far-out count: still a lattice of counts
    stray = find_lattice(np.r_[ints, 3.5])  # one half count: the step stays 1, the 3.5 is off it
    assert stray.step == 1.0 and "1 off it" in stray.reason
    assert find_lattice(np.r_[ints[:200], np.pi]).step == 1.0
    for n in (20, 200, 2000):  # N(100, 15) recorded to 0.1: a lattice of step 0.1 at every n
        column = np.round(rng.normal(100, 15, size=n), 1)
        assert find_lattice(column).step == pytest.approx(0.1, rel=1e-9)
        assert find_lattice(column.astype(np.float32).astype(float)).step == pytest.approx(0.1, rel=1e-6)
    # to 0.01 the grid is finer than 1/1000 of the interquartile range: a density
    fine = find_lattice(np.round(rng.normal(100, 15, size=2000), 2))
    assert fine.kind == "continuous" and "1/1000 of the interquartile range" in fine.reason
    ratings = find_lattice(rng.choice([1.0, 3.0, 5.0], size=300))
    assert (ratings.step, ratings.origin) == (2.0, 1.0)


def test_whole_numbers_from_zero_have_no_negative_values():
    counts = find_lattice(np.random.default_rng(1).poisson(3, size=400).astype(float))
    assert counts.lower == 0.0 and "a negative value is impossible" in counts.reason
    assert np.isnan(find_lattice(np.arange(1.0, 30.0)).lower)  # starts at 1: no bound is implied
    # min-max scaled counts also start at 0, but a value below the training range is only unusual
    assert np.isnan(find_lattice(np.arange(0.0, 21.0) / 20).lower)
    st = Standardizer.fit(np.array([[0.0], [1.0], [2.0], [2.0]]), detect_lattice=True)
    assert st.impossible(np.array([[-1.0], [0.0], [2.5], [7.0], [np.nan]])).ravel().tolist() == [
        True,
        False,
        True,
        False,
        False,
    ]
    assert st.to_support(np.array([[-1.2], [2.6]])).ravel().tolist() == [0.0, 3.0]


def test_a_two_valued_column_is_binary_and_a_third_value_is_impossible():
    # a flag, a one-hot or bag-of-words indicator: its two values are its only cells, at any two values
    for low, high in ((0.0, 1.0), (-2.5, 7.0)):
        flag = find_lattice(np.where(np.random.default_rng(2).random(300) < 0.1, high, low))
        assert (flag.kind, flag.origin, flag.lower, flag.upper) == ("lattice", low, low, high)
        assert flag.step == high - low and "a binary column" in flag.reason
    assert np.isnan(find_lattice(np.array([0.0, 1.0, 2.0, 1.0])).upper)  # three values: a count, unbounded above
    named = find_lattice(np.array([0.0, 1.0, 1.0, 0.0]), forced=True)  # named in discrete_columns: a count
    assert named.kind == "lattice" and named.step == 1 and np.isnan(named.upper) and named.lower == 0
    X = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 2.0], [1.0, 2.0]])
    st = Standardizer.fit(X, detect_lattice=True)
    assert np.isnan(st.upper[1]) and st.upper[0] == 1.0
    assert st.lattice_ceiling[0] == pytest.approx((1.0 - st.center[0]) / st.scale[0])
    tests = np.array([[2.0, 3.0], [-1.0, 0.0], [0.5, 0.0], [1.0, 9.0]])
    assert st.impossible(tests).tolist() == [[True, False], [True, False], [True, False], [False, False]]
    assert st.to_support(tests)[:, 0].tolist() == [1.0, 0.0, 1.0, 1.0]  # samples stay on the two values


def test_named_discrete_columns_override_the_detection():
    rng = np.random.default_rng(2)
    X = np.column_stack([np.round(rng.normal(100, 15, 500), 2), rng.integers(0, 5, 500), rng.normal(size=500)])
    auto = Standardizer.fit(X, detect_lattice=True)
    assert [c.kind for c in auto.columns] == ["continuous", "lattice", "continuous"]
    forced = Standardizer.fit(X, detect_lattice=np.array([True, False, False]), names=["'price'", "'n'", "'z'"])
    assert [c.kind for c in forced.columns] == ["lattice", "continuous", "continuous"]
    assert forced.step[0] == pytest.approx(0.01) and "not named in discrete_columns" in forced.columns[1].reason
    with pytest.raises(ValueError, match="column 'z' is named in discrete_columns but its values such as"):
        Standardizer.fit(X, detect_lattice=np.array([False, False, True]), names=["'price'", "'n'", "'z'"])


def test_lattice_columns_are_snapped_and_left_out_of_the_jacobian():
    X = np.array([[0.0, 1.0], [2.0, 2.5371], [4.0, 0.3141], [2.0, 1.1]])
    st = Standardizer.fit(X, detect_lattice=True)
    assert list(st.discrete) == [True, False]
    np.testing.assert_allclose(st.snap(np.array([[2.9, 0.123]])), [[2.0, 0.123]])
    assert st.log_jacobian == -np.log(st.scale[1])
    assert st.bin_widths[0] == 2.0 / st.scale[0] and st.bin_widths[1] == 0


def test_pixel_levels_of_integer_dtypes_span_the_dtype():
    from vaeguard.preprocessing import PixelLevels

    images = np.array([[[[3, 200, 7]]]], dtype=np.uint8)
    levels = PixelLevels.fit(images.astype(float), images.dtype)
    assert (levels.origin, levels.step, levels.n_levels) == (0.0, 1.0, 256)
    back = levels.to_values(levels.to_levels(np.array([[[[0.0, 255.0]]]])))
    assert back.dtype == np.uint8 and back.tolist() == [[[[0, 255]]]]
    assert PixelLevels.fit(np.zeros((1, 1, 2, 2)), np.bool_).n_levels == 2
    assert PixelLevels.fit(np.array([[[[0, 1, 2]]]]), np.int8).origin == -128
    binary = PixelLevels.fit(np.array([[[[0.0, 255.0, 0.0]]]]), np.uint8)
    assert (binary.origin, binary.step, binary.n_levels) == (0.0, 255.0, 2)


def test_pixel_levels_of_floats_come_from_their_lattice():
    from vaeguard.preprocessing import PixelLevels

    images = np.array([0.0, 0.25, 1.0, 0.5]).reshape(1, 1, 2, 2)
    levels = PixelLevels.fit(images, np.float64)
    assert (levels.origin, levels.step, levels.n_levels) == (0.0, 0.25, 5)
    assert levels.to_levels(images).ravel().tolist() == [0, 1, 4, 2]
    assert PixelLevels.fit(np.random.default_rng(0).random((2, 1, 4, 4)), np.float64) is None
    # off the levels (1.25 above the top level, 0.3 between levels): the nearest level, and marked impossible
    odd = np.array([0.0, 0.3, 1.25, np.nan]).reshape(1, 1, 2, 2)
    assert levels.to_levels(odd).ravel().tolist()[:3] == [0, 1, 4]
    assert levels.impossible(odd).ravel().tolist() == [False, True, True, False]


def test_check_feature_columns_refuses_ids_and_labels_and_nothing_else():
    from vaeguard.preprocessing import check_feature_columns

    rng = np.random.default_rng(0)
    n = 200
    fine = pd.DataFrame(
        {
            "reading": rng.normal(size=n),  # numeric and unique on every row: a measurement, not an id
            "shop": rng.choice(["north", "south", "east"], n),
            "label": rng.integers(0, 3, n),  # three values: not the anomaly labels
            "code": [f"c{i % 40}" for i in range(n)],  # 40 categories in 200 rows: a real category
        }
    )
    check_feature_columns(fine)
    check_feature_columns(pd.DataFrame({"name": [f"n{i}" for i in range(10)]}))  # too few rows to tell
    with pytest.raises(ValueError, match=r"column 'customer' has 150 distinct values in 200 rows: it identifies rows"):
        check_feature_columns(fine.assign(customer=[f"u{i % 150}" for i in range(n)]))
    with pytest.raises(ValueError, match=r"column 'Is_Anomaly' looks like the anomaly labels"):
        check_feature_columns(fine.assign(Is_Anomaly=rng.random(n) < 0.1))
    with pytest.raises(ValueError, match=r"column 'y' looks like the anomaly labels .* --label-column y"):
        VAEAnomalyDetector(epochs=1).fit(fine.assign(y=rng.integers(0, 2, n)))


def test_values_rounded_to_significant_figures_are_continuous_not_a_lattice_with_impossible_values():
    # scikit-learn's breast cancer 'symmetry error' is recorded to 4 significant figures: 0.01513, 0.02348 lie on
    # a 1e-5 step, 0.007882 (and two more below 0.01) do not. They were "impossible" training values.
    from sklearn.datasets import load_breast_cancer

    column = load_breast_cancer(as_frame=True).data["symmetry error"].to_numpy()
    found = find_lattice(column)
    assert found.kind == "continuous" and "rounded to 4 significant figures" in found.reason
    rng = np.random.default_rng(0)
    synthetic = np.array([float(f"{v:.3g}") for v in rng.lognormal(-3, 0.6, 2000)])  # 3 significant figures
    assert find_lattice(synthetic).kind == "continuous"
    # a stray value among whole counts, and a lone 0.005 among values to 2 decimals, stay off-lattice (impossible)
    counts = find_lattice(np.array(list(range(500)) * 4 + [3.5]))
    assert counts.kind == "lattice" and counts.step == 1 and "1 off it" in counts.reason
    decimals = find_lattice(np.array([*np.round(np.linspace(0.1, 9.9, 300), 2), 0.005]))
    assert decimals.kind == "lattice" and decimals.step == pytest.approx(0.01) and "1 off it" in decimals.reason
