"""Small real data sets that ship with vaeguard (see ``datasets/README.md`` for provenance)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.utils import Bunch

from vaeguard.resources import shipped_folder


@dataclass(frozen=True)
class ShippedDataset:
    """One shipped data set: a table (``.npz`` with ``X``, ``y``) or a series (CSV)."""

    filename: str
    description: str
    columns: tuple[str, ...] = ()
    #: For a series: steps ``0 .. train_end-1`` are the anomaly-free training part.
    train_end: int | None = None

    @property
    def kind(self) -> str:
        return "series" if self.filename.endswith(".csv") else "table"


DATASETS: dict[str, ShippedDataset] = {
    "thyroid": ShippedDataset(
        "thyroid.npz",
        "UCI thyroid disease via ODDS/ADBench: 3772 patients, 6 lab values, 2.5 % hyperfunction (anomalies)",
        ("age", "TSH", "T3", "TT4", "T4U", "FTI"),
    ),
    "ucr135": ShippedDataset(
        "ucr135_internal_bleeding.csv",
        "UCR anomaly archive series 135 (InternalBleeding16): 7501 steps, 1 channel; steps 0-1199 are the "
        "anomaly-free training part; the anomaly is steps 4187-4198",
        train_end=1200,
    ),
    "mitdb_ecg": ShippedDataset(
        "mitdb_ecg.csv",
        "MIT-BIH Arrhythmia Database ECG excerpt: 7500 steps, 1 channel; steps 0-4999 are the anomaly-free "
        "training part; anomalous beats at steps 6936-7287",
        train_end=5000,
    ),
}


def _data_dir() -> Path:
    return shipped_folder("_datasets", "datasets")


def list_datasets() -> dict[str, str]:
    """Names of the shipped data sets with a one-line description each."""
    return {name: ds.description for name, ds in DATASETS.items()}


def load_dataset(name: str, *, return_X_y: bool = False, as_frame: bool = False) -> Any:
    """Load a shipped data set, scikit-learn style.

    Parameters
    ----------
    name : str
        One of :func:`list_datasets`.
    return_X_y : bool, default=False
        Return ``(data, target)`` instead of a Bunch.
    as_frame : bool, default=False
        ``data`` as a DataFrame with named columns (and ``target`` as a Series). Series
        data sets are indexed by their time step.

    Returns
    -------
    Bunch
        ``data`` (n_samples, n_features) for a table or (n_steps, n_channels) for a
        series, ``target`` (1 = anomaly, per row or per step), ``frame`` (a DataFrame of
        both, when ``as_frame``), ``feature_names``, ``DESCR``, and for a series
        ``train_end`` (the steps before it are the anomaly-free training part).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(DATASETS))}")
    ds = DATASETS[name]
    path = _data_dir() / ds.filename
    if ds.kind == "table":
        with np.load(path, allow_pickle=False) as data:
            X, y = np.asarray(data["X"], dtype=np.float64), np.asarray(data["y"]).astype(np.int64)
        columns = list(ds.columns)
        X_frame = pd.DataFrame(X, columns=columns)
    else:
        table = pd.read_csv(path, index_col="timestamp")
        y = table.pop("is_anomaly").to_numpy().astype(np.int64)
        columns = list(table.columns)
        X_frame, X = table.astype(np.float64), table.to_numpy(dtype=np.float64)
    frame = None
    if as_frame:
        X = X_frame
        y = pd.Series(y, name="is_anomaly", index=X_frame.index)
        frame = pd.concat([X, y], axis=1)
    if return_X_y:
        return X, y
    descr = f"{ds.description}\n\nProvenance and licence: datasets/README.md ({ds.filename})."
    bunch = Bunch(data=X, target=y, frame=frame, feature_names=columns, DESCR=descr)
    if ds.train_end is not None:
        bunch.train_end = ds.train_end
    return bunch
