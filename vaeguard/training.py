"""The training loop: Adam on minibatches, KL warm-up, gradient clipping, early stopping."""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vaeguard.model import VAE
from vaeguard.objectives import elbo


class TrainingDivergedError(ValueError, RuntimeError):
    """The loss became NaN or infinite; the message says when and what to try."""


@dataclass
class TrainingConfig:
    """Settings of one training run.

    ``epochs`` is the maximum; early stopping (on the validation ELBO, checked every
    epoch) ends sooner after ``patience`` epochs without improvement and restores the
    best weights. ``kl_warmup_fraction`` of all steps ramps the KL weight from 0 to 1.
    """

    epochs: int = 100
    batch_size: int = 128
    learning_rate: float = 1e-3
    validation_fraction: float = 0.1
    min_validation_rows: int = 20
    patience: int = 10
    kl_warmup_fraction: float = 0.1
    max_grad_norm: float = 10.0
    weight_decay: float = 0.0
    trim_fraction: float = 0.0


@dataclass
class TrainingHistory:
    """Per-epoch mean −ELBO (nats per sample, internal units) and the epoch kept."""

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False


def split_validation(n: int, config: TrainingConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices of the training and validation rows (no validation rows for small data)."""
    n_val = round(n * config.validation_fraction)
    perm = torch.randperm(n, generator=generator)
    if n_val < config.min_validation_rows or n - n_val < 2:
        return perm, perm[:0]
    return perm[n_val:], perm[:n_val]


#: Validation rows evaluated at once (bounds memory for large validation sets).
VALIDATION_CHUNK = 8192


@torch.no_grad()
def validation_loss(
    model: VAE, x_val: Tensor, val_eps: Tensor, chunk: int = VALIDATION_CHUNK, mask: Tensor | None = None
) -> float:
    """Mean −ELBO over the validation rows, each with its own fixed draw ``val_eps[:, i]``; nats."""
    total = 0.0
    for start in range(0, x_val.shape[0], chunk):
        xb, eb = x_val[start : start + chunk], val_eps[:, start : start + chunk]
        mb = None if mask is None else mask[start : start + chunk]
        total += -elbo(model, xb, eb, mb)[0].sum().item()
    return total / x_val.shape[0]


def _progress(total: int, verbose: bool):
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="epoch", file=sys.stderr, leave=True, dynamic_ncols=True)


def train(
    model: VAE,
    x: Tensor,
    config: TrainingConfig,
    *,
    generator: torch.Generator,
    device: torch.device,
    verbose: bool = False,
    mask: Tensor | None = None,
) -> TrainingHistory:
    """Fit ``model`` to the rows of ``x`` by maximising the ELBO; returns the history.

    ``mask`` (bool, like ``x``) marks the observed entries: the likelihood then sums
    only those (missing entries of ``x`` must hold finite placeholders, e.g. 0).

    Randomness (split, shuffles, reparameterisation noise) comes from ``generator`` (a
    CPU generator), so the same seed gives the same model on the same device.

    Raises
    ------
    TrainingDivergedError
        When the loss or the gradients become NaN or infinite.
    """
    model.to(device)
    x = x.to(torch.get_default_dtype())
    train_idx, val_idx = split_validation(x.shape[0], config, generator)
    x_train = x[train_idx].to(device)
    x_val = x[val_idx].to(device)
    m_train = None if mask is None else mask[train_idx].to(device)
    m_val = None if mask is None else mask[val_idx].to(device)
    val_eps = torch.randn(1, x_val.shape[0], model.latent_dim, generator=generator).to(device)
    n = x_train.shape[0]
    batch_size = max(1, min(config.batch_size, n))
    steps_per_epoch = math.ceil(n / batch_size)
    warmup_steps = max(1, int(config.kl_warmup_fraction * config.epochs * steps_per_epoch))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    history = TrainingHistory()
    best_loss, best_state, bad_epochs, step = math.inf, None, 0, 0
    bar = _progress(config.epochs, verbose)
    try:
        for epoch in range(config.epochs):
            model.train()
            perm = torch.randperm(n, generator=generator).to(device)
            total = 0.0
            for start in range(0, n, batch_size):
                rows = perm[start : start + batch_size]
                xb = x_train[rows]
                mb = None if m_train is None else m_train[rows]
                eps = torch.randn(1, xb.shape[0], model.latent_dim, generator=generator).to(device)
                kl_weight = min(1.0, (step + 1) / warmup_steps)
                per_row = -elbo(model, xb, eps, mb, kl_weight=kl_weight)[0]
                n_keep = xb.shape[0] - int(config.trim_fraction * xb.shape[0])
                if step >= warmup_steps and n_keep < xb.shape[0]:
                    per_row = torch.topk(per_row, n_keep, largest=False).values
                loss = per_row.mean()
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                        "try a smaller learning_rate, or check the data for extreme values"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                if not torch.isfinite(norm):
                    raise TrainingDivergedError(
                        f"the gradients became {norm.item()} at epoch {epoch + 1}, step {step + 1}; "
                        "try a smaller learning_rate, or check the data for extreme values"
                    )
                optimizer.step()
                total += loss.item() * xb.shape[0]
                step += 1
            history.train_loss.append(total / n)
            monitored = history.train_loss[-1]
            if x_val.shape[0]:
                model.eval()
                monitored = validation_loss(model, x_val, val_eps, mask=m_val)
                history.validation_loss.append(monitored)
            if bar is not None:
                bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}", val=f"{monitored:.3f}")
                bar.update(1)
            in_warmup = step < warmup_steps
            if monitored < best_loss or in_warmup:
                best_loss, bad_epochs, history.best_epoch = monitored, 0, epoch
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
                if x_val.shape[0] and bad_epochs >= config.patience:
                    history.stopped_early = True
                    break
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history
