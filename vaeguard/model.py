"""The VAE module: encoder → q(z|x) → z → decoder → likelihood p(x|z)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from vaeguard.parts import Likelihood, soft_clamp

#: Bounds on the posterior log-variance log σ²_q.
LOGVAR_MIN = -14.0
LOGVAR_MAX = 6.0


class VAE(nn.Module):
    """A variational autoencoder with a N(0, I) prior and a diagonal Gaussian posterior.

    Parameters
    ----------
    encoder : nn.Module
        ``encoder(features) → (batch, 2·latent_dim)``: means then log-variances.
    decoder : nn.Module
        ``decoder(z) → (batch, n_params, *event_shape)``: the likelihood's parameters.
    likelihood : Likelihood
        The normalised observation model.
    latent_dim : int
        Size of z.
    mask_input : bool, default=False
        The encoder also sees the observation mask (1 = observed), appended to its
        flattened input; for models trained on data with missing values.
    condition_dim : int, default=0
        Width of the condition vector c of a conditional VAE, q(z|x, c) and p(x|z, c): the
        encoder is called as ``encoder(features, c)`` and the decoder as ``decoder(z, c)``.
        0: an unconditional model, whose networks take one argument.
    """

    #: A lower precision (``torch.bfloat16``) the encoder and decoder networks run in under
    #: ``torch.autocast``, their outputs cast back; None: the inputs' own dtype. Set on an instance
    #: by the trainer for its training steps only (:func:`vaeguard.training.networks_in`); the class
    #: default also serves models unpickled from versions before it.
    network_precision: torch.dtype | None = None

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        latent_dim: int,
        mask_input: bool = False,
        condition_dim: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = int(latent_dim)
        self.mask_input = bool(mask_input)
        self.condition_dim = int(condition_dim)

    def _networks(self, inputs: Tensor) -> contextlib.AbstractContextManager[None]:
        """Where the networks run: under autocast to :attr:`network_precision` when one is set."""
        if self.network_precision is None:
            return contextlib.nullcontext()
        return torch.autocast(inputs.device.type, dtype=self.network_precision)

    def _checked(self, condition: Tensor | None, rows: int) -> Tensor | None:
        """``condition`` (rows, condition_dim) for a conditional model; refuses one that is missing or misfits."""
        if not self.condition_dim:
            if condition is not None:
                raise ValueError("this model was trained without conditions; it takes none")
            return None
        if condition is None:
            raise ValueError("this model is conditional: every sample needs its condition vector")
        if tuple(condition.shape) != (rows, self.condition_dim):
            raise ValueError(
                f"condition vectors of shape {tuple(condition.shape)}; expected ({rows}, {self.condition_dim})"
            )
        return condition

    def encoder_features(self, x: Tensor, mask: Tensor | None = None, batch_dims: int = 1) -> Tensor:
        """What the encoder sees: the likelihood's view of ``x``, plus the mask when ``mask_input``
        (flattened after the ``batch_dims`` leading dimensions)."""
        features = self.likelihood.encoder_input(x)
        if not self.mask_input:
            return features
        observed = torch.ones_like(x) if mask is None else mask
        return torch.cat(
            [features.flatten(batch_dims), observed.flatten(batch_dims).to(features.dtype)], dim=batch_dims
        )

    def posterior(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's output ``h`` (..., 2·latent_dim) as ``(μ, log σ²)``, the log-variance within its bounds."""
        mu, raw_logvar = h[..., : self.latent_dim], h[..., self.latent_dim :]
        return mu, soft_clamp(raw_logvar, LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, x: Tensor, mask: Tensor | None = None, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``(μ, log σ²)``, each ``(batch, latent_dim)``.

        ``mask`` marks observed entries; ``condition`` (batch, condition_dim) is c for a
        conditional model.
        """
        features = self.encoder_features(x, mask)
        c = self._checked(condition, x.shape[0])
        with self._networks(features):
            h = self.encoder(features) if c is None else self.encoder(features, c.to(features.dtype))
        return self.posterior(h.to(features.dtype))

    def decode(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """Likelihood parameters for codes of shape ``(..., batch, latent_dim)``.

        ``condition`` (batch, condition_dim), for a conditional model, is shared by the
        leading dimensions (e.g. K importance draws per row).
        """
        lead = z.shape[:-1]
        flat = z.reshape(-1, self.latent_dim)
        c = self._checked(condition, z.shape[-2] if z.dim() > 1 else 1)
        with self._networks(z):
            if c is None:
                params = self.decoder(flat)
            else:
                c = c.to(z.dtype).expand(*lead, self.condition_dim).reshape(-1, self.condition_dim)
                params = self.decoder(flat, c)
        if params.dtype != self.likelihood.compute_dtype:  # a scoring copy's float32 decoder output stays float32
            params = params.to(z.dtype)
        return params.reshape(*lead, *params.shape[1:])
