"""VAETimeSeriesDetector: per-step scores aligned with the input, windows, missing values."""

import numpy as np
import pandas as pd
import pytest

from vaeguard import VAEAnomalyDetector
from vaeguard.timeseries import VAETimeSeriesDetector, auto_window, dominant_period

FAST = {"epochs": 30, "hidden_dims": [32], "n_importance_samples": 8}


def sine(n: int, period: int = 40, seed: int = 0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    return np.sin(2 * np.pi * t / period + np.arange(channels)) + 0.05 * rng.normal(size=(n, channels))


@pytest.fixture(scope="module")
def fitted():
    return VAETimeSeriesDetector(window=40, stride=2, estimator=VAEAnomalyDetector(**FAST), random_state=0).fit(
        sine(1500)[:, 0]
    )


def test_every_step_gets_a_score_and_a_planted_anomaly_is_found(fitted):
    x = sine(1000, seed=1)[:, 0]
    x[600:610] = 2.5  # a flat burst off the wave
    scores = fitted.score_samples(x)
    assert scores.shape == (1000,) and np.all(np.isfinite(scores))
    assert 600 - 40 <= int(np.argmin(scores)) <= 610 + 40
    assert fitted.predict(x).shape == (1000,) and set(np.unique(fitted.predict(x))) <= {-1, 1}
    assert (fitted.predict(x)[600:610] == -1).all()


def test_pandas_input_keeps_the_index():
    index = pd.date_range("2026-01-01", periods=600, freq="min")
    frame = pd.DataFrame(sine(600, channels=2), index=index, columns=["a", "b"])
    det = VAETimeSeriesDetector(window=40, stride=4, estimator=VAEAnomalyDetector(**FAST), random_state=0).fit(frame)
    scores = det.score_samples(frame)
    assert isinstance(scores, pd.Series) and scores.index.equals(index)
    assert det.predict(frame).index.equals(index)
    assert det.window_model_.n_features_in_ == 80  # window × channels


def test_missing_values_are_scored_and_long_gaps_refused(fitted):
    x = sine(500, seed=2)[:, 0]
    x[100:105] = np.nan
    assert np.all(np.isfinite(fitted.score_samples(x)))
    x[200:300] = np.nan  # longer than the window: some steps have no observed window
    with pytest.raises(ValueError, match="step 2.. lies only in windows with no observed values"):
        fitted.score_samples(x)


def test_automatic_window_is_the_period():
    assert dominant_period(sine(2000, period=50)) == pytest.approx(50, abs=1)
    assert auto_window(sine(2000, period=5)) == 64  # clipped to the minimum: a window needs some context
    assert auto_window(np.random.default_rng(0).normal(size=(500, 1))) in range(64, 513)
    det = VAETimeSeriesDetector(estimator=VAEAnomalyDetector(**{**FAST, "epochs": 2}), random_state=0).fit(
        sine(1000, period=90)
    )
    assert det.window_ == pytest.approx(90, abs=1)


def test_bad_series(fitted):
    with pytest.raises(ValueError, match="fewer than window=40"):
        fitted.score_samples(sine(30)[:, 0])
    with pytest.raises(ValueError, match="2 channels; the model was fitted on 1"):
        fitted.score_samples(sine(100, channels=2))
    x = sine(100)[:, 0]
    x[7] = np.inf
    with pytest.raises(ValueError, match="inf at step 7"):
        fitted.score_samples(x)
    with pytest.raises(ValueError, match="shape \\(T,\\) or \\(T, C\\)"):
        fitted.score_samples(np.zeros((10, 2, 2)))
    with pytest.raises(ValueError, match="not numeric"):
        VAETimeSeriesDetector().fit(pd.DataFrame({"a": ["x"] * 100}))


def test_contamination_of_training_steps_is_honoured_despite_ties(fitted):
    flagged = (fitted.predict(sine(1500)[:, 0]) == -1).mean()
    assert 0.01 <= flagged <= 0.1


def test_the_detector_round_trips_through_a_model_file(fitted, tmp_path):
    from vaeguard import load

    path = tmp_path / "series.h5"
    digest = fitted.save(path)
    again = load(path, device="cpu")
    assert isinstance(again, VAETimeSeriesDetector) and again.fingerprint_ == digest
    assert (again.window_, again.n_channels_, again.offset_) == (fitted.window_, fitted.n_channels_, fitted.offset_)
    series = sine(300, seed=5)[:, 0]
    assert np.array_equal(again.score_samples(series), fitted.score_samples(series))

    def values(det):  # the nested estimator compares by its parameters (estimator__*), not by identity
        return {k: v for k, v in det.get_params().items() if k != "estimator"}

    assert values(again) == values(fitted)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError):
        load(path)


def test_latent_options_reach_the_window_model():
    params = {**FAST, "epochs": 5, "regularizer": "tc", "regularizer_params": {"beta": 6}, "free_bits": 0.1}
    det = VAETimeSeriesDetector(window=40, stride=4, estimator=VAEAnomalyDetector(**params), random_state=0).fit(
        sine(800)[:, 0]
    )
    inner = det.window_model_
    assert inner.regularizer == "tc" and inner.free_bits == 0.1
    assert inner.active_units_ == int((inner.latent_variance_ > 0.01).sum())
    assert np.isfinite(det.score_samples(sine(300, seed=1)[:, 0])).all()
    with pytest.raises(ValueError, match="the time-series detector takes no conditions"):
        VAETimeSeriesDetector(estimator=VAEAnomalyDetector(**{**FAST, "conditional": True})).fit(sine(300)[:, 0])


def test_the_threshold_flags_a_tied_group_and_never_a_constant_series():
    from vaeguard.timeseries import tie_aware_offset

    steps = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 3.0])
    offset = tie_aware_offset(steps, 0.3)  # the 30 % quantile is 1, tied three times
    assert offset == 1.5 and (steps < offset).sum() == 3
    assert tie_aware_offset(np.full(5, 7.0), 0.01) < 7.0
    noisy = 7.0 + 1e-14 * np.random.default_rng(0).normal(size=100)  # ties up to rounding
    assert (noisy < tie_aware_offset(noisy, 0.01)).sum() == 0


def test_a_constant_series_flags_nothing_and_a_departure_from_it_is_flagged():
    # Every window alike: no step is below the others (was: all 300 of 300 flagged).
    flat = np.full(300, 3.0)
    det = VAETimeSeriesDetector(random_state=0, estimator=VAEAnomalyDetector(**{"epochs": 5})).fit(flat)
    assert (det.predict(flat) == 1).all()
    spiked = flat.copy()
    spiked[150] = 4.0
    labels = det.predict(spiked)
    assert labels[150] == -1 and labels[: 150 - det.window_ + 1].tolist() == [1] * (150 - det.window_ + 1)


def test_the_window_model_is_a_nested_estimator_that_scikit_learn_tunes():
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    det = VAETimeSeriesDetector(window=40, stride=4, estimator=VAEAnomalyDetector(**FAST), random_state=0)
    assert det.get_params()["estimator__latent_dim"] == "auto"
    assert clone(det).set_params(estimator__latent_dim=3).get_params()["estimator__latent_dim"] == 3

    def mean_score(estimator, X, y=None):
        return float(np.mean(estimator.score_samples(X)))

    search = GridSearchCV(det, {"estimator__latent_dim": [2, 3]}, scoring=mean_score, cv=2).fit(sine(800)[:, 0])
    assert search.best_estimator_.window_model_.latent_dim_ == search.best_params_["estimator__latent_dim"]
    # the window defaults apply where the estimator says "auto", and its own choices are kept
    fitted = search.best_estimator_.window_model_
    assert fitted.n_models == 1 and fitted.trim_fraction == 0.1 and fitted.random_state == 0


def test_the_window_model_survives_the_model_file(tmp_path):
    from vaeguard import load

    det = VAETimeSeriesDetector(window=40, stride=4, estimator=VAEAnomalyDetector(**FAST, latent_dim=3), random_state=0)
    det.fit(sine(800)[:, 0])
    det.save(tmp_path / "ts.h5")
    back = load(tmp_path / "ts.h5")
    assert back.get_params()["estimator__latent_dim"] == 3
    np.testing.assert_array_equal(back.score_samples(sine(300)[:, 0]), det.score_samples(sine(300)[:, 0]))


def test_estimator_params_is_a_deprecated_alias():
    with pytest.warns(FutureWarning, match="estimator_params is deprecated"):
        det = VAETimeSeriesDetector(window=40, stride=4, estimator_params={**FAST, "latent_dim": 3}, random_state=0)
        det.fit(sine(600)[:, 0])
    assert det.window_model_.latent_dim_ == 3


def test_a_plugin_encoder_works_in_the_time_series_detector():
    """Any registered encoder family is accepted by name (was: only mlp and temporal)."""
    from vaeguard import hookimpl
    from vaeguard.components.encoders import mlp
    from vaeguard.plugins import get_plugin_manager

    calls = []

    class WindowPlugin:
        @staticmethod
        @hookimpl
        def vaeguard_register_encoders(register):
            def family(input_shape, latent_dim, n_params, **options):
                calls.append(input_shape)
                return mlp(input_shape, latent_dim, n_params, hidden_dims=[16])

            register("window-test-mlp", family)

    pm = get_plugin_manager()
    pm.register(WindowPlugin, name="window-test-plugin")
    try:
        det = VAETimeSeriesDetector(
            window=40, stride=4, encoder="window-test-mlp", estimator=VAEAnomalyDetector(**FAST)
        )
        det.fit(sine(600)[:, 0])
        assert calls and det.window_model_.model_spec_["encoder"] == "window-test-mlp"
    finally:
        pm.unregister(name="window-test-plugin")
