"""The CUDA path (skipped without a GPU): training, scoring and the model file on a device."""

import numpy as np
import pytest
import torch

from vaeguard import VAEAnomalyDetector, load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6))


def test_fit_and_score_on_cuda(data, tmp_path):
    det = VAEAnomalyDetector(device="cuda", random_state=0, epochs=20).fit(data)
    assert det.device_.startswith("cuda")
    assert next(det.model_.parameters()).is_cuda
    scores = det.score_samples(data)
    assert np.all(np.isfinite(scores))
    assert det.transform(data).shape == (2000, det.latent_dim_)
    assert det.sample(5, random_state=0).shape == (5, 6)
    np.testing.assert_array_equal(det.sample(5, random_state=0), det.sample(5, random_state=0))
    # the same weights scored on the CPU (float64) agree with CUDA (float32) to float32 rounding
    det.save(tmp_path / "m.h5")
    on_cpu = load(tmp_path / "m.h5", device="cpu").score_samples(data)
    np.testing.assert_allclose(scores, on_cpu, atol=1e-3)


def test_same_seed_same_scores_on_cuda(data):
    a = VAEAnomalyDetector(device="cuda", random_state=1, epochs=5).fit(data).score_samples(data)
    b = VAEAnomalyDetector(device="cuda", random_state=1, epochs=5).fit(data).score_samples(data)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_images_on_cuda_agree_with_the_cpu(tmp_path):
    from sklearn.datasets import load_digits

    images = (load_digits().images[:400] * 15).astype(np.uint8)  # 8-bit levels
    det = VAEAnomalyDetector(device="cuda", encoder="conv", random_state=0, epochs=10).fit(images)
    assert det.model_spec_["encoder"] == "conv" and det.model_spec_["likelihood"] == "discretized_logistic"
    scores = det.score_samples(images[:50])
    samples = det.sample(4, random_state=0)
    assert samples.dtype == np.uint8 and samples.shape == (4, 8, 8)
    assert det.reconstruct(images[:3]).dtype == np.uint8
    det.save(tmp_path / "img.h5")
    np.testing.assert_allclose(scores, load(tmp_path / "img.h5", device="cpu").score_samples(images[:50]), atol=1e-2)


def test_conditional_and_regularised_models_on_cuda(data, tmp_path):
    """Conditions, a regularizer's penalty and the IWAE objective all run on the device and load on the CPU."""
    labels = np.where(data[:, 0] > 0, "high", "low")
    det = VAEAnomalyDetector(
        device="cuda", random_state=0, epochs=5, conditional=True, regularizer="tc", regularizer_params={"beta": 6}
    ).fit(data, labels)
    scores = det.score_samples(data[:100], condition=labels[:100])
    assert np.all(np.isfinite(scores)) and det.sample(3, condition="high", random_state=0).shape == (3, 6)
    det.save(tmp_path / "c.h5")
    back = load(tmp_path / "c.h5", device="cpu").score_samples(data[:100], condition=labels[:100])
    np.testing.assert_allclose(scores, back, atol=1e-3)
    factor = VAEAnomalyDetector(device="cuda", random_state=0, epochs=3, regularizer="factor").fit(data)
    iwae = VAEAnomalyDetector(device="cuda", random_state=0, epochs=3, objective="iwae").fit(data)
    assert np.isfinite(factor.score_samples(data[:50])).all() and np.isfinite(iwae.score_samples(data[:50])).all()


def test_a_model_trained_on_cuda_codes_the_same_bits_as_on_the_cpu(tmp_path):
    """Compressed with the CUDA model, decompressed with its file loaded on the CPU: the same bytes back."""
    from sklearn.datasets import load_digits

    from vaeguard import compress, decompress

    images = (load_digits().images[:300] >= 8).astype(np.uint8)
    det = VAEAnomalyDetector(device="cuda", random_state=0, epochs=10).fit(images)
    blob = compress(det, images[:40])
    det.save(tmp_path / "bin.h5")
    on_cpu = load(tmp_path / "bin.h5", device="cpu")
    assert compress(on_cpu, images[:40]) == blob
    assert np.array_equal(decompress(on_cpu, blob), images[:40])
    lossy = compress(det, images[:40], codec="latent", codec_params={"step": 0.5})
    assert compress(on_cpu, images[:40], codec="latent", codec_params={"step": 0.5}) == lossy
    assert np.array_equal(decompress(on_cpu, lossy), decompress(det, lossy))
