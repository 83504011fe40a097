"""Built-in observation models p(x|z): gaussian, diag_gaussian, bernoulli, categorical,
mixed (tabular columns of several kinds) and discretized_logistic (8-bit and other pixel levels).

A likelihood turns the decoder's output ``params`` of shape
``(..., n_params, *event_shape)`` into a normalised distribution over ``x`` of shape
``(..., *event_shape)``; ``log_prob`` sums over the event dimensions and returns
nats per sample. Elementwise distributions come from :mod:`torch.distributions`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Categorical, Distribution, Normal

from vaeguard.hookspecs import hookimpl
from vaeguard.parts import (  # noqa: F401 - the contract's names, re-exported for plugins written against them here
    LOG_SCALE_MAX,
    LOG_SCALE_MIN,
    Likelihood,
    soft_clamp,
    soft_clamp_inverse,
    standard_normal_log_prob,
)


def _first_bad_entry(mask: np.ndarray) -> tuple[int, int]:
    """(row, column) of the first True entry of a 2-D boolean array (flattened beyond 2-D)."""
    flat = mask.reshape(mask.shape[0], -1)
    row, col = np.argwhere(flat)[0]
    return int(row), int(col)


def _levels_seen(X: np.ndarray) -> int:
    """1 + the largest observed integer level (at least 2): the number of levels data ``X`` needs."""
    observed = X[~np.isnan(X)]
    return max(2, int(np.max(observed)) + 1) if observed.size else 2


def _check_levels(X: np.ndarray, n_levels: int, name: str, where: tuple[str, str] = ("row", "column")) -> None:
    """Raise ``ValueError`` naming the first entry of ``X`` that is not an integer in [0, n_levels) (NaN = missing)."""
    bad = ((X < 0) | (n_levels <= X) | (np.round(X) != X)) & ~np.isnan(X)
    if bad.any():
        row, col = _first_bad_entry(bad)
        value = X.reshape(X.shape[0], -1)[row, col]
        raise ValueError(
            f"likelihood {name!r} needs integers in [0, {n_levels}); {where[0]} {row}, {where[1]} {col} "
            f"holds {float(value):g}"
        )


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate near 0 and far below it."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


#: The asymptotic series of Φ's lower tail, Φ(t) ≈ φ(t)/(−t) · Σₖ (−1)ᵏ (2k−1)!! / t²ᵏ, to k = 6.
_TAIL_SERIES = (1.0, -1.0, 3.0, -15.0, 105.0, -945.0, 10395.0)
_SQRT_HALF = math.sqrt(0.5)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
#: The lower edge of a lattice's floor cell, in σ units below min(0, its upper edge): Φ there is 0 to float64.
_FLOOR_REACH = 40.0


def _far_tail_start(dtype: torch.dtype) -> float:
    """Below −this (σ units) Φ comes from its asymptotic series: ``erfc`` nears underflow there in ``dtype``
    (float64: 30, float32: 10.6), and the series' first omitted term is below 2e-14 (float32: 1e-8)."""
    return 0.8 * math.sqrt(-2.0 * math.log(torch.finfo(dtype).tiny))


def _log_ndtr_far(t: Tensor) -> Tensor:
    """log Φ(t) for t ≤ −:func:`_far_tail_start` (the asymptotic series of Mills' ratio)."""
    u = t.square().reciprocal()
    series = torch.full_like(u, _TAIL_SERIES[-1])
    for c in reversed(_TAIL_SERIES[:-1]):
        series = series * u + c
    return torch.log(series / -t) - 0.5 * t.square() - _HALF_LOG_2PI


def log_ndtr(t: Tensor) -> Tensor:
    """log Φ(t), as ``torch.special.log_ndtr`` (to a few units of rounding) at a fraction of its cost.

    ``torch.special.log_ndtr`` is scalar code (~50 ns per value on a CPU core); this is
    log(erfc(−t/√2)/2), vectorised, above the far lower tail and the asymptotic series in
    it. Above the mean its absolute error is that of rounding Φ(t) (−7.6e-24 at t = 10
    comes out as 0).
    """
    start = _far_tail_start(t.dtype)
    near = torch.log(0.5 * torch.erfc(torch.clamp(t, min=-start) * -_SQRT_HALF))
    far = t < -start
    if _is_batched(t) or t.device.type != "cpu":  # vmap cannot select; a GPU computes both in the same time
        return torch.where(far, _log_ndtr_far(torch.clamp(t, max=-start)), near)
    return _replaced_where(far, near, _log_ndtr_far, t)  # the series (~20 operations a value) only where needed


def _replaced_where(mask: Tensor, base: Tensor, compute: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """``base`` with ``compute`` of the ``inputs`` (broadcast to ``base``) at the ``mask``'s entries, computed for
    those entries only: ``torch.where(mask, compute(*inputs), base)`` without the work where ``mask`` is false
    (outside ``torch.func`` transforms, which refuse data-dependent indexing). Differentiable. Where no entry
    is selected (nearly always in training) ``base`` itself comes back: the selection, the empty computation and
    the empty write cost ~0.1 ms, a tenth of a small table's training step."""
    if not bool(mask.any()):
        return base
    where = torch.nonzero(mask.reshape(-1)).squeeze(1)
    selected = (t.expand(base.shape).reshape(-1)[where] for t in inputs)
    return base.reshape(-1).index_put((where,), compute(*selected)).reshape(base.shape)


def _log_mass_below_mean(a: Tensor, b: Tensor) -> Tensor:
    """log(Φ(b) − Φ(a)) for a < b and a ≤ 0 (the cell's lower edge at or below the mean).

    The mass is (erfc(−b/√2) − erfc(−a/√2)) / 2 (vectorised ``erfc``; its rounding error is
    relative to Φ(b), as is that of the difference of two ``log_ndtr``); where the whole
    cell lies in the far lower tail, log Φ(b) + log(1 − Φ(a)/Φ(b)) from the asymptotic
    series, computed for those values only (for all of them under ``torch.func.vmap``,
    which cannot select). Gradients stay finite.
    """
    start = _far_tail_start(a.dtype)
    erfcs = torch.erfc(torch.stack([a, b]) * -_SQRT_HALF)
    mass = 0.5 * (erfcs[1] - erfcs[0])
    far = b < -start
    near = torch.log(torch.where(far, 1.0, mass).clamp(min=torch.finfo(mass.dtype).tiny))

    def deep(a: Tensor, b: Tensor) -> Tensor:
        la, lb = _log_ndtr_far(torch.stack([a, b]).clamp(max=-start)).unbind(0)
        return lb + torch.log(-torch.expm1(torch.clamp(la - lb, max=-1e-30)))

    if _is_batched(b):
        return torch.where(far, deep(a, b), near)
    return _replaced_where(far, near, deep, a, b)


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is a tensor inside a ``torch.func`` transform (``vmap``, or ``grad`` within it), where
    data-dependent indexing is refused or may be."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return True if check is None else bool(check(t))


#: Below this bin width (in σ units) the mass is the density times the width, to rounding.
NARROW_BIN = 1e-3


def discretized_normal_log_prob(
    x: Tensor, loc: Tensor, scale: Tensor, bin_width: Tensor, floor: Tensor | None = None
) -> Tensor:
    """Log mass of the cell [x − w/2, x + w/2] under N(loc, scale²) where w > 0; log density where w = 0.

    With cells on a regular lattice this is a mass function over the lattice: the masses
    of all cells sum to one. Where ``floor`` (the lowest cell, NaN = none) is given, the
    lowest cell takes all the mass below it, (−∞, floor + w/2], so the cells from the floor
    up sum to one. Gradients stay finite in every branch.
    """
    return _cell_log_prob(scale, bin_width, *_cell_geometry(x, loc, scale, bin_width, floor))[0]


def _cell_geometry(
    x: Tensor, loc: Tensor, scale: Tensor, bin_width: Tensor, floor: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(z = (x − loc)/scale, the half cell width in σ units, whether x is in its floor cell (None without a
    floor)): what the log mass and its partials both read."""
    at_floor = None if floor is None else (x - floor).abs() < 0.5 * bin_width
    return (x - loc) / scale, (0.5 * bin_width) / scale, at_floor


def _cell_log_prob(
    scale: Tensor, bin_width: Tensor, z: Tensor, half: Tensor, at_floor: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`discretized_normal_log_prob` from :func:`_cell_geometry`'s terms, and where it is a cell's mass
    (not a density: a continuous column, or a cell narrower than :data:`NARROW_BIN` σ outside the floor).

    Each operation here runs on every element of every training step (a few µs each on a small table's
    batch, most of the step's time), so the branches that cannot occur are left out: without a floor there
    is no floor cell to select, and a continuous column (w = 0) is never exact, so its value is the density
    plus log 1."""
    exact = half > NARROW_BIN if at_floor is None else (half > NARROW_BIN) | at_floor
    h = torch.where(exact, half, 1.0)  # the unused branch's inputs harmless, its gradient not NaN
    # a cell's mass is symmetric in z: mirrored below the mean, [−|z| − h, −|z| + h]; the floor cell is (−∞, z + h]
    below = -z.abs()
    if at_floor is None:
        upper, lower = below + h, below - h
    else:
        upper = torch.where(at_floor, z + h, below + h)
        lower = torch.where(at_floor, upper.clamp(max=0.0) - _FLOOR_REACH, below - h)
    log_mass = _log_mass_below_mean(lower, upper)
    log_density = -0.5 * z.square() - (torch.log(scale) + _HALF_LOG_2PI)
    log_width = torch.log(torch.where(bin_width > 0, bin_width, 1.0))  # a narrow cell's mass: density × width
    return torch.where(exact, log_mass, log_density + log_width), exact


def _lattice_log_prob_partials(
    scale: Tensor, z: Tensor, half: Tensor, at_floor: Tensor | None, log_prob: Tensor, exact: Tensor
) -> tuple[Tensor, Tensor]:
    """∂/∂loc and ∂/∂scale of :func:`discretized_normal_log_prob`'s value ``log_prob``, in closed form.

    A cell [b⁻, b⁺] (σ units; b⁻ = −∞ for a floor cell) has log mass log(Φ(b⁺) − Φ(b⁻)) with
    ∂/∂loc = −(φ(b⁺) − φ(b⁻)) / (σ·mass) and ∂/∂scale = −(b⁺φ(b⁺) − b⁻φ(b⁻)) / (σ·mass), each
    φ/mass taken as exp(log φ − log mass) so that it stays finite where the mass underflows;
    a density (``exact`` false: continuous, or a cell narrower than :data:`NARROW_BIN` σ) has z/σ
    and (z² − 1)/σ.
    """
    upper = z + half
    lower = z - half if at_floor is None else torch.where(at_floor, -math.inf, z - half)
    ratio_upper = torch.exp(-0.5 * upper.square() - _HALF_LOG_2PI - log_prob)  # φ(b⁺) / mass
    ratio_lower = torch.exp(-0.5 * lower.square() - _HALF_LOG_2PI - log_prob)  # 0 at −∞
    lower_term = lower * ratio_lower if at_floor is None else torch.where(at_floor, 0.0, lower * ratio_lower)
    d_loc = torch.where(exact, ratio_lower - ratio_upper, z) / scale
    d_scale = torch.where(exact, lower_term - upper * ratio_upper, z.square() - 1.0) / scale
    return d_loc, d_scale


def _lattice_value_and_partials(
    x: Tensor, loc: Tensor, scale: Tensor, bin_width: Tensor, floor: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    z, half, at_floor = _cell_geometry(x, loc, scale, bin_width, floor)
    log_prob, exact = _cell_log_prob(scale, bin_width, z, half, at_floor)
    return log_prob, *_lattice_log_prob_partials(scale, z, half, at_floor, log_prob, exact)


class _ClosedFormGradient(torch.autograd.Function):
    """A log-probability of ``x`` given (loc, scale) as one autograd node.

    ``value_and_partials(x, loc, scale, *args)`` returns the value and its ∂/∂loc and
    ∂/∂scale in closed form; backward multiplies them by the incoming gradient. Autograd
    through the cell masses records some two hundred small operations (edges, mirroring,
    the far tail's series, the branches' ``where``), most of a small table's training
    step. Not differentiable twice; ``x`` and ``args`` take no gradient.

    ``forward`` takes ``ctx`` itself (no ``setup_context``): it runs only outside ``torch.func``
    transforms (:func:`_closed_form_applies`), and a ``setup_context`` would make every call bind
    its arguments through ``inspect.signature`` (~20 µs a call).
    """

    @staticmethod
    def forward(ctx: Any, value_and_partials: Callable[..., tuple[Tensor, Tensor, Tensor]], *inputs: Any) -> Any:
        _, loc, scale, *args = inputs
        output = value_and_partials(*inputs)
        _, d_loc, d_scale = output
        ctx.mark_non_differentiable(d_loc, d_scale)
        ctx.save_for_backward(d_loc, d_scale)
        ctx.shapes, ctx.n_args = (loc.shape, scale.shape), len(args)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        d_loc, d_scale = ctx.saved_tensors
        loc_shape, scale_shape = ctx.shapes
        grad_loc = (grad * d_loc).sum_to_size(loc_shape) if ctx.needs_input_grad[2] else None
        grad_scale = (grad * d_scale).sum_to_size(scale_shape) if ctx.needs_input_grad[3] else None
        return None, None, grad_loc, grad_scale, *([None] * ctx.n_args)


def _closed_form_applies(x: Tensor, loc: Tensor, scale: Tensor) -> bool:
    """Whether autograd records a log-probability here that :class:`_ClosedFormGradient` can stand for: outside
    ``torch.func`` transforms (which keep the plain operations) and where ``x`` needs no gradient."""
    recording = torch.is_grad_enabled() and (loc.requires_grad or scale.requires_grad)
    return recording and not x.requires_grad and not any(_is_batched(t) for t in (x, loc, scale))


def lattice_log_prob(x: Tensor, loc: Tensor, scale: Tensor, bin_width: Tensor, floor: Tensor | None = None) -> Tensor:
    """:func:`discretized_normal_log_prob`; where autograd records it, as one node with the same values
    and the gradient in closed form (:class:`_ClosedFormGradient`)."""
    if not _closed_form_applies(x, loc, scale):
        return discretized_normal_log_prob(x, loc, scale, bin_width, floor)
    return _ClosedFormGradient.apply(_lattice_value_and_partials, x, loc, scale, bin_width, floor)[0]


#: An element whose value or decoder mean (model units: standardised) is beyond this size is scored in float64
#: even by a float32 scoring copy. Below it, with σ ≥ e⁻⁶, |z| < 1e15: z² and the partials z²/σ stay far
#: inside float32's 3.4e38.
FLOAT32_SAFE_VALUE = 1e12


def _beyond_float32_safety(t: Tensor) -> bool:
    """Whether an element of ``t`` is beyond :data:`FLOAT32_SAFE_VALUE` in size: one pass, no copy (a NaN in ``t``
    hides the others: no NaN may be in it)."""
    if t.numel() == 0:
        return False
    low, high = torch.aminmax(t)
    return bool(torch.maximum(-low, high) > FLOAT32_SAFE_VALUE)


#: The largest partial that flows back into float32 parameters (:class:`_FiniteGradient`): far below float32's
#: range (3.4e38) even after the decoder's layers multiply it on its way back.
FLOAT32_SAFE_GRADIENT = 1e20


class _FiniteGradient(torch.autograd.Function):
    """The identity, whose gradient is clamped to ±:data:`FLOAT32_SAFE_GRADIENT`: an absurd value's partial
    ((x − μ)/σ² at x = 1e20) would overflow a float32 decoder's backward pass to inf and its proposal's fit to
    NaN. Such a row's score is tens of orders of magnitude below any other, and its fit only needs a direction."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.clamp(-FLOAT32_SAFE_GRADIENT, FLOAT32_SAFE_GRADIENT)


class _NormalLikelihood(Likelihood):
    """A normal per element; columns with a lattice (``bin_widths`` > 0) get cell masses instead of densities.

    Parameters
    ----------
    event_shape : tuple of int
        Shape of one sample.
    bin_widths : list of float, optional
        Lattice step per element in the model's units (0 = continuous). Where positive,
        the element's likelihood is the mass of the lattice cell holding the value, so
        discrete-valued columns cost at most 0 nats and cannot reward a collapsing σ.
    lattice_floor : list of float or None, optional
        The lowest cell of each lattice element in the model's units (None: unbounded);
        that cell takes all the mass below it, so the cells of the support sum to one.
    lattice_ceiling : list of float or None, optional
        The highest cell of a two-cell lattice element (a binary column: its floor and the
        cell one step above it, in the model's units; None elsewhere). The two cells split
        the normal at their midpoint m: P(top) = Φ((μ − m)/σ), one ``log_ndtr`` per
        element (a probit model of the flag), and a value drawn from the normal and moved
        to the nearer cell has exactly these masses.
    """

    supports_bin_widths: ClassVar[bool] = True
    float32_scoring: ClassVar[bool] = True

    def __init__(
        self,
        event_shape: tuple[int, ...],
        bin_widths: list[float] | None = None,
        lattice_floor: list[float | None] | None = None,
        lattice_ceiling: list[float | None] | None = None,
    ) -> None:
        super().__init__(event_shape)
        widths = (
            torch.zeros(self.event_shape) if bin_widths is None else torch.tensor(bin_widths).reshape(self.event_shape)
        )
        if (widths < 0).any() or not torch.isfinite(widths).all():
            raise ValueError("bin_widths must be finite and non-negative")
        self.register_buffer("bin_widths", widths.to(torch.get_default_dtype()))
        floor = None
        if lattice_floor is not None:
            values = [math.nan if v is None else float(v) for v in lattice_floor]
            floor = torch.tensor(values, dtype=torch.float64).reshape(self.event_shape)
            if torch.isinf(floor).any() or (~torch.isnan(floor) & (widths <= 0)).any():
                raise ValueError("lattice_floor must be finite, and given only for lattice elements (bin_widths > 0)")
            floor = floor.to(torch.get_default_dtype())
        self.register_buffer("lattice_floor", floor, persistent=False)  # rebuilt from the config
        self.lattice_ceiling = (
            None if lattice_ceiling is None else _optional_numbers(lattice_ceiling, "lattice_ceiling")
        )
        if lattice_ceiling is not None:
            layout = _two_cell_layout(self.event_shape, widths, floor, self.lattice_ceiling)
            for name, t in zip(("two_cell_columns", "other_columns"), layout, strict=True):
                self.register_buffer(name, t, persistent=False)  # rebuilt from the config

    def config(self) -> dict[str, Any]:
        if not (self.bin_widths > 0).any():
            return {}
        out: dict[str, Any] = {"bin_widths": self.bin_widths.flatten().tolist()}
        if self.lattice_floor is not None:
            out["lattice_floor"] = [None if math.isnan(v) else v for v in self.lattice_floor.flatten().tolist()]
        if self.lattice_ceiling is not None:
            out["lattice_ceiling"] = list(self.lattice_ceiling)
        return out

    def loc_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def distribution(self, params: Tensor) -> Distribution:
        loc, scale = self.loc_scale(params)
        return Normal(loc, scale, validate_args=False)

    def per_feature_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """Log density or cell mass of each element, nats, ``(..., *event_shape)``, in the wider of ``x``'s and
        ``params``' dtypes.

        With :attr:`compute_dtype` set (a CPU scoring copy: float32) the terms are computed in it and
        returned in that wider dtype (float64): on a wide table they are most of a score's time, and float64
        elementwise functions cost 2-6 times float32's. Their rounding is then relative (a
        row's score to ~1e-6 of its size; the row sums and the importance weights stay float64), and
        alike for an element wherever it sits, so a row's score still does not depend on its batch.
        ``params`` may then come in float32 already (a wide decoder's float32 output, :func:`~vaeguard.scoring.
        cpu_scoring_copy`) or in float64: an element's terms are the same either way.
        """
        compute = self.compute_dtype
        result = torch.promote_types(x.dtype, params.dtype)
        if compute is None or result == compute:
            return self._per_element(x, params)
        x_low, params_low = x.to(compute), params.to(compute)
        values = torch.nan_to_num(x_low.abs(), nan=0.0)  # (rows, ...): missing entries are NaN here
        if not (_beyond_float32_safety(values) or _beyond_float32_safety(params_low)):  # nearly always
            return self._per_element(x_low, params_low).to(result)
        # a value or a mean so far out that its float32 terms or partials could overflow (an absurd value, and
        # the codes and means the encoder gives its row): those elements in the wider dtype, the others as
        # always, each element's value from itself alone. The float32 pass sees 0 for them, so that it stays finite.
        extreme = (values > FLOAT32_SAFE_VALUE) | (self.param(params_low, 0).abs() > FLOAT32_SAFE_VALUE)
        zero = torch.zeros((), dtype=compute, device=x.device)
        x_low = torch.where(extreme, zero, x_low)
        params_low = torch.where(extreme.unsqueeze(-1 - len(self.event_shape)), zero, params_low)
        out = self._per_element(x_low, params_low).to(result)
        if params.dtype != result:  # float32 parameters: their float32 gradient must stay finite
            params = _FiniteGradient.apply(params)
        return torch.where(extreme, self._per_element(x.to(result), params.to(result)), out)

    def _per_element(self, x: Tensor, params: Tensor) -> Tensor:
        loc, scale = self.loc_scale(params)
        if not (self.bin_widths > 0).any():
            return Normal(loc, scale, validate_args=False).log_prob(x)
        floor = None if self.lattice_floor is None else self.lattice_floor.to(loc.dtype)
        widths = self.bin_widths.to(loc.dtype)
        if self.lattice_ceiling is None:
            return lattice_log_prob(x, loc, scale, widths, floor)
        binary, rest = self.two_cell_columns, self.other_columns
        if binary.numel() >= rest.numel():  # mostly flags (one-hot, bag of words): every column as one, then the rest
            midpoint = torch.nan_to_num(floor + 0.5 * widths)  # finite for the columns computed over
            out = _two_cell_log_prob(x, loc, scale, midpoint)
            if rest.numel() == 0:
                return out
            others = lattice_log_prob(
                x[..., rest], loc[..., rest], scale[..., rest], widths[rest], None if floor is None else floor[rest]
            )
            return out.index_copy(-1, rest, others)
        out = lattice_log_prob(x, loc, scale, widths, floor)
        midpoint = (floor + 0.5 * widths)[binary]
        return out.index_copy(
            -1, binary, _two_cell_log_prob(x[..., binary], loc[..., binary], scale[..., binary], midpoint)
        )


def _two_cell_log_prob(x: Tensor, loc: Tensor, scale: Tensor, midpoint: Tensor) -> Tensor:
    """log Φ(±(μ − m)/σ): the mass of the cell of ``x`` (above or below the midpoint m) of a two-cell lattice
    (where autograd records it, as one node with the gradient in closed form)."""
    if _closed_form_applies(x, loc, scale):
        return _ClosedFormGradient.apply(_two_cell_value_and_partials, x, loc, scale, midpoint)[0]
    t = (loc - midpoint) / scale
    return log_ndtr(torch.where(x > midpoint, t, -t))


def _two_cell_value_and_partials(
    x: Tensor, loc: Tensor, scale: Tensor, midpoint: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """log Φ(s·t) with t = (μ − m)/σ and s = ±1 the side of ``x``, and its ∂/∂μ = s·r/σ, ∂/∂σ = −s·t·r/σ,
    r = φ(s·t)/Φ(s·t) (the inverse Mills ratio, as exp(log φ − log Φ))."""
    t = (loc - midpoint) / scale
    above = x > midpoint
    signed = torch.where(above, t, -t)
    log_prob = log_ndtr(signed)
    ratio = torch.exp(-0.5 * signed.square() - _HALF_LOG_2PI - log_prob)
    d_loc = torch.where(above, ratio, -ratio) / scale
    return log_prob, d_loc, -signed * ratio / scale


def _optional_numbers(values: Any, name: str) -> list[float | None]:
    """``values`` as finite floats or None, or a ``ValueError`` naming the first entry that is neither."""
    out: list[float | None] = []
    for j, v in enumerate(values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
            raise ValueError(f"{name}[{j}] must be a finite number or None, got {v!r}")
        out.append(None if v is None else float(v))
    return out


def _two_cell_layout(
    event_shape: tuple[int, ...], widths: Tensor, floor: Tensor | None, ceiling: list[float | None]
) -> tuple[Tensor, Tensor]:
    """(the two-cell columns, the other columns) as index tensors; refuses a ceiling that is not one step above
    a floor of a table's column."""
    if len(event_shape) != 1 or len(ceiling) != event_shape[0]:
        raise ValueError(f"lattice_ceiling is for tables: one entry per column of {event_shape}")
    binary = [j for j, v in enumerate(ceiling) if v is not None]
    for j in binary:
        low = math.nan if floor is None else float(floor[j])
        step = float(widths[j])
        if not (step > 0 and math.isfinite(low) and abs(ceiling[j] - low - step) <= 1e-4 * step):
            raise ValueError(
                f"lattice_ceiling[{j}] = {ceiling[j]!r}: a ceiling is given only one lattice step above the "
                f"column's floor (floor {low!r}, step {step!r})"
            )
    rest = [j for j in range(event_shape[0]) if ceiling[j] is None]
    return torch.tensor(binary, dtype=torch.long), torch.tensor(rest, dtype=torch.long)


class GaussianLikelihood(_NormalLikelihood):
    """Normal with the decoder's mean and a learned σ per feature (shared over samples)."""

    def __init__(self, event_shape: tuple[int, ...], **lattice: Any) -> None:
        """``lattice``: ``bin_widths``, ``lattice_floor`` and ``lattice_ceiling``, as for ``diag_gaussian``."""
        super().__init__(event_shape, **lattice)
        self.raw_log_scale = nn.Parameter(torch.zeros(self.event_shape))

    @property
    def log_scale(self) -> Tensor:
        return soft_clamp(self.raw_log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX)

    def loc_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        loc = self.param(params, 0)
        return loc, self.log_scale.exp().to(loc.dtype).expand_as(loc)


class DiagGaussianLikelihood(_NormalLikelihood):
    """Normal with mean and σ per feature per sample, both from the decoder."""

    n_params = 2

    def loc_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        alike = self.compute_dtype is not None  # a scoring copy: an element's value independent of its position
        log_scale = soft_clamp(self.param(params, 1), LOG_SCALE_MIN, LOG_SCALE_MAX, alike_everywhere=alike)
        return self.param(params, 0), log_scale.exp()


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli per element, for binary data in {0, 1}; a mass function."""

    discrete = True

    def check_support(self, X: np.ndarray) -> None:
        bad = (X != 0) & (X != 1) & ~np.isnan(X)  # NaN = missing, not out of support
        if bad.any():
            row, col = _first_bad_entry(bad)
            value = X.reshape(X.shape[0], -1)[row, col]
            raise ValueError(
                f"likelihood 'bernoulli' needs values 0 or 1; row {row}, column {col} holds {float(value):g}"
            )

    def distribution(self, params: Tensor) -> Distribution:
        return Bernoulli(logits=self.param(params, 0).clamp(-30.0, 30.0), validate_args=False)

    @property
    def n_symbols(self) -> int:
        return 2


class CategoricalLikelihood(Likelihood):
    """Independent categorical per element over ``0 .. n_categories-1``; a mass function.

    Parameters
    ----------
    event_shape : tuple of int
        Shape of one sample.
    n_categories : int
        Number of levels; the data must hold integers in ``[0, n_categories)``.
    """

    discrete = True

    def __init__(self, event_shape: tuple[int, ...], n_categories: int) -> None:
        super().__init__(event_shape)
        if int(n_categories) < 2:
            raise ValueError(f"likelihood 'categorical' needs n_categories >= 2, got {n_categories}")
        self.n_categories = int(n_categories)

    @property
    def param_count(self) -> int:
        return self.n_categories

    @property
    def encoder_input_shape(self) -> tuple[int, ...]:
        return (*self.event_shape, self.n_categories)

    def encoder_input(self, x: Tensor) -> Tensor:
        return nn.functional.one_hot(x.long().clamp(0, self.n_categories - 1), self.n_categories).to(
            x.dtype if x.is_floating_point() else torch.get_default_dtype()
        )

    @classmethod
    def options_from_data(cls, X: np.ndarray) -> dict[str, Any]:
        return {"n_categories": _levels_seen(X)}

    def config(self) -> dict[str, Any]:
        return {"n_categories": self.n_categories}

    def check_support(self, X: np.ndarray) -> None:
        _check_levels(X, self.n_categories, "categorical")

    @property
    def n_symbols(self) -> int:
        return self.n_categories

    def symbol_probabilities(self, params: Tensor) -> Tensor:
        return self.distribution(params).probs

    def distribution(self, params: Tensor) -> Distribution:
        logits = params.movedim(-1 - len(self.event_shape), -1)
        return Categorical(logits=logits, validate_args=False)

    def per_feature_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return self.distribution(params).log_prob(x.long())

    def mean(self, params: Tensor) -> Tensor:
        probs = self.distribution(params).probs
        levels = torch.arange(self.n_categories, dtype=probs.dtype, device=probs.device)
        return (probs * levels).sum(-1)

    def sample(self, params: Tensor) -> Tensor:
        return self.distribution(params).sample().to(params.dtype)


class MixedLikelihood(DiagGaussianLikelihood):
    """Tabular columns of mixed kinds: numeric ones as ``diag_gaussian`` (cell masses on a lattice),
    categorical ones (including booleans) as a categorical over their levels.

    Parameters
    ----------
    event_shape : tuple of int
        ``(n_columns,)``.
    n_categories : list of int
        Levels per column; 0 for a numeric column. Categorical columns hold codes
        ``0 .. n_categories[j]-1``.
    bin_widths : list of float, optional
        Lattice steps of the numeric columns (see ``diag_gaussian``).

    The decoder gives ``max(2, max levels)`` parameters per column: (mean, log σ) for
    numeric columns, the level logits for categorical ones.
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        n_categories: list[int],
        bin_widths: list[float] | None = None,
        lattice_floor: list[float | None] | None = None,
        lattice_ceiling: list[float | None] | None = None,
    ) -> None:
        super().__init__(event_shape, bin_widths, lattice_floor, lattice_ceiling)
        levels = torch.tensor([int(k) for k in n_categories])
        if levels.shape != self.event_shape or ((levels != 0) & (levels < 2)).any():
            raise ValueError(f"n_categories must give 0 or >= 2 levels for each of {self.event_shape} columns")
        self.n_categories = [int(k) for k in n_categories]
        self.register_buffer("is_categorical", levels > 0)
        width = max(2, int(levels.max()))
        self.register_buffer("valid_level", torch.arange(width)[None, :] < levels[:, None].clamp(min=1))

    @property
    def param_count(self) -> int:
        return self.valid_level.shape[1]

    @property
    def encoder_input_shape(self) -> tuple[int, ...]:
        return (self.event_shape[0] * (1 + self.param_count),)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_categories": self.n_categories}

    def _codes(self, x: Tensor) -> Tensor:
        return torch.where(self.is_categorical, x, torch.zeros_like(x)).round().long().clamp(0, self.param_count - 1)

    def encoder_input(self, x: Tensor) -> Tensor:
        numeric = torch.where(self.is_categorical, torch.zeros_like(x), x)
        onehot = nn.functional.one_hot(self._codes(x), self.param_count).to(x.dtype)
        onehot = onehot * self.is_categorical[:, None].to(x.dtype)
        return torch.cat([numeric, onehot.flatten(-2)], dim=-1)

    def _log_levels(self, params: Tensor) -> Tensor:
        logits = params.movedim(-2, -1)  # (..., columns, levels)
        return torch.log_softmax(logits.masked_fill(~self.valid_level, float("-inf")), dim=-1)

    def per_feature_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        numeric = super().per_feature_log_prob(x, params)
        log_levels = self._log_levels(params.to(numeric.dtype))  # a scoring copy's float32 parameters: float64 here
        codes = self._codes(x).expand(log_levels.shape[:-1])
        categorical = log_levels.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
        return torch.where(self.is_categorical, categorical, numeric)

    @property
    def n_symbols(self) -> int | None:
        """Codable as symbols only when every column is categorical."""
        return self.param_count if bool(self.is_categorical.all()) else None

    def symbol_probabilities(self, params: Tensor) -> Tensor:
        if self.n_symbols is None:
            raise ValueError("a table with numeric columns is a density, not a mass function over symbols")
        return self._log_levels(params).exp()

    def mean(self, params: Tensor) -> Tensor:
        """Numeric columns: the mean; categorical columns: the most probable level."""
        return torch.where(
            self.is_categorical, self._log_levels(params).argmax(-1).to(params.dtype), super().mean(params)
        )

    def sample(self, params: Tensor) -> Tensor:
        levels = torch.distributions.Categorical(logits=self._log_levels(params)).sample().to(params.dtype)
        return torch.where(self.is_categorical, levels, super().sample(params))


@functools.lru_cache(maxsize=16)
def _logistic_edges(n_levels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The L + 1 cell edges of L levels in [−1, 1] units: −∞, the L − 1 midpoints between levels, ∞.

    Shared between calls (an operand only, never written to).
    """
    inner = torch.arange(1, n_levels, dtype=dtype, device=device) * (2.0 / (n_levels - 1)) - 1.0
    inner = inner - 1.0 / (n_levels - 1)  # between level k−1 and k
    infinity = torch.full((1,), math.inf, dtype=dtype, device=device)
    return torch.cat([-infinity, inner, infinity])


#: Bounds on the logistic's log-scale, in units where the levels span [−1, 1].
LOGISTIC_LOG_SCALE_MIN = -7.0
LOGISTIC_LOG_SCALE_MAX = 2.0


class DiscretizedLogisticLikelihood(Likelihood):
    """Pixel levels ``0 .. n_levels-1`` (e.g. 256 for 8-bit images) under a discretised logistic; a mass function.

    Each element's level k is scored by the logistic mass of its cell: with the levels
    mapped to x = 2k/(L−1) − 1 in [−1, 1] and half-width h = 1/(L−1),
    P(k) = F((x + h − μ)/s) − F((x − h − μ)/s), where the lowest level takes all mass
    below its cell and the highest all mass above (as in PixelCNN++). The masses of the
    L levels sum to one, so −log₂ P is an exact code length in bits. The decoder gives
    μ and log s per element (log s bounded to [−7, 2]).

    Parameters
    ----------
    event_shape : tuple of int
        Shape of one sample, e.g. ``(channels, height, width)``.
    n_levels : int
        Number of levels L ≥ 2; the data must hold integers in ``[0, L)``.
    """

    n_params = 2
    discrete = True

    def __init__(self, event_shape: tuple[int, ...], n_levels: int = 256) -> None:
        super().__init__(event_shape)
        if int(n_levels) < 2:
            raise ValueError(f"likelihood 'discretized_logistic' needs n_levels >= 2, got {n_levels}")
        self.n_levels = int(n_levels)

    @classmethod
    def options_from_data(cls, X: np.ndarray) -> dict[str, Any]:
        return {"n_levels": _levels_seen(X)}

    def config(self) -> dict[str, Any]:
        return {"n_levels": self.n_levels}

    def check_support(self, X: np.ndarray) -> None:
        _check_levels(X, self.n_levels, "discretized_logistic", ("sample", "element"))

    @property
    def n_symbols(self) -> int:
        return self.n_levels

    def symbol_probabilities(self, params: Tensor) -> Tensor:
        """The L cell masses at once: differences of the logistic CDF at the L − 1 inner cell edges."""
        loc, log_scale = self.loc_log_scale(params)
        if torch.is_grad_enabled() and (loc.requires_grad or log_scale.requires_grad):
            inner = _logistic_edges(self.n_levels, loc.dtype, loc.device)[1:-1]
            cdf = torch.sigmoid((inner - loc[..., None]) * torch.exp(-log_scale)[..., None])
            cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf, torch.ones_like(cdf[..., :1])], -1)
        else:  # the coder's path, the same values: edges from −∞ (F = 0) to ∞ (F = 1) in one buffer, in place
            edges = _logistic_edges(self.n_levels, loc.dtype, loc.device)  # (∞ · 0 in a gradient: NaN)
            cdf = (edges - loc[..., None]).mul_(torch.exp(-log_scale)[..., None]).sigmoid_()
        return cdf[..., 1:] - cdf[..., :-1]

    def encoder_input(self, x: Tensor) -> Tensor:
        return self._scaled(x)

    def _scaled(self, levels: Tensor) -> Tensor:
        return levels * (2.0 / (self.n_levels - 1)) - 1.0

    def loc_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """μ and log s in the [−1, 1] units of the levels, each ``(..., *event_shape)``."""
        log_scale = soft_clamp(self.param(params, 1), LOGISTIC_LOG_SCALE_MIN, LOGISTIC_LOG_SCALE_MAX)
        return self.param(params, 0), log_scale

    def per_feature_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        loc, log_scale = self.loc_log_scale(params)
        inv_scale = torch.exp(-log_scale)
        half = 1.0 / (self.n_levels - 1)
        centered = self._scaled(x) - loc
        upper = (centered + half) * inv_scale  # F(upper) − F(lower) is the cell's mass
        lower = (centered - half) * inv_scale
        log_below = nn.functional.logsigmoid(upper)  # lowest level: all mass below its upper edge
        log_above = nn.functional.logsigmoid(-lower)  # highest level: all mass above its lower edge
        # σ(a) − σ(b) = σ(a)·σ(−b)·(1 − e^(b−a)): stable for cells far in either tail
        log_cell = log_below + log_above + log1mexp(-2.0 * half * inv_scale)
        lowest, highest = x <= 0, x >= self.n_levels - 1
        return torch.where(lowest, log_below, torch.where(highest, log_above, log_cell))

    def mean(self, params: Tensor) -> Tensor:
        """E[level] = Σ_{k < L−1} P(level > k), exact for the discretised distribution."""
        loc, log_scale = self.loc_log_scale(params)
        inv_scale = torch.exp(-log_scale)
        half = 1.0 / (self.n_levels - 1)
        total = torch.zeros_like(loc)
        for k in range(self.n_levels - 1):
            edge = (k * 2.0 / (self.n_levels - 1) - 1.0) + half
            total = total + torch.sigmoid(-(edge - loc) * inv_scale)
        return total

    def sample(self, params: Tensor) -> Tensor:
        """Inverse-CDF draws: a logistic variate, rounded to its level and clamped to [0, L−1]."""
        loc, log_scale = self.loc_log_scale(params)
        u = torch.rand_like(loc).clamp(1e-7, 1 - 1e-7)
        value = loc + log_scale.exp() * (torch.log(u) - torch.log1p(-u))
        return torch.round((value + 1.0) * (self.n_levels - 1) / 2.0).clamp(0, self.n_levels - 1)


@hookimpl
def vaeguard_register_likelihoods(register):
    register("gaussian", GaussianLikelihood)
    register("diag_gaussian", DiagGaussianLikelihood)
    register("bernoulli", BernoulliLikelihood)
    register("categorical", CategoricalLikelihood)
    register("mixed", MixedLikelihood)
    register("discretized_logistic", DiscretizedLogisticLikelihood)
