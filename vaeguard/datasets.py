"""Small real data sets that ship with vaeguard (see ``datasets/README.md`` for provenance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

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


def load_dataset(name: str, *, as_frame: bool = False) -> tuple[np.ndarray | pd.DataFrame, np.ndarray]:
    """Load a shipped data set.

    Parameters
    ----------
    name : str
        One of :func:`list_datasets`.
    as_frame : bool, default=False
        Return ``X`` as a DataFrame with named columns.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features) or DataFrame
    y : ndarray of shape (n_samples,)
        1 for anomalies, 0 otherwise.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(DATASETS))}")
    filename, columns, _ = DATASETS[name]
    with np.load(_data_dir() / filename, allow_pickle=False) as data:
        X, y = np.asarray(data["X"], dtype=np.float64), np.asarray(data["y"]).astype(np.int64)
    if as_frame:
        return pd.DataFrame(X, columns=columns), y
    return X, y
