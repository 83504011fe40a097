"""Small real data sets that ship with vaeguard (see ``datasets/README.md`` for provenance)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.utils import Bunch

from vaeguard.resources import shipped_folder

#: name → (file, column names, one-line description)
DATASETS: dict[str, tuple[str, list[str], str]] = {
    "thyroid": (
        "thyroid.npz",
        ["age", "TSH", "T3", "TT4", "T4U", "FTI"],
        "UCI thyroid disease via ODDS/ADBench: 3772 patients, 6 lab values, 2.5 % hyperfunction (anomalies)",
    ),
}


def _data_dir() -> Path:
    return shipped_folder("_datasets", "datasets")


def list_datasets() -> dict[str, str]:
    """Names of the shipped data sets with a one-line description each."""
    return {name: desc for name, (_, _, desc) in DATASETS.items()}


def load_dataset(name: str, *, return_X_y: bool = False, as_frame: bool = False) -> Any:
    """Load a shipped data set, scikit-learn style.

    Parameters
    ----------
    name : str
        One of :func:`list_datasets`.
    return_X_y : bool, default=False
        Return ``(data, target)`` instead of a Bunch.
    as_frame : bool, default=False
        ``data`` as a DataFrame with named columns (and ``target`` as a Series).

    Returns
    -------
    Bunch
        ``data`` (n_samples, n_features), ``target`` (n_samples,; 1 = anomaly),
        ``frame`` (a DataFrame of both, when ``as_frame``), ``feature_names``, ``DESCR``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(DATASETS))}")
    filename, columns, description = DATASETS[name]
    with np.load(_data_dir() / filename, allow_pickle=False) as data:
        X, y = np.asarray(data["X"], dtype=np.float64), np.asarray(data["y"]).astype(np.int64)
    frame = None
    if as_frame:
        X = pd.DataFrame(X, columns=columns)
        y = pd.Series(y, name="is_anomaly")
        frame = pd.concat([X, y], axis=1)
    if return_X_y:
        return X, y
    descr = f"{description}\n\nProvenance and licence: datasets/README.md ({filename})."
    return Bunch(data=X, target=y, frame=frame, feature_names=list(columns), DESCR=descr)
