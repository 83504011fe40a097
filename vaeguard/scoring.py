"""The score: the importance-sampled log-likelihood with q(z|x) as proposal.

log p(x) ≈ logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K, z_k ~ q(z|x).

Every row is scored with the same K standard-normal draws (common random numbers), so a
row's score does not depend on its batch, the order of rows or the chunk size. The K
weights of a chunk are one batched tensor; rows go in chunks so that memory stays bounded.
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaeguard.model import VAE
from vaeguard.objectives import CorrelatedGaussian, Gaussian, MixtureProposal, Proposal, elbo, importance_terms

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
#: A fitted row whose ELBO beats the encoder's q by more than this (nats) is scored with the fit alone.
HOPELESS_ENCODER = 10.0
#: Further Adam steps for those rows (all of ``refine_eps``), and the step size: blocks of steps (an Adam
#: run each), as (steps, most blocks) by latent size; a row goes on to the next block while its ELBO rose
#: by more than STILL_RISING nats over the block's last RISING_STEPS steps. Where the grid search runs
#: (latent <= 2), blocks of 10, up to 2: its far rows start from the grid's moments onto posteriors far
#: narrower than a step, and shorter runs settled them worse (thyroid's anomalies 98.9 % -> 88 % within
#: 0.5 nats of exact). Elsewhere one block of 10. Blocks of 5, up to 4, were cheaper but each fresh Adam run
#: kicks a settled proposal by a full step: the ECG window model's AUROC 0.931 (one block of 10) -> 0.895
#: on the same fitted model (0.894 with the rows going on unless they rose by less than 0.5 nats), and
#: satellite's rows within 0.5 nats of a K = 2048 reference 73.3 -> 68.8 %.
REFINE_BLOCKS, REFINE_LEARNING_RATE = {"searched": (10, 2), "other": (10, 1)}, 0.3
STILL_RISING, RISING_STEPS = 2.0, 4
#: A grid search for a row's posterior where the latent space has at most two dimensions: points
#: per axis over [−SEARCH_BOX, SEARCH_BOX] (21 × 21 in 2-D: spacing 4; 81 in 1-D: spacing 1) ...
SEARCH_BOX, SEARCH_GRID = 40.0, {1: 81, 2: 21}
#: ... then points per axis of each row's local grid, ±1 coarse spacing around its best point (spacing 1 in 2-D).
LOCAL_GRID = 9
#: The smallest sd per axis that a fit from the grid starts with.
SEARCH_MIN_SD = 0.05
#: Small Adam steps that settle a searched row's proposal, and their step size.
POLISH_STEPS, POLISH_LEARNING_RATE = 10, 0.03
#: Rows whose ELBO at the encoder's q falls below this quantile of the training rows' are searched.
SEARCH_QUANTILE = 0.1
#: Rounds of the fixed-point completion of a row with missing entries (decode the code, fill the
#: missing entries with the decoder's mean, encode the completed row) before its proposal is probed.
COMPLETION_ROUNDS = 30
#: The moment matching of a row's proposal (latent <= 2: rows with missing entries and refitted rows):
#: Gauss-Hermite nodes per axis, and for each round how many times wider than the current proposal the nodes
#: are spread: wide rounds find the posterior's extent, and the last two rounds, on the proposal itself, make the
#: moments those of a Gaussian posterior exactly (with the nodes three times wider the rounds settle at ~0.65 of
#: its sd, and one round on the proposal leaves its mean up to 0.25 sd off).
MATCH_NODES, MATCH_WIDTHS = 7, (3.0, 3.0, 3.0, 1.0, 1.0)
#: A row with missing entries is scored with the even mixture of its proposal and one this much wider.
MISSING_WIDTH = 2.0
#: Rows whose weights have a Pareto k̂ above this (a tail too heavy for a finite variance) get a matched proposal
#: and are scored again (latent <= 2).
RECHECK_PARETO_K = 0.5
#: ... when k̂ comes from at least this many tail weights (K >= 21); from fewer it is noise, and rescoring the
#: rows it picks would cost matchings for no gain.
RECHECK_MIN_TAIL = 5
#: Each round the matched sd along any direction is at least this share of the nodes' scale (the round's width × the
#: current sd).
MATCH_FLOOR = 0.25


#: Samples per call of a scoring copy's convolutions (:func:`cpu_scoring_copy`): the encoder's see one
#: row at a time (a chunk may hold a single row), the decoder's blocks of 64 draws (K = 64 by default).
ENCODER_CONV_BLOCK, DECODER_CONV_BLOCK = 1, 64
#: A scoring copy's MLP decoder with a linear layer of at least this many weights (a table of 512 columns or more
#: at the automatic sizes: 256 × 2d) computes in float32 blocks of DECODER_LINEAR_BLOCK draws and hands its float32
#: output to a likelihood that computes in float32 (:func:`cpu_scoring_copy`). Smaller layers cost less in float64
#: than a block's per-call overhead saves.
WIDE_LINEAR_WEIGHTS, DECODER_LINEAR_BLOCK = 1 << 18, 64
#: No activation of a float32 section may exceed this for a sample computed in float32 (a bound from the sample's
#: input, :meth:`FixedBlockSection.forward`); a sample whose bound does (the code of an absurd row) is computed
#: in float64. The likelihood's terms of means beyond 1e12 are float64 anyway.
FLOAT32_SECTION_BOUND = 1e12


#: Layers that act on each element alone: between two convolutions of a scoring copy they run in float32 with them.
ELEMENTWISE_LAYERS = (
    torch.nn.SiLU,
    torch.nn.ReLU,
    torch.nn.LeakyReLU,
    torch.nn.ELU,
    torch.nn.GELU,
    torch.nn.Tanh,
    torch.nn.Sigmoid,
    torch.nn.Softplus,
    torch.nn.Identity,
)
#: Elementwise layers with |f(t)| ≤ |t| + 1, whose outputs a float32 section bounds from its input's size.
BOUNDED_ACTIVATIONS = (torch.nn.SiLU, torch.nn.ReLU, torch.nn.GELU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Identity)
#: Layers that only reshape, which may follow a float32 section whose output stays float32.
RESHAPES = (torch.nn.Unflatten, torch.nn.Flatten, torch.nn.Identity)


class FixedBlockSection(torch.nn.Module):
    """Consecutive layers of a float64 scoring copy — convolutions and the elementwise activations between
    and after them — computed together in float32, ``block`` samples per call.

    float64 convolutions on the CPU have no direct kernel (PyTorch unfolds the input and
    multiplies matrices): at 32 × 32 they were 88 % of an image model's scoring time. float32
    kernels may round a sample differently with the batch's size, never with its position or
    the other samples in it (``tests/test_scoring.py``), so the input is cut into blocks of
    exactly ``block`` samples (the last one padded with zeros): a sample's output then depends
    on it alone. The whole run of layers computes in float32, in channels-last layout where
    it is 2-D (oneDNN's direct kernels then need no reorder), so that a section converts
    once on the way in and once on the way out instead of around every convolution (a 32 × 32
    image model's scoring: a third of its time went to those conversions and to float64
    activations). Input and output keep the caller's dtype and layout, and so do the
    registered parameters (the wrapped ``layers``): code that reads a model's dtype from its
    parameters still sees float64. The float32 copy that computes is made once, here.

    With ``float32_output`` (a wide MLP decoder whose likelihood computes in float32) the output
    stays float32, unless a sample's input is so large that an activation could pass
    :data:`FLOAT32_SECTION_BOUND` (a bound from the layers' norms, :func:`_safe_input_size`): such
    samples are computed by the float64 originals, and the output is then float64, every other
    sample's values exactly those of its float32 pass.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], block: int, float32_output: bool = False) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.block = int(block)
        self.float32_output = bool(float32_output)
        computing = torch.nn.Sequential(*(copy.deepcopy(layer) for layer in layers)).float()
        self._channels_last = any(isinstance(layer, torch.nn.Conv2d | torch.nn.ConvTranspose2d) for layer in layers)
        if self._channels_last:
            computing = computing.to(memory_format=torch.channels_last)
        # in a tuple, not a submodule: parameters(), state_dict() and .to() see the float64 originals
        self._float32 = (computing,)
        self._safe_input = _safe_input_size(layers) if self.float32_output else math.inf

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        beyond = None
        if self.float32_output:
            # a sample whose activations could pass FLOAT32_SECTION_BOUND is computed in float64 (zeros in the
            # float32 pass); the decision reads the sample alone. NaN compares False: it goes to float64 too.
            size = x.detach().abs().flatten(1).amax(1)
            beyond = ~(size < self._safe_input)
            if beyond.any():
                x_safe = torch.where(beyond.view(-1, *(1,) * (x.dim() - 1)), torch.zeros_like(x), x)
            else:
                beyond, x_safe = None, x
        else:
            x_safe = x
        inputs = x_safe.float()
        short = -n % self.block
        if short:
            inputs = torch.cat([inputs, inputs.new_zeros(short, *inputs.shape[1:])])
        if self._channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        outputs = torch.cat([self._float32[0](part) for part in inputs.split(self.block)])[:n]
        if not self.float32_output:
            return outputs.to(dtype=x.dtype, memory_format=torch.contiguous_format)
        if beyond is None:
            return outputs
        rows = torch.nonzero(beyond).flatten()
        exact = x[rows]
        for layer in self.layers:
            exact = layer(exact)
        # float64 for every sample then: the float32 ones exactly as computed, so no other row's score moves
        return outputs.to(x.dtype).index_put((rows,), exact)


def _safe_input_size(layers: Sequence[torch.nn.Module]) -> float:
    """The largest input size max|x| for which no activation of ``layers`` can pass :data:`FLOAT32_SECTION_BOUND`.

    Each layer's output is bounded from its input's: a linear layer's by ``‖W‖∞ · size + max|b|``
    (‖W‖∞ its largest absolute row sum), an elementwise one's by ``size + 1`` (:data:`BOUNDED_ACTIVATIONS`:
    |f(t)| ≤ |t| + 1). A section with any other layer gets 0: every sample in float64.
    """
    gain, offset, safe = 1.0, 0.0, FLOAT32_SECTION_BOUND
    for layer in layers:
        if isinstance(layer, torch.nn.Linear):
            norm = float(layer.weight.detach().abs().sum(1).max())
            bias = 0.0 if layer.bias is None else float(layer.bias.detach().abs().max())
            gain, offset = gain * norm, offset * norm + bias
        elif isinstance(layer, BOUNDED_ACTIVATIONS):
            offset += 1.0
        else:
            return 0.0
        if gain > 0:
            safe = min(safe, (FLOAT32_SECTION_BOUND - offset) / gain)
        elif offset >= FLOAT32_SECTION_BOUND:
            return 0.0
    return max(safe, 0.0)


def _wide_linear_section(decoder: torch.nn.Module) -> bool:
    """An MLP decoder's linear layers and activations into one float32 :class:`FixedBlockSection` whose output
    stays float32, in place, where one of its layers has :data:`WIDE_LINEAR_WEIGHTS` weights or more; whether
    it did. Only a decoder whose forward is its ``net`` (``stacks_as_sequential``) of linear layers and
    :data:`BOUNDED_ACTIVATIONS`, then at most reshapes."""
    net = getattr(decoder, "net", None)
    if not (getattr(decoder, "stacks_as_sequential", False) and isinstance(net, torch.nn.Sequential)):
        return False
    layers = list(net)
    linear = [i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.Linear)]
    if not linear or max(layers[i].weight.numel() for i in linear) < WIDE_LINEAR_WEIGHTS:
        return False
    last = linear[-1]
    if not all(isinstance(layer, (torch.nn.Linear, *BOUNDED_ACTIVATIONS)) for layer in layers[: last + 1]):
        return False
    if not all(isinstance(layer, RESHAPES) for layer in layers[last + 1 :]):
        return False
    net[0] = FixedBlockSection(layers[: last + 1], DECODER_LINEAR_BLOCK, float32_output=True)
    for k in range(1, last + 1):
        net[k] = torch.nn.Identity()
    return True


def _fixed_block_sections(network: torch.nn.Module, block: int) -> None:
    """Every convolution of ``network`` into a :class:`FixedBlockSection`, in place: a run of convolutions and
    elementwise layers inside a ``Sequential`` becomes one section (its other places hold ``Identity``, so
    the container's indices and slices still mean what they meant); a convolution elsewhere, a section alone."""

    def is_convolution(module: torch.nn.Module) -> bool:
        return isinstance(module, torch.nn.modules.conv._ConvNd)

    for parent in list(network.modules()):  # listed before any section exists
        if isinstance(parent, torch.nn.Sequential):
            children = list(parent)
            i = 0
            while i < len(children):
                if not is_convolution(children[i]):
                    i += 1
                    continue
                j = i + 1
                while j < len(children) and (
                    is_convolution(children[j]) or isinstance(children[j], ELEMENTWISE_LAYERS)
                ):
                    j += 1
                parent[i] = FixedBlockSection(children[i:j], block)
                for k in range(i + 1, j):
                    parent[k] = torch.nn.Identity()
                i = j
            continue
        for name, child in list(parent.named_children()):
            if is_convolution(child):
                setattr(parent, name, FixedBlockSection([child], block))


def cpu_scoring_copy(model: VAE) -> VAE:
    """A float64 copy of ``model`` for scoring on the CPU, its convolutions in fixed-block float32 sections and
    its likelihood's per-element terms in float32 where the likelihood declares ``float32_scoring`` — and
    then a wide MLP decoder (a layer of :data:`WIDE_LINEAR_WEIGHTS` weights or more) in one fixed-block
    float32 section whose float32 output the likelihood reads as it is.

    float64 makes a row's score independent of the other rows of its batch (float32 matrix
    kernels round differently by the batch's shape); the convolutions keep that property by
    computing in blocks of fixed size (:class:`FixedBlockSection`), the likelihood by
    elementwise operations that round an element alike wherever it sits (its row sums and
    the importance weights stay float64). A row's score moves by ~1e-3 nats on a 32 × 32
    image (~1e-6 on 8 × 8), and by ~1e-6 of its size on a table, against an all-float64 copy;
    a wide table's scoring takes ~0.75 × the time (its elementwise terms dominate: float64
    transcendental functions cost 2–6 × float32's on a CPU); its decoder in float32 takes that to
    0.86 × again on a 2000-column table (about half the matrix products' cost, and no float64 round trip
    of the decoder's (K · rows, 2 · columns) output). Samples whose activations could leave float32's
    safe range are decoded in float64 (:class:`FixedBlockSection`).
    """
    scoring = copy.deepcopy(model).double()
    if type(scoring.likelihood).float32_scoring:
        scoring.likelihood.compute_dtype = torch.float32
        _wide_linear_section(scoring.decoder)
    for network, block in ((scoring.encoder, ENCODER_CONV_BLOCK), (scoring.decoder, DECODER_CONV_BLOCK)):
        _fixed_block_sections(network, block)
    return scoring


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
    """The rows ``where`` of a proposal (a Gaussian or a :class:`MixtureProposal` of two)."""
    if isinstance(proposal, MixtureProposal):
        return MixtureProposal(_proposal_rows(proposal.first, where), _proposal_rows(proposal.second, where))
    if isinstance(proposal, CorrelatedGaussian):
        return CorrelatedGaussian(proposal.mean[where], proposal.scale_tril[where])
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
    search_floor: float | None = None,
    probes: Probe | None = None,
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
        probed = None if probes is None else probes.rows(outer).to(device, dtype)
        proposal, refined = _fitted_proposals(
            model, xg, mg, cg, refine_eps, probe_threshold, fit_rows, search_floor, probed
        )
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
    m = pareto_tail_size(k_samples)
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


def pareto_tail_size(k_samples: int) -> int:
    """How many of ``k_samples`` largest weights :func:`pareto_k` fits its tail to: ⌈min(K/5, 3√K)⌉."""
    return math.ceil(min(0.2 * k_samples, 3 * math.sqrt(k_samples)))


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
    parameters alone let an 8 × 8 image model's chunks reach 3 GB. In a CPU scoring copy
    (:func:`cpu_scoring_copy`) convolutions are inside a :class:`FixedBlockSection`, counted by
    its input and output only: its blocks hold at most one block's layers at a time.
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
    search_floor: float | None = None,
    probes: Probe | None = None,
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
    search_floor : float, optional
        With ``refine_eps`` and a latent space of one or two dimensions: rows whose ELBO at
        the encoder's q is below this (nats; a model's own value comes from its training rows,
        :func:`search_floor`), and the rows the probe flags, get a grid search for their
        posterior (:func:`_searched`). None: no search.
    probes : Probe, optional
        With ``refine_eps``: the rows' probe, computed before with the same ``refine_eps``
        (:func:`probe_rows`; a fit probes its training rows once, for the threshold and for this
        pass); None: each row is probed here. A row's probe depends on it alone, so either way
        gives the same estimates.

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
    if probes is not None and len(probes.gain) != x.shape[0]:
        raise ValueError(f"probes are for {len(probes.gain)} rows, x has {x.shape[0]}")
    chunks = _chunks_with_proposals(
        model, x, rows, device, dtype, mask, condition, refine_eps, probe_threshold, k, search_floor, probes
    )
    for where, xb, mb, cb, proposal, redo in chunks:
        if redo is not None:
            refined[where] = redo
        logw, per = importance_terms(model, xb, eps, mb, cb, proposal=proposal)
        tails = None  # each row's k̂, where the recheck computed it
        if redo is not None and model.latent_dim in SEARCH_GRID and pareto_tail_size(k) >= RECHECK_MIN_TAIL:
            tails = pareto_k(logw.double().cpu().numpy())
            rechecked = _rechecked(model, xb, mb, cb, eps, proposal, logw, per, redo, tails)
            refined[where] |= rechecked
        logw = logw.double()  # (K, rows), float64
        value[where] = (torch.logsumexp(logw, 0) - math.log(k)).cpu().numpy()
        if shares is not None:
            shares[where] = _conditional_log_likelihoods(logw, per, mb)
        if std is not None:
            w = (logw - logw.max(0, keepdim=True).values).exp()
            std[where] = (_weights_sd(w, proposal) / (math.sqrt(k) * w.mean(0))).cpu().numpy()
            log_weights = logw.cpu().numpy()
            if tails is None:
                tails = pareto_k(log_weights)
            elif rechecked.any():  # the rescored rows have new weights
                tails[rechecked] = pareto_k(log_weights[:, rechecked])
            tail[where] = tails
            ess[where] = effective_sample_size(log_weights)
    return LogLikelihood(value, std, tail, ess, refined, shares)


def _rechecked(
    model: VAE,
    x: Tensor,
    mask: Tensor | None,
    condition: Tensor | None,
    eps: Tensor,
    proposal: Proposal,
    logw: Tensor,
    per: Tensor,
    matched: np.ndarray,
    tails: np.ndarray,
) -> np.ndarray:
    """Rescore, in place in ``logw`` and ``per``, the rows whose weights have a tail too heavy to trust; which rows.

    In a latent space of one or two dimensions, a row that neither the probe nor the search
    refitted and that has no missing entries (those ``matched`` already are) but whose weights
    have Pareto k̂ (``tails``, (rows,)) above :data:`RECHECK_PARETO_K` (their variance is infinite: the standard
    error and the estimate are unreliable) gets the proposal of a refitted row: the mixture
    of its encoder's q and a Gaussian matched to its posterior's moments (:func:`_moment_matched`),
    each widened :data:`PROPOSAL_WIDTH` times (thyroid: a normal row with a curved posterior
    scored 0.5 nats low with k̂ 0.65 from the encoder's q). Depends on the row alone.
    """
    partial = np.zeros(len(x), bool) if mask is None else (~mask.flatten(1).all(1)).cpu().numpy()
    heavy = tails > RECHECK_PARETO_K
    rows = np.flatnonzero(heavy & ~matched & ~partial)
    if not len(rows):
        return np.zeros(len(x), bool)
    r = torch.from_numpy(rows).to(x.device)
    first = _proposal_rows(proposal.first if isinstance(proposal, MixtureProposal) else proposal, r)
    encoder = first.marginal() if isinstance(first, CorrelatedGaussian) else first
    start = encoder[0], encoder[1] - 2 * math.log(PROPOSAL_WIDTH)
    xr, mr, cr = x[r], _rows(mask, r), _rows(condition, r)
    wide = _moment_matched(model, xr, mr, cr, start).scaled(PROPOSAL_WIDTH)
    again = MixtureProposal(CorrelatedGaussian.diagonal(*encoder), wide)
    logw[:, r], per[:, r] = importance_terms(model, xr, eps, mr, cr, proposal=again)
    out = np.zeros(len(x), bool)
    out[rows] = True
    return out


def _weights_sd(w: Tensor, proposal: Proposal | None) -> Tensor:
    """The sd of the importance weights ``w`` (K, rows) that makes sd / (√K · mean) the estimate's standard error.

    A :class:`MixtureProposal` draws a fixed number from each component (stratified
    sampling), so the estimate's variance is the pooled variance within the two strata:
    the spread between them, which the plain sd of all K weights includes, is not part of
    it (that overstated the error: intervals covered 98.7 % of thyroid's rows with one entry missing).
    """
    k = w.shape[0]
    if k < 2:
        return torch.zeros_like(w[0])
    k_first = (k + 1) // 2
    if not isinstance(proposal, MixtureProposal) or k - k_first < 2:
        return w.std(0, unbiased=False)
    strata = (w[:k_first], w[k_first:])
    return (sum(len(part) * part.var(0) for part in strata) / k).sqrt()  # each stratum's variance unbiased


@dataclass
class Probe:
    """Each row's probe (:func:`probe_rows`): the encoder's q(z|x) ``start`` and q after the probe's steps
    ``moved`` ((μ, log σ²), each (rows, latent)), the rise of the row's ELBO ``gain`` and its ELBO at the
    encoder's q ``at_encoder`` (nats, (rows,) each). A fit computes it once for its training rows: it sets the
    model's probe threshold, and the pass that scores those rows for the threshold takes it instead of
    probing them again (``importance_sampled_log_likelihood(probes=...)``)."""

    start: tuple[Tensor, Tensor]
    moved: tuple[Tensor, Tensor]
    gain: Tensor
    at_encoder: Tensor

    def rows(self, index: slice | Tensor) -> Probe:
        """The probe of the rows ``index`` (a slice or a tensor of row numbers)."""
        return Probe(
            (self.start[0][index], self.start[1][index]),
            (self.moved[0][index], self.moved[1][index]),
            self.gain[index],
            self.at_encoder[index],
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> Probe:
        """The same values on ``device`` in ``dtype`` (where the chunks are scored)."""
        return Probe(*(tuple(t.to(device, dtype) for t in pair) for pair in (self.start, self.moved)),
                     self.gain.to(device, dtype), self.at_encoder.to(device, dtype))  # fmt: skip

    @staticmethod
    def joined(parts: Sequence[Probe]) -> Probe:
        """The probes of consecutive row ranges as one."""
        return Probe(
            (torch.cat([p.start[0] for p in parts]), torch.cat([p.start[1] for p in parts])),
            (torch.cat([p.moved[0] for p in parts]), torch.cat([p.moved[1] for p in parts])),
            torch.cat([p.gain for p in parts]),
            torch.cat([p.at_encoder for p in parts]),
        )


def _probe(model: VAE, x: Tensor, mask: Tensor | None, condition: Tensor | None, eps: Tensor) -> Probe:
    """The probe of each row of ``x``: :data:`PROBE_STEPS` Adam steps on its ELBO from the encoder's q."""
    probe = eps[:PROBE_SAMPLES]
    start = _encoded(model, x, mask, condition, probe)
    mu, logvar, path = refine_proposal(model, x, mask, condition, probe, PROBE_STEPS, PROBE_LEARNING_RATE, start)
    with torch.no_grad():
        after = importance_terms(model, x, probe, mask, condition, proposal=(mu, logvar))[0].mean(0)
    return Probe(start, (mu, logvar), after - path[0], path[0])


@torch.no_grad()
def _encoded(model: VAE, x: Tensor, mask: Tensor | None, condition: Tensor | None, eps: Tensor) -> Proposal:
    """The encoder's q(z|x); for a row with missing entries, a proposal found for its observed entries.

    An encoder trained on complete rows sees a missing entry as the column's mean, and the
    posterior of the observed entries can lie many posterior widths from where it then puts
    q, too far for the probe's steps (thyroid with one column missing: misses of 20-60 nats).
    Completing the row by the model itself — decode the code, fill the missing entries with
    the decoder's mean, encode the completed row, :data:`COMPLETION_ROUNDS` times — walks q
    to a code whose completion the encoder agrees with (an EM-like fixed point; each round is
    one encoder and one decoder pass, no draws). In a latent space of one or two dimensions
    the completed q is then moved to the posterior's moments (:func:`_moment_matched`): the
    posterior without some entries is wider than the complete rows' the encoder learned, and
    that proposal is the row's (a choice among the three by a few draws' estimates scattered
    with the draws, and the intervals then covered 80 % of thyroid's rows with three of six
    entries missing; a matched proposal that is far off is caught by the probe and the
    search). In larger latent spaces each row keeps the encoder's q or the completed one,
    whichever's importance-sampled log p(x) over the draws ``eps`` and their negatives is higher.
    """
    start = model.encode(x, mask, condition)
    if mask is None:
        return start
    partial = torch.nonzero(~mask.flatten(1).all(1)).flatten()
    if not len(partial):
        return start
    xr, mr, cr = x[partial], mask[partial], _rows(condition, partial)
    completed = start[0][partial], start[1][partial]
    for _ in range(COMPLETION_ROUNDS):
        filled = torch.where(mr, xr, model.likelihood.mean(model.decode(completed[0], cr)).to(xr.dtype))
        completed = model.encode(filled, None, cr)
    if model.latent_dim in SEARCH_GRID:
        kept = _moment_matched(model, xr, mr, cr, completed).marginal()
    else:
        kept = (start[0][partial].clone(), start[1][partial].clone())
        draws = torch.cat([eps, -eps])  # antithetic pairs: twice the draws, balanced about each proposal's mean
        _keep_better(model, xr, mr, cr, draws, kept, completed, estimate=True)
    mu, logvar = start[0].clone(), start[1].clone()
    mu[partial], logvar[partial] = kept
    return mu, logvar


@in_eval_mode
def probe_rows(
    model: VAE,
    x: Tensor,
    refine_eps: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    condition: Tensor | None = None,
) -> Probe:
    """The probe of every row of ``x`` (:class:`Probe`), on the CPU in the model's scoring dtype.

    The rise is how much the row's ELBO rises in a short probe of gradient steps from the
    encoder's q: the part of the ELBO the encoder leaves on the table for that row (its
    amortization gap, as far as :data:`PROBE_STEPS` steps find it).
    """
    device, dtype, eps, _ = _prepare(model, refine_eps, device, chunk_size)
    parts = []
    for _, xb, mb, cb in _chunks(x, chunk_size or _gradient_rows(model, PROBE_SAMPLES), device, dtype, mask, condition):
        parts.append(_probe(model, xb, mb, cb, eps).to(torch.device("cpu"), dtype))
    if not parts:
        empty = torch.zeros(0, model.latent_dim, dtype=dtype)
        return Probe((empty, empty), (empty, empty), torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=dtype))
    return Probe.joined(parts)


def search_floor(training_elbos: np.ndarray) -> float | None:
    """The search floor of a model: the :data:`SEARCH_QUANTILE` quantile of its training rows' ELBO at
    the encoder's q (nats); None where no training row's is finite."""
    values = np.asarray(training_elbos, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.quantile(values, SEARCH_QUANTILE)) if values.size else None


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
    search_floor: float | None = None,
    probed: Probe | None = None,
) -> tuple[Proposal, np.ndarray]:
    """The proposal for each row and which rows got one fitted to them (bool, (rows,)).

    The encoder's q(z|x) can sit many posterior widths away from the true posterior of a
    far-out row, with a confident width, so that its importance weights look healthy
    (small Pareto k̂) while the estimate is off by many nats. Each row's q is therefore
    probed: :data:`PROBE_STEPS` Adam steps on its ELBO. A row whose ELBO rises by more
    than ``threshold`` nats was badly served by the encoder and gets
    further steps (:data:`REFINE_BLOCKS`, more while its ELBO keeps rising); its
    proposal is then the even mixture of the encoder's q and the fitted one
    (:class:`~vaeguard.objectives.MixtureProposal`), so a fit that lands worse than the
    encoder (it can, in a large latent space: a Gaussian fitted with few draws) costs at
    most the half of the draws it takes. Every proposal is widened
    :data:`PROPOSAL_WIDTH` times. The fits run ``fit_rows`` rows at a time (default:
    all flagged rows at once). With ``search_floor`` and a latent space of one or two
    dimensions, the flagged rows and the rows whose ELBO at the encoder's q is below it are
    also searched for on a grid (:func:`_searched`); a row it moves counts as refitted, and
    every refitted row's proposal is then moved to its posterior's moments
    (:func:`_moment_matched`): an ELBO fit is mode-seeking and narrower than the posterior,
    whose flanks the draws then miss (thyroid's normal rows along a curved posterior:
    about −0.8 nats with K = 64, and no more draws mend a proposal that misses mass).
    ``probed``: the rows' probe, computed before (:func:`probe_rows`); None: probed here.
    """
    if probed is None:
        probed = _probe(model, x, mask, condition, eps)
    start, moved, gain, at_encoder = probed.start, probed.moved, probed.gain, probed.at_encoder
    redo = (gain > threshold).cpu().numpy()
    search = np.zeros_like(redo)
    partial = np.zeros_like(redo)
    if search_floor is not None and model.latent_dim in SEARCH_GRID:
        search = redo | (at_encoder < search_floor).cpu().numpy()
        if mask is not None:
            partial = (~mask.flatten(1).all(1)).cpu().numpy()
    widen = 2 * math.log(PROPOSAL_WIDTH)
    encoder = (start[0], start[1] + widen)
    if not (redo.any() or search.any() or partial.any()):
        return encoder, redo
    mu, logvar = (t.clone() for t in start)
    flagged = torch.from_numpy(np.flatnonzero(redo)).to(x.device)
    for r in flagged.split(fit_rows or max(1, len(flagged))) if len(flagged) else ():
        mu[r], logvar[r] = _fit(model, x[r], _rows(mask, r), _rows(condition, r), eps, moved, r)
    searched = torch.from_numpy(np.flatnonzero(search)).to(x.device)
    for r in searched.split(fit_rows or max(1, len(searched))) if len(searched) else ():
        found, mu[r], logvar[r] = _searched(model, x[r], _rows(mask, r), _rows(condition, r), eps, (mu[r], logvar[r]))
        redo[r.cpu().numpy()] |= found.cpu().numpy()
    if model.latent_dim in SEARCH_GRID:
        return _matched_mixture(model, x, mask, condition, eps, encoder, (mu, logvar), redo, partial, at_encoder), redo
    fitted = (mu, logvar + widen)
    r = torch.from_numpy(np.flatnonzero(redo)).to(x.device)  # the refitted rows
    if len(r):
        hopeless = _hopeless(model, x, mask, condition, eps, r, (mu[r], logvar[r]), at_encoder)
        encoder = tuple(t.clone() for t in encoder)
        encoder[0][hopeless], encoder[1][hopeless] = fitted[0][hopeless], fitted[1][hopeless]
    return MixtureProposal(encoder, fitted), redo


def _hopeless(
    model: VAE,
    x: Tensor,
    mask: Tensor | None,
    condition: Tensor | None,
    eps: Tensor,
    rows: Tensor,
    fitted: Gaussian,
    at_encoder: Tensor,
) -> Tensor:
    """Of the refitted ``rows``, those whose ELBO at their fit ``fitted`` (before widening) beats the one at the
    encoder's q by more than :data:`HOPELESS_ENCODER` nats: the half of the draws the encoder's q takes would be
    wasted there. The ELBOs use the probe's draws, which gave ``at_encoder``."""
    with torch.no_grad():
        probe = eps[:PROBE_SAMPLES]
        at_fit = importance_terms(model, x[rows], probe, _rows(mask, rows), _rows(condition, rows), fitted)[0].mean(0)
    return rows[at_fit - at_encoder[rows] > HOPELESS_ENCODER]


def _matched_mixture(
    model: VAE,
    x: Tensor,
    mask: Tensor | None,
    condition: Tensor | None,
    eps: Tensor,
    encoder: tuple[Tensor, Tensor],
    current: tuple[Tensor, Tensor],
    refitted: np.ndarray,
    partial: np.ndarray,
    at_encoder: Tensor,
) -> MixtureProposal:
    """The proposals of a latent space of one or two dimensions, each row's pair as :class:`CorrelatedGaussian`.

    Rows refitted or with missing entries are moved to their posterior's moments, correlation
    included (:func:`_moment_matched`), from ``current``. A refitted row's pair is its fit
    ``current`` and the matched Gaussian: the nodes can straddle a narrow mode that holds the
    mass and move to a broad minor one, often where the encoder's q was (a Pima anomaly: 96 %
    of the mass in the mode its fit found, the encoder's q and the matched one on the other,
    3.2 nats low with k̂ −0.2); where the matched one's ELBO beats the encoder's by more than
    :data:`HOPELESS_ENCODER` nats, both are the matched one (a row far out: thyroid's
    anomalies' intervals covered 88 % instead of 92 % with the fit kept there).

    A row with missing entries starts from a proposal already matched to its posterior
    (:func:`_encoded`, the diagonal marginal of it); with no fit its pair is the matched
    Gaussian and, defensively, one :data:`MISSING_WIDTH` times wider.
    Refitted, its pair is the Gaussians matched from both starts: a fit can leave for a far end
    of a ridge, from where the nodes do not find the ridge again (thyroid with three of six
    entries missing: off by 1.5-7 nats on a few of sixty draw sets), and a choice between the
    two by estimates picks that end where its weights' heavy tail overshoots. Every proposal is
    widened :data:`PROPOSAL_WIDTH` times. Other rows keep the encoder's q and ``current``.
    """
    widen = 2 * math.log(PROPOSAL_WIDTH)
    first = CorrelatedGaussian.diagonal(encoder[0].clone(), encoder[1])
    second = CorrelatedGaussian.diagonal(current[0].clone(), current[1] + widen)
    chosen = np.flatnonzero(refitted | partial)
    if not len(chosen):
        return MixtureProposal(first, second)
    m = torch.from_numpy(chosen).to(x.device)
    matched = _moment_matched(model, x[m], _rows(mask, m), _rows(condition, m), (current[0][m], current[1][m]))
    wide = matched.scaled(PROPOSAL_WIDTH)
    second.mean[m], second.scale_tril[m] = wide.mean, wide.scale_tril
    only_partial = torch.from_numpy(~refitted[chosen]).to(x.device)
    p = m[only_partial]
    first.mean[p], first.scale_tril[p] = wide.mean[only_partial], wide.scale_tril[only_partial]
    second.scale_tril[p] *= MISSING_WIDTH
    both = m[torch.from_numpy(refitted[chosen] & partial[chosen]).to(x.device)]
    if len(both):
        start = encoder[0][both], encoder[1][both] - widen
        again = _moment_matched(model, x[both], _rows(mask, both), _rows(condition, both), start).scaled(PROPOSAL_WIDTH)
        first.mean[both], first.scale_tril[both] = again.mean, again.scale_tril
    fit = torch.from_numpy(refitted[chosen] & ~partial[chosen]).to(x.device)
    if fit.any():
        f = m[fit]
        first.mean[f], first.scale_tril[f] = current[0][f], torch.diag_embed((0.5 * (current[1][f] + widen)).exp())
        unwidened = CorrelatedGaussian(matched.mean[fit], matched.scale_tril[fit])
        hopeless = _hopeless(model, x, mask, condition, eps, f, unwidened, at_encoder)
        first.mean[hopeless], first.scale_tril[hopeless] = second.mean[hopeless], second.scale_tril[hopeless]
    return MixtureProposal(first, second)


@torch.no_grad()
def _moment_matched(
    model: VAE, x: Tensor, mask: Tensor | None, condition: Tensor | None, current: tuple[Tensor, Tensor]
) -> CorrelatedGaussian:
    """A Gaussian with the posterior's mean and covariance, by Gauss-Hermite quadrature around ``current``.

    Missing entries leave a posterior wider (and less Gaussian) than the complete rows' the
    encoder learned, and an ELBO fit is mode-seeking: it stays narrower still, and the
    importance weights then miss the posterior's flanks (thyroid with three of six columns
    missing: about -1.3 nats on the typical row; complete rows with a curved posterior whose
    proposal was refitted: about -0.8). Each round integrates p(x, z) z and p(x, z) z zᵀ on
    :data:`MATCH_NODES` nodes per axis of the current proposal made :data:`MATCH_WIDTHS` times
    wider (adaptive Gauss-Hermite quadrature, Liu & Pierce 1994; a deterministic adaptive importance
    sampler) and moves the proposal to those moments, which cover the posterior's mass
    rather than its mode, and follow its correlation (a posterior with three of six entries
    missing is a ridge: correlation 0.99 between the axes).
    """
    mu, logvar = current
    nodes, weights = np.polynomial.hermite_e.hermegauss(MATCH_NODES)
    axis = torch.as_tensor(nodes, dtype=mu.dtype, device=mu.device)
    log_w = torch.as_tensor(np.log(weights / weights.sum()), dtype=mu.dtype, device=mu.device)
    d = mu.shape[1]
    unit = axis[:, None] if d == 1 else torch.cartesian_prod(axis, axis)  # (P, d): the product rule's nodes
    log_node = log_w if d == 1 else (log_w[:, None] + log_w[None, :]).flatten()  # (P,), in the same order
    scale = torch.diag_embed((0.5 * logvar).exp())
    identity = torch.eye(d, dtype=mu.dtype, device=mu.device)
    for width in MATCH_WIDTHS:
        spread = scale * width  # the nodes' scale: z = mu + spread @ unit
        z = mu + torch.einsum("rij,pj->pri", spread, unit)  # (P, rows, d)
        # p(x, z) / N(z; mu, spread spreadᵀ) up to a constant per row: the standard normal's part cancels into the
        # nodes' weights; the moments are taken in the nodes' own (whitened) frame
        log_ratio = _log_joint(model, x, mask, condition, z) + 0.5 * unit.square().sum(-1)[:, None]
        weights = torch.softmax(log_node[:, None] + log_ratio, 0)  # (P, rows)
        mean = weights.T @ unit  # (rows, d)
        centred = unit[:, None, :] - mean
        cov = torch.einsum("pr,pri,prj->rij", weights, centred, centred)
        finite = torch.isfinite(mean).all(-1) & torch.isfinite(cov).flatten(1).all(-1)
        cov = torch.where(finite[:, None, None], cov, identity)
        # a posterior narrower than the nodes' spacing puts its weight on one node: zoom in on it (each sd
        # shrinks to at least MATCH_FLOOR of the nodes' scale per round) instead of collapsing onto that node
        values, vectors = torch.linalg.eigh(cov)
        cov = (vectors * values.clamp(min=MATCH_FLOOR**2)[:, None, :]) @ vectors.transpose(-1, -2)
        moved = mu + (spread @ mean.nan_to_num()[..., None])[..., 0]
        mu = torch.where(finite[:, None], moved, mu)
        scale = torch.where(finite[:, None, None], spread @ torch.linalg.cholesky(cov), scale)
    return CorrelatedGaussian(mu, scale)


def _log_joint(model: VAE, x: Tensor, mask: Tensor | None, condition: Tensor | None, z: Tensor) -> Tensor:
    """log p(x|z) + log p(z) up to a constant, for codes ``z`` (P, rows, latent) of each row: (P, rows).

    ``z`` of shape (P, 1, latent) holds codes shared by every row: the decoder then runs once
    per code, and only the likelihood per row. Chunked along P so that the decoder's outputs
    stay within :data:`PROBE_ELEMENTS`.
    """
    chunk = max(1, PROBE_ELEMENTS // max(1, len(x) * _per_row_elements(model)))
    out = []
    for part in z.split(chunk):
        params = model.decode(part, condition)
        params = params.expand(len(part), len(x), *params.shape[2:])
        per_element = model.likelihood.per_feature_log_prob(x, params)
        if mask is not None:
            per_element = torch.where(mask, per_element, torch.zeros((), dtype=per_element.dtype, device=x.device))
        out.append(per_element.flatten(2).sum(-1) - 0.5 * part.square().sum(-1))
    return torch.cat(out)


def _grid_log_joint(model: VAE, x: Tensor, mask: Tensor | None, condition: Tensor | None, points: Tensor) -> Tensor:
    """log p(x|z) + log p(z) (up to a constant) at every grid point ``points`` (P, latent) for every row: (P, rows).

    Without conditions the decoder runs once per point, not once per point and row: its
    outputs are shared by the rows, and only the likelihood is evaluated per row.
    """
    shared = points[:, None, :]
    if condition is not None:  # the decoder's outputs depend on the row's condition
        shared = shared.expand(-1, len(x), -1)
    return _log_joint(model, x, mask, condition, shared)


def _weighted_moments(weights: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and sd per axis (rows, d) of points ``z`` (P, rows or 1, d) under ``weights`` (P, rows)."""
    mean = (weights[..., None] * z).sum(0)
    return mean, (weights[..., None] * (z - mean).square()).sum(0).clamp(min=0.0).sqrt()


def search_grid(latent_dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The points of the posterior search, shape (points, latent_dim): a regular grid over [−40, 40]^d, d ≤ 2."""
    axis = torch.linspace(-SEARCH_BOX, SEARCH_BOX, SEARCH_GRID[latent_dim], dtype=dtype)
    return axis[:, None] if latent_dim == 1 else torch.cartesian_prod(axis, axis)


def _searched(
    model: VAE,
    x: Tensor,
    mask: Tensor | None,
    condition: Tensor | None,
    eps: Tensor,
    current: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Which rows got a new proposal (bool, (rows,)), and the proposals: ``current`` or, for those, a better one.

    A far-out row can have its posterior many units from where the encoder puts q (in a
    region no training row reached), with the decoder flat in between, or far narrower or
    wider than q: local steps from q do not get there, and the importance weights can look
    healthy while the estimate misses by many nats. In a latent space of one or two
    dimensions a coarse grid (:func:`search_grid`) finds the region, and where its weights
    p(x, z) do not resolve the posterior (spread below the spacing), a grid of
    :data:`LOCAL_GRID` points per axis around the best point does. Where the moments of the
    weights lie more than two local spacings from ``current``'s mean, they start a fit
    (:func:`_fit`); it and ``current`` are each settled by :data:`POLISH_STEPS` small steps
    (a posterior can be far narrower than the fit's step size), and the fit is kept where its
    importance-sampled estimate beats ``current``'s — not its ELBO: an unsettled fit to a
    narrow mode holding nearly all the mass can have a lower ELBO than a broad minor mode.
    Then every row's proposal takes the small steps, kept where the ELBO rises.
    """
    mu, logvar = (t.clone() for t in current)
    d = mu.shape[1]
    points = search_grid(d).to(device=x.device, dtype=mu.dtype)
    spacing = 2 * SEARCH_BOX / (SEARCH_GRID[d] - 1)
    with torch.no_grad():
        coarse = _grid_log_joint(model, x, mask, condition, points)  # (points, rows)
        centre, spread = _weighted_moments(torch.softmax(coarse, 0), points[:, None, :])
        # where the coarse grid does not resolve the posterior, a local grid around its best point does
        axis = torch.linspace(-spacing, spacing, LOCAL_GRID, dtype=mu.dtype, device=x.device)
        offsets = axis[:, None] if d == 1 else torch.cartesian_prod(axis, axis)
        local = points[coarse.argmax(0)] + offsets[:, None, :]  # (local points, rows, d)
        fine = _weighted_moments(torch.softmax(_log_joint(model, x, mask, condition, local), 0), local)
        unresolved = (spread < spacing).any(-1, keepdim=True)
        centre, spread = torch.where(unresolved, fine[0], centre), torch.where(unresolved, fine[1], spread)
    changed = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    step = 2 * spacing / (LOCAL_GRID - 1)
    far = torch.nonzero(((centre - mu).abs() > 2 * step).any(-1)).flatten()  # the grid points elsewhere
    if len(far):
        start = (centre[far], 2 * torch.log(spread[far].clamp(min=SEARCH_MIN_SD)))
        xf, mf, cf = x[far], _rows(mask, far), _rows(condition, far)
        found = _fit(model, xf, mf, cf, eps, start, torch.arange(len(far)))
        here = (mu[far], logvar[far])
        # both settled, then compared by the estimate, not the ELBO: a loose fit to a narrow mode that holds
        # nearly all the mass can have a lower ELBO, and a lower few-draw estimate, than a broad minor mode
        found = refine_proposal(model, xf, mf, cf, eps, POLISH_STEPS, POLISH_LEARNING_RATE, found)[:2]
        settled = refine_proposal(model, xf, mf, cf, eps, POLISH_STEPS, POLISH_LEARNING_RATE, here)[:2]
        changed[far] = _keep_better(model, xf, mf, cf, eps, here, settled)
        changed[far] |= _keep_better(model, xf, mf, cf, eps, here, found, estimate=True)
        mu[far], logvar[far] = here
    polished = refine_proposal(model, x, mask, condition, eps, POLISH_STEPS, POLISH_LEARNING_RATE, (mu, logvar))
    changed |= _keep_better(model, x, mask, condition, eps, (mu, logvar), polished[:2])
    return changed, mu, logvar


def _keep_better(
    model: VAE,
    x: Tensor,
    mask: Tensor | None,
    condition: Tensor | None,
    eps: Tensor,
    kept: tuple[Tensor, Tensor],
    other: tuple[Tensor, Tensor],
    estimate: bool = False,
) -> Tensor:
    """Replace, in place, the rows of ``kept`` whose ELBO (draws ``eps``) ``other`` beats; which rows (bool).

    With ``estimate``, compare the importance-sampled log p(x) of the two proposals, each
    widened as scoring widens it, instead of their ELBO (which favours a narrow proposal on
    the posterior's mode over a wider one that covers its mass).
    """

    def value(proposal: tuple[Tensor, Tensor]) -> Tensor:
        if not estimate:
            return importance_terms(model, x, eps, mask, condition, proposal=proposal)[0].mean(0)
        wide = (proposal[0], proposal[1] + 2 * math.log(PROPOSAL_WIDTH))
        return torch.logsumexp(importance_terms(model, x, eps, mask, condition, proposal=wide)[0], 0)

    with torch.no_grad():
        before, after = value(kept), value(other)
    better = after > before
    kept[0][better], kept[1][better] = other[0][better], other[1][better]
    return better


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

    Blocks of Adam steps (:data:`REFINE_BLOCKS`: each block a fresh Adam run, whose first
    steps are full-sized): after each block only the rows whose ELBO rose by more than
    :data:`STILL_RISING` nats over its last :data:`RISING_STEPS` steps go on (far-out rows,
    still on their way from where their fit began); a row that has settled costs no more.
    """
    steps, blocks = REFINE_BLOCKS["searched" if model.latent_dim in SEARCH_GRID else "other"]
    mu, logvar = start[0][rows].clone(), start[1][rows].clone()
    going = torch.arange(len(x), device=x.device)
    for _ in range(blocks):
        fitted = refine_proposal(
            model, x[going], _rows(mask, going), _rows(condition, going), eps, steps,
            REFINE_LEARNING_RATE, (mu[going], logvar[going]),
        )  # fmt: skip
        mu[going], logvar[going] = fitted[0], fitted[1]
        path = fitted[2]  # the ELBO before each step
        going = going[path[-1] - path[-1 - RISING_STEPS] > STILL_RISING]
        if not len(going):
            break
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
    moments = [(torch.zeros_like(mu), torch.zeros_like(mu)), (torch.zeros_like(logvar), torch.zeros_like(logvar))]
    path = []
    with torch.enable_grad():
        for step in range(1, steps + 1):
            objective = importance_terms(model, x, eps, mask, condition, proposal=(mu, logvar))[0].mean(0)
            path.append(objective.detach())
            grads = torch.autograd.grad(-objective.sum(), [mu, logvar])
            with torch.no_grad():
                for parameter, grad, (m, v) in zip((mu, logvar), grads, moments, strict=True):
                    _adam_step(parameter, grad, m, v, step, learning_rate)
    return mu.detach(), logvar.detach(), torch.stack(path) if path else x.new_zeros(0, x.shape[0])


def _adam_step(parameter: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: int, learning_rate: float) -> None:
    """One Adam step in place (betas 0.9 and 0.999, eps 1e-8: ``torch.optim.Adam``'s arithmetic). Written out
    because a process's first ``torch.optim`` optimizer imports ``torch._dynamo`` (about a second), which
    a command that only scores would otherwise pay."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denominator = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    parameter.addcdiv_(m, denominator, value=-learning_rate / (1 - beta1**step))


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
    search_floor: float | None = None,
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
        search_floor=search_floor,
    ).per_feature


def _conditional_log_likelihoods(logw: Tensor, per: Tensor, mask: Tensor | None) -> np.ndarray:
    """log p̂(x) − log p̂(x_−j) per element from log weights ``logw`` (K, rows) and log p(x_j|z_k) ``per``
    (K, rows, *event): log Σ_k w_k − log Σ_k w_k / p(x_j|z_k); NaN where missing."""
    log_w = logw.reshape(*logw.shape, *([1] * (per.dim() - 2)))
    value = torch.logsumexp(logw, 0).reshape(log_w.shape[1:]) - torch.logsumexp(log_w - per.double(), 0)
    if mask is not None:
        value = torch.where(mask, value, torch.full_like(value, float("nan")))
    return value.cpu().numpy()
