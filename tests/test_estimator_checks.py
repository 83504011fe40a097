"""scikit-learn's own estimator checks, with a configuration that trains quickly."""

from conftest import FAST
from sklearn.utils.estimator_checks import parametrize_with_checks

from vaeguard import VAEAnomalyDetector


@parametrize_with_checks([VAEAnomalyDetector(**FAST, device="cpu")])
def test_sklearn_compatible(estimator, check):
    check(estimator)
