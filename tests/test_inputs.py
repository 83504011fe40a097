"""The input space: one place that checks data, the same answer whether a table is checked strictly (the API)
or row by row (the command line and Dask), and scikit-learn's own feature-name rule."""

import ast
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.ensemble import IsolationForest

from vaeguard import VAEAnomalyDetector
from vaeguard.inputs import ModelInputs

FAST = dict(epochs=3, hidden_dims=[16], latent_dim=2, n_importance_samples=8, random_state=0, device="cpu")


@pytest.fixture(scope="module")
def mixed():
    """A fitted model of a table with a lattice column, a categorical column and missing values."""
    rng = np.random.default_rng(0)
    n = 300
    frame = pd.DataFrame(
        {
            "size": rng.normal(10.0, 2.0, n),
            "count": rng.poisson(4.0, n).astype(float),
            "kind": rng.choice(["a", "b", "c"], n),
        }
    )
    frame.loc[rng.choice(n, 20, replace=False), "size"] = np.nan
    det = VAEAnomalyDetector(**FAST).fit(frame)
    return det, frame


def test_rows_checked_one_by_one_reach_the_model_as_the_strict_check_sends_them(mixed):
    det, frame = mixed
    chunk = frame.iloc[:60].copy()
    chunk["size"] = chunk["size"].astype(object)
    chunk.loc[chunk.index[3], "size"] = "oops"  # not a number
    chunk.loc[chunk.index[7], "count"] = np.inf
    chunk.loc[chunk.index[11], "kind"] = "never seen"
    chunk.loc[chunk.index[13], ["size", "count", "kind"]] = [np.nan, np.nan, None]  # nothing observed
    checked = det.input_space_.check_rows(chunk)
    assert np.flatnonzero(checked.bad).tolist() == [3, 7, 11, 13]
    assert [(row, column, why) for row, column, _, why in checked.problems] == [
        (3, "size", "not a number"),
        (7, "count", "infinite"),
        (11, "kind", "a category never seen in training"),
        (13, "", "has no observed values (all missing)"),
    ]
    strict = det.to_model_space(frame.iloc[:60].drop(index=frame.index[[3, 7, 11, 13]]))
    assert torch.equal(checked.inputs.x, strict.x)
    assert torch.equal(checked.inputs.mask, strict.mask)
    np.testing.assert_array_equal(checked.inputs.values, strict.values)
    # a ModelInputs is scored as the rows it came from
    np.testing.assert_array_equal(det.score_samples(checked.inputs), det.score_samples(strict))


def test_a_chunk_of_bad_rows_only_has_nothing_to_score(mixed):
    det, frame = mixed
    chunk = frame.iloc[:2].copy()
    chunk["count"] = np.inf
    checked = det.input_space_.check_rows(chunk)
    assert checked.bad.all() and checked.inputs is None


def test_the_feature_name_rule_is_scikit_learns():
    """The messages and warnings for changed, reordered or absent names are those scikit-learn's own
    estimators give (IsolationForest as the reference), with the estimator's name."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.normal(size=(200, 3)), columns=["a", "b", "c"])
    ours = VAEAnomalyDetector(**FAST).fit(frame)
    reference = IsolationForest(n_estimators=5, random_state=0).fit(frame)
    cases = [
        frame[["c", "b", "a"]],  # reordered
        frame.rename(columns={"a": "z"}),  # renamed
    ]
    for case in cases:
        with pytest.raises(ValueError) as theirs:
            reference.score_samples(case)
        with pytest.raises(ValueError) as mine:
            ours.score_samples(case)
        assert str(mine.value) == str(theirs.value)
    for case, fitted in ((frame.to_numpy(), frame), (frame, frame.to_numpy())):
        ours = VAEAnomalyDetector(**FAST).fit(fitted)
        reference = IsolationForest(n_estimators=5, random_state=0).fit(fitted)
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            reference.score_samples(case)
        with warnings.catch_warnings(record=True) as mine:
            warnings.simplefilter("always")
            ours.score_samples(case)
        expected = [str(w.message).replace("IsolationForest", "VAEAnomalyDetector") for w in theirs]
        assert [str(w.message) for w in mine] == expected and expected


def test_model_space_values_come_back_in_the_data_units(mixed):
    det, frame = mixed
    inputs = det.to_model_space(frame.iloc[:50].dropna())
    back = det.from_model_space(inputs.x.numpy())
    np.testing.assert_allclose(back["size"].to_numpy(), frame.iloc[:50].dropna()["size"].to_numpy(), rtol=1e-12)
    np.testing.assert_array_equal(back["count"].to_numpy(), frame.iloc[:50].dropna()["count"].to_numpy())
    assert back["kind"].astype(str).tolist() == frame.iloc[:50].dropna()["kind"].tolist()


def test_selected_rows_of_model_inputs_are_those_rows(mixed):
    det, frame = mixed
    inputs = det.to_model_space(frame.iloc[:30])
    part = inputs.rows(np.array([4, 0, 9]))
    assert isinstance(part, ModelInputs) and len(part) == 3
    assert torch.equal(part.x, inputs.x[[4, 0, 9]])
    np.testing.assert_array_equal(part.values, inputs.values[[4, 0, 9]])
    assert (part.mask is None) == (inputs.mask is None)


def test_a_model_inputs_object_carries_its_conditions():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(200, 3)), rng.choice(["u", "v"], 200)
    det = VAEAnomalyDetector(**FAST, conditional=True).fit(X, y)
    inputs = det.to_model_space(X[:10], condition=y[:10])
    np.testing.assert_array_equal(det.score_samples(inputs), det.score_samples(X[:10], condition=y[:10]))
    with pytest.raises(ValueError, match="carry their conditions"):
        det.score_samples(inputs, condition=y[:10])


def test_only_the_input_space_reads_user_arrays():
    """Data is validated in one module: no other module of the package calls scikit-learn's validators."""
    package = Path(__file__).resolve().parents[1] / "vaeguard"
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "inputs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id in ("check_array", "validate_data", "check_X_y"):
                offenders.append(f"{path.name}:{node.lineno} {node.id}")
    assert not offenders, offenders
