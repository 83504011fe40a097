"""Images in VAEAnomalyDetector: (N, H, W) / (N, C, H, W), pixel levels, code lengths, outputs in the input's form."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from vaeguard import VAEAnomalyDetector, load

QUICK = {"epochs": 4, "latent_dim": 2, "n_importance_samples": 8, "random_state": 0}


@pytest.fixture(scope="module")
def digits():
    return load_digits().images  # (1797, 8, 8) float64, levels 0..16


@pytest.fixture(scope="module")
def fitted_digits(digits):
    return VAEAnomalyDetector(**QUICK).fit(digits[:300])


def test_small_images_get_the_mlp_and_a_pixel_level_likelihood(fitted_digits, digits):
    det = fitted_digits
    assert det.model_spec_["encoder"] == "mlp"  # 8 × 8: below 16 × 16 values; larger images get "conv" (below)
    assert det.model_spec_["likelihood"] == "discretized_logistic"
    assert det.model_spec_["likelihood_options"] == {"n_levels": 17}
    assert det.image_shape_ == (8, 8) and det.n_features_in_ == 64
    scores = det.score_samples(digits[300:310])
    assert scores.shape == (10,) and np.all(np.isfinite(scores)) and np.all(scores < 0)  # log masses
    bits = det.bits_per_dim(digits[300:310])
    assert np.allclose(bits, -scores / (64 * math.log(2)))
    assert det.transform(digits[:5]).shape == (5, 2)
    assert det.predict(digits[:5]).shape == (5,)


@pytest.mark.parametrize(
    ("levels", "dtype", "likelihood"), [(2, np.uint8, "bernoulli"), (3, float, "discretized_logistic")]
)
def test_scores_of_all_tiny_images_are_probabilities_that_sum_to_one(levels, dtype, likelihood):
    """On 2×2 images the whole sample space can be listed: Σ_x p̂(x) ≈ 1 (p̂ is unbiased for p)."""
    rng = np.random.default_rng(0)
    train = (rng.random((400, 2, 2)) < np.array([[0.2, 0.5], [0.7, 0.9]])).astype(int)
    if levels == 3:
        train = train + (rng.random((400, 2, 2)) < 0.3)
    train = train.astype(dtype)
    params = {"epochs": 20, "latent_dim": 2, "n_importance_samples": 2000, "offset": 0.0, "random_state": 0}
    det = VAEAnomalyDetector(**params).fit(train)
    assert det.model_spec_["likelihood"] == likelihood
    space = np.array(list(itertools.product(range(levels), repeat=4))).reshape(-1, 2, 2).astype(dtype)
    total = np.exp(det.score_samples(space)).sum()
    assert total == pytest.approx(1.0, abs=0.03)


def test_uint8_images_come_back_as_uint8_in_range():
    rng = np.random.default_rng(1)
    images = (rng.random((120, 3, 8, 8)) * 255).astype(np.uint8)
    det = VAEAnomalyDetector(**QUICK).fit(images)
    assert det.model_spec_["likelihood_options"] == {"n_levels": 256}
    samples = det.sample(4, random_state=0)
    assert samples.dtype == np.uint8 and samples.shape == (4, 3, 8, 8)
    rebuilt = det.reconstruct(images[:5])
    assert rebuilt.dtype == np.uint8 and rebuilt.shape == (5, 3, 8, 8)
    assert det.feature_scores(images[:2]).shape == (2, 3, 8, 8)


def test_float_levels_and_reconstruction_stay_on_the_lattice(fitted_digits, digits):
    samples = fitted_digits.sample(6, random_state=0)
    assert samples.shape == (6, 8, 8) and samples.dtype == np.float64
    assert set(np.unique(samples)) <= set(range(17))
    rebuilt = fitted_digits.reconstruct(digits[:3])
    assert rebuilt.shape == (3, 8, 8) and set(np.unique(rebuilt)) <= set(range(17))


def test_continuous_images_use_a_density_with_one_scale_for_all_pixels():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(200, 6, 6))
    det = VAEAnomalyDetector(**QUICK).fit(images)
    assert det.model_spec_["likelihood"] == "diag_gaussian" and det.pixel_levels_ is None
    assert np.ptp(det.standardizer_.scale) == 0
    shifted = det.score_samples(images[:5] * 10)  # rescaling data and model shifts log p by −d·log 10
    rescaled = VAEAnomalyDetector(**QUICK).fit(images * 10)
    assert rescaled.score_samples(images[:5] * 10) == pytest.approx(
        det.score_samples(images[:5]) - 36 * math.log(10), abs=1e-6
    )
    assert shifted.shape == (5,)
    assert det.sample(2).shape == (2, 6, 6)


def test_missing_pixels_are_marginalised_and_filled_in(digits):
    holes = digits[:200].copy()
    holes[::3, 2:4, 2:4] = np.nan
    det = VAEAnomalyDetector(**QUICK).fit(holes)
    assert det.model_spec_["mask_input"]
    scores = det.score_samples(holes[:6])
    assert np.all(np.isfinite(scores))
    assert scores[0] > det.score_samples(digits[:1])[0]  # four fewer pixels to pay for
    assert not np.isnan(det.reconstruct(holes[:3])).any()


def test_bad_images_get_clear_errors(fitted_digits, digits):
    with pytest.raises(ValueError, match=r"mixed sizes: image 0 has shape \(8, 8\), image 2 has shape \(16, 16\)"):
        VAEAnomalyDetector(**QUICK).fit([np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((16, 16))])
    with pytest.raises(ValueError, match="channels-last"):
        VAEAnomalyDetector(**QUICK).fit(np.zeros((5, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"fitted on images of shape \(8, 8\); got images of shape \(16, 16\)"):
        fitted_digits.score_samples(np.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match="fitted on images of shape"):
        fitted_digits.score_samples(np.zeros((2, 64)))
    bad = digits[:2].copy()
    # off the 17 levels: scored as the nearest level (16), 100 nats less likely, with a warning naming the pixel
    bad[1, 3, 4] = 16.5
    with pytest.warns(UserWarning, match=r"image 1, pixel \(channel 0, row 3, column 4\) holds 16.5"):
        odd = fitted_digits.score_samples(bad)
    nearest = bad.copy()
    nearest[1, 3, 4] = 16
    assert odd[1] == pytest.approx(fitted_digits.score_samples(nearest)[1] - 100, abs=1e-9)
    assert odd[0] == fitted_digits.score_samples(nearest)[0]
    bad[1, 3, 4] = np.inf
    with pytest.raises(ValueError, match=r"image 1, pixel \(channel 0, row 3, column 4\) is infinite"):
        fitted_digits.score_samples(bad)
    with pytest.raises(ValueError, match="fitted on a table of 4 columns; got images"):
        VAEAnomalyDetector(**QUICK).fit(np.random.default_rng(0).normal(size=(50, 4))).score_samples(digits[:2])
    with pytest.raises(ValueError, match="continuous: use likelihood='diag_gaussian'"):
        VAEAnomalyDetector(likelihood="discretized_logistic", **QUICK).fit(np.random.default_rng(0).random((9, 4, 4)))


def test_image_models_round_trip_through_the_model_file(fitted_digits, digits, tmp_path):
    path = tmp_path / "digits.h5"
    fitted_digits.save(path)
    again = load(path, device="cpu")
    assert np.array_equal(again.score_samples(digits[:20]), fitted_digits.score_samples(digits[:20]))
    assert again.image_shape_ == (8, 8) and again.pixel_levels_ == fitted_digits.pixel_levels_
    assert np.array_equal(again.sample(3, random_state=1), fitted_digits.sample(3, random_state=1))


def test_per_row_results_of_a_dataframe_keep_its_index():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(rng.normal(size=(80, 3)), columns=["a", "b", "c"], index=pd.RangeIndex(1000, 1080))
    det = VAEAnomalyDetector(**QUICK).fit(frame)
    for method, name in [("score_samples", "log_likelihood"), ("decision_function", "decision"), ("predict", "label")]:
        out = getattr(det, method)(frame.iloc[5:9])
        assert isinstance(out, pd.Series) and out.name == name
        assert out.index.tolist() == [1005, 1006, 1007, 1008]
    with pytest.warns(UserWarning, match="does not have valid feature names"):  # sklearn's own warning
        assert isinstance(det.score_samples(frame.to_numpy()[:3]), np.ndarray)
    rebuilt = det.reconstruct(frame.iloc[:4])
    assert rebuilt.index.tolist() == [1000, 1001, 1002, 1003] and list(rebuilt.columns) == ["a", "b", "c"]
    drawn = det.sample(3, random_state=0)
    assert isinstance(drawn, pd.DataFrame) and list(drawn.columns) == ["a", "b", "c"]


def test_the_network_family_follows_the_images_size():
    from vaeguard.estimators import auto_encoder

    # values per image C·H·W: the MLP below 16 × 16, convolutions from there; tables always the MLP
    assert [auto_encoder(True, v) for v in (64, 192, 225, 255, 256, 3 * 16 * 16, 784)] == ["mlp"] * 4 + ["conv"] * 3
    assert auto_encoder(False, 4096) == "mlp"


@pytest.mark.parametrize("shape", [(28, 28), (3, 32, 32), (64, 64)])
def test_larger_images_fit_score_and_sample_end_to_end(shape):
    rng = np.random.default_rng(4)
    images = (rng.random((24, *shape)) * 256).astype(np.uint8)
    det = VAEAnomalyDetector(epochs=1, n_importance_samples=2, random_state=0).fit(images)
    assert det.model_spec_["encoder"] == "conv"
    assert np.all(np.isfinite(det.score_samples(images[:3])))
    assert det.sample(2).shape == (2, *shape) and det.reconstruct(images[:2]).dtype == np.uint8


@pytest.mark.parametrize("native", [True, False])
def test_convolutional_models_train_in_bfloat16_by_default_where_the_hardware_has_it(monkeypatch, native, tmp_path):
    monkeypatch.setattr("vaeguard.estimators.native_bfloat16", lambda device: native)
    images = (np.random.default_rng(4).random((24, 16, 16)) * 256).astype(np.uint8)
    det = VAEAnomalyDetector(epochs=1, n_importance_samples=2, random_state=0).fit(images)
    assert det.model_spec_["encoder"] == "conv"
    assert det.training_precision_ == ("bfloat16" if native else "float32")
    assert det.model_.network_precision is None  # scores are computed in float32 either way
    forced = VAEAnomalyDetector(epochs=1, n_importance_samples=2, random_state=0, training_precision="float32")
    assert forced.fit(images).training_precision_ == "float32"
    det.save(tmp_path / "m.h5")
    back = load(tmp_path / "m.h5")
    assert back.training_precision_ == det.training_precision_
    assert np.array_equal(back.score_samples(images[:3]), det.score_samples(images[:3]))


def test_multilayer_perceptrons_train_in_float32_by_default_unless_a_layer_is_wide(monkeypatch, digits):
    from vaeguard.estimators import BFLOAT16_LAYER_WEIGHTS

    monkeypatch.setattr("vaeguard.estimators.native_bfloat16", lambda device: True)
    assert VAEAnomalyDetector(**QUICK).fit(digits[:100]).training_precision_ == "float32"  # 8 × 8: the MLP
    table = np.random.default_rng(0).normal(size=(100, 3))
    assert VAEAnomalyDetector(**QUICK).fit(table).training_precision_ == "float32"
    chosen = VAEAnomalyDetector(**QUICK, training_precision="bfloat16").fit(table)
    assert chosen.training_precision_ == "bfloat16" and np.all(np.isfinite(chosen.score_samples(table)))
    # a wide table's decoder ends in a 256 × 2d layer (mean and σ per column): from 2d · 256 ≥ 2¹⁸ weights, bfloat16
    assert BFLOAT16_LAYER_WEIGHTS == 2 * 512 * 256
    wide = np.random.default_rng(1).normal(size=(40, 512))
    det = VAEAnomalyDetector(**QUICK, n_models=1).fit(wide)
    assert det.training_precision_ == "bfloat16" and np.all(np.isfinite(det.score_samples(wide[:3])))
    assert VAEAnomalyDetector(**QUICK, n_models=1).fit(wide[:, :511]).training_precision_ == "float32"
    monkeypatch.setattr("vaeguard.estimators.native_bfloat16", lambda device: False)  # emulated: slower, never
    assert VAEAnomalyDetector(**QUICK, n_models=1).fit(wide).training_precision_ == "float32"


def test_an_unknown_training_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="training_precision"):
        VAEAnomalyDetector(**QUICK, training_precision="half").fit(np.zeros((30, 2)))
