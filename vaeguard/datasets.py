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


#: Factors of :func:`make_shapes`, in column order, and how many values each takes.
SHAPES_FACTORS: dict[str, int] = {"shape": 3, "scale": 6, "rotation": 10, "x": 8, "y": 8}
#: The shapes, by their factor value.
SHAPES_NAMES = ("square", "ellipse", "heart")


def render_shapes(factors: np.ndarray, image_size: int = 32) -> np.ndarray:
    """Binary images (n, image_size, image_size) uint8 of the shapes given by integer ``factors`` (n, 5).

    Columns as in :data:`SHAPES_FACTORS`: shape (square, ellipse, heart), scale (6 sizes
    from 0.5 to 1 of the largest), rotation (10 angles over one turn; the square repeats
    after a quarter), x and y (8 positions each, keeping the largest shape on the canvas).
    A pixel is on when its centre lies inside the shape. Deterministic.
    """
    f = np.asarray(factors)
    sizes = np.array(list(SHAPES_FACTORS.values()))
    if f.ndim != 2 or f.shape[1] != len(sizes) or not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"factors must be integers of shape (n, {len(sizes)}), got {f.dtype} {f.shape}")
    bad = (f < 0) | (f >= sizes)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        name = list(SHAPES_FACTORS)[col]
        raise ValueError(f"row {row}: factor {name} = {f[row, col]} is outside 0..{sizes[col] - 1}")
    if not (isinstance(image_size, int) and image_size >= 16):
        raise ValueError(f"image_size must be an integer ≥ 16, got {image_size!r}")
    radius = 0.2 * image_size  # half-width of the largest shape, in pixels
    scale = (0.5 + 0.5 * f[:, 1] / (sizes[1] - 1)) * radius
    angle = 2 * np.pi * f[:, 2] / sizes[2]
    margin = radius * 1.45  # the largest shape's reach at any angle
    span = image_size - 2 * margin
    cx = margin + span * f[:, 3] / (sizes[3] - 1)
    cy = margin + span * f[:, 4] / (sizes[4] - 1)
    grid = np.arange(image_size) + 0.5
    px = grid[None, None, :] - cx[:, None, None]
    py = grid[None, :, None] - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (cos * px + sin * py) / scale[:, None, None]
    v = (-sin * px + cos * py) / scale[:, None, None]
    inside = np.zeros(u.shape, dtype=bool)
    kind = f[:, 0][:, None, None]
    square = (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)
    ellipse = u**2 + (v / 0.55) ** 2 <= 1.0
    hu, hv = 1.05 * u, -1.05 * v + 0.18  # heart: (x² + y² − 1)³ − x² y³ ≤ 0, point down, about centred
    heart = (hu**2 + hv**2 - 1) ** 3 - hu**2 * hv**3 <= 0
    inside = np.where(kind == 0, square, np.where(kind == 1, ellipse, heart))
    return inside.astype(np.uint8)


def make_shapes(
    n_samples: int = 10_000, image_size: int = 32, random_state: int | np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A procedural dSprites-like data set: ``(images, factors)`` with the factors known.

    Each image shows one white shape on black, drawn from five independent uniform
    factors (:data:`SHAPES_FACTORS`): shape, scale, rotation, x, y. Made on the fly, so the
    disentanglement metrics (:mod:`vaeguard.metrics`) run without downloads.

    Parameters
    ----------
    n_samples : int, default=10000
    image_size : int, default=32
        Side of the square canvas in pixels (≥ 16).
    random_state : int, Generator or None

    Returns
    -------
    images : ndarray of shape (n_samples, image_size, image_size), uint8 in {0, 1}
    factors : ndarray of shape (n_samples, 5), int64

    Examples
    --------
    >>> images, factors = make_shapes(4, random_state=0)
    >>> images.shape, factors.shape, images.dtype
    ((4, 32, 32), (4, 5), dtype('uint8'))
    """
    if not (isinstance(n_samples, (int, np.integer)) and n_samples >= 1):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    rng = random_state if isinstance(random_state, np.random.Generator) else np.random.default_rng(random_state)
    factors = np.stack([rng.integers(0, size, int(n_samples)) for size in SHAPES_FACTORS.values()], axis=1)
    return render_shapes(factors, image_size), factors
