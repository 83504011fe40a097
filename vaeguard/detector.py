"""What both detectors share: the threshold rule, fits that leave the old model intact when they fail, and the
torch threads a detector's work runs on.

The rule, written once for the estimator, the time-series detector, the CLI and Dask:
``decision = log p(x) − offset_`` (nats) and a row is an outlier where ``decision < 0``
(``predict`` gives −1 there, +1 elsewhere).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

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


#: Torch threads of a detector's work when ``n_jobs`` is None. One: on an idle 2-CPU machine a second
#: thread saves 0–28 % (the demo's fit nothing), on a busy one it makes the same work 1.5–4 times slower
#: than one thread, as every operation waits for the slower of its threads (``benchmarks/results/threads.md``).
DEFAULT_THREADS = 1


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def threads_for(n_jobs: int | None) -> int:
    """The torch threads for ``n_jobs`` (scikit-learn's meaning): None → :data:`DEFAULT_THREADS`; a positive
    number as it is; −1 every available CPU, −2 all but one, and so on (at least 1)."""
    if n_jobs is None:
        return DEFAULT_THREADS
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise ValueError(f"n_jobs must be a non-zero integer or None, got {n_jobs!r}")
    return int(n_jobs) if n_jobs > 0 else max(1, available_cpus() + 1 + int(n_jobs))


@contextlib.contextmanager
def torch_threads(n_jobs: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op threads set for ``n_jobs`` (:func:`threads_for`); restored after."""
    import torch

    wanted, before = threads_for(n_jobs), torch.get_num_threads()
    if wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


Method = TypeVar("Method", bound=Callable[..., Any])


#: Set while a detector method runs on its threads: a detector it calls (a time-series detector's window
#: model) keeps the outer one's setting.
_THREADS_SET: contextvars.ContextVar[bool] = contextvars.ContextVar("vaeguard_threads_set", default=False)


def on_own_threads(method: Method) -> Method:
    """A detector method that runs on the threads its ``n_jobs`` asks for (the caller's setting comes back after).

    The outermost detector call decides: a detector used inside another's method runs on the outer one's threads.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _THREADS_SET.get():
            return method(self, *args, **kwargs)
        token = _THREADS_SET.set(True)
        try:
            with torch_threads(getattr(self, "n_jobs", None)):
                return method(self, *args, **kwargs)
        finally:
            _THREADS_SET.reset(token)

    return wrapper  # type: ignore[return-value]
