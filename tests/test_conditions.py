"""Conditional VAEs: the condition coder, and p(x|c) against closed forms on Gaussian clusters."""

import copy
import math

import numpy as np
import pandas as pd
import pytest

from vaeguard import VAEAnomalyDetector, compress, load
from vaeguard.components.encoders import mlp
from vaeguard.conditions import MAX_CONDITION_LABELS, ConditionEncoder

# --- the condition coder ---------------------------------------------------------------------


def test_categories_are_one_hot_and_numbers_standardised():
    y = pd.DataFrame({"shop": ["b", "a", "c", "a"], "open": [True, False, True, True], "temp": [1.0, 3.0, 5.0, 7.0]})
    coder = ConditionEncoder.fit(y, 4)
    assert coder.labels == [["a", "b", "c"], ["False", "True"], None] and coder.width == 6
    c = coder.transform(y, 4)
    np.testing.assert_array_equal(c[:, :5], [[0, 1, 0, 0, 1], [1, 0, 0, 1, 0], [0, 0, 1, 0, 1], [1, 0, 0, 0, 1]])
    np.testing.assert_allclose(c[:, 5], (y["temp"] - 4.0) / np.std([1.0, 3.0, 5.0, 7.0]))
    # one condition for every row, given as a one-row frame
    shared = coder.transform(y.iloc[[2]], 3)
    assert shared.shape == (3, 6) and (shared == c[2]).all()
    # columns by name (others ignored), a Series as one row, arrays by position
    np.testing.assert_array_equal(coder.transform(y.assign(extra=1)[["extra", "temp", "open", "shop"]], 4), c)
    np.testing.assert_array_equal(coder.transform(y.iloc[1], 2), c[[1, 1]])
    np.testing.assert_array_equal(coder.transform(["a", False, 3.0], 1), c[[1]])
    # the stored configuration rebuilds the same coder
    assert ConditionEncoder(**coder.config()).transform(y, 4).tolist() == c.tolist()


def test_integer_labels_are_categories_and_accept_a_scalar():
    coder = ConditionEncoder.fit(np.array([3, 1, 3, 7]), 4)
    assert coder.labels == [["1", "3", "7"]]
    np.testing.assert_array_equal(coder.transform(7, 2), [[0, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(coder.transform([1, 3], 2), [[1, 0, 0], [0, 1, 0]])


def test_bad_conditions_are_refused_naming_the_column_and_row():
    y = pd.DataFrame({"shop": ["a", "b", "a"], "temp": [1.0, 2.0, 3.0]})
    coder = ConditionEncoder.fit(y, 3)
    with pytest.raises(ValueError, match=r"condition column 'shop', row 1: label 'z' was not seen in fit"):
        coder.transform(pd.DataFrame({"shop": ["a", "z"], "temp": [1.0, 1.0]}), 2)
    with pytest.raises(ValueError, match=r"condition column 'temp', row 0: the value is missing"):
        coder.transform(pd.DataFrame({"shop": ["a"], "temp": [np.nan]}), 1)
    with pytest.raises(ValueError, match="the conditions have 2 rows and the data 5"):
        coder.transform(y.iloc[:2], 5)
    with pytest.raises(ValueError, match=r"lack column\(s\) \['temp'\]; the model was fitted on \['shop', 'temp'\]"):
        coder.transform(y[["shop"]], 3)
    with pytest.raises(ValueError, match=r"shape \(3, 3\); the model was fitted on 2 column\(s\)"):
        coder.transform(np.zeros((3, 3)), 3)
    with pytest.raises(ValueError, match="condition column 'shop', row 2: the value is missing"):
        ConditionEncoder.fit(pd.DataFrame({"shop": ["a", "b", None]}), 3)
    with pytest.raises(ValueError, match="y has 3 conditions and X 4 rows"):
        ConditionEncoder.fit(y, 4)
    with pytest.raises(ValueError, match="pass a numeric condition as floating point"):
        ConditionEncoder.fit(np.arange(MAX_CONDITION_LABELS + 1), MAX_CONDITION_LABELS + 1)
    with pytest.raises(ValueError, match="row 1: inf is not finite"):
        ConditionEncoder.fit(np.array([1.0, np.inf]), 2)


# --- a conditional VAE on Gaussian clusters sharing a plane: x | c ~ N(m_c + A s, σ²I), s ~ N(0, I₂) ---------------

K, D, NOISE = 4, 5, 0.2
LOADINGS = np.random.default_rng(1).normal(size=(D, 2))


def clusters(n: int, seed: int):
    """(centres m (K, D), labels (n,), styles s (n, 2), rows x (n, D)): the style s is shared by every cluster."""
    centers = np.random.default_rng(0).normal(0, 6, size=(K, D))
    rng = np.random.default_rng(seed)
    labels, style = rng.integers(0, K, n), rng.normal(size=(n, 2))
    return centers, labels, style, centers[labels] + style @ LOADINGS.T + NOISE * rng.normal(size=(n, D))


def exact_log_density(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """log N(x; mean, A Aᵀ + σ² I) per row, nats: the closed form of log p(x|c)."""
    cov = LOADINGS @ LOADINGS.T + NOISE**2 * np.eye(D)
    diff = x - mean
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (D * math.log(2 * math.pi) + logdet + np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff))


@pytest.fixture(scope="module")
def conditional():
    """The best of three fits by their own validation loss: one seed in three (seed 2 here) ends in a poor optimum
    (held-out log-likelihood −5.5 against −3.2 nats), and which seed does can change with the CPU's rounding;
    choosing by the model's own held-out loss makes the tests below independent of that (issue 17's audit)."""
    centers, labels, _, X = clusters(2000, 1)
    fits = [
        VAEAnomalyDetector(
            conditional=True, latent_dim=2, epochs=300, trim_fraction=0.0, n_models=1, random_state=seed
        ).fit(X, labels)
        for seed in range(3)
    ]
    return centers, min(fits, key=lambda det: min(det.history_.validation_loss))


def test_conditional_log_likelihood_matches_the_closed_form(conditional):
    """log p(x|c) is a Gaussian's, known exactly; the conditional model's estimate is within 0.25 nats of it."""
    centers, det = conditional
    _, labels, _, X = clusters(1000, 2)
    exact = exact_log_density(X, centers[labels])
    score = np.asarray(det.score_samples(X, condition=labels))
    assert abs(score.mean() - exact.mean()) < 0.25
    assert np.corrcoef(score, exact)[0, 1] > 0.9
    # under another cluster's condition the same rows are far less likely (the clusters are ~8σ apart)
    wrong = np.asarray(det.score_samples(X[:50], condition=(labels[:50] + 1) % K))
    assert (wrong < score[:50] - 10).all()
    # decision_function and predict take the conditions too
    assert (np.asarray(det.predict(X[:50], condition=labels[:50])) == 1).mean() > 0.8


def test_samples_follow_the_condition(conditional):
    centers, det = conditional
    cov = LOADINGS @ LOADINGS.T + NOISE**2 * np.eye(D)
    for c in range(K):
        draws = det.sample(4000, random_state=c, condition=c)
        # the fitted conditional means are off by 0.12–0.15 sd over model seeds (the 4000 draws' own error is
        # 0.02 sd); the clusters are ~6 sd apart, so 0.3 sd still says "near this condition's centre"
        assert np.abs(draws.mean(0) - centers[c]).max() < 0.3 * np.sqrt(cov.diagonal()).max()
        np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.2 * np.abs(cov).max())
    mixed = det.sample(4, random_state=0, condition=[0, 1, 2, 3])
    assert np.argmin(((mixed[:, None] - centers[None]) ** 2).sum(-1), axis=1).tolist() == [0, 1, 2, 3]


def test_the_code_carries_the_style_across_conditions(conditional):
    """x = m_a + A s + noise encoded under a and decoded under b lands near m_b + A s: z holds s, c the rest."""
    centers, det = conditional
    _, labels, style, X = clusters(300, 3)
    target = (labels + 2) % K
    moved = det.inverse_transform(det.transform(X, condition=labels), condition=target)
    error = np.sqrt(((moved - (centers[target] + style @ LOADINGS.T)) ** 2).sum(1))
    spread = np.sqrt(((style @ LOADINGS.T) ** 2).sum(1))  # what a decoder ignoring the style would miss
    assert error.mean() < 0.4 * spread.mean()  # 0.22–0.26 over model seeds
    # moving to another cluster costs little more than reconstructing in place: z does not encode the cluster
    kept = det.reconstruct(X, condition=labels)
    in_place = np.sqrt(((kept - (centers[labels] + style @ LOADINGS.T)) ** 2).sum(1))
    assert error.mean() < 2.0 * in_place.mean()  # 1.35–1.46 over model seeds
    # the latent-space tools take the condition as well
    assert det.traverse(X[0], 0, condition=labels[0]).shape == (5, D)
    assert det.interpolate(X[0], X[1], steps=3, condition=labels[0]).shape == (3, D)
    assert det.reconstruct(X[:4], condition=labels[:4]).shape == (4, D)


def test_conditional_model_file_round_trip(conditional, tmp_path):
    _, det = conditional
    _, labels, _, X = clusters(20, 4)
    det.save(tmp_path / "c.h5")
    back = load(tmp_path / "c.h5")
    assert back.condition_encoder_ == det.condition_encoder_
    np.testing.assert_allclose(back.score_samples(X, condition=labels), det.score_samples(X, condition=labels))


def test_conditions_are_required_and_refused_where_they_do_not_belong(conditional):
    _, det = conditional
    _, labels, _, X = clusters(10, 5)
    with pytest.raises(ValueError, match="this model is conditional"):
        det.score_samples(X)
    with pytest.raises(ValueError, match="this model is conditional"):
        det.sample(3)
    with pytest.raises(ValueError, match="label '9' was not seen in fit"):
        det.score_samples(X, condition=np.full(10, 9))
    with pytest.raises(ValueError, match="a conditional model .* cannot compress"):
        compress(det, X)
    with pytest.raises(ValueError, match=r"conditional=True needs the conditions: fit\(X, y\)"):
        VAEAnomalyDetector(conditional=True, epochs=1).fit(X)
    plain = VAEAnomalyDetector(epochs=1, random_state=0).fit(X, labels)  # y is ignored without conditional=True
    assert plain.condition_encoder_ is None
    with pytest.raises(ValueError, match="fitted without conditions"):
        plain.score_samples(X, condition=labels)


def test_a_family_without_condition_dim_is_refused(monkeypatch):
    def no_conditions(input_shape, latent_dim, n_params, *, output_shape=None, hidden_dims=None):
        return mlp(input_shape, latent_dim, n_params, output_shape=output_shape, hidden_dims=hidden_dims)

    import vaeguard.estimators as estimators

    real = estimators.get_part
    monkeypatch.setattr(estimators, "get_part", lambda kind, name: no_conditions if name == "old" else real(kind, name))
    _, labels, _, X = clusters(50, 6)
    with pytest.raises(ValueError, match="encoder 'old' cannot build a conditional VAE"):
        VAEAnomalyDetector(conditional=True, encoder="old", epochs=1).fit(X, labels)


def test_conditional_model_with_missing_values_and_a_dataframe_condition():
    _, labels, _, X = clusters(400, 7)
    X = X.copy()
    X[::7, 2] = np.nan
    y = pd.DataFrame({"cluster": [f"c{v}" for v in labels], "size": np.linspace(0, 1, 400)})
    det = VAEAnomalyDetector(conditional=True, epochs=5, random_state=0).fit(X, y)
    scores = det.score_samples(X[:30], condition=y.iloc[:30])
    assert np.isfinite(scores).all()
    assert det.condition_encoder_.width == K + 1


def test_conditional_images_go_through_the_conv_family():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images[:300], digits.target[:300]
    det = VAEAnomalyDetector(conditional=True, encoder="conv", epochs=2, random_state=0).fit(images, labels)
    assert det.model_spec_["encoder"] == "conv" and det.model_spec_["condition_dim"] == 10
    assert det.sample(3, condition=7, random_state=0).shape == (3, 8, 8)
    one = copy.deepcopy(det)
    assert np.isfinite(one.score_samples(images[:5], condition=labels[:5])).all()
