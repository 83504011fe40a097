"""VAEAnomalyDetector: behaviour, sklearn integration, bad input, and learned densities."""

import copy
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from vaeguard import VAEAnomalyDetector, load


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(200, 4)) @ rng.normal(size=(4, 4))


@pytest.fixture(scope="module")
def fitted(blobs) -> VAEAnomalyDetector:
    from conftest import FAST

    return VAEAnomalyDetector(**FAST, random_state=0).fit(blobs)


def test_methods_shapes_and_relations(fitted, blobs):
    scores = fitted.score_samples(blobs)
    assert scores.shape == (200,) and scores.dtype == np.float64 and np.all(np.isfinite(scores))
    np.testing.assert_allclose(fitted.decision_function(blobs), scores - fitted.offset_)
    pred = fitted.predict(blobs)
    assert set(np.unique(pred)) <= {-1, 1}
    # contamination = 0.1 of the training rows fall below the offset
    assert (pred == -1).mean() == pytest.approx(0.1, abs=0.01)
    assert fitted.transform(blobs).shape == (200, 2)
    assert list(fitted.get_feature_names_out()) == ["vaeanomalydetector0", "vaeanomalydetector1"]
    assert fitted.sample(7, random_state=0).shape == (7, 4)
    ll, std = fitted.log_likelihood(blobs[:5], n_samples=100, return_std=True)
    assert ll.shape == std.shape == (5,) and np.all(std >= 0)
    assert np.mean(fitted.elbo(blobs)) <= np.mean(fitted.log_likelihood(blobs, n_samples=200))


def test_contamination_sets_offset_as_training_percentile(blobs, fast_params):
    det = VAEAnomalyDetector(**fast_params, contamination=0.25, random_state=0).fit(blobs)
    assert (det.predict(blobs) == -1).mean() == pytest.approx(0.25, abs=0.01)
    assert det.offset_ == pytest.approx(np.percentile(det.score_samples(blobs), 25))


def test_same_seed_same_scores_and_different_seed_differs(blobs, fast_params):
    a = VAEAnomalyDetector(**fast_params, random_state=3).fit(blobs).score_samples(blobs)
    b = VAEAnomalyDetector(**fast_params, random_state=3).fit(blobs).score_samples(blobs)
    c = VAEAnomalyDetector(**fast_params, random_state=4).fit(blobs).score_samples(blobs)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_score_of_a_row_does_not_depend_on_its_batch(fitted, blobs):
    full = fitted.score_samples(blobs)
    np.testing.assert_allclose(fitted.score_samples(blobs[3:4]), full[3:4], rtol=0, atol=1e-9)
    np.testing.assert_allclose(fitted.score_samples(blobs[::-1]), full[::-1], rtol=0, atol=1e-9)


def test_fitting_does_not_touch_torch_global_rng(blobs, fast_params):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    VAEAnomalyDetector(**fast_params, random_state=0).fit(blobs)
    assert torch.equal(torch.rand(3), expected)


def test_pipeline_clone_gridsearch_and_pickle(blobs, fast_params):
    pipe = Pipeline([("scale", StandardScaler()), ("vae", VAEAnomalyDetector(**fast_params, random_state=0))])
    pipe.fit(blobs)
    assert pipe.predict(blobs).shape == (200,)
    assert pipe.score_samples(blobs).shape == (200,)
    # as a transformer inside a pipeline
    codes = Pipeline([("vae", VAEAnomalyDetector(**fast_params, random_state=0))]).fit_transform(blobs)
    assert codes.shape == (200, 2)
    twin = clone(pipe.named_steps["vae"])
    assert twin.get_params() == pipe.named_steps["vae"].get_params()
    search = GridSearchCV(
        VAEAnomalyDetector(**fast_params, random_state=0),
        {"latent_dim": [1, 2]},
        scoring=lambda est, X, y=None: est.score_samples(X).mean(),
        cv=2,
    ).fit(blobs)
    assert search.best_params_["latent_dim"] in (1, 2)
    det = pipe.named_steps["vae"]
    again = pickle.loads(pickle.dumps(det))
    np.testing.assert_array_equal(again.score_samples(blobs), det.score_samples(blobs))


def test_score_is_the_mean_log_likelihood_so_gridsearch_picks_the_better_model():
    # issue 19: score(X) as GaussianMixture's, so GridSearchCV without scoring= compares held-out likelihoods
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1200, 2)) @ rng.normal(size=(2, 6)) + 0.1 * rng.normal(size=(1200, 6))
    search = GridSearchCV(
        VAEAnomalyDetector(random_state=0, hidden_dims=[32], latent_dim=2, n_models=1), {"epochs": [1, 40]}, cv=2
    ).fit(X)
    assert search.best_params_ == {"epochs": 40}  # one epoch leaves the model far from the data
    det = search.best_estimator_
    assert det.score(X[:100]) == pytest.approx(float(np.mean(det.score_samples(X[:100]))), rel=1e-12)
    fold_scores = search.cv_results_["mean_test_score"]
    assert fold_scores[1] > fold_scores[0] + 1.0  # nats per row


def test_dataframe_keeps_feature_names(blobs, fast_params):
    df = pd.DataFrame(blobs, columns=["a", "b", "c", "d"])
    det = VAEAnomalyDetector(**fast_params, random_state=0).fit(df)
    assert list(det.feature_names_in_) == ["a", "b", "c", "d"]
    bad = df.copy()
    bad.iloc[4, 2] = np.inf
    with pytest.raises(ValueError, match=r"inf at row 4, column 'c'"):
        det.score_samples(bad)


@pytest.mark.parametrize(
    ("make_bad", "match"),
    [
        (lambda X: np.where(np.arange(X.size).reshape(X.shape) < 8, np.nan, X), r"row 0 has no observed values"),
        (lambda X: np.where(np.arange(X.size).reshape(X.shape) == 6, np.inf, X), r"inf at row 1, column 2"),
        (lambda X: X[:, :3], r"3 features, but VAEAnomalyDetector is expecting 4"),
        (lambda X: X[:0], r"0 sample"),
        (lambda X: X[:, 0], r"Expected 2D array"),
        (lambda X: np.full_like(X, 1e300), r"too far from the training data"),
    ],
)
def test_bad_input_at_score_time_is_a_clear_value_error(fitted, blobs, make_bad, match):
    with pytest.raises(ValueError, match=match):
        fitted.score_samples(make_bad(blobs[:10].copy()))


def test_bad_input_at_fit_time(fast_params):
    det = VAEAnomalyDetector(**fast_params)
    with pytest.raises(ValueError, match="inf at row 0, column 0"):
        det.fit(np.array([[np.inf, 1.0], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="column 1 has no observed values"):
        det.fit(np.array([[0.0, np.nan], [2.0, np.nan]]))
    with pytest.raises(ValueError, match="0 sample"):
        det.fit(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="unknown likelihood 'nope'; known likelihoods: .*gaussian"):
        VAEAnomalyDetector(**fast_params, likelihood="nope").fit(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="unknown encoder 'nope'; known encoders: .*mlp"):
        VAEAnomalyDetector(**fast_params, encoder="nope").fit(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="hidden_dims"):
        VAEAnomalyDetector(**{**fast_params, "hidden_dims": [0]}).fit(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="bernoulli.*row 1, column 0 holds 0.5"):
        VAEAnomalyDetector(**fast_params, likelihood="bernoulli").fit(np.array([[0, 1], [0.5, 1]]))


def test_constant_and_extreme_columns_give_finite_scores(fast_params):
    rng = np.random.default_rng(1)
    X = np.column_stack([rng.normal(size=300), np.full(300, 7.0), 1e8 * rng.standard_t(2, size=300)])
    det = VAEAnomalyDetector(**fast_params, random_state=0).fit(X)
    assert np.all(np.isfinite(det.score_samples(X)))
    X_new = X[:5].copy()
    X_new[:, 1] = 7.5  # off the constant column: very unlikely, still finite
    assert np.all(np.isfinite(det.score_samples(X_new)))


def test_discrete_likelihoods_give_probability_masses(fast_params):
    rng = np.random.default_rng(0)
    Xb = (rng.random((300, 6)) < 0.3).astype(float)
    bern = VAEAnomalyDetector(**fast_params, likelihood="bernoulli", random_state=0).fit(Xb)
    assert np.all(bern.score_samples(Xb) < 0)  # log of a probability mass
    Xc = rng.integers(0, 4, size=(300, 3))
    cat = VAEAnomalyDetector(**fast_params, likelihood="categorical", random_state=0).fit(Xc)
    scores = cat.log_likelihood(Xc, n_samples=64)
    assert np.all(scores < 0)
    # uniform categories over 3 columns: about 3·log 4 nats per row
    assert np.mean(scores) == pytest.approx(-3 * math.log(4), abs=0.15)
    with pytest.raises(ValueError, match=r"integers in \[0, 4\); row 0, column 1 holds 7"):
        cat.score_samples(np.array([[1, 7, 0]]))


def test_studentt_plugin_works_through_the_estimator(blobs, fast_params):
    det = VAEAnomalyDetector(**fast_params, likelihood="studentt", random_state=0).fit(blobs)
    assert np.all(np.isfinite(det.score_samples(blobs)))


def ppca(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws from probabilistic PCA (d=10, 2 factors, σ=0.3) and their true log-densities."""
    rng = np.random.default_rng(100)
    W = rng.normal(size=(10, 2))
    mu = rng.normal(size=10)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2)) @ W.T + mu + 0.3 * rng.normal(size=(n, 10))
    cov = W @ W.T + 0.09 * np.eye(10)
    diff = X - mu
    _, logdet = np.linalg.slogdet(cov)
    logp = -0.5 * (np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff) + logdet + 10 * math.log(2 * math.pi))
    return X, logp


def test_learns_the_true_density_of_probabilistic_pca_and_keeps_units():
    """Maximum likelihood (no trimming: the default trims the worst-fitting rows of each batch, a robust
    estimator whose density is narrower by design, ~0.55 nats/row on this clean table) approaches the true
    density; the units follow the data."""
    X, _ = ppca(4000, seed=1)
    X_test, logp_test = ppca(1000, seed=2)
    det = VAEAnomalyDetector(random_state=0, trim_fraction=0.0).fit(X)
    scores = det.score_samples(X_test)
    assert abs(scores.mean() - logp_test.mean()) < 0.5, (scores.mean(), logp_test.mean())
    # rescaling the data by 1000 shifts log-densities by exactly −d·log 1000
    scaled = VAEAnomalyDetector(random_state=0, trim_fraction=0.0).fit(X * 1000).score_samples(X_test * 1000)
    shift = scaled - scores
    assert np.mean(shift) == pytest.approx(-10 * math.log(1000), abs=0.05)
    assert np.max(np.abs(shift + 10 * math.log(1000))) < 0.5


def test_discrete_columns_are_masses_and_continuous_ones_densities(fast_params):
    # Rescaling a count column leaves its cell masses unchanged; rescaling a continuous
    # column shifts every log-density by −log(factor).
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.poisson(4, 400), rng.normal(size=400)]).astype(float)
    params = {**fast_params, "random_state": 0}
    base = VAEAnomalyDetector(**params).fit(X)
    assert list(base.standardizer_.discrete) == [True, False]
    s = base.score_samples(X)
    counts_scaled = VAEAnomalyDetector(**params).fit(X * [1000, 1]).score_samples(X * [1000, 1])
    cont_scaled = VAEAnomalyDetector(**params).fit(X * [1, 1000]).score_samples(X * [1, 1000])
    np.testing.assert_allclose(counts_scaled, s, atol=1e-3)
    np.testing.assert_allclose(cont_scaled, s - math.log(1000), atol=1e-3)
    # samples of a count column are counts
    draws = base.sample(50, random_state=0)
    np.testing.assert_array_equal(draws[:, 0], np.round(draws[:, 0]))
    none = VAEAnomalyDetector(**params, discrete_columns="none").fit(X)
    assert not none.standardizer_.discrete.any()


def test_impossible_values_score_as_very_improbable_not_as_a_normal_cell(fast_params, tmp_path):
    # A count column (0..20) and a continuous one: a negative count, a half count and a
    # value between ratings are impossible; each is scored as its nearest lattice point
    # (halves round up), 100 nats less likely, and ranks below every training row.
    rng = np.random.default_rng(0)
    counts = np.minimum(rng.poisson(3, 600), 20).astype(float)
    counts[0] = 20
    ratings = rng.choice([1.0, 3.0, 5.0], size=600)
    X = np.column_stack([counts, ratings, rng.normal(size=600)])
    det = VAEAnomalyDetector(**fast_params, random_state=0).fit(X)
    types = det.column_types_
    assert types["kind"].tolist() == ["lattice", "lattice", "continuous"]
    assert types.loc["x0", "lower"] == 0 and np.isnan(types.loc["x1", "lower"]) and types.loc["x1", "step"] == 2
    train = det.score_samples(X)
    rows = np.array([[-1, 3, 0], [20, 3, 0], [3.5, 3, 0], [4, 3, 0], [2.5, 3, 0], [3, 3, 0], [3, 6, 0], [3, 7, 0]])
    with pytest.warns(UserWarning, match=r"4 value\(s\) are impossible .*: 0 \(3\), 1 \(1\); first: row 0, column 0"):
        s = det.score_samples(rows)
    assert s[0] < s[1] and s[0] < train.min()  # a negative count is less likely than the largest count
    assert s[2] == pytest.approx(s[3] - 100, abs=1e-6) and s[4] == pytest.approx(s[5] - 100, abs=1e-6)
    assert s[6] == pytest.approx(s[7] - 100, abs=1e-6) and s[6] < s[7]  # 6 is off the ratings, 7 on them
    with pytest.warns(UserWarning):
        assert (det.predict(rows[[0, 2, 4, 6]]) == -1).all()
    with pytest.warns(UserWarning):
        shares = det.feature_scores(rows[:1])
    assert shares.iloc[0, 0] < -100 < shares.iloc[0, 2]  # the column at fault carries the cost
    draws = det.sample(200, random_state=0)  # samples are possible values: counts ≥ 0, ratings odd
    assert (draws[:, 0] >= 0).all() and (draws[:, 0] == np.round(draws[:, 0])).all()
    assert set(np.unique(draws[:, 1])) <= set(range(-99, 100, 2))
    det.save(tmp_path / "m.h5")
    again = load(tmp_path / "m.h5")
    pd.testing.assert_frame_equal(again.column_types_, types)
    with pytest.warns(UserWarning):
        np.testing.assert_allclose(again.score_samples(rows), s, atol=1e-9)


def test_a_binary_column_scores_its_two_values_samples_them_and_refuses_a_third(fast_params, tmp_path):
    # a 0/1 flag that follows a continuous column: its two cells carry all its mass, a 2 is
    # impossible (the upper cell, 100 nats less likely), samples are 0 or 1, and the bounds
    # survive the model file
    rng = np.random.default_rng(3)
    signal = rng.normal(size=800)
    X = np.column_stack([signal, (signal + 0.3 * rng.normal(size=800) > 0.5).astype(float)])
    det = VAEAnomalyDetector(**{**fast_params, "epochs": 20}, random_state=0).fit(X)
    assert det.column_types_.loc["x1", "upper"] == 1 and det.column_types_.loc["x1", "lower"] == 0
    rows = np.array([[1.5, 1.0], [1.5, 0.0], [1.5, 2.0]])
    with pytest.warns(UserWarning, match=r"1 value\(s\) are impossible .*outside its bounds: 1 \(1\)"):
        s = det.score_samples(rows)
    assert s[0] > s[1]  # the flag follows the signal
    assert s[2] == pytest.approx(s[0] - 100, abs=1e-6)
    assert set(np.unique(det.sample(300, random_state=0)[:, 1])) <= {0.0, 1.0}
    det.save(tmp_path / "m.h5")
    again = load(tmp_path / "m.h5")
    pd.testing.assert_frame_equal(again.column_types_, det.column_types_)
    np.testing.assert_allclose(again.score_samples(rows[:2]), s[:2], atol=1e-9)


def test_discrete_columns_can_be_named_and_column_types_say_why(fast_params):
    rng = np.random.default_rng(1)
    X = pd.DataFrame({"n": rng.integers(0, 6, 300), "price": np.round(rng.normal(100, 15, 300), 2)})
    auto = VAEAnomalyDetector(**fast_params, random_state=0).fit(X)
    assert auto.column_types_["kind"].tolist() == ["lattice", "continuous"]
    assert "1/1000 of the interquartile range" in auto.column_types_.loc["price", "reason"]
    named = VAEAnomalyDetector(**fast_params, random_state=0, discrete_columns=["price"]).fit(X)
    assert named.column_types_["kind"].tolist() == ["continuous", "lattice"]
    assert named.column_types_.loc["price", "step"] == pytest.approx(0.01)
    by_position = VAEAnomalyDetector(**fast_params, random_state=0, discrete_columns=[0]).fit(X.to_numpy())
    assert by_position.column_types_["kind"].tolist() == ["lattice", "continuous"]
    with pytest.raises(ValueError, match="discrete_columns names 'prices', which is not a column of X; the columns"):
        VAEAnomalyDetector(**fast_params, discrete_columns=["prices"]).fit(X)
    with pytest.raises(ValueError, match="column 'z' is named in discrete_columns but its values"):
        VAEAnomalyDetector(**fast_params, discrete_columns=["z"]).fit(X.assign(z=rng.normal(size=300)))


def test_offset_from_a_subsample_of_large_training_sets(blobs, fast_params, monkeypatch):
    from vaeguard import estimators

    monkeypatch.setattr(estimators, "OFFSET_ROWS", 100)
    det = VAEAnomalyDetector(**fast_params, random_state=0).fit(blobs)
    assert 0.03 <= (det.predict(blobs) == -1).mean() <= 0.2


def _count_scored_rows(monkeypatch) -> list[int]:
    """The number of rows of each internal scoring call from now on (a list that fills as the estimator scores)."""
    scored: list[int] = []
    internal = VAEAnomalyDetector._log_likelihood_internal

    def counting(self, x, *args, **kwargs):
        scored.append(len(x))
        return internal(self, x, *args, **kwargs)

    monkeypatch.setattr(VAEAnomalyDetector, "_log_likelihood_internal", counting)
    return scored


@pytest.mark.parametrize("contamination", [0.1, 0.02])
def test_offset_subsample_sized_by_the_contamination(fast_params, monkeypatch, contamination):
    # the threshold's percentile comes from offset_rows(c) random training rows: enough that the fraction of
    # the whole set it flags has a standard error of 7 % of c (binomial: sqrt(c (1 - c) / m)); checked on a
    # 12 000-row table, where the subsample is a part of the rows
    from vaeguard import estimators

    rows = estimators.offset_rows(contamination)
    se = math.sqrt(contamination * (1 - contamination) / rows)
    assert se == pytest.approx(estimators.OFFSET_RELATIVE_ERROR * contamination, rel=0.02) or rows in (
        estimators.MIN_OFFSET_ROWS,
        estimators.OFFSET_ROWS,
    )
    assert estimators.MIN_OFFSET_ROWS <= rows <= estimators.OFFSET_ROWS
    X = np.random.default_rng(0).normal(size=(12_000, 3))
    scored = _count_scored_rows(monkeypatch)
    det = VAEAnomalyDetector(**fast_params, random_state=0, contamination=contamination).fit(X)
    exact = estimators.EXACT_BASELINE_ROWS
    assert sum(scored) == rows + exact + exact * X.shape[1]  # the subsample, then the baseline's correction
    flagged = (det.score_samples(X) < det.offset_).mean()
    assert abs(flagged - contamination) < 4 * se  # 4 standard errors of the subsample's percentile


def test_fit_scores_each_training_row_once_and_none_when_the_offset_is_given(blobs, fast_params, monkeypatch):
    # the threshold's pass also gives the feature baseline's conditionals (rows scored with
    # others score alike), and a given offset leaves only the baseline's rows to score; the
    # baseline's correction scores its first rows by the first model, then without each column in one call
    from vaeguard import estimators

    monkeypatch.setattr(estimators, "FEATURE_BASELINE_ROWS", 50)
    monkeypatch.setattr(estimators, "EXACT_BASELINE_ROWS", 20)
    conditionals = 20 * blobs.shape[1]
    scored = _count_scored_rows(monkeypatch)
    det = VAEAnomalyDetector(**fast_params, random_state=0).fit(blobs)
    assert sum(scored) == len(blobs) + 20 + conditionals and 50 in scored and scored[-2:] == [20, conditionals]
    baseline = det.feature_baseline_
    scored.clear()
    given = VAEAnomalyDetector(**fast_params, random_state=0, offset=-5.0).fit(blobs)
    assert scored == [50, 20, conditionals] and given.offset_ == -5.0
    np.testing.assert_array_equal(given.feature_baseline_, baseline)  # the same rows, the same draws


def test_device_errors_are_clear(blobs, fast_params):
    import torch

    from vaeguard.estimators import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device torch knows"):
        VAEAnomalyDetector(**fast_params, device="gpu0").fit(blobs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            VAEAnomalyDetector(**fast_params, device="cuda").fit(blobs)


def test_verbose_shows_training_progress(blobs, fast_params, capsys):
    VAEAnomalyDetector(**fast_params, verbose=True, random_state=0).fit(blobs)
    err = capsys.readouterr().err  # stderr is not a terminal here: a line per tenth of the epochs
    epochs = fast_params["epochs"]
    lines = [line for line in err.splitlines() if line.startswith("training: epoch ")]
    assert lines and lines[-1].startswith(f"training: epoch {epochs}/{epochs} (training loss ")
    assert "validation loss" in lines[-1]


def test_divergence_is_an_error_and_leaves_the_estimator_unfitted(blobs):
    from sklearn.exceptions import NotFittedError

    from vaeguard.training import TrainingDivergedError

    det = VAEAnomalyDetector(learning_rate=1e6, epochs=5, random_state=0)
    with pytest.raises(TrainingDivergedError, match="try a smaller learning_rate"):
        det.fit(blobs)
    with pytest.raises(NotFittedError):
        det.score_samples(blobs)


def test_missing_values_are_scored_by_the_marginal_of_the_observed_entries():
    # PPCA with 20 % of entries missing in training and test: the held-out mean score is
    # close to the true marginal log-density of each row's observed entries.
    X, _ = ppca(4000, seed=1)
    X_test, _ = ppca(1000, seed=2)
    rng = np.random.default_rng(0)
    X[rng.random(X.shape) < 0.2] = np.nan
    hole = rng.random(X_test.shape) < 0.2
    hole[:, 0] = False
    X_test[hole] = np.nan
    rng = np.random.default_rng(100)
    W, mu = rng.normal(size=(10, 2)), rng.normal(size=10)
    cov = W @ W.T + 0.09 * np.eye(10)
    exact = []
    for x in X_test:
        o = ~np.isnan(x)
        c, diff = cov[np.ix_(o, o)], x[o] - mu[o]
        exact.append(
            -0.5 * (diff @ np.linalg.solve(c, diff) + np.linalg.slogdet(c)[1] + o.sum() * math.log(2 * math.pi))
        )
    det = VAEAnomalyDetector(random_state=0).fit(X)
    assert det.model_.mask_input
    scores = det.score_samples(X_test)
    assert np.all(np.isfinite(scores))
    assert abs(scores.mean() - np.mean(exact)) < 0.5, (scores.mean(), np.mean(exact))
    # units: rescaling column 3 shifts only the rows where it is observed
    scaled = VAEAnomalyDetector(random_state=0).fit(X * [1, 1, 1, 1000, 1, 1, 1, 1, 1, 1])
    shift = scaled.score_samples(X_test * [1, 1, 1, 1000, 1, 1, 1, 1, 1, 1]) - scores
    seen = ~np.isnan(X_test[:, 3])
    assert np.mean(shift[seen]) == pytest.approx(-math.log(1000), abs=0.05)
    assert np.mean(shift[~seen]) == pytest.approx(0.0, abs=0.05)


def test_missing_values_at_score_time_on_a_model_trained_on_complete_data(fitted, blobs):
    X = blobs[:20].copy()
    X[::2, 1] = np.nan
    scores = fitted.score_samples(X)
    assert np.all(np.isfinite(scores))
    # dropping an entry removes its (negative or positive) contribution; complete rows are unchanged
    np.testing.assert_allclose(scores[1::2], fitted.score_samples(blobs[:20])[1::2], atol=1e-9)
    assert fitted.transform(X).shape == (20, 2) and np.all(np.isfinite(fitted.elbo(X)))


def test_feature_scores_point_at_the_planted_column():
    # Normal rows from a correlated Gaussian; in each test row one column gets a 6σ shift.
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    X = rng.normal(size=(3000, 6)) @ A
    det = VAEAnomalyDetector(random_state=0).fit(pd.DataFrame(X, columns=list("abcdef")))
    X_test = rng.normal(size=(200, 6)) @ A
    planted = rng.integers(0, 6, size=200)
    X_test[np.arange(200), planted] += 6 * X.std(0)[planted]
    frame = pd.DataFrame(X_test, columns=list("abcdef"), index=np.arange(1000, 1200))
    scores = det.feature_scores(frame)
    assert list(scores.columns) == list("abcdef") and list(scores.index) == list(frame.index)
    worst = scores.to_numpy().argmin(axis=1)
    assert (worst == planted).mean() >= 0.9, (worst == planted).mean()
    # missing entries are NaN and the rest stays finite
    frame.iloc[0, 2] = np.nan
    with_gap = det.feature_scores(frame)
    assert np.isnan(with_gap.iloc[0, 2]) and np.isfinite(with_gap.drop(columns="c").to_numpy()).all()


def test_feature_scores_name_the_planted_column_whatever_the_columns_scales():
    # Issue 19: raw per-column log-likelihoods mostly reflect each column's units (a column in
    # thousandths has a density 1e6 times that of one in thousands), so they named the same
    # wide columns for most rows. Against each column's training median, the planted column
    # comes first. Six correlated columns scaled 1e-3 ... 1e3, two of them whole numbers
    # (lattice columns, scored by cell masses), one 6σ shift planted per test row.
    rng = np.random.default_rng(1)
    A = rng.normal(size=(6, 6))
    scales = np.array([1e-3, 1e-2, 1e-1, 1e1, 1e2, 1e3])

    def rows(n):
        X = (rng.normal(size=(n, 6)) @ A) * scales
        X[:, 3] = np.round(X[:, 3])  # whole numbers: a lattice column of step 1 (~10 σ-units wide)
        X[:, 4] = np.round(X[:, 4], -1)  # multiples of 10
        return X

    X = rows(3000)
    det = VAEAnomalyDetector(random_state=0).fit(pd.DataFrame(X, columns=list("abcdef")))
    assert (det.column_types_["kind"].to_numpy()[3:5] == "lattice").all()
    X_test = rows(300)
    planted = rng.integers(0, 6, size=300)
    X_test[np.arange(300), planted] += 6 * X.std(0)[planted]
    X_test[:, 3], X_test[:, 4] = np.round(X_test[:, 3]), np.round(X_test[:, 4], -1)
    worst = det.feature_scores(pd.DataFrame(X_test, columns=list("abcdef"))).to_numpy().argmin(axis=1)
    assert (worst == planted).mean() >= 0.9, (worst == planted).mean()
    # on normal rows no column is named for its units: each is the worst for about 1/6 of the rows
    counts = np.bincount(det.feature_scores(pd.DataFrame(rows(600), columns=list("abcdef"))).to_numpy().argmin(1))
    assert counts.max() < 0.4 * 600, counts


def test_feature_scores_name_tsh_for_the_thyroid_anomalies_it_makes():
    # Issue 19's target on the shipped thyroid table: for the anomalies whose TSH is more than
    # 5 σ off, TSH is the top feature for at least 90 % (the raw per-column log-likelihood named
    # it for 18 of 21 and named TSH for 79 % of all rows, normal ones included, for its scale).
    from vaeguard.datasets import load_dataset

    X, y = load_dataset("thyroid", return_X_y=True, as_frame=True)
    det = VAEAnomalyDetector(random_state=0).fit(X)
    top = det.feature_scores(X).idxmin(axis=1)
    far = (((X - X.mean()) / X.std())["TSH"].abs() > 5).to_numpy() & (y == 1).to_numpy()
    assert far.sum() >= 15
    assert (top[far] == "TSH").mean() >= 0.9, top[far].value_counts()
    assert top.value_counts(normalize=True).max() < 0.5  # no column is named for most rows


def test_feature_baseline_is_the_training_median_and_travels_with_the_model(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(1500, 4)) @ rng.normal(size=(4, 4)) * [1, 10, 100, 1000]
    det = VAEAnomalyDetector(random_state=0).fit(X)
    assert det.feature_baseline_.shape == (4,)
    # the training rows' scores sit around 0 in every column: the median of the reported values is ~0,
    # within the sampling error of a median over the 500 baseline rows (and of the 64 rows' correction
    # of the one-pass estimate's offset, which was 0.1-0.2 nats here), a few hundredths of a nat
    scores = det.feature_scores(X).to_numpy()
    medians = np.median(scores, axis=0)
    spread = np.subtract(*np.percentile(scores, [75, 25], axis=0)) / 1.349  # a robust sd per column
    assert (np.abs(medians) < 4 * 1.2533 * spread / np.sqrt(64)).all(), (medians, spread)
    det.save(tmp_path / "m.h5")
    again = load(tmp_path / "m.h5")
    np.testing.assert_array_equal(again.feature_baseline_, det.feature_baseline_)
    pd.testing.assert_frame_equal(again.feature_scores(X[:20]), det.feature_scores(X[:20]))


# -- a mixture of models (n_models) -------------------------------------------------------


def test_auto_n_models_is_three_for_small_narrow_tables_and_one_otherwise():
    from vaeguard.estimators import SMALL_TABLE_ROWS, WIDE_TABLE_COLUMNS, auto_n_models

    assert auto_n_models(50, images=False) == 3 and auto_n_models(SMALL_TABLE_ROWS, images=False) == 3
    assert auto_n_models(SMALL_TABLE_ROWS + 1, images=False) == 1
    assert auto_n_models(100, images=True) == 1
    assert auto_n_models(100, images=False, columns=WIDE_TABLE_COLUMNS - 1) == 3
    assert auto_n_models(100, images=False, columns=WIDE_TABLE_COLUMNS) == 1


def test_a_wide_table_gets_one_model_counting_the_columns_the_networks_read():
    # a column constant in training stays out of the networks: 512 columns with one constant are 511 modelled
    rng = np.random.default_rng(0)
    X = (rng.random((40, 513)) < 0.2).astype(float)
    X[:, 0] = 1.0
    narrow = VAEAnomalyDetector(epochs=1, random_state=0).fit(X[:, :512])
    wide = VAEAnomalyDetector(epochs=1, random_state=0).fit(X)
    assert len(narrow.models_) == 3 and len(wide.models_) == 1


def test_auto_training_settings_differ_for_tables_and_images(monkeypatch):
    """The "auto" training settings reach the training loop as a table's, an image's and the
    time-series window model's (a table): trim_fraction 0.3 / 0.1 (the window model's preset
    0.1), learning_rate 1e-3 / 3e-3, batch_size n/32 as a power of two within [32, 512] /
    within [128, 512]; numbers given are passed through unchanged."""
    from conftest import FAST

    import vaeguard.estimators as estimators
    from vaeguard.timeseries import VAETimeSeriesDetector

    seen: list[tuple[float, float, int]] = []
    real_train = estimators.train_models

    def spy(models, x, config, **kwargs):
        seen.append((config.trim_fraction, config.learning_rate, config.batch_size))
        return real_train(models, x, config, **kwargs)

    monkeypatch.setattr(estimators, "train_models", spy)
    rng = np.random.default_rng(0)
    VAEAnomalyDetector(**FAST, n_models=1, random_state=0).fit(rng.normal(size=(100, 3)))
    VAEAnomalyDetector(**FAST, random_state=0).fit(rng.integers(0, 2, size=(40, 8, 8)).astype(np.float32))
    VAEAnomalyDetector(**FAST, n_models=1, trim_fraction=0.05, learning_rate=0.02, batch_size=7, random_state=0).fit(
        rng.normal(size=(100, 3))
    )
    VAEAnomalyDetector(**FAST, batch_size=16, random_state=0).fit(rng.integers(0, 2, size=(40, 8, 8)).astype(float))
    VAETimeSeriesDetector(window=16, estimator=VAEAnomalyDetector(**FAST), random_state=0).fit(
        np.sin(np.arange(400) / 5)
    )
    assert seen == [
        (estimators.TABLE_TRIM_FRACTION, estimators.TABLE_LEARNING_RATE, 32),
        (estimators.IMAGE_TRIM_FRACTION, estimators.IMAGE_LEARNING_RATE, 128),
        (0.05, 0.02, 7),
        (estimators.IMAGE_TRIM_FRACTION, estimators.IMAGE_LEARNING_RATE, 16),
        (0.1, estimators.TABLE_LEARNING_RATE, 32),
    ]
    assert estimators.TABLE_TRIM_FRACTION == 0.3 and estimators.IMAGE_TRIM_FRACTION == 0.1
    assert (estimators.TABLE_LEARNING_RATE, estimators.IMAGE_LEARNING_RATE) == (1e-3, 3e-3)


def test_auto_batch_size_is_n_over_32_as_a_power_of_two_with_a_wider_floor_for_images():
    from vaeguard.estimators import auto_batch_size

    assert [auto_batch_size(n) for n in (10, 1000, 2000, 8192, 10**6)] == [32, 32, 64, 256, 512]
    assert [auto_batch_size(n, images=True) for n in (10, 1000, 8192, 10**6)] == [128, 128, 256, 512]


def _mixture(n_models=3, n=200, seed=0):
    from conftest import FAST

    X = np.random.default_rng(seed).normal(size=(n, 3))
    return VAEAnomalyDetector(**FAST, n_models=n_models, random_state=0).fit(X), X


def _alone(det, member):
    """A copy of ``det`` whose mixture is the one model ``member``."""
    single = copy.copy(det)
    single.model_, single.models_ = member, [member]
    single.probe_thresholds_ = [det.probe_thresholds_[det.models_.index(member)]]
    single.search_floors_ = [det.search_floors_[det.models_.index(member)]]
    return single


def test_a_mixture_scores_the_log_mean_of_its_members_probabilities():
    det, X = _mixture()
    assert len(det.models_) == 3 and det.models_[0] is det.model_
    members = np.stack([_alone(det, m).score_samples(X[:40]) for m in det.models_])
    assert np.ptp(members, axis=0).max() > 1e-3  # three different models (their own seeds)
    expected = np.log(np.mean(np.exp(members.astype(np.float64)), axis=0))
    np.testing.assert_allclose(det.score_samples(X[:40]), expected, rtol=0, atol=1e-9)
    # the mixture's ELBO is log-mean-exp of the members' ELBOs, a bound on each member's log p(x)
    bounds = np.stack([_alone(det, m).elbo(X[:40]) for m in det.models_])
    np.testing.assert_allclose(det.elbo(X[:40]), np.log(np.mean(np.exp(bounds), axis=0)), atol=1e-9)


def test_a_mixture_of_one_model_repeated_is_that_model_with_its_error_bar():
    det, X = _mixture()
    one = _alone(det, det.model_)
    repeated = copy.copy(det)
    repeated.models_ = [det.model_] * 4
    repeated.probe_thresholds_ = [det.probe_thresholds_[0]] * 4
    repeated.search_floors_ = [det.search_floors_[0]] * 4
    value, std = repeated.log_likelihood(X[:30], return_std=True)
    v1, s1 = one.log_likelihood(X[:30], return_std=True)
    np.testing.assert_allclose(value, v1, atol=1e-12)
    np.testing.assert_allclose(std, s1, atol=1e-12)  # the bound that holds for perfectly correlated errors


def test_a_mixture_error_bar_is_the_weighted_mean_of_the_members_errors():
    det, X = _mixture()
    value, std = det.log_likelihood(X[:30], return_std=True)
    parts = [_alone(det, m).log_likelihood(X[:30], return_std=True) for m in det.models_]
    weights = np.exp(np.stack([p[0] for p in parts]) - value) / len(parts)
    np.testing.assert_allclose(weights.sum(0), 1.0, atol=1e-9)
    np.testing.assert_allclose(std, (weights * np.stack([p[1] for p in parts])).sum(0), atol=1e-12)


def test_one_model_is_what_n_models_1_and_large_tables_give():
    det1, X = _mixture(n_models=1)
    assert len(det1.models_) == 1
    det3, _ = _mixture(n_models=3)
    # the first model of a mixture is the model a single fit trains (same seed, same draws), to
    # float32 rounding: the mixture's models are trained side by side by one vectorised step
    np.testing.assert_allclose(det3.transform(X[:10]), det1.transform(X[:10]), rtol=1e-4, atol=1e-5)


def test_a_mixture_survives_the_model_file(tmp_path):
    det, X = _mixture()
    det.save(tmp_path / "m.h5")
    loaded = load(tmp_path / "m.h5")
    assert len(loaded.models_) == 3
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))


def test_a_model_file_that_declares_more_models_than_it_may_is_refused(tmp_path):
    from vaeguard import storage

    det, _ = _mixture()
    config, arrays = det.model_file_contents()
    for declared in (0, 1000):
        config["fitted"]["n_models_"] = declared
        storage.write_model_file(tmp_path / "crafted.h5", config, arrays)
        with pytest.raises(ValueError, match=r"fitted\.n_models_: must be in \[1, 64\]"):
            load(tmp_path / "crafted.h5")
    config["fitted"]["n_models_"] = 4  # one more than the file holds weights for
    storage.write_model_file(tmp_path / "crafted.h5", config, arrays)
    with pytest.raises(ValueError, match="weights do not fit"):
        load(tmp_path / "crafted.h5")


def test_each_model_keeps_its_probe_threshold_in_the_model_file(tmp_path):
    from vaeguard import storage
    from vaeguard.scoring import PROBE_GAIN

    det, _ = _mixture()
    assert len(det.probe_thresholds_) == 3 and min(det.probe_thresholds_) >= PROBE_GAIN
    det.save(tmp_path / "m.h5")
    assert load(tmp_path / "m.h5").probe_thresholds_ == det.probe_thresholds_
    config, arrays = det.model_file_contents()
    config["fitted"].pop("probe_thresholds_")  # a file from before the thresholds: one nat each
    storage.write_model_file(tmp_path / "old.h5", config, arrays)
    assert load(tmp_path / "old.h5")._probe_threshold_of(2) == PROBE_GAIN
    for crafted in ([float("nan")] * 3, [1.0], [-1.0] * 3, "1.0", [True] * 3):
        config["fitted"]["probe_thresholds_"] = crafted
        storage.write_model_file(tmp_path / "crafted.h5", config, arrays)
        with pytest.raises(ValueError, match="probe_thresholds_"):
            load(tmp_path / "crafted.h5")


def test_each_model_keeps_its_search_floor_in_the_model_file(tmp_path):
    # A 2-D latent space: each model's floor is a low quantile of its training rows'
    # ELBO at the encoder's q, and the file keeps it; a file without floors scores without
    # the search; crafted values are refused.
    from vaeguard import storage
    from vaeguard.scoring import SEARCH_QUANTILE, probe_rows

    det, X = _mixture()
    assert len(det.search_floors_) == 3 and all(np.isfinite(det.search_floors_))
    inputs = det.to_model_space(X)
    for i, member in enumerate(det._mixture_members()):
        at_encoder = probe_rows(det._scoring_model(member), inputs.x, det._refine_eps()).at_encoder.numpy()
        assert det.search_floors_[i] == pytest.approx(np.quantile(at_encoder, SEARCH_QUANTILE), rel=1e-9)
    det.save(tmp_path / "m.h5")
    assert load(tmp_path / "m.h5").search_floors_ == det.search_floors_
    config, arrays = det.model_file_contents()
    config["fitted"].pop("search_floors_")
    storage.write_model_file(tmp_path / "old.h5", config, arrays)
    assert load(tmp_path / "old.h5")._search_floor_of(1) is None
    for crafted in ([float("inf")] * 3, [1.0], "1.0", [True] * 3):
        config["fitted"]["search_floors_"] = crafted
        storage.write_model_file(tmp_path / "crafted.h5", config, arrays)
        with pytest.raises(ValueError, match="search_floors_"):
            load(tmp_path / "crafted.h5")


def test_a_fit_probes_each_training_row_once_per_model_and_its_threshold_is_that_of_a_fresh_pass(monkeypatch):
    # the calibration's probe of every training row sets each model's probe threshold and is handed to the pass
    # that scores those rows for the threshold: probing them again there would cost a third of that pass and
    # give the same numbers (a row's probe depends on it alone)
    from conftest import FAST

    import vaeguard.scoring as scoring

    probed = []
    real = scoring._probe

    def counting(model, x, mask, *args):
        if mask is None:  # whole rows (the feature baseline's exact conditionals probe rows less one column)
            probed.append(x.shape[0])
        return real(model, x, mask, *args)

    monkeypatch.setattr(scoring, "_probe", counting)
    X = np.random.default_rng(0).normal(size=(300, 4))
    det = VAEAnomalyDetector(**FAST, n_models=3, random_state=0).fit(X)
    assert sum(probed) == 3 * len(X)
    fresh = det.score_samples(X)  # a pass that probes the rows itself
    assert sum(probed) == 6 * len(X)
    assert det.offset_ == pytest.approx(np.percentile(fresh, 100 * det.contamination), rel=0, abs=1e-9)


@pytest.mark.parametrize("magnitude", [1e-300, 1e-13, 1e200])
def test_a_column_at_any_magnitude_is_modelled_and_scores_change_by_the_jacobian(magnitude):
    # Rescaling one column by m multiplies its density by 1/m: every score moves by exactly
    # −log m nats (change of variables), and a 50σ departure in that column stays flagged.
    # Columns of scale 1e-13 used to count as constant and 1e200 overflowed to NaN scores.
    X = np.random.default_rng(0).normal(size=(300, 3))
    scaled = X.copy()
    scaled[:, 1] *= magnitude
    params = {"random_state": 0, "epochs": 10, "n_models": 1}
    reference = VAEAnomalyDetector(**params).fit(X)
    det = VAEAnomalyDetector(**params).fit(scaled)
    shift = det.score_samples(scaled[:20]) - reference.score_samples(X[:20])
    np.testing.assert_allclose(shift, -math.log(magnitude), atol=1e-6)
    assert np.isfinite(det.offset_)
    outlier = scaled[:1].copy()
    outlier[0, 1] = 50 * magnitude
    assert det.predict(outlier)[0] == -1


def test_a_fit_whose_training_scores_are_not_finite_stops_with_a_clear_error(monkeypatch):
    # Whatever the cause, a model whose threshold would be NaN (flagging nothing) is refused,
    # naming the row (training row 3, whichever pass scores it)
    real = VAEAnomalyDetector._log_likelihood_internal
    X = np.random.default_rng(0).normal(size=(100, 3))

    def broken(self, x, *args, **kwargs):
        result = real(self, x, *args, **kwargs)
        row_3 = self.input_space_.to_model(X[3:4]).x.to(x.dtype)
        result.value[(x == row_3).all(dim=1).numpy()] = -np.inf
        return result

    monkeypatch.setattr(VAEAnomalyDetector, "_log_likelihood_internal", broken)
    det = VAEAnomalyDetector(random_state=0, epochs=2, n_models=1)
    with pytest.raises(ValueError, match=r"1 training row\(s\) have a non-finite log-likelihood \(first: row 3 "):
        det.fit(X)
    assert not hasattr(det, "offset_")


def test_feature_scores_come_with_the_log_likelihood_from_one_pass():
    X = np.random.default_rng(0).normal(size=(200, 3))
    det = VAEAnomalyDetector(epochs=3, hidden_dims=[16], latent_dim=2, n_importance_samples=8, random_state=0).fit(X)
    log_px, shares = det.log_likelihood(X[:30], return_feature_scores=True)
    np.testing.assert_array_equal(log_px, det.score_samples(X[:30]))
    np.testing.assert_allclose(shares.to_numpy(), det.feature_scores(X[:30]).to_numpy(), rtol=1e-12, atol=1e-12)


def test_scoring_copies_the_networks_once_and_again_only_when_they_change(monkeypatch):
    import pickle

    X = np.random.default_rng(0).normal(size=(200, 3))
    det = VAEAnomalyDetector(epochs=3, hidden_dims=[16], latent_dim=2, n_importance_samples=8, random_state=0).fit(X)
    first = det.score_samples(X[:20])
    copies = []
    real_deepcopy = copy.deepcopy

    def counted(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            copies.append(obj)
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", counted)
    for _ in range(3):
        np.testing.assert_array_equal(det.score_samples(X[:20]), first)
    assert copies == []  # the copies made at fit serve every later call
    with torch.no_grad():
        for p in det.model_.parameters():
            p.mul_(1.5)  # changed in place: the copy must follow
    changed = det.score_samples(X[:20])
    assert len(copies) == 1 and not np.allclose(changed, first)
    monkeypatch.undo()
    again = pickle.loads(pickle.dumps(det))
    assert "_scoring_copies" not in vars(again)
    np.testing.assert_array_equal(again.score_samples(X[:20]), changed)


def test_model_space_round_trips_a_mixed_table():
    """to_model_space / from_model_space: the public way (for codecs, benchmarks, plugins) between the
    data and the networks' units; categories, lattices and names come back as they went in."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "size": rng.normal(5, 2, 200),
            "count": rng.integers(0, 6, 200),
            "colour": rng.choice(["red", "blue"], 200),
        }
    )
    det = VAEAnomalyDetector(epochs=2, hidden_dims=[8], latent_dim=2, n_models=1, random_state=0).fit(frame)
    inputs = det.to_model_space(frame.iloc[:20])
    assert inputs.mask is None and inputs.impossible is None and inputs.condition is None
    back = det.from_model_space(inputs.x.numpy())
    assert (
        list(back.columns) == ["size", "count", "colour"] and back["colour"].tolist() == frame["colour"][:20].tolist()
    )
    np.testing.assert_allclose(back[["size", "count"]].to_numpy(float), frame[["size", "count"]][:20].to_numpy(float))
    odd = frame.iloc[:3].astype({"count": float})
    odd.loc[odd.index[1], "count"] = 2.5  # off the count's lattice
    assert det.to_model_space(odd).impossible[1].tolist() == [False, True, False]
