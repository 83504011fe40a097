"""Built-in network families: ``mlp`` (an MLP encoder and its mirrored decoder), ``conv``
(2-D convolutions over images) and ``temporal`` (1-D convolutions over windows of a series)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vaeguard.hookspecs import hookimpl
from vaeguard.parts import declare


def default_hidden_dims(n_inputs: int) -> list[int]:
    """Two hidden layers sized from the input width: 2·d clipped to [32, 256]."""
    width = int(min(256, max(32, 2 * n_inputs)))
    return [width, width]


class MLPEncoder(nn.Module):
    """``(batch, *input_shape) → (batch, 2·latent_dim)``: means, then log-variances.

    With ``condition_dim`` > 0 it is called as ``forward(x, c)`` and reads c after the
    flattened input.
    """

    #: Its forward is ``net`` on the flattened input and nothing else: training may run stacked copies of it as
    #: batched matrix products over ``net``'s layers (read from this class only, so a subclass declares it anew).
    stacks_as_sequential = True

    def __init__(self, n_inputs: int, hidden_dims: Sequence[int], latent_dim: int, condition_dim: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = n_inputs + condition_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, 2 * latent_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        return self.net(with_condition(x.flatten(1), condition))


class MLPDecoder(nn.Module):
    """``(batch, latent_dim) → (batch, n_params, *output_shape)``; ``forward(z, c)`` when ``condition_dim`` > 0."""

    #: As :attr:`MLPEncoder.stacks_as_sequential`: its forward is ``net`` on z.
    stacks_as_sequential = True

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: Sequence[int],
        output_shape: tuple[int, ...],
        n_params: int,
        condition_dim: int = 0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim + condition_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, n_params * math.prod(output_shape)))
        layers.append(nn.Unflatten(-1, (n_params, *output_shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        return self.net(with_condition(z, condition))


def with_condition(h: Tensor, condition: Tensor | None) -> Tensor:
    """``[h, c]`` along the last dimension, or ``h`` alone for an unconditional call."""
    return h if condition is None else torch.cat([h, condition], dim=-1)


@declare(takes_conditions=True)
def mlp(
    input_shape: tuple[int, ...],
    latent_dim: int,
    n_params: int,
    *,
    output_shape: tuple[int, ...] | None = None,
    hidden_dims: Sequence[int] | None = None,
    condition_dim: int = 0,
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
    condition_dim : int, default=0
        Width of a conditional VAE's condition vector c: both networks read it next to
        their input (the encoder after x, the decoder after z).
    """
    output_shape = tuple(output_shape or input_shape)
    n_inputs = math.prod(input_shape)
    hidden = list(hidden_dims) if hidden_dims is not None else default_hidden_dims(n_inputs)
    return (
        MLPEncoder(n_inputs, hidden, latent_dim, condition_dim),
        MLPDecoder(latent_dim, hidden[::-1], output_shape, n_params, condition_dim),
    )


@hookimpl
def vaeguard_register_encoders(register):
    register("mlp", mlp)
    register("temporal", temporal)
    register("conv", conv)


class TemporalEncoder(nn.Module):
    """1-D convolutions over time: ``(batch, k·window·channels)`` → ``(batch, 2·latent_dim)``.

    The flattened input is read as ``k`` blocks of a time-major ``(window, channels)``
    window (k = 2 when the observation mask is appended), so the convolution sees
    ``k·channels`` input channels.
    """

    def __init__(self, window: int, channels: int, blocks: int, width: int, latent_dim: int) -> None:
        super().__init__()
        self.window, self.channels, self.blocks = window, channels, blocks
        self.net = nn.Sequential(
            nn.Conv1d(blocks * channels, width, kernel_size=5, stride=2, padding=2),
            nn.SiLU(),
            nn.Conv1d(width, width, kernel_size=5, stride=2, padding=2),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(width * _conv_length(window, 2), 2 * latent_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], self.blocks, self.window, self.channels)
        x = x.permute(0, 1, 3, 2).reshape(x.shape[0], self.blocks * self.channels, self.window)
        return self.net(x)


class TemporalDecoder(nn.Module):
    """``(batch, latent_dim)`` → ``(batch, n_params, window·channels)`` (time-major), by transposed convolutions."""

    def __init__(self, window: int, channels: int, n_params: int, width: int, latent_dim: int) -> None:
        super().__init__()
        self.window, self.channels, self.n_params, self.width = window, channels, n_params, width
        self.start = _conv_length(window, 2)
        self.project = nn.Linear(latent_dim, width * self.start)
        self.net = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose1d(width, width, kernel_size=4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose1d(width, width, kernel_size=4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv1d(width, n_params * channels, kernel_size=5, padding=2),
        )

    def forward(self, z: Tensor) -> Tensor:
        h = self.net(self.project(z).reshape(z.shape[0], self.width, self.start))
        h = nn.functional.interpolate(h, size=self.window, mode="linear", align_corners=False)
        h = h.reshape(z.shape[0], self.n_params, self.channels, self.window).permute(0, 1, 3, 2)
        return h.reshape(z.shape[0], self.n_params, self.window * self.channels)


def _conv_length(window: int, halvings: int) -> int:
    for _ in range(halvings):
        window = (window + 1) // 2
    return window


def temporal(
    input_shape: tuple[int, ...],
    latent_dim: int,
    n_params: int,
    *,
    output_shape: tuple[int, ...] | None = None,
    hidden_dims: Sequence[int] | None = None,
    channels: int = 1,
) -> tuple[nn.Module, nn.Module]:
    """The ``temporal`` family: 1-D convolutions over flattened, time-major windows.

    Parameters
    ----------
    input_shape : tuple of int
        ``(k·window·channels,)``: a flattened window, possibly followed by its mask.
    latent_dim, n_params : int
    output_shape : tuple of int, optional
        ``(window·channels,)``; defaults to ``input_shape``.
    hidden_dims : sequence of int, optional
        Only the first entry is used: the number of convolution channels (default 32).
    channels : int, default=1
        Channels of the series.
    """
    output_shape = tuple(output_shape or input_shape)
    values = math.prod(output_shape)
    if values % channels:
        raise ValueError(
            f"the 'temporal' family needs window × channels values; {values} is not a multiple of {channels}"
        )
    window = values // channels
    blocks = math.prod(input_shape) // values
    if blocks * values != math.prod(input_shape) or window < 4:
        raise ValueError(f"the 'temporal' family cannot read input of shape {input_shape} as windows of {window} steps")
    width = int(hidden_dims[0]) if hidden_dims else 32
    return (
        TemporalEncoder(window, channels, blocks, width, latent_dim),
        TemporalDecoder(window, channels, n_params, width, latent_dim),
    )


#: The conv family halves the image until both sides are at most this size.
CONV_FINAL_SIZE = 4
#: Channels per downsampling stage of the conv family (the last entry repeats for larger images).
CONV_CHANNELS = (16, 32, 64)
#: Bounds on the width of the fully connected layer between the convolutions and the latent code.
CONV_DENSE_MIN, CONV_DENSE_MAX = 64, 256


def conv_dense_width(image_shape: tuple[int, int, int]) -> int:
    """Width of the conv family's dense layer: the number of values in an image, within [64, 256].

    Small images need a narrow layer: on 8 × 8 digits a width of 256 overfits the ~120
    training images of a class (one-class AUROC 0.987 against 0.992 at 64).
    """
    return int(min(CONV_DENSE_MAX, max(CONV_DENSE_MIN, math.prod(image_shape))))


def conv_stage_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Spatial sizes after each stride-2 convolution: at least one, halving (rounding up) until both sides are ≤ 4."""
    sizes = []
    while not sizes or max(height, width) > CONV_FINAL_SIZE:
        height, width = (height + 1) // 2, (width + 1) // 2
        sizes.append((height, width))
    return sizes


class ConvEncoder(nn.Module):
    """``(batch, k·C·H·W)`` or ``(batch, k·C, H, W)`` → ``(batch, 2·latent_dim)`` by stride-2 convolutions.

    The input is read as ``k`` channel blocks of the image (k = 2 when the observation
    mask is appended). With ``condition_dim`` > 0 it is called as ``forward(x, c)`` and
    the dense layer reads c after the flattened convolutional features.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        blocks: int,
        channels: list[int],
        latent_dim: int,
        dense: int,
        condition_dim: int = 0,
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.in_shape = (blocks * c, h, w)
        sizes = conv_stage_sizes(h, w)
        layers: list[nn.Module] = [nn.Conv2d(blocks * c, channels[0], 3, padding=1), nn.SiLU()]
        previous = channels[0]
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.SiLU()]
            previous = width
        fh, fw = sizes[-1]
        layers.append(nn.Flatten())
        self.n_features = len(layers)  # self.net[:n_features] are the convolutions, flattened
        layers += [nn.Linear(previous * fh * fw + condition_dim, dense), nn.SiLU(), nn.Linear(dense, 2 * latent_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)
        if condition is None:
            return self.net(x)
        features = self.net[: self.n_features](x)
        return self.net[self.n_features :](with_condition(features, condition))


class ConvDecoder(nn.Module):
    """``(batch, latent_dim)`` → ``(batch, n_params, C, H, W)`` by transposed convolutions that mirror the encoder.

    Each transposed convolution restores the exact size its encoder stage halved, so any
    H × W ≥ 1 comes back without cropping. With ``condition_dim`` > 0 it is called as
    ``forward(z, c)``; the first dense layer reads ``[z, c]``.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        channels: list[int],
        n_params: int,
        latent_dim: int,
        dense: int,
        condition_dim: int = 0,
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.n_params, self.image_shape = n_params, (c, h, w)
        sizes = [(h, w), *conv_stage_sizes(h, w)]
        self.start = (channels[-1], *sizes[-1])
        layers: list[nn.Module] = [
            nn.Linear(latent_dim + condition_dim, dense),
            nn.SiLU(),
            nn.Linear(dense, math.prod(self.start)),
            nn.SiLU(),
            nn.Unflatten(-1, self.start),
        ]
        widths = [*channels[::-1], channels[0]]
        for i, (target, source) in enumerate(zip(sizes[-2::-1], sizes[:0:-1], strict=True)):
            padding = tuple(t - (2 * s - 1) for t, s in zip(target, source, strict=True))
            layers += [
                nn.ConvTranspose2d(widths[i], widths[i + 1], 3, stride=2, padding=1, output_padding=padding),
                nn.SiLU(),
            ]
        layers.append(nn.Conv2d(widths[len(sizes) - 1], n_params * c, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        return self.net(with_condition(z, condition)).reshape(z.shape[0], self.n_params, *self.image_shape)


@declare(takes_conditions=True)
def conv(
    input_shape: tuple[int, ...],
    latent_dim: int,
    n_params: int,
    *,
    output_shape: tuple[int, ...] | None = None,
    hidden_dims: Sequence[int] | None = None,
    condition_dim: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """The ``conv`` family for images ``(C, H, W)``: stride-2 convolutions down to at most 4 × 4, then a dense layer.

    An 8 × 8 image takes one downsampling stage, 28 × 28 and 32 × 32 three, 64 × 64 four;
    the dense layer is :func:`conv_dense_width` wide; the decoder mirrors the encoder with
    transposed convolutions.

    Parameters
    ----------
    input_shape : tuple of int
        The encoder's input per sample: the image ``(C, H, W)``, or any shape holding
        ``k·C·H·W`` values (k image-shaped blocks, e.g. the image and its mask).
    latent_dim, n_params : int
    output_shape : tuple of int, optional
        The image shape ``(C, H, W)`` (or ``(H, W)``); defaults to ``input_shape``.
    hidden_dims : sequence of int, optional
        Channels per downsampling stage, one entry per stage (default 16, 32, 64, 64, ...).
    condition_dim : int, default=0
        Width of a conditional VAE's condition vector c: the encoder's dense layer reads it
        after the convolutional features, the decoder's first dense layer after z.
    """
    output_shape = tuple(int(s) for s in (output_shape or input_shape))
    if len(output_shape) == 2:
        output_shape = (1, *output_shape)
    if len(output_shape) != 3:
        raise ValueError(f"the 'conv' family needs images of shape (C, H, W); got {output_shape}")
    values = math.prod(output_shape)
    blocks = math.prod(input_shape) // values
    if blocks < 1 or blocks * values != math.prod(input_shape):
        raise ValueError(
            f"the 'conv' family reads its input as image-shaped blocks of {output_shape}; "
            f"an input of shape {tuple(input_shape)} does not divide into them (one-hot inputs such as the "
            "'categorical' likelihood's need the 'mlp' family)"
        )
    if len(input_shape) > 3 and tuple(input_shape[:3]) == output_shape:
        raise ValueError("the 'conv' family cannot read one-hot inputs (the 'categorical' likelihood); use 'mlp'")
    stages = len(conv_stage_sizes(*output_shape[1:]))
    if hidden_dims is not None:
        channels = [int(c) for c in hidden_dims]
        if len(channels) != stages or min(channels) < 1:
            raise ValueError(
                f"hidden_dims for the 'conv' family gives channels per downsampling stage: "
                f"{stages} positive integers for {output_shape[1]}×{output_shape[2]} images, got {list(hidden_dims)}"
            )
    else:
        channels = [CONV_CHANNELS[min(i, len(CONV_CHANNELS) - 1)] for i in range(stages)]
    dense = conv_dense_width(output_shape)
    return (
        ConvEncoder(output_shape, blocks, channels, latent_dim, dense, condition_dim),
        ConvDecoder(output_shape, channels, n_params, latent_dim, dense, condition_dim),
    )
