"""Threshold rules: contamination quantile, explicit offset, target false-positive rate."""

import numpy as np
import pytest
from conftest import FAST

from vaeguard import VAEAnomalyDetector, load


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3))
    X_normal = rng.normal(size=(2000, 3))
    return X, X_normal


def test_contamination_rule(data):
    X, _ = data
    det = VAEAnomalyDetector(**FAST, contamination=0.2, random_state=0).fit(X)
    assert det.threshold_rule_ == {"rule": "contamination", "contamination": 0.2}
    assert (det.predict(X) == -1).mean() == pytest.approx(0.2, abs=0.005)


def test_explicit_offset_rule(data):
    X, _ = data
    det = VAEAnomalyDetector(**FAST, offset=-5.0, random_state=0).fit(X)
    assert det.offset_ == -5.0 and det.threshold_rule_ == {"rule": "offset", "offset": -5.0}
    scores = det.score_samples(X)
    np.testing.assert_array_equal(det.predict(X), np.where(scores < -5.0, -1, 1))
    with pytest.raises(ValueError, match="offset must be a finite"):
        VAEAnomalyDetector(**FAST, offset=float("nan")).fit(X)


def test_false_positive_rate_rule_holds_on_fresh_normal_data(data, tmp_path):
    X, X_normal = data
    det = VAEAnomalyDetector(**FAST, random_state=0).fit(X)
    det.set_threshold(X_normal[:1000], fpr=0.05)
    assert det.threshold_rule_ == {"rule": "fpr", "fpr": 0.05, "n_normal_rows": 1000}
    # on more rows from the same normal distribution, about 5 % are flagged
    flagged = (det.predict(X_normal[1000:]) == -1).mean()
    assert 0.03 <= flagged <= 0.07
    # the model file keeps the rule and the threshold
    det.save(tmp_path / "m.h5")
    again = load(tmp_path / "m.h5")
    assert again.threshold_rule_ == det.threshold_rule_ and again.offset_ == det.offset_
    np.testing.assert_array_equal(again.predict(X_normal), det.predict(X_normal))


def test_set_threshold_validates(data):
    X, X_normal = data
    det = VAEAnomalyDetector(**FAST, random_state=0).fit(X)
    with pytest.raises(ValueError, match="fpr must be"):
        det.set_threshold(X_normal, fpr=1.5)
    with pytest.warns(UserWarning, match="cannot resolve fpr"):
        det.set_threshold(X_normal[:10], fpr=0.01)
    with pytest.raises(ValueError, match="features"):
        det.set_threshold(X_normal[:, :2])
