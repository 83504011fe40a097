"""The input space: one place that checks data, the same answer whether a table is checked strictly (the API)
or row by row (the command line and Dask), and scikit-learn's own feature-name rule."""

import ast
import math
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


def _with_a_constant_column(X: np.ndarray, at: int, value: float) -> np.ndarray:
    return np.insert(X, at, value, axis=1)


def test_a_column_constant_in_training_stays_out_of_the_networks_and_costs_the_same_for_every_row():
    """The model of a table with a constant column is the model of the table without it, to the bit, and the
    column adds log (m + 1)/(m + 2) to every row that holds its value (m = 240 training rows; as a density with
    a collapsing σ it had added a different few nats to each row: noise in the ranking, optdigits 0.84 → 0.92
    AUROC without it)."""
    rng = np.random.default_rng(3)
    X = np.column_stack([rng.normal(size=240), rng.poisson(3.0, 240), rng.normal(size=240)])
    with_constant = _with_a_constant_column(X, 1, 2.5)
    params = {**FAST, "epochs": 5}
    alone = VAEAnomalyDetector(**params).fit(X)
    det = VAEAnomalyDetector(**params).fit(with_constant)
    assert det.column_types_["kind"].tolist() == ["continuous", "constant", "lattice", "continuous"]
    assert det.model_.likelihood.event_shape == (3,) and det.n_features_in_ == 4
    same = math.log(241 / 242)
    np.testing.assert_allclose(det.score_samples(with_constant), alone.score_samples(X) + same, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(det.transform(with_constant), alone.transform(X))
    shares = det.feature_scores(with_constant[:5])
    assert (shares.iloc[:, 1] == 0).all()  # as in every training row
    others = shares.drop(columns=shares.columns[1]).to_numpy()  # the same sums in another order: float64 rounding
    np.testing.assert_allclose(others, alone.feature_scores(X[:5]), rtol=0, atol=1e-12)
    # bits per dimension count the column
    bits = 3 * alone.bits_per_dim(X[:5]) - same / math.log(2)
    np.testing.assert_allclose(4 * det.bits_per_dim(with_constant[:5]), bits, rtol=1e-12)
    samples = det.sample(50, random_state=0)
    assert (samples[:, 1] == 2.5).all()


def test_another_value_in_a_constant_column_costs_log_m_plus_one_nats_whatever_it_is(tmp_path):
    """Laplace's rule of succession: after m rows that held 0, P(0) = (m + 1)/(m + 2) and P(another) = 1/(m + 2);
    m counts the rows that observed the column."""
    from vaeguard.persistence import load

    rng = np.random.default_rng(4)
    frame = pd.DataFrame({"a": rng.normal(size=200), "flag": np.zeros(200), "b": rng.normal(size=200)})
    frame.loc[frame.index[:10], "flag"] = np.nan  # m = 190
    det = VAEAnomalyDetector(**FAST).fit(frame)
    assert det.input_space_.modelled.tolist() == [0, 2] and det.input_space_.constant_rows.tolist() == [190]
    rows = frame.iloc[10:13].copy()
    other = rows.assign(flag=[0.0, 1.0, 1e300])  # 1e300 is not "too far": the column is not scaled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # possible values: no warning
        scores = det.score_samples(other)
    np.testing.assert_allclose(scores, det.score_samples(rows) - math.log(191) * np.array([0, 1, 1]), atol=1e-9)
    assert det.feature_scores(other)["flag"].tolist() == pytest.approx([0, -math.log(191), -math.log(191)])
    missing = rows.assign(flag=np.nan)  # a missing value of the column: the marginal of the rest
    np.testing.assert_allclose(det.score_samples(missing), det.score_samples(rows) - math.log(191 / 192), atol=1e-9)
    with pytest.raises(ValueError, match="row 0 has values only in columns that held one value"):
        det.score_samples(pd.DataFrame({"a": [np.nan], "flag": [0.0], "b": [np.nan]}))
    checked = det.input_space_.check_rows(pd.DataFrame({"a": [np.nan, 1.0], "flag": [0.0, 0.0], "b": [np.nan, 0.5]}))
    assert checked.bad.tolist() == [True, False] and "nothing to score" in checked.problems[0][3]
    det.save(tmp_path / "m.h5")
    back = load(tmp_path / "m.h5")
    assert back.input_space_.modelled.tolist() == [0, 2] and back.input_space_.constant_rows.tolist() == [190]
    np.testing.assert_array_equal(back.score_samples(other), scores)
