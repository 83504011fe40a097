"""Time series: sliding windows in, per-time-step scores out."""

from __future__ import annotations

import os
import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context, clone
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from vaeguard import storage
from vaeguard.detector import decision, labels, on_own_threads, previous_fit_kept_on_failure
from vaeguard.estimators import VAEAnomalyDetector, storable_params
from vaeguard.presets import PresetMixin

#: Bounds on the automatic window length (steps).
MIN_WINDOW, MAX_WINDOW = 64, 512


def tie_aware_offset(steps: np.ndarray, contamination: float) -> float:
    """Threshold (nats per value) below which about ``contamination`` of the training steps lie.

    Steps share the score of their worst window, so many tie at the ``contamination``
    quantile q: the threshold sits half-way between q and the next larger score, so the
    group tied at q is flagged by ``score < offset_``. When no score is larger (a constant
    series: every step alike) it sits just below q and no training step is flagged. Scores
    within 1e-9 (relative) of each other count as tied: rounding in the last bits must not
    split a group of identical windows.
    """
    q = float(np.percentile(steps, 100.0 * contamination))
    tolerance = 1e-9 * max(1.0, abs(q))
    above = steps[steps > q + tolerance]
    return 0.5 * (q + float(above.min())) if above.size else q - tolerance


def dominant_period(values: np.ndarray, max_lag: int = 4 * MAX_WINDOW) -> int | None:
    """Lag of the highest autocorrelation peak after the first zero crossing (mean over channels), or None."""
    x = values - np.nanmean(values, axis=0)
    x = np.nan_to_num(x)
    n = x.shape[0]
    if n < 2 * MIN_WINDOW:
        return None
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spectrum = np.fft.rfft(x, size, axis=0)
    acf = np.fft.irfft(spectrum * np.conj(spectrum), size, axis=0)[:n].mean(axis=1)
    if acf[0] <= 0:
        return None
    acf = acf / acf[0]
    below = np.flatnonzero(acf < 0)
    if below.size == 0:
        return None
    start, stop = int(below[0]), min(n // 2, max_lag)
    if stop <= start + 1:
        return None
    lag = start + int(np.argmax(acf[start:stop]))
    return lag if acf[lag] > 0.2 else None


def auto_window(values: np.ndarray) -> int:
    """The dominant period of the series within [64, 512] steps, or 64 when it has none."""
    period = dominant_period(values)
    return 64 if period is None else int(min(MAX_WINDOW, max(MIN_WINDOW, period)))


def _as_series_array(series: Any) -> tuple[np.ndarray, Any]:
    """``(values (T, C) float64, index or None)`` from a 1-D/2-D array, Series or DataFrame."""
    index = series.index if isinstance(series, (pd.Series, pd.DataFrame)) else None
    if isinstance(series, pd.DataFrame):
        bad = [
            str(c) for c, t in zip(series.columns, series.dtypes, strict=True) if not pd.api.types.is_numeric_dtype(t)
        ]
        if bad:
            raise ValueError(f"column(s) {', '.join(map(repr, bad))} of the series are not numeric")
    try:
        values = np.asarray(series, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the series must be numeric: {exc}") from exc
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"a series has shape (T,) or (T, C); got an array of shape {values.shape}")
    if np.isinf(values).any():
        step, channel = (int(i) for i in np.argwhere(np.isinf(values))[0])
        raise ValueError(f"the series holds inf at step {step}, channel {channel} (NaN marks a missing value)")
    return values, index


class VAETimeSeriesDetector(PresetMixin, OutlierMixin, BaseEstimator):
    """Anomaly detection in uni- and multivariate series with a VAE on sliding windows.

    Each window of ``window`` steps (all channels) is one sample of a
    :class:`VAEAnomalyDetector`; its importance-sampled log-likelihood, divided by the
    number of values in the window, is spread back onto the steps it covers: a step's
    score is the lowest per-value log-likelihood (nats) among the windows that contain
    it, so every step, the edges included, gets a score. Missing values (NaN) are
    scored by the marginal likelihood of the observed values.

    Parameters
    ----------
    window : int or "auto", default="auto"
        Window length in steps; "auto" is the series' dominant period (the highest
        autocorrelation peak after its first zero crossing) within [64, 512] steps,
        or 64 when the series has no clear period.
    stride : int, default=1
        Step between training windows (scoring always uses every window).
    encoder : str, default="mlp"
        The window model's network: "mlp" (an MLP on the flattened window), "temporal"
        (1-D convolutions over time; told the number of channels) or any encoder a plugin
        registers. An ``estimator`` that names its own encoder keeps it.
    contamination : float in (0, 0.5], default=0.01
        Fraction of training steps flagged by :meth:`predict`: ``offset_`` is that
        quantile of the training steps' scores.
    estimator : VAEAnomalyDetector, optional
        The window model's settings, as an unfitted detector (cloned at fit), e.g.
        ``VAEAnomalyDetector(epochs=50, latent_dim=4)``; scikit-learn tunes them as
        ``estimator__latent_dim``. Its ``"auto"`` values of ``n_models`` and
        ``trim_fraction`` become 1 and 0.1 for windows (the table defaults were decided on
        tables), and this detector's ``random_state``, ``device`` and ``verbose`` replace its
        own. Default: ``VAEAnomalyDetector()``.
    estimator_params : dict, optional
        Deprecated alias: arguments set on the window model after ``estimator``'s.
    random_state : int or None, default=None
    device : str, default="auto"
    verbose : bool, default=False
    n_jobs : int or None, default=None
        Torch threads for the detector's work, as for :class:`VAEAnomalyDetector` (and
        given to the window model).

    Attributes
    ----------
    window_ : int
        The window length used.
    window_model_ : VAEAnomalyDetector
        The model of the windows (features: ``window × n_channels`` values).
    offset_ : float
        Threshold on the per-step scores (nats per value).
    n_channels_ : int
    fingerprint_ : str or None
        SHA-256 of the model file this detector was saved to or loaded from.
    """

    _parameter_constraints: dict = {  # noqa: RUF012 (scikit-learn convention)
        "window": [StrOptions({"auto"}), Interval(Integral, 2, None, closed="left")],
        "stride": [Interval(Integral, 1, None, closed="left")],
        "encoder": [str],
        "estimator": [HasMethods(["fit", "score_samples", "get_params"]), None],
        "contamination": [Interval(Real, 0, 0.5, closed="right")],
        "estimator_params": [dict, None],
        "random_state": ["random_state"],
        "device": [StrOptions({"auto", "cpu", "cuda"}), str],
        "verbose": ["verbose"],
        "n_jobs": [Integral, None],
    }

    def __init__(
        self,
        *,
        window: int | str = "auto",
        stride: int = 1,
        encoder: str = "mlp",
        contamination: float = 0.01,
        estimator: VAEAnomalyDetector | None = None,
        estimator_params: dict | None = None,
        random_state: int | None = None,
        device: str = "auto",
        verbose: bool = False,
        n_jobs: int | None = None,
    ) -> None:
        self.window = window
        self.stride = stride
        self.encoder = encoder
        self.contamination = contamination
        self.estimator = estimator
        self.estimator_params = estimator_params
        self.random_state = random_state
        self.device = device
        self.verbose = verbose
        self.n_jobs = n_jobs

    def _windows(self, values: np.ndarray, stride: int, window: int) -> np.ndarray:
        if values.shape[0] < window:
            raise ValueError(f"the series has {values.shape[0]} steps, fewer than window={window}")
        views = sliding_window_view(values, window, axis=0)[::stride]  # (n, C, window)
        return np.ascontiguousarray(views.transpose(0, 2, 1).reshape(views.shape[0], -1))

    @on_own_threads
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, series: Any, y: Any = None) -> VAETimeSeriesDetector:
        """Train on a series of shape (T,) or (T, C) (or a Series/DataFrame with a time index).

        A fit that fails leaves the detector as it was (a fitted one stays usable).
        """
        with previous_fit_kept_on_failure(self):
            return self._fit(series)

    def _fit(self, series: Any) -> VAETimeSeriesDetector:
        values, _ = _as_series_array(series)
        self.n_channels_ = values.shape[1]
        self.window_ = auto_window(values) if self.window == "auto" else int(self.window)
        windows = self._windows(values, self.stride, self.window_)
        keep = ~np.isnan(windows).all(axis=1)
        self.window_model_ = self._window_model().fit(windows[keep])
        steps = self._step_scores(values)
        self.fingerprint_ = None
        self.offset_ = tie_aware_offset(steps, self.contamination)
        return self

    def _window_model(self) -> VAEAnomalyDetector:
        """The unfitted window model: ``estimator`` (cloned) with the window defaults and this detector's settings."""
        model = clone(self.estimator) if self.estimator is not None else VAEAnomalyDetector()
        if not isinstance(model, VAEAnomalyDetector):
            raise ValueError(f"estimator must be a VAEAnomalyDetector, got {type(self.estimator).__name__}")
        if self.estimator_params:
            warnings.warn(
                "estimator_params is deprecated: pass estimator=VAEAnomalyDetector(...) (tunable as estimator__name)",
                FutureWarning,
                stacklevel=3,
            )
        # one window model and 10 % trimming unless asked: the mixture for small tables and
        # their 30 % trimming were decided on tables, not on series
        window_defaults = {"n_models": 1, "trim_fraction": 0.1, "encoder": self.encoder}
        params = {k: v for k, v in window_defaults.items() if model.get_params()[k] == "auto"}
        params |= {"random_state": self.random_state, "device": self.device, "verbose": self.verbose}
        params["n_jobs"] = self.n_jobs
        model.set_params(**params, **dict(self.estimator_params or {}))
        if model.encoder == "temporal" and not (model.encoder_params or {}).get("channels"):
            model.set_params(encoder_params={**(model.encoder_params or {}), "channels": self.n_channels_})
        if model.conditional:
            raise ValueError("the time-series detector takes no conditions: its window model must not be conditional")
        return model

    def _step_scores(self, values: np.ndarray) -> np.ndarray:
        w = self.window_
        windows = self._windows(values, 1, w)
        scored = ~np.isnan(windows).all(axis=1)
        per_value = np.full(windows.shape[0], np.nan)
        observed = (~np.isnan(windows[scored])).sum(axis=1)
        per_value[scored] = self.window_model_.score_samples(windows[scored]) / observed
        # a step's score: the lowest per-value score among the windows covering it
        padded = np.concatenate([np.full(w - 1, np.nan), per_value, np.full(w - 1, np.nan)])
        covering = sliding_window_view(padded, w)  # row t: windows t-w+1 .. t
        with np.errstate(invalid="ignore"):
            empty = np.isnan(covering).all(axis=1)
            if empty.any():
                t = int(np.flatnonzero(empty)[0])
                raise ValueError(
                    f"step {t} lies only in windows with no observed values: too many missing values there"
                )
            return np.nanmin(covering, axis=1)

    @on_own_threads
    def score_samples(self, series: Any) -> np.ndarray | pd.Series:
        """Per-step scores, shape (T,): nats per value; lower = more anomalous.

        A Series with the input's index when the input is a Series or DataFrame.
        """
        check_is_fitted(self)
        values, index = _as_series_array(series)
        if values.shape[1] != self.n_channels_:
            raise ValueError(f"the series has {values.shape[1]} channels; the model was fitted on {self.n_channels_}")
        scores = self._step_scores(values)
        return pd.Series(scores, index=index, name="score") if index is not None else scores

    @on_own_threads
    def decision_function(self, series: Any) -> np.ndarray | pd.Series:
        """Per-step ``score_samples - offset_``; negative = anomalous."""
        return decision(self.score_samples(series), self.offset_)

    @on_own_threads
    def predict(self, series: Any) -> np.ndarray | pd.Series:
        """Per-step +1 (normal) or −1 (anomalous: a score below ``offset_``), as the table detector."""
        values = self.decision_function(series)
        out = labels(values)
        return pd.Series(out, index=values.index, name="label") if isinstance(values, pd.Series) else out

    def save(self, path: str | os.PathLike[str], signing_key: bytes | str | None = None) -> str:
        """Write the fitted detector to an HDF5 model file atomically; returns its SHA-256 fingerprint.

        :func:`vaeguard.load` reads it back; ``signing_key`` signs the file as
        :meth:`VAEAnomalyDetector.save` does.
        """
        check_is_fitted(self)
        window_config, arrays = self.window_model_.model_file_contents()
        params = self.get_params(deep=False)
        params["random_state"] = storable_params(self)["random_state"]
        if self.estimator is not None:  # stored as its own parameters; load rebuilds it
            params["estimator"] = storable_params(self.estimator)
        config = {
            "estimator": type(self).__name__,
            "params": params,
            "fitted": {"window_": self.window_, "n_channels_": self.n_channels_, "offset_": self.offset_},
            "window_model": window_config,
        }
        self.fingerprint_ = storage.write_model_file(path, config, arrays, signing_key=signing_key)
        return self.fingerprint_

    @classmethod
    def from_model_file_contents(
        cls, config: dict[str, Any], arrays: dict[str, np.ndarray], digest: str, device: str
    ) -> VAETimeSeriesDetector:
        """The fitted detector from a model file's verified contents (:func:`vaeguard.persistence.load` calls it)."""
        params = dict(config["params"])
        if isinstance(params.get("estimator"), dict):
            params["estimator"] = VAEAnomalyDetector(**params["estimator"])
        det = cls(**params)
        fitted = config["fitted"]
        det.window_model_ = VAEAnomalyDetector.from_model_file_contents(config["window_model"], arrays, digest, device)
        det.window_ = int(fitted["window_"])
        det.n_channels_ = int(fitted["n_channels_"])
        det.offset_ = float(fitted["offset_"])
        det.fingerprint_ = digest
        return det
