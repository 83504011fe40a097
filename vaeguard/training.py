"""The training loop: Adam on minibatches, KL warm-up, gradient clipping, early stopping."""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vaeguard.ddp import ProcessGroup, same_rows
from vaeguard.model import VAE
from vaeguard.objectives import (
    TrainingTerms,
    free_bits_kl,
    iwae_objective,
    kl_per_dimension,
    reparameterize,
    training_terms,
)

#: KL schedules: "linear" ramps the KL weight from 0 to 1 over ``kl_warmup_fraction`` of the
#: steps; "cyclical" repeats that ramp (over the first half of each) in 4 equal cycles (Fu et
#: al. 2019); "constant" keeps it at 1.
KL_SCHEDULES = ("linear", "cyclical", "constant")
#: Cycles of the "cyclical" schedule, and the share of each cycle spent ramping up.
KL_CYCLES, KL_CYCLE_RAMP = 4, 0.5


class TrainingDivergedError(ValueError, RuntimeError):
    """The loss became NaN or infinite; the message says when and what to try."""


@dataclass
class TrainingConfig:
    """Settings of one training run.

    ``epochs`` is the maximum; early stopping (on the validation objective, checked
    every epoch; see :func:`validation_loss`) ends sooner after ``patience`` epochs
    without improvement and restores the best weights. ``trim_fraction`` leaves the
    worst-fitted rows of each minibatch out of the loss after the KL warm-up (and of the
    validation objective). ``kl_schedule`` sets the KL weight per step (see :data:`KL_SCHEDULES`;
    ``kl_warmup_fraction`` of all steps is the linear ramp); ``free_bits`` is a floor in
    nats per latent dimension on the minibatch-mean KL; ``regularizer`` an object with
    ``penalty(terms, step)`` added to the loss; ``objective="iwae"`` trains on the
    importance-weighted bound with ``iwae_samples`` draws per row instead of the ELBO
    (without regularizer or free bits). ``precision`` is what the encoder and decoder
    networks compute in during training steps (see :data:`TRAINING_PRECISIONS`); the
    likelihood, the KL, validation and scoring always keep the data's dtype.
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
    kl_schedule: str = "linear"
    free_bits: float = 0.0
    regularizer: Any = None
    objective: str = "elbo"
    iwae_samples: int = 5
    precision: str = "float32"


#: What the networks may compute in during training steps: ``"float32"`` (the data's own dtype,
#: whatever it is) or ``"bfloat16"`` (``torch.autocast``: matrix products and convolutions in
#: bfloat16, their outputs cast back before the likelihood; the parameters, the optimiser and
#: every loss term stay in the data's dtype).
TRAINING_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 products in hardware: a CPU with AMX or AVX512-BF16, a CUDA
    device with bfloat16 support. Elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:  # private probes of torch's CPU capabilities: absent or failing means "no"
        return any(bool(probe()) for probe in probes if probe is not None)
    except Exception:
        return False


def network_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a training ``precision`` (None: the data's own); an unknown one is refused by name."""
    if precision not in TRAINING_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(TRAINING_PRECISIONS)}; got {precision!r}")
    return TRAINING_PRECISIONS[precision]


@contextlib.contextmanager
def networks_in(model: VAE, precision: str) -> Iterator[None]:
    """Within the block, ``model``'s encoder and decoder run in ``precision`` (:data:`TRAINING_PRECISIONS`)."""
    dtype = network_dtype(precision)
    before = model.network_precision
    model.network_precision = dtype
    try:
        yield
    finally:
        model.network_precision = before


@dataclass
class TrainingHistory:
    """Per-epoch mean −ELBO (nats per sample, internal units) and the epoch kept.

    ``epoch_seconds`` holds the wall time (s) from the start of training to the end of
    each epoch (in this session only: model files do not keep it).
    """

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    epoch_seconds: list[float] = field(default_factory=list)


def split_validation(n: int, config: TrainingConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices of the training and validation rows (no validation rows for small data)."""
    n_val = round(n * config.validation_fraction)
    perm = torch.randperm(n, generator=generator)
    if n_val < config.min_validation_rows or n - n_val < 2:
        return perm, perm[:0]
    return perm[n_val:], perm[:n_val]


#: Validation rows evaluated at once (bounds memory for large validation sets).
VALIDATION_CHUNK = 8192


def best_rows(per_row_loss: Tensor, trim_fraction: float) -> Tensor:
    """The per-row losses (last axis) without the worst ``trim_fraction`` of them (``int(f · n)`` rows)."""
    n_rows = per_row_loss.shape[-1]
    n_keep = n_rows - int(trim_fraction * n_rows)
    if n_keep == n_rows:
        return per_row_loss
    return torch.topk(per_row_loss, n_keep, dim=-1, largest=False).values


@torch.no_grad()
def validation_loss(
    model: VAE,
    x_val: Tensor,
    val_eps: Tensor,
    chunk: int = VALIDATION_CHUNK,
    mask: Tensor | None = None,
    config: TrainingConfig | None = None,
    generator: torch.Generator | None = None,
    condition: Tensor | None = None,
) -> float:
    """Training objective over the validation rows at full KL weight, each row with its own draw; nats per row.

    Without a regularizer or free bits that is the −ELBO (the −IWAE bound with
    ``val_eps`` of K draws when ``config.objective == "iwae"``). With them it is the objective
    being trained (free-bits KL, plus the regularizer's penalty per chunk of
    ``config.batch_size`` rows, evaluated without updating anything), so early stopping
    keeps the model best at what it was asked to do. For the same reason, with
    ``config.trim_fraction`` = f > 0 it is the mean over the best (lowest-loss) 1 − f of the
    rows, as training averages over the best 1 − f of each batch: the full mean would rise
    as the model stops spending effort on the rows it trims, and stop training as soon as
    trimming starts.
    """
    config = config or TrainingConfig()
    per_row, penalty = _validation_rows(model, x_val, val_eps, chunk, mask, config, generator, condition)
    return best_rows(per_row, config.trim_fraction).mean().item() + penalty / x_val.shape[0]


@torch.no_grad()
def _validation_rows(
    model: VAE,
    x_val: Tensor,
    val_eps: Tensor,
    chunk: int,
    mask: Tensor | None,
    config: TrainingConfig,
    generator: torch.Generator | None,
    condition: Tensor | None,
) -> tuple[Tensor, float]:
    """Each validation row's objective ``(rows,)``, and the regularizer's penalty summed over its chunks."""
    if config.regularizer is not None:
        chunk = max(2, config.batch_size)
    generator = generator or torch.Generator().manual_seed(0)
    per_row: list[Tensor] = []
    penalty = 0.0
    for start in range(0, x_val.shape[0], chunk):
        xb, eb = x_val[start : start + chunk], val_eps[:, start : start + chunk]
        mb = None if mask is None else mask[start : start + chunk]
        cb = None if condition is None else condition[start : start + chunk]
        if config.objective == "iwae":
            per_row.append(-iwae_objective(model, xb, eb, mb, condition=cb).detach())
            continue
        terms = training_terms(
            model, xb, eb, mb, kl_weight=1.0, dataset_size=x_val.shape[0], generator=generator, condition=cb
        )
        per_row.append((free_bits_kl(terms.kl, config.free_bits) - terms.recon).detach())
        if config.regularizer is not None and xb.shape[0] > 1:
            penalty += config.regularizer.penalty(terms, -1).item() * xb.shape[0]
    if not per_row:
        return x_val.new_zeros(0), penalty
    return torch.cat(per_row), penalty


def kl_weight_at(step: int, total_steps: int, config: TrainingConfig) -> float:
    """The KL weight of ``config.kl_schedule`` at optimisation step ``step`` (0-based) of ``total_steps``."""
    if config.kl_schedule == "constant":
        return 1.0
    if config.kl_schedule == "cyclical":
        period = max(1, math.ceil(total_steps / KL_CYCLES))
        return min(1.0, (step % period + 1) / max(1, int(KL_CYCLE_RAMP * period)))
    return min(1.0, (step + 1) / max(1, int(config.kl_warmup_fraction * total_steps)))


def kl_ramp_steps(total_steps: int, config: TrainingConfig) -> int:
    """Steps until the KL weight first reaches 1 (the warm-up: no trimming, no early stopping before it)."""
    if config.kl_schedule == "constant":
        return 1
    if config.kl_schedule == "cyclical":
        return max(1, int(KL_CYCLE_RAMP * max(1, math.ceil(total_steps / KL_CYCLES))))
    return max(1, int(config.kl_warmup_fraction * total_steps))


class EpochLines:
    """Training progress for a log: a line on stderr every tenth of the epochs (and at the end), with the losses.

    What ``verbose`` shows where stderr is not a terminal (a job's log, a pipe): a bar
    redrawn with carriage returns there is one unreadable line, and nothing at all until it ends.
    """

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total, self.done, self.losses = total, 0, ""
        self.every = max(1, math.ceil(total / 10))
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()

    def set_postfix(self, **losses: str) -> None:
        names = {"loss": "training loss", "val": "validation loss"}
        self.losses = ", ".join(f"{names.get(name, name)} {value}" for name, value in losses.items())

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done % self.every == 0 or self.done == self.total:
            self._line(f"epoch {self.done}/{self.total}")

    def finish(self) -> None:
        """Training ended normally: where it stopped, if that was before the last epoch's line."""
        if self.done % self.every != 0 and self.done != self.total:
            self._line(f"stopped at epoch {self.done}/{self.total}")

    def close(self) -> None:
        """Nothing more to say (a failed fit says nothing here: its error is the message)."""

    def _line(self, where: str) -> None:
        seconds = time.perf_counter() - self.started
        print(f"training: {where} ({self.losses} nats; {seconds:.1f} s)", file=self.stream, flush=True)


def _progress(total: int, verbose: bool):
    """The progress display of ``verbose`` training: a bar on a terminal or in a notebook, else :class:`EpochLines`."""
    if not verbose:
        return None
    if not sys.stderr.isatty() and "ipykernel" not in sys.modules:
        return EpochLines(total)
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
    condition: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> TrainingHistory:
    """Fit ``model`` to the rows of ``x`` by maximising the ELBO; returns the history.

    ``mask`` (bool, like ``x``) marks the observed entries: the likelihood then sums
    only those (missing entries of ``x`` must hold finite placeholders, e.g. 0).
    ``condition`` (rows, condition_dim) holds each row's condition vector for a
    conditional model, which then learns p(x|c).

    Randomness (split, shuffles, reparameterisation noise) comes from ``generator`` (a
    CPU generator), so the same seed gives the same model on the same device.

    With ``group`` (see :mod:`vaeguard.ddp`) every rank of the group calls this with the
    same ``x`` and seed, and each computes its share of every batch.

    Raises
    ------
    TrainingDivergedError
        When the loss or the gradients become NaN or infinite.
    """
    return _train_loop(_OneModel(model), x, config, [generator], device, verbose, mask, condition, group)[0]


def train_models(
    models: list[VAE],
    x: Tensor,
    config: TrainingConfig,
    *,
    generators: list[torch.Generator],
    device: torch.device,
    verbose: bool = False,
    mask: Tensor | None = None,
    condition: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> list[TrainingHistory]:
    """Fit each of ``models`` to ``x`` as :func:`train` would with its own generator; their histories.

    Models of the same architecture are trained side by side in one loop: their
    parameters are stacked and one vectorised step updates all of them (batched matrix
    products for the built-in MLPs, ``torch.func.vmap`` for other networks), so the fixed
    cost of a step is paid once instead of once per model. Each
    model keeps its own validation rows, shuffles, draws, gradient clipping and early
    stopping, so it ends where :func:`train` with its generator would (to float rounding).
    Where they cannot be stacked (a regularizer, which keeps state of its own; a plugin
    network that ``vmap`` cannot run; a ``precision`` other than float32) they are trained
    one after another.
    """
    if len(models) != len(generators):
        raise ValueError(f"{len(models)} models but {len(generators)} generators")
    # the stacked step runs its own batched products: a lower training precision trains the models one by one
    stackable = len(models) > 1 and config.precision == "float32"
    stacked = _StackedModels.build(models, x, config, device, mask, condition) if stackable else None
    if stacked is None:
        return [
            train(
                m, x, config, generator=g, device=device, verbose=verbose, mask=mask, condition=condition, group=group
            )
            for m, g in zip(models, generators, strict=True)
        ]
    return _train_loop(stacked, x, config, generators, device, verbose, mask, condition, group)


class FusedAdam:
    """Adam as ``torch.optim.Adam(fused=True)`` computes it, each step equal to the bit: per device and dtype one
    ``torch._fused_adam_`` kernel over every parameter with a gradient, its moments and step counters kept alike.

    Written out (as :func:`vaeguard.scoring._adam_step` is for the proposal fits) because a process's first
    ``torch.optim`` optimizer imports ``torch._dynamo``, about 1.4 s that every ``vaeguard fit`` paid on top of
    a small table's few seconds of training. ``zero_grad`` sets the gradients to None, as the optimiser's does.
    """

    def __init__(self, parameters: list[Tensor], *, lr: float, weight_decay: float = 0.0) -> None:
        self.parameters = list(parameters)
        self.lr, self.weight_decay = lr, weight_decay
        self.state: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # id(parameter) → (step, exp_avg, exp_avg_sq)

    @staticmethod
    def available(parameters: list[Tensor]) -> bool:
        """Whether torch has the fused kernel for these parameters (CPU and CUDA, float32 and float64)."""
        return hasattr(torch, "_fused_adam_") and all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in parameters
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = {}
        for p in self.parameters:
            if p.grad is None:
                continue  # as torch's: a parameter without a gradient is not stepped, nor its moments started
            if id(p) not in self.state:
                zeros = (torch.zeros_like(p, memory_format=torch.preserve_format) for _ in range(2))
                self.state[id(p)] = (torch.zeros((), dtype=torch.float32, device=p.device), *zeros)
            step, exp_avg, exp_avg_sq = self.state[id(p)]
            group = groups.setdefault((p.device, p.dtype), ([], [], [], [], []))
            for part, t in zip(group, (p, p.grad, exp_avg, exp_avg_sq, step), strict=True):
                part.append(t)
        for params, grads, exp_avgs, exp_avg_sqs, steps in groups.values():
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                lr=self.lr,
                beta1=0.9,
                beta2=0.999,
                weight_decay=self.weight_decay,
                eps=1e-8,
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )


def make_optimizer(parameters: list[Tensor], config: TrainingConfig) -> FusedAdam | torch.optim.Optimizer:
    """Adam; the fused implementation (one kernel per step for all parameters) where torch has it."""
    # fused: one kernel updates every parameter (CPU and CUDA since torch 2.4), a third of the
    # foreach update's time on small tables where per-step overhead dominates; foreach=True
    # elsewhere (torch picks it only on CUDA by default).
    if FusedAdam.available(parameters):
        return FusedAdam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True)


def per_row_objective(
    model: VAE,
    xb: Tensor,
    eps: Tensor,
    mb: Tensor | None,
    cb: Tensor | None,
    weight: float,
    config: TrainingConfig,
    n: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, TrainingTerms | None]:
    """The loss each row of a batch contributes ``(batch,)`` (−ELBO with the KL weight and free bits, or −IWAE),
    and the ELBO's terms (None for IWAE) that a regularizer's penalty reads."""
    if config.objective == "iwae":
        return -iwae_objective(model, xb, eps, mb, kl_weight=weight, condition=cb), None
    terms = training_terms(model, xb, eps, mb, kl_weight=weight, dataset_size=n, generator=generator, condition=cb)
    return terms.kl_weight * free_bits_kl(terms.kl, config.free_bits) - terms.recon, terms


class _OneModel:
    """One model trained on its own: the member interface of :func:`_train_loop` for M = 1."""

    count = 1

    def __init__(self, model: VAE) -> None:
        self.model = model
        self.latent_dim = model.latent_dim

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        if any(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in self.model.modules()):
            # 2-D convolutions train in channels-last layout: oneDNN's direct kernels then need no reorder
            # (a 32 × 32 image model's step 0.105 -> 0.072 s on the CPU); restore() gives the usual layout back
            self.model.to(memory_format=torch.channels_last)

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def zero_grad(self, optimizer: FusedAdam | torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def gradients_in_place(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # autograd keeps each gradient in its parameter's own layout

    def set_training(self, training: bool) -> None:
        self.model.train(training)

    def per_row_loss(
        self,
        xb: Tensor,
        eps: Tensor,
        mb: Tensor | None,
        cb: Tensor | None,
        weight: float,
        config: TrainingConfig,
        n: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, TrainingTerms | None]:
        """Per-row loss ``(1, batch)`` of a batch given as ``(1, batch, ...)``, and the ELBO's terms."""
        xb, eps = xb[0], eps[0]
        mb = None if mb is None else mb[0]
        cb = None if cb is None else cb[0]
        with networks_in(self.model, config.precision):
            per_row, terms = per_row_objective(self.model, xb, eps, mb, cb, weight, config, n, generator)
        return per_row[None], terms

    def clip_gradients(self, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)[None]

    def validation(
        self,
        x_val: Tensor,
        val_eps: Tensor,
        m_val: Tensor | None,
        c_val: Tensor | None,
        config: TrainingConfig,
        generator: torch.Generator,
    ) -> list[float]:
        mask = None if m_val is None else m_val[0]
        cond = None if c_val is None else c_val[0]
        return [
            validation_loss(
                self.model, x_val[0], val_eps[0], mask=mask, config=config, generator=generator, condition=cond
            )
        ]

    def validation_rows(
        self, x_val: Tensor, val_eps: Tensor, m_val: Tensor | None, c_val: Tensor | None, config: TrainingConfig
    ) -> Tensor:
        """Each validation row's objective ``(1, rows)`` (no regularizer: see :func:`validation_loss`)."""
        mask = None if m_val is None else m_val[0]
        cond = None if c_val is None else c_val[0]
        per_row, _ = _validation_rows(self.model, x_val[0], val_eps[0], VALIDATION_CHUNK, mask, config, None, cond)
        return per_row[None]

    @property
    def modules(self) -> list[VAE]:
        return [self.model]

    def snapshot(self, member: int) -> dict[str, Tensor]:
        return copy.deepcopy(self.model.state_dict())

    def restore(self, states: list[dict[str, Tensor] | None]) -> None:
        if states[0] is not None:
            self.model.load_state_dict(states[0])
        self.model.to(memory_format=torch.contiguous_format)
        self.model.eval()


class _MemberObjective(nn.Module):
    """``forward(x, eps, mask, condition)`` → one model's per-row training loss: what ``vmap`` maps over the models."""

    def __init__(self, model: VAE, config: TrainingConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, xb: Tensor, eps: Tensor, mb: Tensor | None, cb: Tensor | None, *, kl_weight: float) -> Tensor:
        return per_row_objective(self.model, xb, eps, mb, cb, kl_weight, self.config, xb.shape[0], None)[0]


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal shapes and values, NaN equal to NaN (a lattice floor of NaN means "none")."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


class _NativeStack:
    """The stacked models' per-row ELBO loss ``(M, batch)`` with their MLPs run as batched matrix products.

    The same objective as ``vmap`` of :class:`_MemberObjective` over the stacked parameters
    (``_StackedModels.build`` compares the two on the data before training), without
    vmap's per-operation cost, which is most of a small table's step: for networks that
    declare ``stacks_as_sequential`` (the built-in MLPs), no condition, the ELBO, and a
    likelihood without parameters of its own (its per-element computations broadcast
    over the leading model dimension).
    """

    #: Modules a stacked MLP may hold besides ``nn.Linear``: elementwise or shape-only.
    ELEMENTWISE = (nn.SiLU, nn.ReLU, nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Softplus)

    def __init__(self, model: VAE, config: TrainingConfig, params: dict[str, Tensor]) -> None:
        self.model = model
        self.config = config
        self.params = params
        # Each linear layer's weight as (M, in, out) and bias as (M, 1, out): leaves sharing the stacked
        # parameters' storage, their gradients views of the stacked gradients, so that a step records no
        # transpose or unsqueeze (two autograd nodes fewer per layer, a few µs each)
        self.layer_params = {
            name: _reshaped_leaf(p, (lambda t: t.transpose(1, 2)) if name.endswith(".weight") else _as_row)
            for name, p in params.items()
            if name.endswith((".weight", ".bias")) and p.grad is not None
        }

    @classmethod
    def build(cls, model: VAE, config: TrainingConfig, params: dict[str, Tensor]) -> _NativeStack | None:
        """The fast path for these models, or None where only ``vmap`` runs them. The networks must declare
        ``stacks_as_sequential`` in their own class (the built-in MLPs do: their forward is ``net`` alone)."""
        if (
            config.objective != "elbo"
            or model.condition_dim
            or not all(vars(type(net)).get("stacks_as_sequential", False) for net in (model.encoder, model.decoder))
            or any(True for _ in model.likelihood.parameters())
        ):
            return None
        for net in (getattr(model.encoder, "net", None), getattr(model.decoder, "net", None)):
            if not isinstance(net, nn.Sequential):
                return None
            for module in net:
                if not isinstance(module, (nn.Linear, nn.Flatten, nn.Unflatten, *cls.ELEMENTWISE)):
                    return None
        return cls(model, config, params)

    @torch.no_grad()
    def agrees(self, vmapped: Any, rows: Tensor, mb: Tensor | None, cb: Tensor | None) -> bool:
        """Whether this gives ``vmapped``'s loss on ``rows`` (M, n, ...) at random draws (float rounding aside)."""
        count, latent = rows.shape[0], self.model.latent_dim
        draws = torch.Generator(device=rows.device).manual_seed(0)  # the global generator's state is the user's
        eps = torch.randn(count, 1, rows.shape[1], latent, generator=draws, device=rows.device, dtype=rows.dtype)
        try:
            return torch.allclose(self(rows, eps, mb, cb, 0.5), vmapped(rows, eps, mb, cb, 0.5), rtol=1e-4, atol=1e-4)
        except Exception:  # a likelihood that does not broadcast over the models: vmap runs them
            return False

    def _network(self, prefix: str, net: nn.Sequential, h: Tensor) -> Tensor:
        """``net`` applied to ``h`` (M, rows, features) with each model's own weights."""
        for name, module in net.named_children():
            if isinstance(module, nn.Linear):
                weight = self.layer_params[f"{prefix}.{name}.weight"]  # (M, in, out)
                bias = self.layer_params.get(f"{prefix}.{name}.bias")  # (M, 1, out)
                h = torch.matmul(h, weight) if bias is None else torch.baddbmm(bias, h, weight)
            elif isinstance(module, nn.Unflatten):
                h = h.unflatten(-1, module.unflattened_size)
            elif not isinstance(module, nn.Flatten):  # the encoder's input is flattened already
                h = module(h)
        return h

    def __call__(self, xb: Tensor, eps: Tensor, mb: Tensor | None, cb: Tensor | None, weight: float) -> Tensor:
        """Each model's per-row loss ``(M, batch)`` for its rows ``xb`` (M, batch, ...) and draws ``eps``
        (M, K, batch, latent): what :class:`_MemberObjective` gives each under ``vmap``."""
        model, count, rows = self.model, xb.shape[0], xb.shape[1]
        features = model.encoder_features(xb, mb, batch_dims=2).flatten(2)
        h = self._network("model.encoder.net", model.encoder.net, features)
        latent = model.latent_dim
        mu, logvar = model.posterior(h)
        z = reparameterize(mu.unsqueeze(1), logvar.unsqueeze(1), eps)  # (M, K, batch, latent)
        out = self._network("model.decoder.net", model.decoder.net, z.reshape(count, -1, latent))
        params = out.reshape(count, eps.shape[1], rows, *out.shape[2:])
        recon = model.likelihood.log_prob(xb.unsqueeze(1), params, None if mb is None else mb.unsqueeze(1)).mean(1)
        return weight * free_bits_kl(kl_per_dimension(mu, logvar), self.config.free_bits) - recon


def _as_row(t: Tensor) -> Tensor:
    return t.unsqueeze(1)


def _reshaped_leaf(parameter: Tensor, view: Callable[[Tensor], Tensor]) -> Tensor:
    """A leaf that is ``view`` of ``parameter``'s storage, its gradient ``view`` of ``parameter.grad``: autograd
    adds into the same memory, and the optimiser, stepping ``parameter``'s storage, moves both."""
    leaf = view(parameter.detach()).requires_grad_(True)
    leaf.grad = view(parameter.grad)
    return leaf


@contextlib.contextmanager
def _strided_gradients() -> Iterator[None]:
    """Autograd adding gradients into :class:`_StackedModels`' strided parameter views without its warning
    that such gradients "do not obey the gradient layout contract" (they are where the optimiser wants them)."""
    relax = getattr(torch.autograd, "enforce_grad_layout_policy", None)  # absent from older torch
    with contextlib.ExitStack() as stack:
        if relax is not None:
            stack.enter_context(relax(False))
        else:
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
        yield


class _StackedModels:
    """M models of one architecture as stacked parameters ``(M, ...)``, stepped together: as batched matrix
    products where :class:`_NativeStack` runs them (the default models), else under ``torch.func.vmap``."""

    def __init__(self, models: list[VAE], config: TrainingConfig) -> None:
        self.models = models
        self.count = len(models)
        self.latent_dim = models[0].latent_dim
        self.base = _MemberObjective(models[0], config)
        params, _ = torch.func.stack_module_state([_MemberObjective(m, config) for m in models])
        # Every stacked parameter is a view of one (M, P) tensor, and its gradient a view of that tensor's
        # gradient: Adam, the clipping and the zeroing each run once per step over all of them instead of
        # once per parameter (a small table's step is mostly such per-operation overhead). Autograd adds
        # each parameter's gradient into its view in place (the gradient is defined, outside grad mode).
        self.flat = torch.cat([v.detach().reshape(self.count, -1) for v in params.values()], 1).requires_grad_(True)
        self.flat.grad = torch.zeros_like(self.flat)
        self.params: dict[str, Tensor] = {}
        start = 0
        for name, v in params.items():
            part = slice(start, start + v[0].numel())
            self.params[name] = _reshaped_leaf(self.flat, lambda t, part=part, shape=v.shape: t[:, part].view(shape))
            start = part.stop
        self.native = _NativeStack.build(models[0], config, self.params)

    @classmethod
    def build(
        cls,
        models: list[VAE],
        x: Tensor,
        config: TrainingConfig,
        device: torch.device,
        mask: Tensor | None,
        condition: Tensor | None,
    ) -> _StackedModels | None:
        """The stack, or None where the models differ in shape or buffers, or ``vmap`` cannot run them."""
        if config.regularizer is not None:
            return None
        first = models[0].state_dict()
        for m in models[1:]:
            state = m.state_dict()
            if state.keys() != first.keys() or any(state[k].shape != first[k].shape for k in first):
                return None
        buffers = [dict(m.named_buffers()) for m in models]
        if any(b.keys() != buffers[0].keys() or any(not _same(b[k], buffers[0][k]) for k in b) for b in buffers):
            return None  # the base model's buffers stand in for every member's
        for m in models:
            m.to(device)
        stack = cls(models, config)
        try:  # a trial forward and backward on two rows: does vmap run these networks?
            rows = x[:2].to(device=device, dtype=torch.get_default_dtype()).expand(stack.count, *x[:2].shape)
            mb = None if mask is None else mask[:2].to(device).expand(stack.count, *mask[:2].shape)
            cb = None if condition is None else condition[:2].to(device=device, dtype=rows.dtype)
            cb = None if cb is None else cb.expand(stack.count, *cb.shape)
            eps = torch.zeros(stack.count, 1, rows.shape[1], stack.latent_dim, device=device)
            with _strided_gradients():
                stack._vmapped(rows, eps, mb, cb, 1.0).sum().backward()
        except Exception:  # any failure means: train them one by one
            return None
        finally:
            stack.zero_grad()
        if stack.native is not None and not stack.native.agrees(stack._vmapped, rows, mb, cb):
            stack.native = None
        return stack

    def _objective(self, xb: Tensor, eps: Tensor, mb: Tensor | None, cb: Tensor | None, weight: float) -> Tensor:
        """Each model's per-row loss ``(M, batch)``: batched matrix products where they run, else vmap."""
        return (self._vmapped if self.native is None else self.native)(xb, eps, mb, cb, weight)

    def _vmapped(self, xb: Tensor, eps: Tensor, mb: Tensor | None, cb: Tensor | None, weight: float) -> Tensor:
        def one(params: dict[str, Tensor], xb: Tensor, eps: Tensor, mb: Tensor | None, cb: Tensor | None) -> Tensor:
            return torch.func.functional_call(self.base, params, (xb, eps, mb, cb), {"kl_weight": weight})

        in_dims = (0, 0, 0, None if mb is None else 0, None if cb is None else 0)
        with warnings.catch_warnings():
            # ops without a vmap batching rule fall back to a loop over the models: slower, still right
            warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
            return torch.func.vmap(one, in_dims=in_dims, randomness="error")(self.params, xb, eps, mb, cb)

    def to(self, device: torch.device) -> None:
        pass  # built on the device

    def parameters(self) -> list[Tensor]:
        """What the optimiser steps: the one tensor that every stacked parameter is a view of."""
        return [self.flat]

    def zero_grad(self, optimizer: FusedAdam | torch.optim.Optimizer | None = None) -> None:
        self.flat.grad.zero_()  # in place: the parameters' gradients are views of it

    def gradients_in_place(self) -> contextlib.AbstractContextManager[None]:
        return _strided_gradients()  # the parameters are strided views of the one tensor

    def set_training(self, training: bool) -> None:
        self.base.train(training)

    def per_row_loss(
        self,
        xb: Tensor,
        eps: Tensor,
        mb: Tensor | None,
        cb: Tensor | None,
        weight: float,
        config: TrainingConfig,
        n: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, None]:
        return self._objective(xb, eps, mb, cb, weight), None

    def clip_gradients(self, max_norm: float) -> Tensor:
        """Each model's gradient scaled to norm ≤ ``max_norm`` as ``clip_grad_norm_`` would; the norms ``(M,)``."""
        norms = self.flat.grad.norm(dim=1)
        self.flat.grad.mul_((max_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1))
        return norms

    def validation(
        self,
        x_val: Tensor,
        val_eps: Tensor,
        m_val: Tensor | None,
        c_val: Tensor | None,
        config: TrainingConfig,
        generator: torch.Generator,
    ) -> list[float]:
        per_row = self.validation_rows(x_val, val_eps, m_val, c_val, config)
        return best_rows(per_row, config.trim_fraction).mean(1).tolist()

    @torch.no_grad()
    def validation_rows(
        self, x_val: Tensor, val_eps: Tensor, m_val: Tensor | None, c_val: Tensor | None, config: TrainingConfig
    ) -> Tensor:
        """Each model's objective on each of its validation rows ``(M, rows)``."""
        per_row = []
        for start in range(0, x_val.shape[1], VALIDATION_CHUNK):
            part = slice(start, start + VALIDATION_CHUNK)
            per_row.append(
                self._objective(
                    x_val[:, part],
                    val_eps[:, :, part],
                    None if m_val is None else m_val[:, part],
                    None if c_val is None else c_val[:, part],
                    1.0,
                )
            )
        return torch.cat(per_row, 1) if per_row else x_val.new_zeros(self.count, 0)

    @property
    def modules(self) -> list[VAE]:
        return self.models

    def snapshot(self, member: int) -> dict[str, Tensor]:
        return {k.removeprefix("model."): v[member].detach().clone() for k, v in self.params.items()}

    def restore(self, states: list[dict[str, Tensor] | None]) -> None:
        for i, (model, state) in enumerate(zip(self.models, states, strict=True)):
            if state is None:
                state = self.snapshot(i)
            model.load_state_dict(state, strict=False)
            model.eval()


def _train_loop(
    members: _OneModel | _StackedModels,
    x: Tensor,
    config: TrainingConfig,
    generators: list[torch.Generator],
    device: torch.device,
    verbose: bool,
    mask: Tensor | None,
    condition: Tensor | None,
    group: ProcessGroup | None = None,
) -> list[TrainingHistory]:
    """The training loop for M models at once (M = 1: one model); each keeps its own randomness and stopping.

    With ``group``, this rank computes its share of every batch and of the validation rows
    (:mod:`vaeguard.ddp`); the gradients and the objectives are summed over the ranks.
    """
    if group is not None and config.regularizer is not None:
        raise ValueError(
            "a regularizer cannot be trained across processes yet (its penalty is a statistic of the whole "
            "batch, and FactorVAE's discriminator keeps its own optimiser); train it in one process"
        )
    verbose = verbose and (group is None or group.is_main)
    if group is not None:
        same_rows(group, [x, mask, condition])
    members.to(device)
    count = members.count
    x = x.to(torch.get_default_dtype())
    if condition is not None:
        condition = condition.to(torch.get_default_dtype())
    splits = [split_validation(x.shape[0], config, g) for g in generators]
    train_idx = torch.stack([t for t, _ in splits]).to(device)  # (M, n_train) row numbers of x
    val_idx = torch.stack([v for _, v in splits]).to(device)
    x = x.to(device)
    mask = None if mask is None else mask.to(device)
    condition = None if condition is None else condition.to(device)
    draws = config.iwae_samples if config.objective == "iwae" else 1
    n, n_val = train_idx.shape[1], val_idx.shape[1]
    val_eps = torch.stack([torch.randn(draws, n_val, members.latent_dim, generator=g) for g in generators]).to(device)
    if group is not None:  # this rank's share of the validation rows (and of their draws)
        val_idx, val_eps = val_idx[:, group.share(n_val)], val_eps[:, :, group.share(n_val)]
    x_val = x[val_idx]
    m_val = None if mask is None else mask[val_idx]
    c_val = None if condition is None else condition[val_idx]
    batch_size = max(1, min(config.batch_size, n))
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.kl_schedule not in KL_SCHEDULES:
        raise ValueError(f"kl_schedule must be one of {', '.join(KL_SCHEDULES)}; got {config.kl_schedule!r}")
    network_dtype(config.precision)  # an unknown precision is refused before the first step
    if config.objective not in ("elbo", "iwae"):
        raise ValueError(f"objective must be 'elbo' or 'iwae', got {config.objective!r}")
    if config.objective == "iwae" and (config.regularizer is not None or config.free_bits > 0):
        raise ValueError(
            "objective='iwae' trains on the importance-weighted bound alone: drop the regularizer and free_bits"
        )
    warmup_steps = kl_ramp_steps(total_steps, config)
    optimizer = make_optimizer(members.parameters(), config)
    histories = [TrainingHistory() for _ in range(count)]
    best_loss, bad_epochs = [math.inf] * count, [0] * count
    best_states: list[dict[str, Tensor] | None] = [None] * count
    active = [True] * count  # still training: not stopped early
    step = 0

    def diverged(what: str, values: Tensor, epoch: int) -> TrainingDivergedError:
        bad = [i for i in range(count) if active[i] and not math.isfinite(values[i].item())]
        which = f" (model {bad[0] + 1} of {count})" if count > 1 else ""
        return TrainingDivergedError(
            f"{what} became {values[bad[0]].item()} at epoch {epoch + 1}, step {step + 1}{which}; "
            "try a smaller learning_rate, or check the data for extreme values"
        )

    bar = _progress(config.epochs, verbose)
    started = time.perf_counter()
    layout = contextlib.ExitStack()
    layout.enter_context(members.gradients_in_place())
    try:
        for epoch in range(config.epochs):
            members.set_training(True)
            perms = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
            order = train_idx.gather(1, perms)  # each model's rows of x in this epoch's order
            total = torch.zeros(count, dtype=torch.float64, device=device)
            for start in range(0, n, batch_size):
                rows = order[:, start : start + batch_size]
                batch_rows = rows.shape[1]
                eps = torch.stack(
                    [torch.randn(draws, batch_rows, members.latent_dim, generator=g) for g in generators]
                ).to(device)
                weight = kl_weight_at(step, total_steps, config)
                members.zero_grad(optimizer)
                if group is None:
                    xb = x[rows]
                    mb = None if mask is None else mask[rows]
                    cb = None if condition is None else condition[rows]
                    per_row, terms = members.per_row_loss(xb, eps, mb, cb, weight, config, n, generators[0])
                    if step >= warmup_steps:
                        per_row = best_rows(per_row, config.trim_fraction)
                    loss = per_row.mean(-1)
                    if terms is not None and config.regularizer is not None:
                        loss = loss + config.regularizer.penalty(terms, step)
                    if not all(ok or not on for ok, on in zip(torch.isfinite(loss).tolist(), active, strict=True)):
                        raise diverged("the training loss", loss, epoch)
                    loss.sum().backward()
                else:
                    terms = None  # no regularizer across processes
                    trim = config.trim_fraction if step >= warmup_steps else 0.0
                    data = (x, mask, condition)
                    loss = _rank_step(members, data, rows, eps, weight, config, n, generators, group, trim)
                    if not all(ok or not on for ok, on in zip(torch.isfinite(loss).tolist(), active, strict=True)):
                        raise diverged("the training loss", loss, epoch)
                norms = members.clip_gradients(config.max_grad_norm)
                if not all(ok or not on for ok, on in zip(torch.isfinite(norms).tolist(), active, strict=True)):
                    raise diverged("the gradients", norms, epoch)
                optimizer.step()
                if terms is not None and hasattr(config.regularizer, "update"):
                    config.regularizer.update(terms, step)  # e.g. FactorVAE's discriminator, after the VAE's step
                total += loss.detach().double() * batch_rows
                step += 1
            monitored = (total / n).tolist()
            train_losses = monitored
            if n_val and group is None:
                members.set_training(False)
                monitored = members.validation(x_val, val_eps, m_val, c_val, config, generators[0])
            elif n_val:  # every rank's validation rows, so that the ranks decide alike when to stop
                members.set_training(False)
                per_row = group.gather_columns(members.validation_rows(x_val, val_eps, m_val, c_val, config), n_val)
                monitored = best_rows(per_row, config.trim_fraction).mean(1).tolist()
            in_warmup = step < warmup_steps
            for i in range(count):
                if not active[i]:
                    continue
                history = histories[i]
                history.train_loss.append(train_losses[i])
                history.epoch_seconds.append(time.perf_counter() - started)
                if n_val:
                    history.validation_loss.append(monitored[i])
                if monitored[i] < best_loss[i] or in_warmup:
                    best_loss[i], bad_epochs[i], history.best_epoch = monitored[i], 0, epoch
                    best_states[i] = members.snapshot(i)
                else:
                    bad_epochs[i] += 1
                    if n_val and bad_epochs[i] >= config.patience:
                        history.stopped_early, active[i] = True, False
            if bar is not None:
                bar.set_postfix(loss=f"{train_losses[0]:.3f}", val=f"{monitored[0]:.3f}")
                bar.update(1)
            if not any(active):
                break
        if isinstance(bar, EpochLines):
            bar.finish()
    finally:
        layout.close()
        if bar is not None:
            bar.close()
    members.restore(best_states)
    if group is not None:  # the ranks hold the same weights; rank 0's make that exact, whatever the rounding
        group.broadcast_parameters([t for m in members.modules for t in m.state_dict().values()])
    return histories


def _rank_step(
    members: _OneModel | _StackedModels,
    data: tuple[Tensor, Tensor | None, Tensor | None],
    rows: Tensor,
    eps: Tensor,
    weight: float,
    config: TrainingConfig,
    n: int,
    generators: list[torch.Generator],
    group: ProcessGroup,
    trim: float,
) -> Tensor:
    """This rank's share of one step: its rows' loss, backward, then the gradients summed over the ranks.

    The rows trimmed are those one process would trim from the whole batch: the ranks
    exchange their rows' losses (a few numbers per row) and each keeps its rows among the
    batch's best ``1 − trim``. Each rank divides the sum of its kept rows' losses by the
    number kept over all ranks, so that the summed gradient is the gradient of the global
    batch's mean loss (what one process computes from the whole batch). ``data`` is
    ``(x, mask, condition)``. Returns that mean ``(M,)``.
    """
    x, mask, condition = data
    count = rows.shape[1]
    share = group.share(count)
    local = rows[:, share]
    per_row = None
    if local.shape[1]:
        xb = x[local]
        mb = None if mask is None else mask[local]
        cb = None if condition is None else condition[local]
        per_row, _ = members.per_row_loss(xb, eps[:, :, share], mb, cb, weight, config, n, generators[0])
    n_keep = count - int(trim * count)
    keep = None
    if n_keep < count:  # the batch's best rows, chosen from every rank's losses
        mine = per_row.detach() if per_row is not None else x.new_zeros(members.count, 0)
        every = group.gather_columns(mine, count)
        chosen = torch.zeros_like(every, dtype=torch.bool)
        chosen.scatter_(1, torch.topk(every, n_keep, dim=-1, largest=False).indices, True)
        keep = chosen[:, share]
    if per_row is not None:
        loss = (per_row if keep is None else torch.where(keep, per_row, 0.0)).sum(-1) / n_keep
        loss.sum().backward()
    else:  # a last batch with fewer rows than ranks: nothing to add here, but the sum still needs this rank
        loss = torch.zeros(members.count, device=x.device)
    params = members.parameters()
    summed = group.sum([p.grad for p in params] + [loss.detach()], like=[*params, loss])
    for p, g in zip(params, summed[:-1], strict=True):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)  # in place: a stack's parameters' gradients are views of its one gradient
    return summed[-1]
