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
