"""A linear-Gaussian VAE whose marginal p(x) and posterior p(z|x) are known in closed form."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vaeguard.components.likelihoods import GaussianLikelihood, soft_clamp_inverse
from vaeguard.model import LOGVAR_MAX, LOGVAR_MIN, VAE


@dataclass
class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, σ²I) with orthogonal columns of W (diagonal posterior)."""

    W: np.ndarray  # (d, L)
    b: np.ndarray  # (d,)
    sigma: float

    @classmethod
    def make(cls, d: int = 5, latent: int = 2, sigma: float = 0.5, seed: int = 0) -> LinearGaussian:
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        W = q[:, :latent] * rng.uniform(0.8, 2.5, size=latent)
        return cls(W, rng.normal(size=d), sigma)

    @property
    def d(self) -> int:
        return self.W.shape[0]

    @property
    def latent(self) -> int:
        return self.W.shape[1]

    def sample(self, n: int, seed: int = 1) -> np.ndarray:
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(n, self.latent))
        return z @ self.W.T + self.b + self.sigma * rng.normal(size=(n, self.d))

    def log_px(self, X: np.ndarray) -> np.ndarray:
        cov = self.W @ self.W.T + self.sigma**2 * np.eye(self.d)
        diff = X - self.b
        _, logdet = np.linalg.slogdet(cov)
        maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        return -0.5 * (maha + logdet + self.d * math.log(2 * math.pi))

    def posterior(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact posterior means (n, L) and variances (L,)."""
        m_diag = np.diag(self.W.T @ self.W) + self.sigma**2
        means = (X - self.b) @ self.W / m_diag
        return means, self.sigma**2 / m_diag

    def observed_posterior(self, X: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact posterior means (n, L) and covariances (n, L, L) of each row given its observed entries
        (bool, (n, d)): precision I + W_oᵀ W_o / σ², correlated once entries are hidden."""
        means, covs = [], []
        for x, o in zip(X, observed, strict=True):
            w = self.W[o]
            cov = np.linalg.inv(np.eye(self.latent) + w.T @ w / self.sigma**2)
            means.append(cov @ w.T @ (x[o] - self.b[o]) / self.sigma**2)
            covs.append(cov)
        return np.array(means), np.array(covs)

    def vae(self, mean_shift: float = 0.0, var_scale: float = 1.0, dtype: torch.dtype = torch.float32) -> VAE:
        """The VAE with this decoder and an encoder giving the exact posterior (optionally perturbed)."""
        d, L = self.d, self.latent
        m_diag = np.diag(self.W.T @ self.W) + self.sigma**2
        A = self.W.T / m_diag[:, None]  # (L, d)
        post_var = self.sigma**2 / m_diag * var_scale
        encoder = nn.Linear(d, 2 * L).double()
        decoder = nn.Sequential(nn.Linear(L, d), nn.Unflatten(-1, (1, d))).double()
        lik = GaussianLikelihood((d,)).double()
        with torch.no_grad():
            encoder.weight.zero_()
            encoder.weight[:L] = torch.tensor(A)
            encoder.bias[:L] = torch.tensor(-A @ self.b + mean_shift * np.sqrt(post_var))
            encoder.bias[L:] = soft_clamp_inverse(torch.tensor(np.log(post_var)), LOGVAR_MIN, LOGVAR_MAX)
            decoder[0].weight.copy_(torch.tensor(self.W))
            decoder[0].bias.copy_(torch.tensor(self.b))
            lik.raw_log_scale.fill_(float(soft_clamp_inverse(torch.tensor(math.log(self.sigma)), -6.0, 4.0)))
        return VAE(encoder, decoder, lik, L).to(dtype).eval()

    def kl_q_to_posterior(self, X: np.ndarray, mean_shift: float, var_scale: float) -> np.ndarray:
        """KL(q(z|x) ‖ p(z|x)) in closed form for the perturbed encoder of :meth:`vae`."""
        means, var = self.posterior(X)
        q_var = var * var_scale
        q_means = means + mean_shift * np.sqrt(q_var)
        return 0.5 * (np.log(var / q_var) + q_var / var + (q_means - means) ** 2 / var - 1).sum(-1)

    def log_conditionals(self, X: np.ndarray) -> np.ndarray:
        """log p(x_j | x_−j) of every element (n, d): the Gaussian conditional, from the precision matrix P:
        x_j | x_−j ~ N(x_j − (P(x − b))_j / P_jj, 1 / P_jj)."""
        precision = np.linalg.inv(self.W @ self.W.T + self.sigma**2 * np.eye(self.d))
        p_jj = np.diag(precision)
        residual = (X - self.b) @ precision / p_jj
        return 0.5 * np.log(p_jj / (2 * math.pi)) - 0.5 * p_jj * residual**2
