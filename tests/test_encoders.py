"""The mlp network family."""

import torch

from vaeguard.components.encoders import default_hidden_dims, default_latent_dim, mlp


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
