"""A fitted model's input space: the one place that checks user data and moves it into the networks' space and back.

:class:`InputSpace` is read off the training data at ``fit`` (columns and their names,
categories, image shape and dtype) and completed with what the model chose (the
standardiser and its lattices, the pixel levels, the likelihood's support, the
conditions' coding). The model file stores its parts. Everything that takes user data
goes through it:

- :meth:`InputSpace.validate` checks a table or a batch of images strictly (the first
  problem raises a ``ValueError`` naming its row and column), as the Python API does;
- :meth:`InputSpace.check_rows` checks a chunk of a file row by row (bad rows are
  reported, not raised), as the command line and Dask do, and codes the good rows without
  a second check;
- :meth:`InputSpace.to_model` turns validated values into :class:`ModelInputs` (the
  tensors, the missing-value mask, the conditions, the impossible values), and
  :meth:`InputSpace.row_nats` gives the nats that take a model-space log-density back to
  the data's units; :meth:`InputSpace.from_model` maps model-space values back.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.utils.validation import _get_feature_names, check_array

from vaeguard.conditions import ConditionEncoder
from vaeguard.parts import Likelihood
from vaeguard.preprocessing import (
    IMPOSSIBLE_VALUE_NATS,
    ColumnCoder,
    ColumnLattice,
    PixelLevels,
    Standardizer,
    check_feature_columns,
    column_types,
)

#: A problem in a row of a chunk: (row in the chunk, column ("" for the whole row), value, why).
Problem = tuple[int, str, Any, str]

#: Standardised values beyond this cannot be scored in float32 (their squares overflow).
MAX_STANDARDISED = 1e30
TOO_FAR = "too far from the training data to be scored in float32"
ONLY_CONSTANT = "has values only in columns that held one value in every training row: the model has nothing to score"


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """Rows as a fitted model's networks see them (:meth:`InputSpace.to_model`).

    ``x`` (n, *event_shape) float64 in the model's units (standardised, coded, pixel
    levels), ``mask`` (bool, like ``x``; True = observed) or None when nothing is
    missing, ``condition`` (n, condition_dim) for a conditional model or None,
    ``impossible`` (n, n_features) the values the model gives no probability (off a
    lattice, below a bound, off the pixel levels) or None, ``values`` the validated input
    (n, n_features), or (n, C, H, W) for images.
    """

    x: torch.Tensor
    mask: torch.Tensor | None
    condition: torch.Tensor | None
    impossible: np.ndarray | None
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def rows(self, keep: np.ndarray | torch.Tensor) -> ModelInputs:
        """The rows ``keep`` (indices or a boolean mask) of these inputs."""
        keep = torch.as_tensor(keep)
        index = keep.numpy()

        def pick(part: Any) -> Any:
            return None if part is None else part[keep if isinstance(part, torch.Tensor) else index]

        x, values = self.x[keep], self.values[index]
        return ModelInputs(x, pick(self.mask), pick(self.condition), pick(self.impossible), values)


@dataclasses.dataclass(frozen=True)
class RowCheck:
    """What :meth:`InputSpace.check_rows` found in a chunk: ``bad`` (n,) rows that cannot be scored, the first
    ``problems`` of each kind (by row), and ``inputs``, the good rows in model space (None when none is good)."""

    bad: np.ndarray
    problems: list[Problem]
    inputs: ModelInputs | None


@dataclasses.dataclass(eq=False)
class InputSpace:
    """The data a fitted model reads, and how it reaches the networks.

    ``owner`` names the estimator in messages; ``n_features`` columns (or pixels ×
    channels) named ``feature_names`` when fitted on a DataFrame of string-named columns;
    ``image_shape`` (H, W) or (C, H, W) and ``image_dtype`` for images, else None;
    ``column_coder`` codes a DataFrame's categorical columns (``handle_unknown``: "error"
    or "ignore" for unseen categories). Completed by :meth:`with_model`: ``standardizer``
    (continuous models: centre, scale, lattices), ``pixel_levels`` (discrete images),
    ``support`` (the likelihood whose support discrete values must lie in),
    ``condition_encoder`` (conditional models), ``modelled``, the columns the networks
    read (None: all), and ``constant_rows``, the training rows that observed each of the
    others, which held one value (see the module).
    """

    owner: str
    n_features: int
    feature_names: np.ndarray | None = None
    image_shape: tuple[int, ...] | None = None
    image_dtype: str | None = None
    column_coder: ColumnCoder | None = None
    handle_unknown: str = "error"
    standardizer: Standardizer | None = None
    pixel_levels: PixelLevels | None = None
    support: Likelihood | None = None
    condition_encoder: ConditionEncoder | None = None
    modelled: np.ndarray | None = None
    constant_rows: np.ndarray | None = None

    # -- building ------------------------------------------------------------------------
    @classmethod
    def observe(cls, X: Any, *, owner: str, handle_unknown: str = "error") -> tuple[InputSpace, np.ndarray]:
        """At fit: the space's shape read off the training data ``X``, and ``X`` validated by it.

        Returns the space (to be completed by :meth:`with_model`) and the values: float64
        (n, d) for a table, (n, C, H, W) for images. ValueErrors name the row and column at fault.
        """
        shape = image_input_shape(X)
        if shape is not None:
            images = np.asarray(X)
            space = cls(owner, math.prod(shape), image_shape=shape, image_dtype=images.dtype.str)
            return space, space._image_values(images, need=2)
        if isinstance(X, pd.DataFrame):
            check_feature_columns(X)
        coder = ColumnCoder.fit(X) if ColumnCoder.needed(X) else None
        names = _get_feature_names(X)
        values = check_array(
            X if coder is None else coder.encode(X, handle_unknown),
            dtype=np.float64,
            ensure_all_finite=False,
            estimator=owner,
            input_name="X",
        )
        space = cls(owner, values.shape[1], names, column_coder=coder, handle_unknown=handle_unknown)
        space._check_values(values)
        missing = np.isnan(values).all(axis=0)
        if missing.any():
            col = space.column_name(int(np.flatnonzero(missing)[0]))
            raise ValueError(f"column {col} has no observed values (all NaN) to learn from")
        return space, values

    def with_model(
        self,
        *,
        standardizer: Standardizer | None,
        pixel_levels: PixelLevels | None,
        support: Likelihood | None,
        condition_encoder: ConditionEncoder | None,
        training_values: np.ndarray | None = None,
    ) -> InputSpace:
        """This space completed with what the model chose (see the class); a table's ``training_values``
        (n, d) leave its constant columns out of the model."""
        modelled = None if self.images else self.modelled_columns(standardizer)
        rows = None
        if modelled is not None and training_values is not None:
            left_out = np.ones(self.n_features, bool)
            left_out[modelled] = False
            rows = (~np.isnan(training_values[:, left_out])).sum(axis=0)
        return dataclasses.replace(
            self,
            standardizer=standardizer,
            pixel_levels=pixel_levels,
            support=support,
            condition_encoder=condition_encoder,
            modelled=None if rows is None else modelled,
            constant_rows=rows,
        )

    @staticmethod
    def modelled_columns(standardizer: Standardizer | None) -> np.ndarray | None:
        """The columns a table's model reads: all but those constant in training (None: all, also when all are)."""
        if standardizer is None or standardizer.columns is None:
            return None
        varying = np.array([c.kind != "constant" for c in standardizer.columns])
        return None if varying.all() or not varying.any() else np.flatnonzero(varying)

    # -- what it reads -------------------------------------------------------------------
    @property
    def images(self) -> bool:
        return self.image_shape is not None

    @property
    def columns(self) -> list[str]:
        """The table's column names (``x0``, ``x1``, ... when fitted without names)."""
        if self.feature_names is not None:
            return [str(c) for c in self.feature_names]
        return [f"x{j}" for j in range(self.n_features)]

    @property
    def condition_columns(self) -> list[str] | None:
        """The columns a conditional model reads its conditions from (the names of ``y`` in fit), else None."""
        return None if self.condition_encoder is None else list(self.condition_encoder.columns)

    def column_name(self, col: int) -> str:
        """Column ``col`` as messages name it: its quoted name, or its position for a table without names."""
        return repr(str(self.feature_names[col])) if self.feature_names is not None else str(col)

    def column_types(self, likelihood_name: str) -> pd.DataFrame | None:
        """``column_types_``: each column's kind (continuous, lattice, categorical, ...) and why; None for images."""
        if self.images:
            return None
        names, d = self.columns, self.n_features
        st = self.standardizer
        if st is None:
            why = f"likelihood {likelihood_name!r} for every column"
            return column_types([ColumnLattice(likelihood_name, 0.0, 0.0, np.nan, why)] * d, names)
        if st.columns is None:  # a model file that did not record the reasons
            kinds = ["lattice" if lattice else "continuous" for lattice in st.discrete]
            return column_types(st.lattices(kinds, ["not recorded in the model file"] * d), names)
        return column_types(st.columns, names)

    # -- checking ------------------------------------------------------------------------
    def validate(self, X: Any) -> np.ndarray:
        """``X`` checked against this space: float64 (n, d), or (n, C, H, W) for images.

        The first problem raises a ``ValueError`` naming its row and column: the wrong
        number of columns or names (as scikit-learn words it), a non-numeric column, an
        unseen category (``handle_unknown="error"``), an infinite value, a row with nothing
        observed. NaN is a missing value.
        """
        shape = image_input_shape(X)
        if self.images:
            if shape != self.image_shape:
                got = "a table" if shape is None else f"images of shape {shape}"
                raise ValueError(f"the model was fitted on images of shape {self.image_shape}; got {got}")
            return self._image_values(np.asarray(X), need=1)
        if shape is not None:
            raise ValueError(
                f"the model was fitted on a table of {self.n_features} columns; got images of shape {np.shape(X)}"
            )
        if self.column_coder is not None and not isinstance(X, pd.DataFrame):
            raise ValueError("this model was fitted on a DataFrame with categorical columns: pass a DataFrame")
        self._check_names(X)
        if self.column_coder is not None:
            X = self.column_coder.encode(X, self.handle_unknown)
        elif hasattr(X, "dtypes") and hasattr(X, "columns"):
            bad = [str(c) for c, t in zip(X.columns, X.dtypes, strict=True) if not _is_numeric_dtype(t)]
            if bad:
                raise ValueError(
                    f"column(s) {', '.join(repr(b) for b in bad)} are not numeric; "
                    "but the model was fitted on numeric columns only"
                )
        values = check_array(X, dtype=np.float64, ensure_all_finite=False, estimator=self.owner, input_name="X")
        if values.shape[1] != self.n_features:
            raise ValueError(
                f"X has {values.shape[1]} features, but {self.owner} is expecting {self.n_features} features as input."
            )
        self._check_values(values)
        return values

    def check_rows(self, features: pd.DataFrame, conditions: pd.DataFrame | None = None) -> RowCheck:
        """A chunk of a table checked row by row, and its good rows in model space (one pass; no second check).

        ``features`` holds this space's columns (others are ignored); ``conditions`` a
        conditional model's condition columns. A row is bad when a value is not a number,
        is infinite or is a category never seen in training (``handle_unknown="error"``),
        when nothing in it is observed, or when a condition cannot be coded.
        """
        coder = self.column_coder
        vocabularies = dict(zip(coder.columns, coder.vocabularies, strict=True)) if coder is not None else {}
        bad = np.zeros(len(features), bool)
        problems: list[Problem] = []
        clean = {}
        for name in self.columns:
            column = features[name]
            vocab = vocabularies.get(name)
            if vocab is not None:
                clean[name] = column
                if self.handle_unknown == "error":
                    unknown = column.notna().to_numpy() & ~column.astype(str).isin(vocab).to_numpy()
                    if unknown.any():
                        i = int(np.flatnonzero(unknown)[0])
                        problems.append((i, name, column.iloc[i], "a category never seen in training"))
                        bad |= unknown
                continue
            numbers = pd.to_numeric(column, errors="coerce").astype(np.float64)
            not_number = numbers.isna().to_numpy() & column.notna().to_numpy()
            infinite = np.isinf(numbers.to_numpy())
            for mask, why in ((not_number, "not a number"), (infinite, "infinite")):
                if mask.any():
                    i = int(np.flatnonzero(mask)[0])
                    problems.append((i, name, column.iloc[i], why))
                    bad |= mask
            clean[name] = numbers.where(~infinite)
        frame = pd.DataFrame(clean, index=features.index)
        empty = frame.isna().all(axis=1).to_numpy() & ~bad
        if empty.any():
            problems.append((int(np.flatnonzero(empty)[0]), "", None, "has no observed values (all missing)"))
            bad |= empty
        if self.modelled is not None:
            unread = frame.iloc[:, self.modelled].isna().all(axis=1).to_numpy() & ~bad
            if unread.any():
                problems.append((int(np.flatnonzero(unread)[0]), "", None, ONLY_CONSTANT))
                bad |= unread
        if self.condition_encoder is not None:
            if conditions is None:
                raise ValueError("this model is conditional: check_rows needs the rows' conditions")
            conditions = conditions.reset_index(drop=True)
            bad_conditions, condition_problems = self.condition_encoder.problems(conditions)
            bad |= bad_conditions
            problems += [(i, c, v, f"a condition: {why}") for i, c, v, why in condition_problems]
        good = ~bad
        values = np.empty((0, self.n_features))
        if good.any():
            kept = frame.loc[good]
            if coder is not None:
                kept = coder.encode(kept, self.handle_unknown)  # codes only: the rows were checked above
            values = kept.to_numpy(dtype=np.float64)
            far = self._too_far(values)
            if far is not None:  # values the networks cannot take in float32: those rows, not the chunk
                rows = np.flatnonzero(good)
                i, j = (int(v) for v in np.argwhere(far)[0])
                problems.append((int(rows[i]), self.columns[j], features[self.columns[j]].iloc[rows[i]], TOO_FAR))
                bad[rows[far.any(axis=1)]] = True
                values = values[~far.any(axis=1)]
                good = ~bad
        problems.sort(key=lambda problem: problem[0])
        if not good.any():
            return RowCheck(bad, problems, None)
        condition = None if conditions is None else conditions[good].reset_index(drop=True)
        return RowCheck(bad, problems, self.to_model(values, condition))

    # -- into the model's space and back -------------------------------------------------
    def to_model(self, values: np.ndarray, condition: Any = None) -> ModelInputs:
        """Validated ``values`` (and a conditional model's ``condition``) as the networks see them.

        Continuous likelihoods get standardised data (lattice columns at their nearest
        lattice point); discrete ones are checked against their support (images as their
        pixel levels, an impossible level moved to the nearest possible one). Values off a
        column's lattice or outside its support are marked in ``impossible`` (no warning
        here: :meth:`impossible_message` words one).
        """
        n = values.shape[0]
        flat = values.reshape(n, -1)
        if self.standardizer is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                Z = self.standardizer.transform(flat).reshape(values.shape)
                far = self._model_columns(np.abs(Z.reshape(n, -1)) > MAX_STANDARDISED)
            if far.any():
                row, col = (int(i) for i in np.argwhere(far)[0])
                col = col if self.modelled is None else int(self.modelled[col])
                raise ValueError(
                    f"row {row}, column {self.column_name(col)} holds {float(flat[row, col])!r}, {TOO_FAR}"
                )
            impossible = self.standardizer.impossible(flat)
            Z = self._model_columns(Z)
        else:
            Z = values if self.pixel_levels is None else self.pixel_levels.to_levels(values)
            if self.support is not None:
                self.support.check_support(Z)
            impossible = None if self.pixel_levels is None else self.pixel_levels.impossible(flat)
        missing = np.isnan(Z)
        if missing.any():
            empty = missing.reshape(n, -1).all(axis=1)
            if empty.any():
                raise ValueError(f"row {int(np.flatnonzero(empty)[0])} {ONLY_CONSTANT}")
            x, mask = torch.tensor(np.where(missing, 0.0, Z), dtype=torch.float64), torch.from_numpy(~missing)
        else:
            x, mask = torch.tensor(Z, dtype=torch.float64), None
        impossible = impossible if impossible is not None and impossible.any() else None
        return ModelInputs(x, mask, self.condition_tensor(condition, n), impossible, values)

    def model_scale(self) -> np.ndarray | None:
        """Each model-space value's unit in the data's units (the standardizer's scale of the columns the model
        reads); None for models without a standardizer."""
        if self.standardizer is None:
            return None
        scale = np.asarray(self.standardizer.scale, dtype=np.float64)
        return scale if self.modelled is None else scale[self.modelled]

    def _model_columns(self, a: np.ndarray) -> np.ndarray:
        """The columns of a table's ``a`` (n, d) that the model reads (all of ``a`` when it reads all)."""
        return a if self.modelled is None else a[:, self.modelled]

    def _all_columns(self, a: np.ndarray, fill: float | bool) -> np.ndarray:
        """Model-space columns ``a`` (n, modelled) spread into (n, d), ``fill`` in the columns left out."""
        if self.modelled is None:
            return a
        out = np.full((a.shape[0], self.n_features), fill, dtype=a.dtype)
        out[:, self.modelled] = a
        return out

    @property
    def _left_out(self) -> np.ndarray:
        """Boolean mask (d,) of the columns the model does not read (constant in training)."""
        out = np.zeros(self.n_features, bool)
        if self.modelled is not None:
            out[:] = True
            out[self.modelled] = False
        return out

    def _constant_entries(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The columns left out of the model (d,), their entries of ``values`` (n, k) and where those differ from
        the column's one training value (n, k; NaN: False)."""
        constant = self._left_out
        entries = values.reshape(len(values), -1)[:, constant]
        value = self.standardizer.center[constant]
        with np.errstate(invalid="ignore"):
            return constant, entries, np.abs(entries - value) > 1e-12 * np.abs(value)

    def unseen_constants(self, inputs: ModelInputs) -> np.ndarray | None:
        """Mask (n, d) of the values in columns left out of the model other than their one training value
        (NaN included): what the networks cannot give back; None when there are none."""
        if self.modelled is None:
            return None
        constant, entries, differs = self._constant_entries(inputs.values)
        out = np.zeros((len(inputs), self.n_features), bool)
        out[:, constant] = differs | np.isnan(entries)
        return out if out.any() else None

    def _constant_nats(self, values: np.ndarray) -> np.ndarray:
        """log p of each value of the columns left out of the model (rule of succession: log (m + 1)/(m + 2) for
        the training value, −log (m + 2) for another), 0 elsewhere and where missing; (n, d)."""
        out = np.zeros((len(values), self.n_features))
        if self.modelled is not None:
            constant, entries, differs = self._constant_entries(values)
            m = self.constant_rows.astype(np.float64)
            nats = np.where(differs, -np.log(m + 2), np.log1p(-1 / (m + 2)))
            out[:, constant] = np.where(np.isnan(entries), 0.0, nats)
        return out

    def encode(self, X: Any, condition: Any = None) -> ModelInputs:
        """:meth:`validate` then :meth:`to_model`: user input as the networks see it."""
        return self.to_model(self.validate(X), condition)

    def condition_tensor(self, condition: Any, n_rows: int) -> torch.Tensor | None:
        """The codes (n_rows, width) of a conditional model's ``condition``; None for other models."""
        if self.condition_encoder is None:
            if condition is not None:
                raise ValueError("this model was fitted without conditions (conditional=False): it takes no condition")
            return None
        if condition is None:
            raise ValueError(
                "this model is conditional (conditional=True): pass condition= with one condition per sample, "
                "or one condition for all"
            )
        return torch.from_numpy(self.condition_encoder.transform(condition, n_rows))

    def row_nats(self, inputs: ModelInputs) -> np.ndarray:
        """Per-row nats added to a model-space log-density to give the data's: the standardiser's log-Jacobian
        over the observed entries, the columns left out of the model (:meth:`_constant_nats`), less
        :data:`IMPOSSIBLE_VALUE_NATS` per impossible value. Shape (n,)."""
        n = len(inputs)
        if self.standardizer is None:
            nats = np.zeros(n)
        else:
            observed = None if inputs.mask is None else self._all_columns(inputs.mask.numpy().reshape(n, -1), True)
            nats = self.standardizer.log_jacobian_rows(observed, n)  # the columns left out: scale 1, 0 nats
            nats = nats + self._constant_nats(inputs.values).sum(axis=1)
        if inputs.impossible is not None:
            nats = nats - IMPOSSIBLE_VALUE_NATS * inputs.impossible.sum(axis=1)
        return nats

    def impossible_message(self, inputs: ModelInputs) -> str | None:
        """One message on the impossible values of ``inputs`` (how many, where, the first); None if there are none."""
        impossible = inputs.impossible
        if impossible is None:
            return None
        row, col = (int(i) for i in np.argwhere(impossible)[0])
        value = float(inputs.values.reshape(len(inputs), -1)[row, col])
        if self.images:
            c, y, x = np.unravel_index(col, _chw(self.image_shape))
            first = f"image {row}, pixel (channel {c}, row {y}, column {x}) holds {value:g}"
            where = "off the pixel levels"
        else:
            count = impossible.sum(axis=0)
            first = f"row {row}, column {self.column_name(col)} holds {value:g}"
            columns = ", ".join(f"{self.column_name(j)} ({int(count[j])})" for j in np.flatnonzero(count)[:5])
            where = f"off their column's lattice or outside its bounds: {columns}"
        return (
            f"{int(impossible.sum())} value(s) are impossible under the model, {where}; first: {first}. Each is "
            f"scored as the nearest lattice point (or level), {IMPOSSIBLE_VALUE_NATS:g} nats less likely "
            "(column_types_ lists each column's lattice; discrete_columns changes it)"
        )

    def feature_shares(self, shares: np.ndarray, inputs: ModelInputs, index: Any = None) -> Any:
        """Model-space per-element log-likelihood shares (n, *event_shape) of ``inputs`` in the data's units and
        form.

        Adds each continuous column's log-Jacobian and the columns left out of the model, and
        charges an impossible value's :data:`IMPOSSIBLE_VALUE_NATS` to its column. A DataFrame
        with the training columns (``index`` for its rows) for a table; an array shaped like
        the images for images.
        """
        impossible = inputs.impossible
        shares = self._all_columns(shares.reshape(len(shares), -1), 0.0)
        if self.modelled is not None:
            shares = shares + self._constant_nats(inputs.values)
        if self.standardizer is not None:
            shares = shares + np.where(self.standardizer.discrete, 0.0, -np.log(self.standardizer.scale))
        if impossible is not None:
            shares = shares - IMPOSSIBLE_VALUE_NATS * impossible
        if self.images:
            return shares.reshape(len(shares), *self.image_shape)
        return pd.DataFrame(shares, columns=self.columns, index=index)

    def from_model(self, x: np.ndarray) -> np.ndarray | pd.DataFrame:
        """Model-space values (n, *event_shape) back in the user's units, dtype and form."""
        st = self.standardizer
        if self.images:
            if self.pixel_levels is not None:
                images = self.pixel_levels.to_values(x)
            else:
                images = st.to_support(st.inverse_transform(x.reshape(len(x), -1))).astype(np.dtype(self.image_dtype))
            return images.reshape(len(x), *self.image_shape)
        if st is not None:
            x = st.to_support(st.inverse_transform(self._all_columns(x, 0.0)))  # 0: the training value
        if self.column_coder is not None:
            frame = self.column_coder.decode(x)
        elif self.feature_names is None:
            return x
        else:
            frame = pd.DataFrame(x, columns=self.columns)
        if st is not None:  # whole-number lattice columns of a table come back as integers
            numeric = np.ones(x.shape[1], bool) if self.column_coder is None else ~self.column_coder.categorical
            for j in np.flatnonzero(st.integer_columns() & numeric):
                if np.isfinite(x[:, j]).all():
                    frame[self.columns[j]] = x[:, j].astype(np.int64)
        return frame

    # -- helpers -------------------------------------------------------------------------
    def _check_names(self, X: Any) -> None:
        """scikit-learn's feature-name rule: the same names in the same order as in fit, or a warning."""
        names = _get_feature_names(X)
        fitted = self.feature_names
        if names is None and fitted is None:
            return
        if fitted is None:
            warnings.warn(f"X has feature names, but {self.owner} was fitted without feature names", stacklevel=2)
            return
        if names is None:
            warnings.warn(
                f"X does not have valid feature names, but {self.owner} was fitted with feature names", stacklevel=2
            )
            return
        if len(names) == len(fitted) and np.all(names == fitted):
            return
        unseen, missing = sorted(set(names) - set(fitted)), sorted(set(fitted) - set(names))
        message = "The feature names should match those that were passed during fit.\n"
        groups = {
            "Feature names unseen at fit time:\n": unseen,
            "Feature names seen at fit time, yet now missing:\n": missing,
        }
        for title, group in groups.items():
            if group:
                message += title + "".join(f"- {name}\n" for name in group[:5]) + ("- ...\n" if len(group) > 5 else "")
        if not unseen and not missing:
            message += "Feature names must be in the same order as they were in fit.\n"
        if unseen and not missing:  # extra columns: scikit-learn's message, and the way out
            message += (
                "Select the training columns with X[model.feature_names_in_] (the command line ignores others).\n"
            )
        raise ValueError(message)

    def _too_far(self, flat: np.ndarray) -> np.ndarray | None:
        """Mask (n, d) of values whose standardised magnitude exceeds :data:`MAX_STANDARDISED`; None if none."""
        if self.standardizer is None:
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            far = np.abs(self.standardizer.transform(flat)) > MAX_STANDARDISED
        far[:, self._left_out] = False  # not standardised: an unseen value of a constant column (_constant_nats)
        return far if far.any() else None

    def _check_values(self, values: np.ndarray) -> None:
        """No infinite value; no row with nothing observed."""
        infinite = np.isinf(values)
        if infinite.any():
            row, col = (int(i) for i in np.argwhere(infinite)[0])
            more = f" ({int(infinite.sum()) - 1} more infinite entries)" if infinite.sum() > 1 else ""
            raise ValueError(
                f"X contains inf at row {row}, column {self.column_name(col)}{more}; "
                "remove infinite values first (NaN marks a missing value)"
            )
        empty = np.isnan(values).all(axis=1)
        if empty.any():
            raise ValueError(
                f"row {int(np.flatnonzero(empty)[0])} has no observed values (all NaN): there is nothing to score"
            )

    def _image_values(self, images: np.ndarray, need: int) -> np.ndarray:
        """Images as float64 (n, C, H, W), at least ``need`` of them, none infinite or wholly missing."""
        if images.dtype != np.bool_ and not _is_numeric_dtype(images.dtype):
            raise ValueError(f"images must hold numbers or booleans, not {images.dtype}")
        if images.shape[0] < need:
            why = "fit needs at least 2" if need > 1 else "nothing to score"
            raise ValueError(f"got {images.shape[0]} image(s); {why}")
        values = images.astype(np.float64).reshape(images.shape[0], *_chw(self.image_shape))
        infinite = np.isinf(values)
        if infinite.any():
            i, c, y, x = (int(v) for v in np.argwhere(infinite)[0])
            raise ValueError(
                f"image {i}, pixel (channel {c}, row {y}, column {x}) is infinite; NaN marks a missing pixel"
            )
        empty = np.isnan(values).reshape(len(values), -1).all(axis=1)
        if empty.any():
            raise ValueError(f"image {int(np.flatnonzero(empty)[0])} has no observed pixels (all NaN)")
        return values


def image_input_shape(X: Any) -> tuple[int, ...] | None:
    """The shape of one image, ``(H, W)`` or ``(C, H, W)``, when ``X`` is a batch of images; None for a table.

    Images are arrays of shape (n, H, W) or (n, C, H, W), or a list of equally shaped 2-D
    or 3-D arrays. Raises ``ValueError`` for images of mixed sizes, more than four
    dimensions, or sides shorter than 2 pixels.
    """
    if isinstance(X, (pd.DataFrame, pd.Series)) or hasattr(X, "tocsr"):
        return None
    if isinstance(X, (list, tuple)) and X and all(hasattr(im, "shape") for im in X):
        shapes = [tuple(np.shape(im)) for im in X]
        if len({len(sh) for sh in shapes}) == 1 and len(shapes[0]) >= 2:
            differs = [i for i, sh in enumerate(shapes) if sh != shapes[0]]
            if differs:
                i = differs[0]
                raise ValueError(
                    f"images of mixed sizes: image 0 has shape {shapes[0]}, image {i} has shape {shapes[i]}; "
                    "resize or pad them to one size first"
                )
            return shapes[0]
        return None
    shape = np.shape(X) if hasattr(X, "shape") else None
    if shape is None:
        try:
            shape = np.shape(np.asarray(X, dtype=object))
        except ValueError:
            return None
    if len(shape) <= 2:
        return None
    if len(shape) > 4:
        raise ValueError(f"images must have shape (n, H, W) or (n, C, H, W); got {len(shape)} dimensions {shape}")
    if len(shape) == 4 and shape[1] > 4 and shape[3] in (1, 3, 4):
        raise ValueError(
            f"images of shape {shape} look channels-last (n, H, W, C); vaeguard reads (n, C, H, W): "
            "pass np.moveaxis(X, -1, 1)"
        )
    if min(shape[-2:]) < 2:
        raise ValueError(f"images must be at least 2×2 pixels; got shape {shape}")
    return tuple(int(v) for v in shape[1:])


def _chw(image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image shape ``(H, W)`` or ``(C, H, W)``."""
    return (1, *image_shape) if len(image_shape) == 2 else tuple(image_shape)  # type: ignore[return-value]


def _is_numeric_dtype(dtype: Any) -> bool:
    return bool(pd.api.types.is_numeric_dtype(dtype)) and not pd.api.types.is_complex_dtype(dtype)
