"""The score: the importance-sampled log-likelihood with q(z|x) as proposal.

log p(x) ≈ logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K, z_k ~ q(z|x).

Every row is scored with the same K standard-normal draws (common random numbers), so a
row's score does not depend on its batch, the order of rows or the chunk size. The K
weights of a chunk are one batched tensor; rows go in chunks so that memory stays bounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vaeguard.model import VAE
from vaeguard.objectives import elbo, importance_terms, log_importance_weights

#: Elements (K × rows × per-row decoder outputs) one chunk may hold; about 64 MiB of float32.
CHUNK_ELEMENTS = 1 << 24


def common_random_numbers(n_samples: int, latent_dim: int, seed: int) -> Tensor:
    """The K standard-normal draws every row shares, shape ``(n_samples, latent_dim)``, on the CPU."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(n_samples, latent_dim, generator=generator)


def chunk_rows(n_samples: int, elements_per_row: int, budget: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that ``rows × n_samples × elements_per_row`` stays within ``budget``."""
    return max(1, budget // max(1, n_samples * elements_per_row))


def _chunks(
    x: Tensor,
    rows: int,
    device: torch.device,
    dtype: torch.dtype,
    mask: Tensor | None = None,
    condition: Tensor | None = None,
) -> Iterator[tuple[slice, Tensor, Tensor | None, Tensor | None]]:
    """``(rows of x it covers, chunk, its mask, its conditions)`` for chunks of ``rows`` rows, moved to ``device``."""
    for start in range(0, x.shape[0], rows):
        where = slice(start, min(start + rows, x.shape[0]))
        xb = x[where].to(device=device, dtype=dtype, non_blocking=True)
        mb = None if mask is None else mask[where].to(device, non_blocking=True)
        yield where, xb, mb, (None if condition is None else condition[where].to(device, dtype, non_blocking=True))


def _placement(model: VAE, device: torch.device | str | None) -> tuple[torch.device, torch.dtype]:
    """Where and in which floating-point type the model computes."""
    p = next(model.parameters())
    return (torch.device(device) if device is not None else p.device), p.dtype


def _prepare(
    model: VAE, eps: Tensor, device: torch.device | str | None, chunk_size: int | None
) -> tuple[torch.device, torch.dtype, Tensor, int]:
    """Device, dtype, the draws moved there, and the rows per chunk; puts the model in eval mode."""
    device, dtype = _placement(model, device)
    rows = chunk_size or chunk_rows(eps.shape[0], _per_row_elements(model))
    model.eval()
    return device, dtype, eps.to(device=device, dtype=dtype), rows


@dataclass
class LogLikelihood:
    """Per-row estimates in nats: ``value`` (n,) and, when asked, its standard error ``std`` (n,)."""

    value: np.ndarray
    std: np.ndarray | None = None


#: Floor on the per-row size used for chunking, standing in for the hidden activations.
MIN_ROW_ELEMENTS = 512


def _per_row_elements(model: VAE) -> int:
    lik = model.likelihood
    return max(MIN_ROW_ELEMENTS, lik.param_count * math.prod(lik.event_shape))


@torch.no_grad()
def importance_sampled_log_likelihood(
    model: VAE,
    x: Tensor,
    eps: Tensor,
    *,
    mask: Tensor | None = None,
    return_std: bool = False,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    condition: Tensor | None = None,
) -> LogLikelihood:
    """Estimate log p(x) for every row, in nats, in the model's internal units.

    Parameters
    ----------
    model : VAE
    x : Tensor, shape (n, *event_shape)
        Data on any device; chunks are moved to ``device``.
    eps : Tensor, shape (K, latent_dim)
        The shared standard-normal draws (:func:`common_random_numbers`).
    mask : Tensor of bool, shape (n, *event_shape), optional
        Observed entries; the estimate is then of the marginal log p(x_observed).
    return_std : bool, default=False
        Also return the delta-method standard error of the estimate,
        ``sd(w) / (√K · mean(w))``, from the K importance weights.
    chunk_size : int, optional
        Rows per chunk; by default sized so a chunk holds about 64 MiB.
    device : torch.device, optional
        Where to compute; defaults to the model's device.
    condition : Tensor, shape (n, condition_dim), optional
        A conditional model's condition vectors; the estimate is then of log p(x|c).

    Returns
    -------
    LogLikelihood
        float64 arrays of shape (n,).
    """
    device, dtype, eps, rows = _prepare(model, eps, device, chunk_size)
    k = eps.shape[0]
    # results go into arrays allocated once: small tensors kept alive between the chunks' large
    # temporaries would pin glibc's heap and let the process grow with the number of rows
    value = np.zeros(x.shape[0])
    std = np.zeros(x.shape[0]) if return_std else None
    for where, xb, mb, cb in _chunks(x, rows, device, dtype, mask, condition):
        logw = log_importance_weights(model, xb, eps, mb, cb).double()  # (K, rows): accumulate in float64
        value[where] = (torch.logsumexp(logw, 0) - math.log(k)).cpu().numpy()
        if std is not None:
            w = (logw - logw.max(0, keepdim=True).values).exp()
            mean = w.mean(0)
            sd = w.std(0, unbiased=False) if k > 1 else torch.zeros_like(mean)
            std[where] = (sd / (math.sqrt(k) * mean)).cpu().numpy()
    return LogLikelihood(value, std)


@torch.no_grad()
def evidence_lower_bound(
    model: VAE,
    x: Tensor,
    eps: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    condition: Tensor | None = None,
) -> np.ndarray:
    """ELBO per row in nats (internal units), the reconstruction term averaged over ``eps``; float64 (n,)."""
    device, dtype, eps, rows = _prepare(model, eps, device, chunk_size)
    out = np.zeros(x.shape[0])
    for where, xb, mb, cb in _chunks(x, rows, device, dtype, mask, condition):
        out[where] = elbo(model, xb, eps, mb, condition=cb)[0].double().cpu().numpy()
    return out


@torch.no_grad()
def posterior_means(
    model: VAE,
    x: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int = 65536,
    device: torch.device | str | None = None,
    condition: Tensor | None = None,
) -> np.ndarray:
    """Posterior means μ(x) (μ(x, c) for a conditional model), float64 of shape (n, latent_dim)."""
    device, dtype = _placement(model, device)
    model.eval()
    out = np.zeros((x.shape[0], model.latent_dim))
    for where, xb, mb, cb in _chunks(x, chunk_size, device, dtype, mask, condition):
        out[where] = model.encode(xb, mb, cb)[0].double().cpu().numpy()
    return out


@torch.no_grad()
def per_feature_log_likelihood(
    model: VAE,
    x: Tensor,
    eps: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    condition: Tensor | None = None,
) -> np.ndarray:
    """Each element's share of the score: E_{p(z|x)}[log p(x_j|z)] in nats, shape (n, *event_shape).

    The posterior expectation uses the self-normalised importance weights of
    :func:`importance_sampled_log_likelihood` (same draws ``eps``). Summed over the
    elements it is the expected reconstruction term; the remainder of log p(x) belongs to
    the latent code, not to any one element. Missing entries (``mask`` False) are NaN.
    """
    device, dtype, eps, rows = _prepare(model, eps, device, chunk_size)
    out = np.zeros((x.shape[0], *model.likelihood.event_shape))
    for where, xb, mb, cb in _chunks(x, rows, device, dtype, mask, condition):
        logw, per = importance_terms(model, xb, eps, mb, cb)
        weights = torch.softmax(logw.double(), 0)  # (K, rows)
        share = (weights.reshape(*weights.shape, *([1] * (per.dim() - 2))) * per.double()).sum(0)
        if mb is not None:
            share = torch.where(mb, share, torch.full_like(share, float("nan")))
        out[where] = share.cpu().numpy()
    return out
