"""What both detectors share: the threshold rule, and fits that leave the old model intact when they fail.

The rule, written once for the estimator, the time-series detector, the CLI and Dask:
``decision = log p(x) − offset_`` (nats) and a row is an outlier where ``decision < 0``
(``predict`` gives −1 there, +1 elsewhere).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np


def decision(log_px: Any, offset: float) -> Any:
    """``log_px − offset`` (nats): negative for outliers; keeps a pandas index."""
    return log_px - offset


def is_outlier(decision_values: Any) -> np.ndarray:
    """True where ``decision < 0`` (the score lies below the threshold), bool array."""
    return np.asarray(decision_values) < 0


def labels(decision_values: Any) -> np.ndarray:
    """−1 for outliers, +1 for inliers (scikit-learn's convention), int array."""
    return np.where(is_outlier(decision_values), -1, 1)


def _fitted_attributes(estimator: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(estimator).items() if k.endswith("_") and not k.startswith("__")}


@contextlib.contextmanager
def previous_fit_kept_on_failure(estimator: Any) -> Iterator[None]:
    """Run a (re)fit so that, should it raise, ``estimator`` is exactly as it was before it.

    Fitted attributes (names ending in ``_``) set or replaced by the failed fit are put back
    and new ones removed: a model that was fitted stays fitted and usable, one that was not
    stays unfitted. A fit replaces attributes with new objects rather than changing old ones
    in place, so restoring the references restores the model.
    """
    before = _fitted_attributes(estimator)
    try:
        yield
    except BaseException:
        for name in set(_fitted_attributes(estimator)) - set(before):
            delattr(estimator, name)
        vars(estimator).update(before)
        raise
