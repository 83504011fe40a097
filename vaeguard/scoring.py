"""The score: the importance-sampled log-likelihood with q(z|x) as proposal.

log p(x) ≈ logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K, z_k ~ q(z|x).

Every row is scored with the same K standard-normal draws (common random numbers), so a
row's score does not depend on its batch, the order of rows or the chunk size. The K
weights of a chunk are one batched tensor; rows go in chunks so that memory stays bounded.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaeguard.model import VAE
from vaeguard.objectives import MixtureProposal, Proposal, elbo, importance_terms

#: Elements (K × rows × per-row working memory) one chunk may hold: 16 MiB of float64, so that the
#: likelihood's chains of elementwise operations stay in cache. With chunks sized by the decoder's
#: outputs (floored at 512 per row) and 1 << 24, scoring was 9–15 % slower on campaign, satellite,
#: Cardiotocography and a 500-column binary table, 40 % slower on 8 × 8 digits and 15 % on a 20-column
#: table (``benchmarks/results/scoring_memory.md``); scores agree to 1e-12.
CHUNK_ELEMENTS = 1 << 21
#: Decoder outputs (draws × rows × per-row outputs) of one gradient step of the probe or a fit.
PROBE_ELEMENTS = 1 << 21


#: The proposal's standard deviations are these times the fitted q's (an ELBO-fitted q is
#: narrower than the posterior; importance sampling needs the proposal's tails to cover it).
PROPOSAL_WIDTH = 1.5
#: Draws of the proposal fits (``refine_eps``); the estimator makes them from its own seed.
REFINE_SAMPLES = 8
#: The probe of every row's proposal: Adam steps, draws (the first of ``refine_eps``), step size.
PROBE_STEPS, PROBE_SAMPLES, PROBE_LEARNING_RATE = 3, 4, 0.1
#: A row whose ELBO rises by more than this (nats) beyond the typical rise gets a proposal fitted
#: to it; also the threshold of a model whose typical rise is unknown.
PROBE_GAIN = 1.0
#: Further Adam steps for those rows (all of ``refine_eps``), and the step size.
REFINE_STEPS, REFINE_LEARNING_RATE = 10, 0.3
#: A fitted row whose ELBO still rose by more than this (nats) over the second half of its steps
#: gets as many steps again.
STILL_RISING = 2.0


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


def _gradient_rows(model: VAE, draws: int) -> int:
    """Rows whose ``draws`` decoder outputs fill :data:`PROBE_ELEMENTS` (at least 1)."""
    lik = model.likelihood
    return max(1, PROBE_ELEMENTS // (draws * lik.param_count * math.prod(lik.event_shape)))


def _proposal_rows(proposal: Proposal, where: slice) -> Proposal:
    """The rows ``where`` of a proposal (a (μ, log σ²) pair or a :class:`MixtureProposal`)."""
    if isinstance(proposal, MixtureProposal):
        return MixtureProposal(
            (proposal.first[0][where], proposal.first[1][where]), (proposal.second[0][where], proposal.second[1][where])
        )
    return proposal[0][where], proposal[1][where]


def _chunks_with_proposals(
    model: VAE,
    x: Tensor,
    rows: int,
    device: torch.device,
    dtype: torch.dtype,
    mask: Tensor | None,
    condition: Tensor | None,
    refine_eps: Tensor | None,
    probe_threshold: float,
    k: int,
) -> Iterator[tuple[slice, Tensor, Tensor | None, Tensor | None, Proposal | None, np.ndarray | None]]:
    """``(rows of x, chunk, mask, conditions, proposal, refined)`` for chunks of ``rows`` rows.

    Without ``refine_eps`` the proposal is None (the encoder's q) and ``refined`` None.
    With it, the probe and the fits run on groups of up to ``rows × k / PROBE_SAMPLES`` rows,
    so their fixed cost per call is paid once per group, not once per chunk; their
    gradient steps keep to :data:`PROBE_ELEMENTS` decoder outputs (large temporaries, kept
    for the backward pass, cost more in memory traffic than they save). A row's proposal
    depends only on it.
    """
    if refine_eps is None:
        for where, xb, mb, cb in _chunks(x, rows, device, dtype, mask, condition):
            yield where, xb, mb, cb, None, None
        return
    group = max(rows, min(rows * k // PROBE_SAMPLES, _gradient_rows(model, PROBE_SAMPLES)))
    fit_rows = max(1, min(rows * k // refine_eps.shape[0], _gradient_rows(model, refine_eps.shape[0])))
    for outer, xg, mg, cg in _chunks(x, group, device, dtype, mask, condition):
        proposal, refined = _fitted_proposals(model, xg, mg, cg, refine_eps, probe_threshold, fit_rows)
        for start in range(0, xg.shape[0], rows):
            inner = slice(start, min(start + rows, xg.shape[0]))
            yield (
                slice(outer.start + inner.start, outer.start + inner.stop),
                xg[inner],
                None if mg is None else mg[inner],
                None if cg is None else cg[inner],
                _proposal_rows(proposal, inner),
                refined[inner],
            )


def in_eval_mode(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``function(model, ...)`` with ``model`` in eval mode, then give every submodule back its own mode."""

    @functools.wraps(function)
    def wrapper(model: VAE, *args: Any, **kwargs: Any) -> Any:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            return function(model, *args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training

    return wrapper


def _placement(model: VAE, device: torch.device | str | None) -> tuple[torch.device, torch.dtype]:
    """Where and in which floating-point type the model computes."""
    p = next(model.parameters())
    return (torch.device(device) if device is not None else p.device), p.dtype


def _prepare(
    model: VAE, eps: Tensor, device: torch.device | str | None, chunk_size: int | None
) -> tuple[torch.device, torch.dtype, Tensor, int]:
    """Device, dtype, the draws moved there, and the rows per chunk."""
    device, dtype = _placement(model, device)
    rows = chunk_size or chunk_rows(eps.shape[0], _per_row_elements(model))
    return device, dtype, eps.to(device=device, dtype=dtype), rows


@dataclass
class LogLikelihood:
    """Per-row estimates in nats: ``value`` (n,) and, when asked, its standard error ``std`` (n,).

    ``pareto_k`` (n,) is the reliability diagnostic of each row's importance weights
    (:func:`pareto_k`; above :data:`PARETO_K_RELIABLE` the estimate cannot be trusted) and
    ``ess`` (n,) their effective sample size, both filled when the standard error is.
    """

    value: np.ndarray
    std: np.ndarray | None = None
    pareto_k: np.ndarray | None = None
    ess: np.ndarray | None = None
    refined: np.ndarray | None = None
    #: With ``per_feature=True``: each element's conditional log-likelihood log p(x_j | x_−j) given the row's other
    #: elements, (n, *event_shape), nats (:func:`per_feature_log_likelihood`).
    per_feature: np.ndarray | None = None


#: Pareto k̂ above which an importance-sampling estimate is unreliable (Vehtari et al., PSIS).
PARETO_K_RELIABLE = 0.7


def pareto_k(log_weights: np.ndarray) -> np.ndarray:
    """Pareto k̂ of each column's importance weights: ``log_weights`` (K, n) → (n,).

    The generalized Pareto distribution is fitted to the M = ⌈min(K/5, 3√K)⌉ largest
    weights above the next one (Zhang & Stephens 2009, with the weakly informative prior
    on k of Vehtari et al., "Pareto smoothed importance sampling", 2015–2024). k̂ is the
    estimated shape of the weights' tail: below 0.5 their variance is finite; above 0.7
    the estimate of the mean (and so of log p(x)) is unreliable whatever its standard
    error says. Rows whose weights are all equal get −inf.
    """
    lw = np.sort(np.asarray(log_weights, dtype=np.float64), axis=0)
    k_samples = lw.shape[0]
    m = math.ceil(min(0.2 * k_samples, 3 * math.sqrt(k_samples)))
    if k_samples < 5 or m < 2:
        return np.full(lw.shape[1], np.inf)
    lw = lw - lw[-1]
    x = (np.exp(lw[-m:]) - np.exp(lw[-m - 1])).T  # (n, m) exceedances, ascending
    top = x[:, -1]
    quarter = x[:, int(m / 4 + 0.5) - 1]
    quarter = np.where(quarter > 0, quarter, top)
    grid = 30 + int(math.sqrt(m))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        b = 1.0 / top[:, None] + (1 - np.sqrt(grid / (np.arange(1, grid + 1) - 0.5)))[None, :] / (3 * quarter[:, None])
        k = np.log1p(-b[:, :, None] * x[:, None, :]).mean(-1)  # (n, grid)
        profile = m * (np.log(-b / k) - k - 1)
        # the posterior weights 1 / Σ_j exp(profile_j − profile_i): a softmax of the profile
        profile = np.where(np.isfinite(profile), profile, -np.inf)
        weights = np.exp(profile - profile.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
        b_post = (b * weights).sum(1)
        k_post = np.log1p(-b_post[:, None] * x).mean(1)
    k_post = (m * k_post + 10 * 0.5) / (m + 10)
    return np.where(top > 0, k_post, -np.inf)


def effective_sample_size(log_weights: np.ndarray) -> np.ndarray:
    """(Σw)² / Σw² per column of ``log_weights`` (K, n): how many equal weights they are worth."""
    w = np.exp(log_weights - log_weights.max(0, keepdims=True))
    return w.sum(0) ** 2 / np.square(w).sum(0)


#: Floor on the per-row working memory used for chunking (the measured size of very small networks).
MIN_ROW_ELEMENTS = 64
#: Each model's working memory per decoder evaluation, in elements (see :func:`_per_row_elements`).
_ROW_ELEMENTS: weakref.WeakKeyDictionary[VAE, int] = weakref.WeakKeyDictionary()


def _per_row_elements(model: VAE) -> int:
    """Elements one decoder evaluation (one draw for one row) holds at its peak; chunks are sized by it.

    Measured once per model by decoding one code with a hook on every layer: the largest
    layer's input plus output plus, for a convolution, its unfolded input (the column
    buffer that CPU convolutions without a direct kernel build, e.g. in float64: 9
    times the input of a 3 × 3 convolution), and the likelihood's parameters. Sizing by the
    parameters alone let an 8 × 8 image model's chunks reach 3 GB.
    """
    known = _ROW_ELEMENTS.get(model)
    if known is not None:
        return known
    lik = model.likelihood
    peak = lik.param_count * math.prod(lik.event_shape)

    def measure(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal peak
        given = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        if given is None or not isinstance(output, Tensor):
            return
        elements = given.numel() + output.numel()
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            kernel = math.prod(module.kernel_size)
            if module.transposed:  # columns of the output's channels for every input position
                elements += module.out_channels * kernel * math.prod(given.shape[2:])
            else:  # the input's channels for every output position
                elements += module.in_channels * kernel * math.prod(output.shape[2:])
        peak = max(peak, elements)

    p = next(model.parameters())
    code = torch.zeros(1, model.latent_dim, dtype=p.dtype, device=p.device)
    condition = torch.zeros(1, model.condition_dim, dtype=p.dtype, device=p.device) if model.condition_dim else None
    hooks = [m.register_forward_hook(measure) for m in model.decoder.modules()]
    try:
        with torch.no_grad():
            model.decode(code, condition)
    finally:
        for hook in hooks:
            hook.remove()
    _ROW_ELEMENTS[model] = result = max(MIN_ROW_ELEMENTS, peak)
    return result


@torch.no_grad()
@in_eval_mode
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
    refine_eps: Tensor | None = None,
    probe_threshold: float = PROBE_GAIN,
    per_feature: bool = False,
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
        Rows per chunk; by default sized by :data:`CHUNK_ELEMENTS` and the network's working memory.
    device : torch.device, optional
        Where to compute; defaults to the model's device.
    condition : Tensor, shape (n, condition_dim), optional
        A conditional model's condition vectors; the estimate is then of log p(x|c).
    refine_eps : Tensor, shape (S, latent_dim), optional
        Draws for fitting proposals (independent of ``eps``). Given, the proposal is the
        encoder's q widened :data:`PROPOSAL_WIDTH` times, and a row that the probe of
        :func:`_fitted_proposals` flags gets a proposal fitted to it, mixed with the
        encoder's; ``refined`` says which rows. Without it the proposal is the encoder's q
        as it is.
    probe_threshold : float, default=PROBE_GAIN
        Rise of a row's ELBO in the probe (nats) above which its proposal is fitted; a
        model's own value comes from its training rows (:func:`probe_threshold`).
    per_feature : bool, default=False
        Also fill ``per_feature``: each element's log-likelihood given the row's other
        elements, from the same pass (:func:`per_feature_log_likelihood`), no second forward pass.

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
    tail = np.zeros(x.shape[0]) if return_std else None
    ess = np.zeros(x.shape[0]) if return_std else None
    refined = np.zeros(x.shape[0], bool)
    shares = np.zeros((x.shape[0], *model.likelihood.event_shape)) if per_feature else None
    if refine_eps is not None:
        refine_eps = refine_eps.to(device=device, dtype=dtype)
    chunks = _chunks_with_proposals(model, x, rows, device, dtype, mask, condition, refine_eps, probe_threshold, k)
    for where, xb, mb, cb, proposal, redo in chunks:
        if redo is not None:
            refined[where] = redo
        logw, per = importance_terms(model, xb, eps, mb, cb, proposal=proposal)
        logw = logw.double()  # (K, rows), float64
        value[where] = (torch.logsumexp(logw, 0) - math.log(k)).cpu().numpy()
        if shares is not None:
            shares[where] = _conditional_log_likelihoods(logw, per, mb)
        if std is not None:
            w = (logw - logw.max(0, keepdim=True).values).exp()
            mean = w.mean(0)
            sd = w.std(0, unbiased=False) if k > 1 else torch.zeros_like(mean)
            std[where] = (sd / (math.sqrt(k) * mean)).cpu().numpy()
            log_weights = logw.cpu().numpy()
            tail[where] = pareto_k(log_weights)
            ess[where] = effective_sample_size(log_weights)
    return LogLikelihood(value, std, tail, ess, refined, shares)


def _probe(
    model: VAE, x: Tensor, mask: Tensor | None, condition: Tensor | None, eps: Tensor
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor]:
    """The encoder's q(z|x), q after the probe's steps, and the rise of each row's ELBO (nats, (rows,))."""
    probe = eps[:PROBE_SAMPLES]
    with torch.no_grad():
        start = model.encode(x, mask, condition)
    mu, logvar, path = refine_proposal(model, x, mask, condition, probe, PROBE_STEPS, PROBE_LEARNING_RATE, start)
    with torch.no_grad():
        after = importance_terms(model, x, probe, mask, condition, proposal=(mu, logvar))[0].mean(0)
    return start, (mu, logvar), after - path[0]


@in_eval_mode
def probe_gains(
    model: VAE,
    x: Tensor,
    refine_eps: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    condition: Tensor | None = None,
) -> np.ndarray:
    """How much each row's ELBO rises (nats) in a short probe of gradient steps from the encoder's q.

    float64 of shape (n,). The rise is the part of the ELBO the encoder leaves on the table
    for that row (its amortization gap, as far as :data:`PROBE_STEPS` steps find it).
    """
    device, dtype, eps, _ = _prepare(model, refine_eps, device, chunk_size)
    out = np.zeros(x.shape[0])
    for where, xb, mb, cb in _chunks(
        x, chunk_size or _gradient_rows(model, PROBE_SAMPLES), device, dtype, mask, condition
    ):
        out[where] = _probe(model, xb, mb, cb, eps)[2].double().cpu().numpy()
    return out


def probe_threshold(training_gains: np.ndarray) -> float:
    """The probe's threshold for a model: the median rise over its training rows plus :data:`PROBE_GAIN`.

    In a small latent space the encoder serves typical rows almost perfectly (a median
    rise of a few tenths of a nat); in a large one every row rises by nats, and fitting
    a proposal to each of them costs many times the score while it changes the estimate
    little (``benchmarks/results/scoring_cost.md``). What marks a row the encoder
    serves badly is a rise well beyond the usual. Never below :data:`PROBE_GAIN`.
    """
    gains = np.asarray(training_gains, dtype=np.float64)
    gains = gains[np.isfinite(gains)]
    if gains.size == 0:
        return PROBE_GAIN
    return float(max(PROBE_GAIN, np.median(gains) + PROBE_GAIN))


def _fitted_proposals(
    model: VAE,
    x: Tensor,
    mask: Tensor | None,
    condition: Tensor | None,
    eps: Tensor,
    threshold: float = PROBE_GAIN,
    fit_rows: int | None = None,
) -> tuple[Proposal, np.ndarray]:
    """The proposal for each row and which rows got one fitted to them (bool, (rows,)).

    The encoder's q(z|x) can sit many posterior widths away from the true posterior of a
    far-out row, with a confident width, so that its importance weights look healthy
    (small Pareto k̂) while the estimate is off by many nats. Each row's q is therefore
    probed: :data:`PROBE_STEPS` Adam steps on its ELBO. A row whose ELBO rises by more
    than ``threshold`` nats was badly served by the encoder and gets
    :data:`REFINE_STEPS` further steps (twice that while its ELBO keeps rising); its
    proposal is then the even mixture of the encoder's q and the fitted one
    (:class:`~vaeguard.objectives.MixtureProposal`), so a fit that lands worse than the
    encoder (it can, in a large latent space: a Gaussian fitted with few draws) costs at
    most the half of the draws it takes. Every proposal is widened
    :data:`PROPOSAL_WIDTH` times. The fits run ``fit_rows`` rows at a time (default:
    all flagged rows at once).
    """
    start, moved, gain = _probe(model, x, mask, condition, eps)
    redo = (gain > threshold).cpu().numpy()
    widen = 2 * math.log(PROPOSAL_WIDTH)
    encoder = (start[0], start[1] + widen)
    if not redo.any():
        return encoder, redo
    mu, logvar = (t.clone() for t in start)
    flagged = torch.from_numpy(np.flatnonzero(redo)).to(x.device)
    step = fit_rows or len(flagged)
    for r in flagged.split(step):
        mu[r], logvar[r] = _fit(model, x[r], _rows(mask, r), _rows(condition, r), eps, moved, r)
    return MixtureProposal(encoder, (mu, logvar + widen)), redo


def _rows(t: Tensor | None, rows: Tensor) -> Tensor | None:
    """The rows ``rows`` of an optional per-row tensor (a mask, conditions)."""
    return None if t is None else t[rows]


def _fit(
    model: VAE,
    x: Tensor,
    mask: Tensor | None,
    condition: Tensor | None,
    eps: Tensor,
    start: tuple[Tensor, Tensor],
    rows: Tensor,
) -> tuple[Tensor, Tensor]:
    """The proposals (μ, log σ²) fitted to ``x``, starting from the rows ``rows`` of ``start``.

    :data:`REFINE_STEPS` Adam steps, and as many again for the rows whose ELBO still rose
    by more than :data:`STILL_RISING` nats over the second half of them (far-out rows, far
    from where their fit began).
    """
    mu, logvar, path = refine_proposal(
        model, x, mask, condition, eps, REFINE_STEPS, REFINE_LEARNING_RATE, (start[0][rows], start[1][rows])
    )
    rising = torch.nonzero(path[-1] - path[REFINE_STEPS // 2] > STILL_RISING).flatten()
    if len(rising):
        more = refine_proposal(
            model, x[rising], _rows(mask, rising), _rows(condition, rising), eps, REFINE_STEPS,
            REFINE_LEARNING_RATE, (mu[rising], logvar[rising]),
        )  # fmt: skip
        mu[rising], logvar[rising] = more[0], more[1]
    return mu, logvar


def refine_proposal(
    model: VAE,
    x: Tensor,
    mask: Tensor | None,
    condition: Tensor | None,
    eps: Tensor,
    steps: int,
    learning_rate: float,
    start: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """A Gaussian proposal fitted to each row: (μ, log σ²), each (rows, latent), and its ELBO's path.

    Starts from ``start`` (e.g. the encoder's q(z|x)) and takes ``steps`` Adam steps
    on each row's ELBO, estimated with the fixed draws ``eps`` (S, latent) —
    semi-amortized inference (Kim et al. 2018). The objective is a sum over rows and Adam
    acts element by element, so a row's proposal does not depend on the other rows. The
    third result, shape (steps, rows), is each row's ELBO estimate (nats) before each step.
    """
    mu, logvar = (t.detach().clone().requires_grad_(True) for t in start)
    optimizer = torch.optim.Adam([mu, logvar], lr=learning_rate)
    path = []
    with torch.enable_grad():
        for _ in range(steps):
            objective = importance_terms(model, x, eps, mask, condition, proposal=(mu, logvar))[0].mean(0)
            path.append(objective.detach())
            mu.grad, logvar.grad = torch.autograd.grad(-objective.sum(), [mu, logvar])
            optimizer.step()
    return mu.detach(), logvar.detach(), torch.stack(path) if path else x.new_zeros(0, x.shape[0])


@torch.no_grad()
@in_eval_mode
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
@in_eval_mode
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
    out = np.zeros((x.shape[0], model.latent_dim))
    for where, xb, mb, cb in _chunks(x, chunk_size, device, dtype, mask, condition):
        out[where] = model.encode(xb, mb, cb)[0].double().cpu().numpy()
    return out


@torch.no_grad()
@in_eval_mode
def per_feature_log_likelihood(
    model: VAE,
    x: Tensor,
    eps: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    condition: Tensor | None = None,
    refine_eps: Tensor | None = None,
    probe_threshold: float = PROBE_GAIN,
) -> np.ndarray:
    """Each element's log-likelihood given the row's other elements, log p(x_j | x_−j), in nats, (n, *event_shape).

    log p(x_j | x_−j) = log p(x) − log p(x_−j): what the element's value costs the row once
    the rest of the row is known — an unusual value, or a usual value that does not fit
    the others. Both terms are importance-sampling estimates from the same draws ``eps``
    and proposals as :func:`importance_sampled_log_likelihood` (with ``refine_eps``, fitted
    to the rows the encoder serves badly), p(x_−j) with the weights w_k / p(x_j|z_k), so it
    costs no second forward pass. Where x_j alone makes a row far-out the proposal follows
    x_j and p(x_−j) is underestimated: the element's value is then an upper bound, by
    hundreds of nats on thyroid's anomalies, so the estimator scores tables of up to 64
    columns with a pass per column instead; this estimate serves images (one value per
    pixel) and wider tables. Missing entries (``mask`` False) are NaN.
    """
    return importance_sampled_log_likelihood(
        model,
        x,
        eps,
        mask=mask,
        chunk_size=chunk_size,
        device=device,
        condition=condition,
        refine_eps=refine_eps,
        probe_threshold=probe_threshold,
        per_feature=True,
    ).per_feature


def _conditional_log_likelihoods(logw: Tensor, per: Tensor, mask: Tensor | None) -> np.ndarray:
    """log p̂(x) − log p̂(x_−j) per element from log weights ``logw`` (K, rows) and log p(x_j|z_k) ``per``
    (K, rows, *event): log Σ_k w_k − log Σ_k w_k / p(x_j|z_k); NaN where missing."""
    log_w = logw.reshape(*logw.shape, *([1] * (per.dim() - 2)))
    value = torch.logsumexp(logw, 0).reshape(log_w.shape[1:]) - torch.logsumexp(log_w - per.double(), 0)
    if mask is not None:
        value = torch.where(mask, value, torch.full_like(value, float("nan")))
    return value.cpu().numpy()
