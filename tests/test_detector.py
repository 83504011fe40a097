"""The threshold rule both detectors share, and refits that fail without breaking the fitted model."""

import numpy as np
import pandas as pd
import pytest
from conftest import FAST
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from vaeguard import VAEAnomalyDetector
from vaeguard.detector import decision, is_outlier, labels


def test_a_row_is_an_outlier_strictly_below_the_threshold():
    log_px = np.array([-10.0, -5.0, -4.999, 3.0])
    d = decision(log_px, -5.0)
    np.testing.assert_allclose(d, [-5.0, 0.0, 0.001, 8.0])
    assert is_outlier(d).tolist() == [True, False, False, False]  # at the threshold: an inlier
    assert labels(d).tolist() == [-1, 1, 1, 1]
    indexed = decision(pd.Series(log_px, index=list("abcd")), -5.0)
    assert list(indexed.index) == list("abcd")


def test_predict_follows_the_rule_in_both_detectors():
    from vaeguard.timeseries import VAETimeSeriesDetector

    X = np.random.default_rng(0).normal(size=(200, 3))
    det = VAEAnomalyDetector(**FAST, random_state=0).fit(X)
    np.testing.assert_array_equal(det.predict(X), labels(det.score_samples(X) - det.offset_))
    series = np.sin(np.arange(400) / 5) + 0.05 * np.random.default_rng(1).normal(size=400)
    ts = VAETimeSeriesDetector(window=16, estimator=VAEAnomalyDetector(**FAST), random_state=0).fit(series)
    np.testing.assert_array_equal(ts.predict(series), labels(ts.score_samples(series) - ts.offset_))


def test_a_failed_refit_leaves_the_fitted_model_intact(monkeypatch):
    """Every kind of failure after the input checks began: the old model keeps working as before."""
    import vaeguard.estimators as estimators

    X = np.random.default_rng(0).normal(size=(200, 3))
    det = VAEAnomalyDetector(**FAST, random_state=0).fit(X)
    before = (det.score_samples(X), det.offset_, det.n_features_in_, det.models_)

    def broken(*args, **kwargs):
        raise RuntimeError("the machine ran out of memory")

    monkeypatch.setattr(estimators, "train_models", broken)
    wider = pd.DataFrame(np.random.default_rng(1).normal(size=(50, 5)), columns=list("abcde"))
    with pytest.raises(RuntimeError, match="out of memory"):
        det.fit(wider)
    assert det.n_features_in_ == 3 and not hasattr(det, "feature_names_in_")
    assert det.models_ is before[3] and det.offset_ == before[1]
    np.testing.assert_array_equal(det.score_samples(X), before[0])
    assert det.predict(X).shape == (200,)
    monkeypatch.undo()
    with pytest.raises(ValueError):  # refused by the input checks, after they had started
        det.fit(np.array([[1.0, np.inf, 2.0]] * 10))
    np.testing.assert_array_equal(det.score_samples(X), before[0])


def test_a_failed_first_fit_leaves_the_estimator_unfitted():
    det = VAEAnomalyDetector(**FAST)
    with pytest.raises(ValueError):
        det.fit(np.array([[1.0, np.inf, 2.0]] * 10))
    with pytest.raises(NotFittedError):
        check_is_fitted(det)
    assert not [k for k in vars(det) if k.endswith("_") and not k.startswith("__")]


def test_a_failed_time_series_refit_leaves_the_detector_intact():
    from vaeguard.timeseries import VAETimeSeriesDetector

    series = np.sin(np.arange(400) / 5) + 0.05 * np.random.default_rng(1).normal(size=400)
    ts = VAETimeSeriesDetector(window=16, estimator=VAEAnomalyDetector(**FAST), random_state=0).fit(series)
    before = ts.score_samples(series)
    with pytest.raises(ValueError, match="fewer than window"):
        ts.fit(np.stack([series[:10], series[:10]], axis=1))  # two channels, too short: fails after n_channels_
    assert ts.n_channels_ == 1
    np.testing.assert_array_equal(ts.score_samples(series), before)


# -- torch threads (n_jobs) ---------------------------------------------------------------


def test_n_jobs_means_what_it_means_in_scikit_learn(monkeypatch):
    from vaeguard import detector

    monkeypatch.setattr(detector, "available_cpus", lambda: 8)
    assert detector.threads_for(None) == detector.DEFAULT_THREADS == 1
    assert [detector.threads_for(n) for n in (1, 3, -1, -2, -8, -20)] == [1, 3, 8, 7, 1, 1]
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n_jobs must be a non-zero integer or None"):
            detector.threads_for(bad)


@pytest.fixture
def threads_seen(monkeypatch):
    """The torch thread count at each scoring pass of a VAEAnomalyDetector (a list filled as they run)."""
    import torch

    seen = []
    original = VAEAnomalyDetector._log_likelihood_internal

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VAEAnomalyDetector, "_log_likelihood_internal", spy)
    return seen


def test_a_detector_works_on_its_threads_and_gives_the_callers_back(threads_seen):
    import torch

    seen = threads_seen
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        X = np.random.default_rng(0).normal(size=(300, 3))
        det = VAEAnomalyDetector(**FAST, n_jobs=2).fit(X)
        det.score_samples(X[:10])
        assert seen and set(seen) == {2} and torch.get_num_threads() == 3
        seen.clear()
        det.set_params(n_jobs=None).predict(X[:10])
        assert set(seen) == {1} and torch.get_num_threads() == 3
        with pytest.raises(ValueError, match="n_jobs must be"):
            det.set_params(n_jobs=0).score_samples(X[:10])
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_the_outer_detector_decides_the_threads_of_its_window_model(threads_seen):
    from vaeguard import VAETimeSeriesDetector

    seen = threads_seen
    series = np.sin(np.arange(600) / 5.0) + 0.05 * np.random.default_rng(0).normal(size=600)
    ts = VAETimeSeriesDetector(window=16, estimator=VAEAnomalyDetector(**FAST), n_jobs=2).fit(series)
    assert ts.window_model_.n_jobs == 2 and set(seen) == {2}
    seen.clear()
    ts.window_model_.set_params(n_jobs=1)
    ts.score_samples(series)
    assert set(seen) == {2}
