"""The contract between vaeguard's core and its parts: what a plugin implements and may import.

A likelihood subclasses :class:`Likelihood`; an encoder family, a regularizer and a codec
follow the protocols :class:`EncoderFamily`, :class:`Regularizer` and :class:`Codec`, and
declare what they can do beyond the minimum with :func:`declare` (the core reads the
declaration with :func:`declares`; it never guesses from a signature). The core and the
built-in parts (:mod:`vaeguard.components`) import these names from here, as third-party
plugins do (``plugins/vaeguard-studentt`` is the worked example); nothing in the core
imports a built-in part.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Distribution

#: What a part may declare it can do (:func:`declare`); a part that declares nothing can do none of it.
CAPABILITIES = {
    "takes_conditions": "an encoder family whose networks read a condition vector: it accepts the option "
    "condition_dim (m > 0) and returns networks called as encoder(x, c) and decoder(z, c), c of shape (batch, m)",
    "reports_progress": "a codec whose encode and decode take a keyword progress: a callable told the number "
    "of samples done since its last call",
}

Part = TypeVar("Part")


def declare(**capabilities: bool) -> Callable[[Part], Part]:
    """Mark a part (a class or a function) with what it can do, e.g. ``@declare(takes_conditions=True)``.

    The names are those of :data:`CAPABILITIES`; an unknown name is refused, so a typo does
    not pass silently.
    """
    unknown = sorted(set(capabilities) - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"unknown capability {unknown[0]!r}; parts declare {', '.join(sorted(CAPABILITIES))}")

    def mark(part: Part) -> Part:
        for name, value in capabilities.items():
            setattr(part, name, bool(value))
        return part

    return mark


def declares(part: Any, capability: str) -> bool:
    """Whether ``part`` (a registered class, function or object) declared ``capability`` (:func:`declare`)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    return getattr(part, capability, False) is True


@runtime_checkable
class EncoderFamily(Protocol):
    """A network family: ``family(input_shape, latent_dim, n_params, **options) -> (encoder, decoder)``.

    ``encoder(x)`` maps ``(batch, *input_shape)`` to ``(batch, 2 * latent_dim)`` (means, then
    log-variances); ``decoder(z)`` maps ``(batch, latent_dim)`` to ``(batch, n_params,
    *output_shape)``. Options the core passes: ``output_shape``, ``hidden_dims`` (when the
    user gives them), the user's ``encoder_params``, and ``condition_dim`` to a family that
    declares ``takes_conditions``.
    """

    def __call__(
        self, input_shape: tuple[int, ...], latent_dim: int, n_params: int, **options: Any
    ) -> tuple[nn.Module, nn.Module]: ...


@runtime_checkable
class Regularizer(Protocol):
    """A disentanglement regularizer, built as ``factory(**regularizer_params)``.

    ``penalty(terms, step)`` returns a scalar tensor in nats per sample added to the
    minibatch's mean −ELBO (``step`` −1: the validation loss, under ``torch.no_grad()``: it must
    change nothing). One that trains a network of its own also defines ``update(terms, step)``,
    which the training loop calls after each optimisation step of the VAE.
    """

    def penalty(self, terms: Any, step: int) -> Tensor: ...


@runtime_checkable
class Codec(Protocol):
    """A latent-code compression codec, built as ``factory(**codec_params)``.

    ``encode(model, x) -> (payload, info)`` for ``x`` (n, *event_shape) in the model's units;
    ``decode(model, payload, n) -> x``; ``params()`` the settings the container records (passed
    back to the factory to decode); ``lossless`` whether decode gives ``x`` back exactly.
    ``model`` is a :class:`CodingModel`. A codec that declares ``reports_progress`` takes a
    keyword ``progress`` in both methods.
    """

    lossless: bool

    def encode(self, model: CodingModel, x: Tensor) -> tuple[bytes, dict[str, Any]]: ...

    def decode(self, model: CodingModel, payload: bytes, n: int) -> Tensor: ...

    def params(self) -> dict[str, Any]: ...


#: Bounds on log σ (standardised units) so that densities never overflow.
LOG_SCALE_MIN = -6.0
LOG_SCALE_MAX = 4.0


def softplus_alike_everywhere(x: Tensor) -> Tensor:
    """log(1 + eˣ) as max(x, 0) + log1p(e^−|x|): the same value for an element wherever it sits in ``x``.

    ``torch.nn.functional.softplus`` on the CPU rounds an element differently in its vectorised
    loop and in its scalar remainder (by one unit in the last place): in float32 a row's value
    then depends on the rows computed beside it (~1e-7 nats of a score). ``exp``, ``log1p`` and
    ``abs`` round alike in both (``tests/test_parts.py``). About three times softplus's time.
    """
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def soft_clamp(x: Tensor, low: float, high: float, *, alike_everywhere: bool = False) -> Tensor:
    """Smoothly squash ``x`` into ``(low, high)``; the identity well inside the bounds.

    ``alike_everywhere``: with :func:`softplus_alike_everywhere`, so that an element's value
    does not depend on its position in ``x`` (float32 scoring; the two agree to rounding).
    """
    softplus = softplus_alike_everywhere if alike_everywhere else nn.functional.softplus
    return high - softplus(high - low - softplus(x - low))


def soft_clamp_inverse(y: Tensor, low: float, high: float) -> Tensor:
    """The ``x`` with ``soft_clamp(x, low, high) == y`` for ``low < y < high``."""

    def softplus_inverse(u: Tensor) -> Tensor:
        return u + torch.log(-torch.expm1(-u))

    return low + softplus_inverse(high - low - softplus_inverse(high - y))


class Likelihood(nn.Module):
    """Base class of observation models.

    Subclasses set ``n_params`` (decoder outputs per data element) and ``discrete``
    (a mass function, data used as given) and implement :meth:`distribution`.

    Parameters
    ----------
    event_shape : tuple of int
        Shape of one sample, e.g. ``(n_features,)``.
    """

    n_params: ClassVar[int] = 1
    discrete: ClassVar[bool] = False
    #: Whether the constructor takes ``bin_widths`` (cell masses for lattice-valued columns).
    supports_bin_widths: ClassVar[bool] = False
    #: Whether :meth:`per_feature_log_prob` honours :attr:`compute_dtype`: computes its per-element terms in that
    #: dtype from parameters of any dtype, an element's value independent of its position in the tensors (no
    #: operation whose vectorised loop and scalar remainder round differently), and returns the parameters' dtype.
    float32_scoring: ClassVar[bool] = False
    #: Set on a CPU scoring copy of a model (:func:`vaeguard.scoring.cpu_scoring_copy`) whose likelihood declares
    #: :attr:`float32_scoring`: float32. None: the parameters' own dtype.
    compute_dtype: torch.dtype | None = None

    def __init__(self, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def options_from_data(cls, X: np.ndarray) -> dict[str, Any]:
        """Constructor options read off the training data (e.g. the number of categories)."""
        return {}

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments (besides ``event_shape``) to rebuild this object."""
        return {}

    def check_support(self, X: np.ndarray) -> None:
        """Raise ``ValueError`` naming the first row and column outside the support."""

    @property
    def param_count(self) -> int:
        """Decoder outputs per data element."""
        return self.n_params

    @property
    def encoder_input_shape(self) -> tuple[int, ...]:
        """Shape of :meth:`encoder_input` per sample."""
        return self.event_shape

    def encoder_input(self, x: Tensor) -> Tensor:
        """What the encoder sees of ``x`` (the data itself unless a subclass encodes it)."""
        return x

    # -- the distribution --------------------------------------------------------------
    def param(self, params: Tensor, i: int) -> Tensor:
        """The ``i``-th parameter slice, shape ``(..., *event_shape)``."""
        return params.select(-1 - len(self.event_shape), i)

    def distribution(self, params: Tensor) -> Distribution:
        """Elementwise distribution with batch shape ``(..., *event_shape)``."""
        raise NotImplementedError

    def per_feature_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """Log density (or mass) of each element, nats, shape ``(..., *event_shape)``."""
        return self.distribution(params).log_prob(x)

    def log_prob(self, x: Tensor, params: Tensor, mask: Tensor | None = None) -> Tensor:
        """Log-likelihood summed over the event dimensions, nats, shape ``(...)``.

        ``mask`` (same shape as ``x``, true = observed) restricts the sum to observed
        entries, which for this factorised model is the exact marginal likelihood.
        """
        lp = self.per_feature_log_prob(x, params)
        if mask is not None:
            lp = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
        return lp.flatten(start_dim=lp.dim() - len(self.event_shape)).sum(-1)

    def mean(self, params: Tensor) -> Tensor:
        """Mean of x given the parameters, shape ``(..., *event_shape)``."""
        return self.distribution(params).mean

    def sample(self, params: Tensor) -> Tensor:
        """One draw of x per parameter set (uses torch's global generator)."""
        return self.distribution(params).sample()

    # -- coding ------------------------------------------------------------------------
    @property
    def n_symbols(self) -> int | None:
        """For a mass function over symbols 0 .. K−1 per element: K (lossless codecs use it); None for densities."""
        return None

    def symbol_probabilities(self, params: Tensor) -> Tensor:
        """P(x_j = k | params) for every element and symbol k, shape ``(..., *event_shape, n_symbols)``.

        The default evaluates :meth:`per_feature_log_prob` at each symbol; subclasses may
        compute the table directly.
        """
        if self.n_symbols is None:
            raise ValueError(f"{type(self).__name__} is a density, not a mass function over symbols")
        shape = params.shape[: params.dim() - len(self.event_shape) - 1] + self.event_shape
        columns = [
            self.per_feature_log_prob(torch.full(shape, float(k), dtype=params.dtype, device=params.device), params)
            for k in range(self.n_symbols)
        ]
        return torch.stack(columns, -1).exp()


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension, nats."""
    return -0.5 * (z.square().sum(-1) + z.shape[-1] * math.log(2 * math.pi))


@dataclass(frozen=True)
class CodingModel:
    """What a codec sees of a fitted model (``encode(model, x)``, ``decode(model, payload, n)``).

    ``network``: the VAE (the first model of a mixture) whose ``encode``/``decode``/``likelihood``
    the codec uses; ``latent_dim``: the size of z; ``likelihood``: the likelihood's registered
    name (for messages); ``element_scale``: per element of a sample, the factor from the model's
    units to the data's (standardised table columns; None: 1), e.g. to weigh squared errors.
    """

    network: nn.Module
    latent_dim: int
    likelihood: str
    element_scale: np.ndarray | None = None
