"""The VAE module: encoder → q(z|x) → z → decoder → likelihood p(x|z)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vaeguard.components.likelihoods import Likelihood, soft_clamp

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
    """

    def __init__(
        self, encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood, latent_dim: int, mask_input: bool = False
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = int(latent_dim)
        self.mask_input = bool(mask_input)

    def encoder_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """What the encoder sees: the likelihood's view of ``x``, plus the mask when ``mask_input``."""
        features = self.likelihood.encoder_input(x)
        if not self.mask_input:
            return features
        observed = torch.ones_like(x) if mask is None else mask
        return torch.cat([features.flatten(1), observed.flatten(1).to(features.dtype)], dim=1)

    def encode(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``(μ, log σ²)``, each ``(batch, latent_dim)``; ``mask`` marks observed entries."""
        h = self.encoder(self.encoder_features(x, mask))
        mu, raw_logvar = h[..., : self.latent_dim], h[..., self.latent_dim :]
        return mu, soft_clamp(raw_logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: Tensor) -> Tensor:
        """Likelihood parameters for a batch of codes of shape ``(..., latent_dim)``."""
        lead = z.shape[:-1]
        params = self.decoder(z.reshape(-1, self.latent_dim))
        return params.reshape(*lead, *params.shape[1:])
