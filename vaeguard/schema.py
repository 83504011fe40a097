"""The model file's schema: what its configuration and preprocessing arrays may hold, checked before anything
is built from them (issue 17).

A model file's SHA-256 shows that it is intact, not that whoever wrote it meant well: a
crafted file recomputes it. :func:`check_model_file` therefore checks the configuration's
types, ranges and keys (unknown keys are refused), that every number is finite where a
number must be, that the sizes it declares agree with each other and stay within
:data:`LIMITS`, and that the preprocessing arrays have the shapes and values the
configuration implies. Each problem is one ``ValueError`` naming the field, e.g.
``fitted.offset_: must be a finite number, got nan``. The network's weights are checked
against the network's shapes by the detector (built without memory first, on PyTorch's
``meta`` device).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.utils._param_validation import InvalidParameterError, validate_parameter_constraints

from vaeguard.conditions import ConditionEncoder
from vaeguard.preprocessing import PixelLevels
from vaeguard.training import TRAINING_PRECISIONS

#: Bounds on what a model file may declare (far beyond any model vaeguard fits; a guard against crafted files).
LIMITS = {
    "n_features": 10_000_000,
    "latent_dim": 4096,
    "width": 65_536,
    "depth": 64,
    "models": 64,
    "condition_dim": 100_000,
    "importance_samples": 1_000_000,
    "window": 1_000_000,
    "channels": 100_000,
    "categories": 1_000_000,
}

_TABLE_KEYS = {"estimator", "params", "model", "fitted"}
_SERIES_KEYS = {"estimator", "params", "fitted", "window_model"}
_SPEC_REQUIRED = {"encoder", "likelihood", "likelihood_options", "latent_dim", "hidden_dims", "n_features"}
_SPEC_OPTIONAL = {"event_shape", "mask_input", "condition_dim"}
_FITTED_REQUIRED = {
    *("offset_", "threshold_rule_", "score_seed_", "latent_dim_", "n_features_in_", "best_epoch", "stopped_early")
}
_FITTED_OPTIONAL = {
    *("column_coder_", "feature_names_in_", "image_shape_", "image_dtype_", "pixel_levels_", "column_types_"),
    *("condition_encoder_", "active_units_", "n_models_", "probe_thresholds_", "search_floors_"),
    "modelled_columns_",
    "constant_rows_",
    "training_precision_",
}
#: The kinds a table's column may have (``column_types_``).
COLUMN_KINDS = ("continuous", "lattice", "constant", "categorical")
#: The largest probe threshold a model file may declare (nats; fitted ones are a few nats).
MAX_PROBE_THRESHOLD = 1e6
_THRESHOLD_RULES = {"offset": {"offset"}, "contamination": {"contamination"}, "fpr": {"fpr", "n_normal_rows"}}


class SchemaError(ValueError):
    """A model file's configuration or arrays break the schema; the message names the field."""


def _fail(field: str, problem: str) -> SchemaError:
    return SchemaError(f"{field}: {problem}")


def _mapping(value: Any, field: str, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(field or "the configuration", f"must be a JSON object, got {type(value).__name__}")
    where = f"{field}." if field else ""
    missing = sorted(required - set(value))
    if missing:
        raise _fail(f"{where}{missing[0]}", "is missing")
    unknown = sorted(set(value) - required - set(optional))
    if unknown:
        raise _fail(f"{where}{unknown[0]}", "is not a known entry")
    return value


def _integer(value: Any, field: str, low: int, high: int | None = None) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise _fail(field, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise _fail(field, f"must be in [{low}, {high if high is not None else '∞'}], got {value}")
    return int(value)


def _number(value: Any, field: str, *, positive: bool = False) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise _fail(field, f"must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise _fail(field, f"must be positive, got {value!r}")
    return float(value)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _fail(field, f"must be text, got {value!r}")
    return value


def _boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, f"must be true or false, got {value!r}")
    return value


def _sequence(value: Any, field: str, length: int | None = None, max_length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(field, f"must be a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise _fail(field, f"must have {length} entries, got {len(value)}")
    if max_length is not None and len(value) > max_length:
        raise _fail(field, f"may have at most {max_length} entries, got {len(value)}")
    return value


def check_params(estimator: type, params: Any, field: str = "params") -> None:
    """A detector's constructor arguments: known names, values its constraints accept, finite numbers, and
    true/false only where the default is."""
    defaults = estimator().get_params(deep=False)
    _mapping(params, field, set(), set(defaults))
    for name, value in params.items():
        if isinstance(value, bool) and not isinstance(defaults[name], bool):
            raise _fail(f"{field}.{name}", f"must not be {value} (a boolean where the parameter takes another type)")
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(f"{field}.{name}", f"must be a finite number, got {value!r}")
    constraints = {k: v for k, v in getattr(estimator, "_parameter_constraints", {}).items() if k in params}
    try:
        validate_parameter_constraints(constraints, params, caller_name=estimator.__name__)
    except InvalidParameterError as exc:
        raise _fail(field, str(exc)) from None
    hidden = params.get("hidden_dims", "auto")
    if hidden != "auto" and hidden is not None:
        widths = _sequence(list(hidden) if isinstance(hidden, tuple) else hidden, f"{field}.hidden_dims")
        if len(widths) > LIMITS["depth"]:
            raise _fail(f"{field}.hidden_dims", f"may have at most {LIMITS['depth']} entries")
        for i, width in enumerate(widths):
            _integer(width, f"{field}.hidden_dims[{i}]", 1, LIMITS["width"])
    bounded = {"latent_dim": "latent_dim", "n_importance_samples": "importance_samples", "n_models": "models"}
    for name, limit in bounded.items():
        value = params.get(name)
        if value is not None and not isinstance(value, str):  # "auto" is checked by the constraints above
            _integer(value, f"{field}.{name}", 1, LIMITS[limit])


def _check_spec(spec: Any, field: str) -> dict[str, Any]:
    _mapping(spec, field, _SPEC_REQUIRED, _SPEC_OPTIONAL)
    _text(spec["encoder"], f"{field}.encoder")
    _text(spec["likelihood"], f"{field}.likelihood")
    _mapping(spec["likelihood_options"], f"{field}.likelihood_options", set(), set(spec["likelihood_options"]))
    _integer(spec["latent_dim"], f"{field}.latent_dim", 1, LIMITS["latent_dim"])
    n = _integer(spec["n_features"], f"{field}.n_features", 1, LIMITS["n_features"])
    if spec["hidden_dims"] is not None:
        hidden = _sequence(spec["hidden_dims"], f"{field}.hidden_dims", max_length=LIMITS["depth"])
        if not hidden:
            raise _fail(f"{field}.hidden_dims", "must be null or a non-empty list")
        for i, width in enumerate(hidden):
            _integer(width, f"{field}.hidden_dims[{i}]", 1, LIMITS["width"])
    if spec.get("event_shape") is not None:
        shape = _sequence(spec["event_shape"], f"{field}.event_shape", max_length=3)
        if not shape:
            raise _fail(f"{field}.event_shape", "must not be empty")
        for i, side in enumerate(shape):
            _integer(side, f"{field}.event_shape[{i}]", 1, LIMITS["n_features"])
        if math.prod(shape) != n:
            raise _fail(f"{field}.event_shape", f"holds {math.prod(shape)} elements but n_features is {n}")
    if "mask_input" in spec:
        _boolean(spec["mask_input"], f"{field}.mask_input")
    if "condition_dim" in spec:
        _integer(spec["condition_dim"], f"{field}.condition_dim", 0, LIMITS["condition_dim"])
    for key, value in spec["likelihood_options"].items():
        _check_option(value, f"{field}.likelihood_options.{key}", n)
    return spec


def _check_option(value: Any, field: str, n_features: int) -> None:
    """A likelihood option: a finite number, text, a boolean, null, or a list of them no longer than the sample."""
    if isinstance(value, list):
        _sequence(value, field, max_length=max(n_features, LIMITS["categories"]))
        for i, item in enumerate(value):
            if isinstance(item, list):
                raise _fail(f"{field}[{i}]", "nested lists are not likelihood options")
            _check_option(item, f"{field}[{i}]", n_features)
    elif isinstance(value, dict):
        raise _fail(field, "objects are not likelihood options")
    elif isinstance(value, Real) and not isinstance(value, bool):
        _number(value, field)


def _check_fitted(fitted: Any, spec: dict[str, Any], arrays: dict[str, np.ndarray], field: str = "fitted") -> None:
    _mapping(fitted, field, _FITTED_REQUIRED, _FITTED_OPTIONAL)
    _number(fitted["offset_"], f"{field}.offset_")
    rule = fitted["threshold_rule_"]
    _mapping(rule, f"{field}.threshold_rule_", {"rule"}, {key for keys in _THRESHOLD_RULES.values() for key in keys})
    if not isinstance(rule["rule"], str) or rule["rule"] not in _THRESHOLD_RULES:
        known = ", ".join(_THRESHOLD_RULES)
        raise _fail(f"{field}.threshold_rule_.rule", f"must be one of {known}, got {rule['rule']!r}")
    _mapping(rule, f"{field}.threshold_rule_", {"rule", *_THRESHOLD_RULES[rule["rule"]]})
    for key in _THRESHOLD_RULES[rule["rule"]]:
        value = _number(rule[key], f"{field}.threshold_rule_.{key}")
        if key in ("contamination", "fpr") and not 0 < value < 1:
            raise _fail(f"{field}.threshold_rule_.{key}", f"must be in (0, 1), got {value!r}")
        if key == "n_normal_rows" and (value < 1 or value != int(value)):
            raise _fail(f"{field}.threshold_rule_.{key}", f"must be a whole number ≥ 1, got {value!r}")
    _integer(fitted["score_seed_"], f"{field}.score_seed_", 0, 2**32 - 1)
    if _integer(fitted["latent_dim_"], f"{field}.latent_dim_", 1) != spec["latent_dim"]:
        raise _fail(
            f"{field}.latent_dim_", f"is {fitted['latent_dim_']}; the network's latent_dim is {spec['latent_dim']}"
        )
    n = _integer(fitted["n_features_in_"], f"{field}.n_features_in_", 1, LIMITS["n_features"])
    modelled = fitted.get("modelled_columns_")
    if modelled is None and n != spec["n_features"]:
        raise _fail(f"{field}.n_features_in_", f"is {n} but the network reads {spec['n_features']} features")
    if modelled is not None:  # the columns the network reads; the others held one value in their training rows
        where = f"{field}.modelled_columns_"
        columns = [_integer(j, f"{where}[{i}]", 0, n - 1) for i, j in enumerate(_sequence(modelled, where))]
        if len(columns) != spec["n_features"] or any(b <= a for a, b in itertools.pairwise(columns)):
            raise _fail(where, f"must list the {spec['n_features']} columns the network reads, in increasing order")
    if (modelled is None) != (fitted.get("constant_rows_") is None):
        raise _fail(f"{field}.constant_rows_", "comes with modelled_columns_ and only with it")
    if modelled is not None:
        where = f"{field}.constant_rows_"
        for i, m in enumerate(_sequence(fitted["constant_rows_"], where, length=n - len(columns))):
            _integer(m, f"{where}[{i}]", 1, 2**53)
    precision = fitted.get("training_precision_", "float32")
    if not isinstance(precision, str) or precision not in TRAINING_PRECISIONS:
        known = ", ".join(TRAINING_PRECISIONS)
        raise _fail(f"{field}.training_precision_", f"must be one of {known}, got {precision!r}")
    _integer(fitted["best_epoch"], f"{field}.best_epoch", -1)
    _boolean(fitted["stopped_early"], f"{field}.stopped_early")
    if fitted.get("n_models_") is not None:
        _integer(fitted["n_models_"], f"{field}.n_models_", 1, LIMITS["models"])
    if fitted.get("active_units_") is not None:
        _integer(fitted["active_units_"], f"{field}.active_units_", 0, spec["latent_dim"])
    names = fitted.get("feature_names_in_")
    if names is not None:
        for i, name in enumerate(_sequence(names, f"{field}.feature_names_in_", length=n)):
            _text(name, f"{field}.feature_names_in_[{i}]")
    shape = fitted.get("image_shape_")
    if shape is not None:
        sides = _sequence(shape, f"{field}.image_shape_")
        if len(sides) not in (2, 3):
            raise _fail(f"{field}.image_shape_", f"must be (H, W) or (C, H, W), got {sides}")
        for i, side in enumerate(sides):
            _integer(side, f"{field}.image_shape_[{i}]", 1 if i == 0 and len(sides) == 3 else 2, LIMITS["n_features"])
        if math.prod(sides) != n:
            raise _fail(f"{field}.image_shape_", f"holds {math.prod(sides)} pixels but n_features_in_ is {n}")
    dtype = fitted.get("image_dtype_")
    if dtype is not None:
        try:
            kind = np.dtype(_text(dtype, f"{field}.image_dtype_")).kind
        except TypeError:
            kind = "?"
        if kind not in "biuf":
            raise _fail(f"{field}.image_dtype_", f"must be a numeric dtype, got {dtype!r}")
    levels = fitted.get("pixel_levels_")
    if levels is not None:
        keys = {f.name for f in dataclasses.fields(PixelLevels)}
        _mapping(levels, f"{field}.pixel_levels_", keys)
        _number(levels["origin"], f"{field}.pixel_levels_.origin")
        _number(levels["step"], f"{field}.pixel_levels_.step", positive=True)
        _integer(levels["n_levels"], f"{field}.pixel_levels_.n_levels", 2, 2**16)
        if np.dtype(_text(levels["dtype"], f"{field}.pixel_levels_.dtype")).kind not in "biuf":
            raise _fail(f"{field}.pixel_levels_.dtype", f"must be a numeric dtype, got {levels['dtype']!r}")
    coder = fitted.get("column_coder_")
    if coder is not None:
        _mapping(coder, f"{field}.column_coder_", {"columns", "vocabularies"})
        for i, name in enumerate(_sequence(coder["columns"], f"{field}.column_coder_.columns", length=n)):
            _text(name, f"{field}.column_coder_.columns[{i}]")
        for i, vocab in enumerate(_sequence(coder["vocabularies"], f"{field}.column_coder_.vocabularies", length=n)):
            if vocab is not None:
                where = f"{field}.column_coder_.vocabularies[{i}]"
                for j, label in enumerate(_sequence(vocab, where, max_length=LIMITS["categories"])):
                    _text(label, f"{where}[{j}]")
    kinds = fitted.get("column_types_")
    if kinds is not None:
        for i, record in enumerate(_sequence(kinds, f"{field}.column_types_", length=n)):
            _mapping(record, f"{field}.column_types_[{i}]", {"kind", "reason"})
            if record["kind"] not in COLUMN_KINDS:
                raise _fail(f"{field}.column_types_[{i}].kind", f"must be one of {', '.join(COLUMN_KINDS)}")
            _text(record["reason"], f"{field}.column_types_[{i}].reason")
    conditions = fitted.get("condition_encoder_")
    if conditions is not None:
        _check_conditions(conditions, f"{field}.condition_encoder_")
    thresholds = fitted.get("probe_thresholds_")
    if isinstance(thresholds, list):
        for i, value in enumerate(thresholds):
            if isinstance(value, Real) and not isinstance(value, bool) and value > MAX_PROBE_THRESHOLD:
                raise _fail(f"{field}.probe_thresholds_[{i}]", f"must be at most {MAX_PROBE_THRESHOLD:g} nats")
    _check_standardizer(arrays, n)
    _check_latent_arrays(arrays, spec["latent_dim"])
    baseline = arrays.get("feature.baseline")
    if baseline is not None and (
        baseline.shape != (n,) or baseline.dtype.kind != "f" or not np.isfinite(baseline).all()
    ):
        raise _fail("arrays/feature.baseline", f"must hold {n} finite floats, got {baseline.dtype} {baseline.shape}")


def _check_latent_arrays(arrays: dict[str, np.ndarray], k: int) -> None:
    """The latent space's summaries: per-dimension variances and KLs (k,) ≥ 0, and the aggregate posterior's
    mixture (weights (m,) ≥ 0 summing to 1, means (m, k), covariances (m, k, k)), all finite."""
    shapes = {"latent.variance": (k,), "latent.kl_per_dimension": (k,)}
    weights = arrays.get("aggregate.weights")
    if any(name.startswith("aggregate.") for name in arrays):
        m = weights.shape[0] if weights is not None and weights.ndim == 1 else -1
        shapes |= {"aggregate.weights": (m,), "aggregate.means": (m, k), "aggregate.covariances": (m, k, k)}
    for name, shape in shapes.items():
        if name not in arrays:
            if name.startswith("aggregate."):
                raise _fail(f"arrays/{name}", "is missing")
            continue
        a = arrays[name]
        if a.shape != shape or a.dtype.kind not in "biuf" or not np.isfinite(a).all():
            raise _fail(f"arrays/{name}", f"must hold finite numbers of shape {shape}, got {a.dtype} {a.shape}")
        if name != "aggregate.means" and name != "aggregate.covariances" and (a < 0).any():
            raise _fail(f"arrays/{name}", "must not be negative")
    if weights is not None and not math.isclose(float(weights.sum()), 1.0, rel_tol=1e-6):
        raise _fail("arrays/aggregate.weights", f"must sum to 1, not {float(weights.sum())!r}")


def _check_conditions(value: Any, field: str) -> None:
    keys = {f.name for f in dataclasses.fields(ConditionEncoder)}
    _mapping(value, field, keys)
    columns = _sequence(value["columns"], f"{field}.columns", max_length=LIMITS["condition_dim"])
    for i, name in enumerate(columns):
        _text(name, f"{field}.columns[{i}]")
    for key in ("labels", "center", "scale"):
        _sequence(value[key], f"{field}.{key}", length=len(columns))
    for i, (labels, center, scale) in enumerate(zip(value["labels"], value["center"], value["scale"], strict=True)):
        if labels is None:
            _number(center, f"{field}.center[{i}]")
            _number(scale, f"{field}.scale[{i}]", positive=True)
        else:
            for j, label in enumerate(_sequence(labels, f"{field}.labels[{i}]", max_length=LIMITS["categories"])):
                _text(label, f"{field}.labels[{i}][{j}]")


def _check_standardizer(arrays: dict[str, np.ndarray], n: int) -> None:
    """The standardiser's arrays: one value per feature; finite centres, positive finite scales, lattice steps
    ≥ 0 with finite origins, lower and upper bounds finite or NaN (no bound)."""
    names = {k for k in arrays if k.startswith("standardizer.")}
    if not names:
        return
    known = {f"standardizer.{k}" for k in ("center", "scale", "origin", "step", "lower", "upper")}
    unknown = sorted(names - known)
    if unknown:
        raise _fail(f"arrays/{unknown[0]}", "is not a known array")
    for key in ("center", "scale"):
        if f"standardizer.{key}" not in names:
            raise _fail(f"arrays/standardizer.{key}", "is missing")
    if ("standardizer.origin" in names) != ("standardizer.step" in names):
        raise _fail("arrays/standardizer.step", "origin and step come together")
    for name in sorted(names):
        a = arrays[name]
        if a.shape != (n,) or a.dtype.kind not in "biuf":
            raise _fail(f"arrays/{name}", f"must hold {n} numbers, got dtype {a.dtype} and shape {a.shape}")
        values = a.astype(np.float64)
        short = name.split(".", 1)[1]
        if short in ("lower", "upper"):
            bad = np.isinf(values)
        elif short in ("scale",):
            bad = ~np.isfinite(values) | (values <= 0)
        elif short == "step":
            bad = ~np.isfinite(values) | (values < 0)
        else:
            bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = "positive and finite" if short == "scale" else "≥ 0 and finite" if short == "step" else "finite"
            what = "finite or NaN (no bound)" if short in ("lower", "upper") else what
            raise _fail(f"arrays/{name}", f"entry {i} is {values[i]!r}; it must be {what}")


def check_model_file(config: Any, arrays: dict[str, np.ndarray], detectors: dict[str, type]) -> None:
    """Check a model file's verified contents against the schema (see the module); ``detectors`` maps the
    stored estimator names to their classes. Raises :class:`SchemaError` naming the first field at fault."""
    if not isinstance(config, dict):
        raise _fail("the configuration", f"must be a JSON object, got {type(config).__name__}")
    name = config.get("estimator")
    if not isinstance(name, str) or name not in detectors:
        raise _fail("estimator", f"is {name!r}; known: {', '.join(detectors)}")
    if "window_model" in config or name != "VAEAnomalyDetector":
        _mapping(config, "", _SERIES_KEYS)
        if name == "VAEAnomalyDetector":
            raise _fail("estimator", "a table detector's file holds no window_model")
        params = dict(config["params"]) if isinstance(config["params"], dict) else config["params"]
        inner = params.pop("estimator", None) if isinstance(params, dict) else None
        if inner is not None:
            check_params(detectors["VAEAnomalyDetector"], inner, "params.estimator")
        check_params(detectors[name], params)
        fitted = _mapping(config["fitted"], "fitted", {"window_", "n_channels_", "offset_"})
        window = _integer(fitted["window_"], "fitted.window_", 1, LIMITS["window"])
        channels = _integer(fitted["n_channels_"], "fitted.n_channels_", 1, LIMITS["channels"])
        _number(fitted["offset_"], "fitted.offset_")
        window_model = config["window_model"]
        if not isinstance(window_model, dict) or window_model.get("estimator") != "VAEAnomalyDetector":
            raise _fail("window_model.estimator", "must be 'VAEAnomalyDetector'")
        _check_table(window_model, arrays, detectors["VAEAnomalyDetector"], "window_model.")
        if window * channels != window_model["fitted"]["n_features_in_"]:
            raise _fail("fitted.window_", f"{window} steps × {channels} channels do not make the window model's input")
        return
    _check_table(config, arrays, detectors[name], "")


def _check_table(config: dict[str, Any], arrays: dict[str, np.ndarray], estimator: type, prefix: str) -> None:
    _mapping(config, prefix.rstrip("."), _TABLE_KEYS)
    check_params(estimator, config["params"], f"{prefix}params")
    spec = _check_spec(config["model"], f"{prefix}model")
    _check_fitted(config["fitted"], spec, arrays, f"{prefix}fitted")
