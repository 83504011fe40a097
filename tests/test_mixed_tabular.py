"""DataFrames with categorical, string and boolean columns: the mixed likelihood."""

import math

import numpy as np
import pandas as pd
import pytest

from vaeguard import VAEAnomalyDetector, load


def make_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    colour = rng.choice(["red", "green", "blue"], size=n, p=[0.5, 0.3, 0.2])
    size = rng.normal(size=n) + (colour == "red") * 3.0  # depends on the category
    flag = rng.random(n) < 0.3
    count = rng.poisson(2 + flag * 4, size=n)
    return pd.DataFrame(
        {
            "size": size,
            "colour": pd.Categorical(colour),
            "flag": flag,
            "count": count,
            "city": rng.choice(["a", "b"], n),
        }
    )


@pytest.fixture(scope="module")
def fitted():
    return VAEAnomalyDetector(random_state=0, epochs=40, n_models=1).fit(make_frame(2000, 0))


def test_columns_are_typed_and_scores_are_finite(fitted):
    coder = fitted.column_coder_
    assert coder.n_categories == [0, 3, 2, 0, 2]
    assert fitted.model_spec_["likelihood"] == "mixed"
    X = make_frame(300, 1)
    scores = fitted.score_samples(X)
    assert np.all(np.isfinite(scores))
    assert list(fitted.feature_scores(X).columns) == list(X.columns)


def test_categorical_columns_are_probability_masses(fitted):
    # the masses of all levels of 'colour' sum to one for a given row
    row = make_frame(1, 5)
    shares = []
    for colour in ["red", "green", "blue"]:
        r = row.copy()
        r["colour"] = pd.Categorical([colour], categories=["blue", "green", "red"])
        r.loc[:, "size"] = np.nan  # score the categorical column alone (plus the others, held fixed)
        shares.append(fitted.log_likelihood(r, n_samples=2000)[0])
    # log p(colour, flag, count, city) summed over colours = log p(flag, count, city)
    rest = row.drop(columns=[]).copy()
    rest.loc[:, ["size"]] = np.nan
    rest["colour"] = pd.Categorical([None], categories=["blue", "green", "red"])
    marginal = fitted.log_likelihood(rest, n_samples=2000)[0]
    assert np.logaddexp.reduce(shares) == pytest.approx(marginal, abs=0.05)


def test_an_unlikely_category_lowers_the_score(fitted):
    X = make_frame(400, 2)
    typical = X[(X.colour == "red")].head(50).copy()
    odd = typical.copy()
    odd["colour"] = pd.Categorical(["blue"] * len(odd), categories=["blue", "green", "red"])  # red rows are large
    assert np.mean(fitted.score_samples(odd) < fitted.score_samples(typical)) > 0.9


def test_unknown_categories(fitted):
    X = make_frame(5, 3)
    X["city"] = ["a", "b", "zurich", "a", "b"]
    with pytest.raises(ValueError, match=r"column 'city', row 2: category 'zurich' was not seen in training"):
        fitted.score_samples(X)
    lenient = VAEAnomalyDetector(random_state=0, epochs=3, handle_unknown="ignore").fit(make_frame(200, 0))
    assert np.all(np.isfinite(lenient.score_samples(X)))


def test_save_load_and_sample_keep_the_categories(fitted, tmp_path):
    X = make_frame(50, 4)
    fitted.save(tmp_path / "m.h5")
    again = load(tmp_path / "m.h5")
    np.testing.assert_array_equal(again.score_samples(X), fitted.score_samples(X))
    draws = fitted.sample(200, random_state=0)
    assert isinstance(draws, pd.DataFrame) and set(draws["colour"].unique()) <= {"red", "green", "blue"}
    assert set(draws["flag"].astype(str).unique()) <= {"False", "True"}
    assert (draws["count"] == draws["count"].round()).all()


def test_bad_frames(fitted):
    with pytest.raises(ValueError, match="holds a dict at row 1"):
        VAEAnomalyDetector(epochs=1).fit(pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": ["x", {"k": 1}, "y"]}))
    with pytest.raises(ValueError, match="pass a DataFrame"):
        fitted.score_samples(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="likelihood 'auto' .* 'diag_gaussian' or 'mixed'"):
        VAEAnomalyDetector(likelihood="gaussian", epochs=1).fit(make_frame(50, 0))
    assert math.isfinite(fitted.offset_)


def test_a_numeric_column_with_a_stray_text_cell_stays_numeric():
    # One "n/a" among 600 numbers used to make the column categorical (600 categories) and
    # scoring then refused every new number. It is a numeric column with one missing cell.
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=600), "y": rng.normal(size=600)})
    frame["x"] = frame["x"].astype(object)
    frame.loc[17, "x"] = "n/a"
    with pytest.warns(UserWarning, match=r"column 'x': 1 cell\(s\) are not numbers \(first: row 17, 'n/a'\)"):
        det = VAEAnomalyDetector(random_state=0, epochs=5, n_models=1).fit(frame)
    assert not det.column_coder_.categorical.any()
    unseen = pd.DataFrame({"x": [0.123456, 40.0], "y": [0.0, 0.0]})
    scores = det.score_samples(unseen)
    assert np.isfinite(scores).all() and scores[1] < scores[0] - 100  # 40 σ out is far less likely
    # the same model as on the clean numbers with that cell missing
    clean = frame.assign(x=pd.to_numeric(frame["x"], errors="coerce"))
    reference = VAEAnomalyDetector(random_state=0, epochs=5, n_models=1).fit(clean)
    np.testing.assert_allclose(det.score_samples(unseen), reference.score_samples(unseen), rtol=1e-12)


def test_a_text_column_with_some_numbers_stays_categorical():
    words = pd.Series(["red", "green", "3", "blue"] * 50)
    frame = pd.DataFrame({"x": np.arange(200.0), "colour": words})
    det = VAEAnomalyDetector(random_state=0, epochs=2, n_models=1).fit(frame)
    assert det.column_coder_.vocabularies[1] == ["3", "blue", "green", "red"]
