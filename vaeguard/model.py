"""The VAE module: encoder → q(z|x) → z → decoder → likelihood p(x|z)."""

from __future__ import annotations

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
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood, latent_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = int(latent_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``(μ, log σ²)``, each ``(batch, latent_dim)``."""
        h = self.encoder(self.likelihood.encoder_input(x))
        mu, raw_logvar = h[..., : self.latent_dim], h[..., self.latent_dim :]
        return mu, soft_clamp(raw_logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: Tensor) -> Tensor:
        """Likelihood parameters for a batch of codes of shape ``(..., latent_dim)``."""
        lead = z.shape[:-1]
        params = self.decoder(z.reshape(-1, self.latent_dim))
        return params.reshape(*lead, *params.shape[1:])
