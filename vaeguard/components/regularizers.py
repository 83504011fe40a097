"""Built-in regularizers: ``beta`` (β-VAE), ``tc`` (β-TCVAE) and ``factor`` (FactorVAE).

A regularizer's ``penalty(terms, step)`` returns a scalar (nats per sample) added to the
minibatch's mean −ELBO; ``terms`` is a :class:`~vaeguard.objectives.TrainingTerms` with
the batch, its posterior parameters, one reparameterised code per row, the
reconstruction and per-dimension KL terms, the KL weight of the schedule and the size of
the data set. Each penalty is scaled by the schedule's KL weight, so annealing acts on
the regularised KL as a whole. A regularizer that needs a network of its own (FactorVAE's
discriminator) owns it and trains it in ``update(terms, step)``, which the training loop
calls after each optimisation step of the VAE; ``penalty`` itself changes nothing, so the
validation loss can evaluate it freely.

References: Higgins et al. 2017 (β-VAE); Chen et al. 2018, "Isolating Sources of
Disentanglement in VAEs" (β-TCVAE, its minibatch-weighted and -stratified estimators);
Kim & Mnih 2018, "Disentangling by Factorising" (FactorVAE).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vaeguard.components.likelihoods import standard_normal_log_prob
from vaeguard.hookspecs import hookimpl
from vaeguard.objectives import TrainingTerms


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


class BetaVAE:
    """β-VAE: the KL term weighted by β, i.e. a penalty (β − 1)·KL on top of −ELBO.

    β > 1 presses the posterior towards the factorised prior (more disentangled, blurrier
    reconstructions); β < 1 keeps more information in the code (lower distortion, the
    rate–distortion view of Alemi et al. 2018).

    Parameters
    ----------
    beta : float, default=4.0
    """

    def __init__(self, beta: float = 4.0) -> None:
        self.beta = _weight("beta", beta)

    def penalty(self, terms: TrainingTerms, step: int) -> Tensor:
        return (self.beta - 1.0) * terms.kl_weight * terms.kl.sum(-1).mean()


def log_density_gaussian(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z_d; μ_d, σ_d²) elementwise (broadcasting), nats."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).square() * torch.exp(-logvar))


def log_importance_weights_mss(batch_size: int, dataset_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """log-weights ``(M, M)`` of the minibatch-stratified estimate of q(z_i) (Chen et al. 2018, appendix C).

    q(z) = (1/N) Σ_n q(z|x_n). For z_i drawn from q(z|x_i), row i gives x_i its own share
    1/N and lets the other M − 1 rows of the batch stand for the other N − 1 points of the
    data set: weight (N − 1) / (N (M − 1)) each. Every row sums to 1.
    """
    n, m = max(dataset_size, batch_size), batch_size
    weights = torch.full((m, m), (n - 1) / (n * (m - 1)), device=device, dtype=dtype)
    weights.fill_diagonal_(1.0 / n)
    return weights.log()


class BetaTCVAE:
    """β-TCVAE: the KL split into index-code mutual information, total correlation and dimension-wise KL.

    With z_i ~ q(z|x_i) for the rows of a minibatch of M out of N, and the aggregate
    posterior q(z) = (1/N) Σ_n q(z|x_n) estimated on the minibatch,

    - MI = E[log q(z|x) − log q(z)],
    - TC = E[log q(z) − Σ_d log q(z_d)],
    - dimension-wise KL = E[Σ_d log q(z_d) − log p(z)],

    which sum to the ELBO's KL in expectation. The loss weighs them α, β, γ; as a penalty
    on top of −ELBO that is (α − 1)·MI + (β − 1)·TC + (γ − 1)·dwKL.

    Parameters
    ----------
    alpha, beta, gamma : float, default=1.0, 6.0, 1.0
    estimator : {"mss", "mws"}, default="mss"
        Minibatch-stratified or minibatch-weighted sampling for log q(z). MWS (the
        original paper's main estimator) weighs every row of the batch 1/(M N): where
        posteriors barely overlap it puts log q(z) and each log q(z_d) about log M too low,
        which inflates TC by about (D − 1)·log M. MSS gives each row's own posterior 1/N.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 6.0, gamma: float = 1.0, estimator: str = "mss") -> None:
        self.alpha, self.beta, self.gamma = _weight("alpha", alpha), _weight("beta", beta), _weight("gamma", gamma)
        if estimator not in ("mss", "mws"):
            raise ValueError(f"estimator must be 'mss' or 'mws', got {estimator!r}")
        self.estimator = estimator

    def decomposition(self, terms: TrainingTerms) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row estimates (MI, TC, dimension-wise KL), each ``(batch,)``, nats."""
        z, mu, logvar = terms.z, terms.mu, terms.logvar
        batch = z.shape[0]
        pairwise = log_density_gaussian(z[:, None, :], mu[None, :, :], logvar[None, :, :])  # (i, j, d)
        log_qz_x = log_density_gaussian(z, mu, logvar).sum(-1)
        log_pz = standard_normal_log_prob(z)
        if self.estimator == "mss" and batch > 2:
            log_w = log_importance_weights_mss(batch, terms.dataset_size, z.device, z.dtype)
            log_qz = torch.logsumexp(log_w + pairwise.sum(-1), dim=1)
            log_qz_marginals = torch.logsumexp(log_w[:, :, None] + pairwise, dim=1).sum(-1)
        else:
            shift = math.log(batch * terms.dataset_size)
            log_qz = torch.logsumexp(pairwise.sum(-1), dim=1) - shift
            log_qz_marginals = (torch.logsumexp(pairwise, dim=1) - shift).sum(-1)
        return log_qz_x - log_qz, log_qz - log_qz_marginals, log_qz_marginals - log_pz

    def penalty(self, terms: TrainingTerms, step: int) -> Tensor:
        mi, tc, dw = self.decomposition(terms)
        total = (self.alpha - 1.0) * mi + (self.beta - 1.0) * tc + (self.gamma - 1.0) * dw
        return terms.kl_weight * total.mean()


def permute_dimensions(z: Tensor, generator: torch.Generator) -> Tensor:
    """Each latent dimension shuffled across the batch on its own: samples of Π_d q(z_d)."""
    order = torch.stack([torch.randperm(z.shape[0], generator=generator) for _ in range(z.shape[1])], dim=1)
    return torch.gather(z, 0, order.to(z.device))


class FactorVAE:
    """FactorVAE: total correlation estimated by a discriminator between q(z) and Π_d q(z_d).

    The discriminator D (an MLP owned by this object) learns to tell codes of the batch
    from codes whose dimensions were shuffled independently across the batch; by the
    density-ratio trick TC ≈ E[log D(z) / (1 − D(z))], and the penalty is γ·TC. D is
    trained by :meth:`update`, one Adam step per minibatch on detached codes after the
    VAE's step, so it never pushes on the VAE; the VAE gets the penalty's gradient through z.

    Parameters
    ----------
    gamma : float, default=10.0
    hidden : int, default=256
        Width of the discriminator's three hidden layers.
    learning_rate : float, default=1e-4
    """

    def __init__(self, gamma: float = 10.0, hidden: int = 256, learning_rate: float = 1e-4) -> None:
        self.gamma = _weight("gamma", gamma)
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        self.hidden, self.learning_rate = hidden, _weight("learning_rate", learning_rate)
        self.discriminator: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _build(self, latent_dim: int, z: Tensor, generator: torch.Generator) -> None:
        """The discriminator, initialised from a seed drawn from the training run's generator (reproducible)."""
        width = self.hidden
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            for size in (latent_dim, width, width):
                layers += [nn.Linear(size, width), nn.LeakyReLU(0.2)]
            network = nn.Sequential(*layers, nn.Linear(width, 2))
        self.discriminator = network.to(device=z.device, dtype=z.dtype)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.learning_rate, betas=(0.5, 0.9))

    def total_correlation(self, z: Tensor) -> Tensor:
        """The discriminator's estimate of TC at each code, ``(batch,)`` (logit of "joint" minus "shuffled").

        Evaluated with a snapshot of the discriminator's weights, so the gradient reaches z
        only and the discriminator's own update may follow before the VAE's backward pass.
        """
        assert self.discriminator is not None
        frozen = {k: v.detach().clone() for k, v in self.discriminator.state_dict().items()}
        logits = torch.func.functional_call(self.discriminator, frozen, (z,))
        return logits[:, 0] - logits[:, 1]

    def penalty(self, terms: TrainingTerms, step: int) -> Tensor:
        """γ · KL weight · the batch's mean TC estimate; changes nothing (the training loop calls :meth:`update`)."""
        if self.discriminator is None:
            self._build(terms.z.shape[1], terms.z, terms.generator)
        return self.gamma * terms.kl_weight * self.total_correlation(terms.z).mean()

    def update(self, terms: TrainingTerms, step: int) -> None:
        """One Adam step of the discriminator on the batch's codes (detached), after the VAE's own step.

        Class 0: the batch's codes; class 1: the same codes with each dimension shuffled
        independently across the batch (samples of Π_d q(z_d)).
        """
        if self.discriminator is None:
            self._build(terms.z.shape[1], terms.z, terms.generator)
        assert self.discriminator is not None and self.optimizer is not None
        joint = terms.z.detach()
        shuffled = permute_dimensions(joint, terms.generator)
        with torch.enable_grad():
            logits = self.discriminator(torch.cat([joint, shuffled]))
            labels = torch.cat([torch.zeros(len(joint)), torch.ones(len(shuffled))]).long().to(joint.device)
            loss = nn.functional.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()


@hookimpl
def vaeguard_register_regularizers(register):
    register("beta", BetaVAE)
    register("tc", BetaTCVAE)
    register("factor", FactorVAE)
