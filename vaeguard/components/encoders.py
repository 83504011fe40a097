"""Built-in network families: ``mlp`` (an MLP encoder and its mirrored decoder)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from vaeguard.hookspecs import hookimpl


def default_hidden_dims(n_inputs: int) -> list[int]:
    """Two hidden layers sized from the input width: 2·d clipped to [32, 256]."""
    width = int(min(256, max(32, 2 * n_inputs)))
    return [width, width]


def default_latent_dim(n_inputs: int) -> int:
    """Latent size from the input width: about d/4, clipped to [2, 32]."""
    return int(min(32, max(2, math.ceil(n_inputs / 4))))


class MLPEncoder(nn.Module):
    """``(batch, *input_shape) → (batch, 2·latent_dim)``: means, then log-variances."""

    def __init__(self, n_inputs: int, hidden_dims: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = n_inputs
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, 2 * latent_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """``(batch, latent_dim) → (batch, n_params, *output_shape)``."""

    def __init__(
        self, latent_dim: int, hidden_dims: Sequence[int], output_shape: tuple[int, ...], n_params: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, n_params * math.prod(output_shape)))
        layers.append(nn.Unflatten(-1, (n_params, *output_shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def mlp(
    input_shape: tuple[int, ...],
    latent_dim: int,
    n_params: int,
    *,
    output_shape: tuple[int, ...] | None = None,
    hidden_dims: Sequence[int] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """The ``mlp`` family: an MLP encoder and a decoder with the hidden sizes reversed.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of the encoder's input per sample (flattened inside).
    latent_dim : int
        Size of z.
    n_params : int
        Likelihood parameters per output element.
    output_shape : tuple of int, optional
        Shape of one sample for the decoder; defaults to ``input_shape``.
    hidden_dims : sequence of int, optional
        Encoder hidden widths; the decoder uses them reversed. Default:
        :func:`default_hidden_dims`.
    """
    output_shape = tuple(output_shape or input_shape)
    n_inputs = math.prod(input_shape)
    hidden = list(hidden_dims) if hidden_dims is not None else default_hidden_dims(n_inputs)
    return MLPEncoder(n_inputs, hidden, latent_dim), MLPDecoder(latent_dim, hidden[::-1], output_shape, n_params)


@hookimpl
def vaeguard_register_encoders(register):
    register("mlp", mlp)
