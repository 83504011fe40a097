"""The network families: mlp, conv, temporal."""

import math

import pytest
import torch

from vaeguard.components.encoders import default_hidden_dims, mlp
from vaeguard.estimators import default_latent_dim


def test_mlp_shapes_and_mirrored_decoder():
    enc, dec = mlp((6,), 3, 2, hidden_dims=[20, 10])
    assert enc(torch.zeros(4, 6)).shape == (4, 6)
    assert dec(torch.zeros(4, 3)).shape == (4, 2, 6)
    widths = [m.out_features for m in dec.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [10, 20, 12]


def test_mlp_output_shape_may_differ_from_input():
    enc, dec = mlp((5, 3), 2, 3, output_shape=(5,))
    assert enc(torch.zeros(2, 5, 3)).shape == (2, 4)
    assert dec(torch.zeros(2, 2)).shape == (2, 3, 5)


def test_default_sizes_follow_the_data():
    assert default_hidden_dims(3) == [32, 32]
    assert default_hidden_dims(64) == [128, 128]
    assert default_hidden_dims(10_000) == [256, 256]
    assert default_latent_dim(3) == 2 and default_latent_dim(20) == 5 and default_latent_dim(1000) == 32


def test_temporal_family_reads_time_major_windows_and_masks():
    import pytest

    from vaeguard.components.encoders import temporal

    for window, channels, blocks in [(64, 1, 1), (66, 9, 2), (301, 1, 1)]:
        enc, dec = temporal((blocks * window * channels,), 4, 2, output_shape=(window * channels,), channels=channels)
        assert enc(torch.zeros(3, blocks * window * channels)).shape == (3, 8)
        assert dec(torch.zeros(3, 4)).shape == (3, 2, window * channels)
    # a change at one time step of channel 1 reaches the output only through that channel's values
    enc, dec = temporal((20 * 2,), 3, 1, channels=2)
    out = dec(torch.zeros(1, 3))[0, 0].reshape(20, 2)
    assert out.shape == (20, 2)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        temporal((20,), 2, 1, channels=3)


def test_temporal_family_through_the_estimators():
    import numpy as np

    from vaeguard import VAEAnomalyDetector, VAETimeSeriesDetector

    t = np.arange(800)
    series = np.c_[np.sin(t / 7), np.cos(t / 11)]
    det = VAETimeSeriesDetector(
        window=64, stride=8, encoder="temporal", estimator=VAEAnomalyDetector(**{"epochs": 2}), random_state=0
    )
    scores = det.fit(series).score_samples(series)
    assert scores.shape == (800,) and np.isfinite(scores).all()
    assert det.window_model_.encoder == "temporal" and det.window_model_.encoder_params == {"channels": 2}
    import pytest

    with pytest.raises(ValueError, match="does not accept these options"):
        VAEAnomalyDetector(encoder_params={"colour": 1}, epochs=1).fit(np.zeros((10, 2)))


@pytest.mark.parametrize(
    ("shape", "stages"), [((1, 8, 8), 1), ((1, 28, 28), 3), ((3, 32, 32), 3), ((1, 64, 64), 4), ((2, 13, 9), 2)]
)
@pytest.mark.parametrize("blocks", [1, 2])
def test_conv_family_restores_the_exact_image_shape(shape, stages, blocks):
    from vaeguard.components.encoders import conv, conv_stage_sizes

    assert len(conv_stage_sizes(*shape[1:])) == stages
    enc, dec = conv((blocks * math.prod(shape),), 5, 3, output_shape=shape)
    x = torch.randn(4, blocks * math.prod(shape))
    h = enc(x)
    assert h.shape == (4, 10)
    assert dec(h[:, :5]).shape == (4, 3, *shape)
    assert enc(x.reshape(4, blocks * shape[0], *shape[1:])).shape == (4, 10)  # image-shaped input too


def test_conv_family_refuses_what_it_cannot_read():
    from vaeguard.components.encoders import conv

    with pytest.raises(ValueError, match="2 positive integers"):
        conv((1, 16, 16), 4, 2, hidden_dims=[8])
    with pytest.raises(ValueError, match="one-hot"):
        conv((1, 8, 8, 17), 4, 17, output_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        conv((64,), 4, 2)
