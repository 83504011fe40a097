"""Conditions of a conditional VAE: what the user passes as ``y`` turned into the vector c the networks read.

A condition is one value per sample or several (columns of a DataFrame or of a 2-D
array). Each column is either

- *categorical* (strings, booleans, integers, pandas categories): one-hot over the labels
  seen in ``fit``, sorted; a label never seen is refused, naming the column and the row;
- *numeric* (floating point): standardised with the training mean and standard deviation.

c is the concatenation of the columns' codes, of width :attr:`ConditionEncoder.width`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

#: A categorical condition column may have at most this many labels (more: pass it as float, a numeric condition).
MAX_CONDITION_LABELS = 1000


def _as_frame(y: Any, what: str) -> pd.DataFrame:
    """``y`` (Series, DataFrame, 1-D or 2-D array-like) as a DataFrame of condition columns."""
    if isinstance(y, pd.DataFrame):
        return y.reset_index(drop=True)
    if isinstance(y, pd.Series):
        return y.reset_index(drop=True).to_frame(name=str(y.name) if y.name is not None else "condition")
    array = np.asarray(y)
    if array.ndim == 0:
        raise ValueError(f"{what} must hold one condition per sample (an array, Series or DataFrame), got a scalar")
    if array.ndim == 1:
        return pd.DataFrame({"condition": array})
    if array.ndim == 2:
        return pd.DataFrame({f"condition{j}": array[:, j] for j in range(array.shape[1])})
    raise ValueError(f"{what} must be 1-D or 2-D (samples × condition columns), got shape {array.shape}")


def _is_float(dtype: Any) -> bool:
    return bool(pd.api.types.is_float_dtype(dtype))


def _label(value: Any) -> str:
    return str(value.item() if isinstance(value, np.generic) else value)


@dataclass
class ConditionEncoder:
    """Codes condition columns as one vector per sample: one-hot categories, standardised numbers.

    ``labels[j]`` holds column j's sorted labels (as strings) for a categorical column and
    is None for a numeric one, whose ``center[j]`` and ``scale[j]`` standardise it.
    """

    columns: list[str]
    labels: list[list[str] | None]
    center: list[float]
    scale: list[float]

    @classmethod
    def fit(cls, y: Any, n_rows: int) -> ConditionEncoder:
        """Learn the columns' kinds, labels and scales from the training conditions ``y``, one per row of the data."""
        frame = _as_frame(y, "y")
        if frame.shape[1] == 0:
            raise ValueError("y has no condition columns")
        if len(frame) != n_rows:
            raise ValueError(f"y has {len(frame)} conditions and X {n_rows} rows: give one per row")
        labels: list[list[str] | None] = []
        center, scale = [], []
        for name in frame.columns:
            column = frame[name]
            missing = column.isna().to_numpy()
            if missing.any():
                raise ValueError(
                    f"condition column {str(name)!r}, row {int(np.flatnonzero(missing)[0])}: the value is missing; "
                    "every sample needs its conditions"
                )
            if _is_float(column.dtype):
                values = column.to_numpy(dtype=np.float64)
                if not np.isfinite(values).all():
                    row = int(np.flatnonzero(~np.isfinite(values))[0])
                    raise ValueError(f"condition column {str(name)!r}, row {row}: {values[row]} is not finite")
                spread = float(values.std())
                labels.append(None)
                center.append(float(values.mean()))
                scale.append(spread if spread > 0 else 1.0)
                continue
            seen = sorted({_label(v) for v in column})
            if len(seen) > MAX_CONDITION_LABELS:
                raise ValueError(
                    f"condition column {str(name)!r} has {len(seen)} distinct labels (at most {MAX_CONDITION_LABELS}); "
                    "pass a numeric condition as floating point"
                )
            labels.append(seen)
            center.append(0.0)
            scale.append(1.0)
        return cls([str(c) for c in frame.columns], labels, center, scale)

    @property
    def width(self) -> int:
        """Length of the condition vector c."""
        return sum(1 if v is None else len(v) for v in self.labels)

    def transform(self, y: Any, n_rows: int) -> np.ndarray:
        """The condition vectors, float64 of shape (n_rows, :attr:`width`).

        ``y`` holds one condition per row of the data (``n_rows`` of them), or a single
        condition (one value, or one row) that every row shares. A condition that cannot be
        coded raises ``ValueError`` naming its column and row (:meth:`problems`).
        """
        frame = self.frame(y, n_rows)
        _, problems = self.problems(frame)
        if problems:
            row, name, _, why = problems[0]
            raise ValueError(f"condition column {name!r}, row {row}: {why}")
        parts = []
        for name, labels, center, scale in zip(self.columns, self.labels, self.center, self.scale, strict=True):
            if labels is None:
                parts.append(((pd.to_numeric(frame[name]).to_numpy(dtype=np.float64) - center) / scale)[:, None])
            else:
                index = {label: i for i, label in enumerate(labels)}
                parts.append(np.eye(len(labels))[[index[_label(v)] for v in frame[name]]])
        return np.concatenate(parts, axis=1)

    def problems(self, frame: pd.DataFrame) -> tuple[np.ndarray, list[tuple[int, str, Any, str]]]:
        """(rows that cannot be coded (bool, len(frame)), the first problem of each column as (row, column,
        value, why)) of a frame with this encoder's columns: missing values, labels not seen in fit, numeric
        columns holding something else than a finite number."""
        bad = np.zeros(len(frame), bool)
        problems = []
        for name, labels in zip(self.columns, self.labels, strict=True):
            column = frame[name]
            missing = column.isna().to_numpy()
            if labels is None:
                values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
                wrong, why = ~np.isfinite(values) & ~missing, "{!r} is not a finite number"
            else:
                known = set(labels)
                wrong = np.array(
                    [not m and _label(v) not in known for v, m in zip(column, missing, strict=True)], dtype=bool
                )
                shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
                why = f"label {{!r}} was not seen in fit (known: {shown})"
            for mask, reason in ((missing, "the value is missing"), (wrong, why)):
                if mask.any():
                    row = int(np.flatnonzero(mask)[0])
                    value = column.iloc[row]
                    problems.append((row, name, value, reason.format(_label(value) if labels else value)))
                    bad |= mask
        return bad, sorted(problems, key=lambda p: p[0])

    def frame(self, y: Any, n_rows: int) -> pd.DataFrame:
        """``y`` as a frame with this encoder's columns and ``n_rows`` rows (one shared condition repeated)."""
        frame = self._frame(y)
        if len(frame) == 1 and n_rows != 1:
            frame = frame.loc[np.zeros(n_rows, dtype=int)].reset_index(drop=True)
        if len(frame) != n_rows:
            raise ValueError(f"the conditions have {len(frame)} rows and the data {n_rows}: give one per sample")
        return frame

    def _frame(self, y: Any) -> pd.DataFrame:
        """``y`` as a frame of this encoder's columns.

        A DataFrame gives its columns by name (others are ignored); a Series is one column
        for a one-column encoder, else one row indexed by column name; arrays give columns by
        position: a bare value or a 1-D sequence is one value per row for a one-column
        encoder, else one row.
        """
        if isinstance(y, pd.DataFrame):
            missing = [c for c in self.columns if c not in set(map(str, y.columns))]
            if missing:
                raise ValueError(
                    f"the conditions lack column(s) {missing}; the model was fitted on {self.columns}, "
                    f"they have {list(map(str, y.columns))}"
                )
            return y.rename(columns=str)[self.columns].reset_index(drop=True)
        if isinstance(y, pd.Series):
            if len(self.columns) == 1:
                return pd.DataFrame({self.columns[0]: y.reset_index(drop=True)})
            return self._frame(y.to_frame().T)
        array = np.asarray(y, dtype=object if np.asarray(y).dtype.kind in "OUS" else None)
        if array.ndim == 0 or (array.ndim == 1 and len(self.columns) > 1):
            array = array.reshape(1, -1)  # one condition, shared by every sample
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim != 2 or array.shape[1] != len(self.columns):
            raise ValueError(
                f"the conditions have shape {array.shape}; the model was fitted on {len(self.columns)} column(s) "
                f"{self.columns}"
            )
        return pd.DataFrame({name: array[:, j] for j, name in enumerate(self.columns)})

    def config(self) -> dict[str, Any]:
        """JSON-ready description (the model file stores it)."""
        return {"columns": self.columns, "labels": self.labels, "center": self.center, "scale": self.scale}
