"""A vaeguard plugin: the Student-t likelihood ``studentt``.

Each feature is t-distributed around the decoder's output with a learned scale σ_j and
learned degrees of freedom ν_j (shared across samples), which gives heavy tails: a few
extreme values cost far fewer nats than under a Gaussian, so a model trained on
contaminated data is pulled less towards its outliers. Install the package and use
``VAEAnomalyDetector(likelihood="studentt")``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, StudentT

import vaeguard
from vaeguard.parts import LOG_SCALE_MAX, LOG_SCALE_MIN, Likelihood, soft_clamp

#: ν is kept within [DF_MIN, DF_MAX]: above 2 the variance exists; near 200 it is Gaussian.
DF_MIN = 2.1
DF_MAX = 200.0


class StudentTLikelihood(Likelihood):
    """Student-t with the decoder's location, a learned scale and learned ν per feature.

    Parameters
    ----------
    event_shape : tuple of int
        Shape of one sample.
    initial_df : float, default=5.0
        Starting degrees of freedom.
    """

    def __init__(self, event_shape: tuple[int, ...], initial_df: float = 5.0) -> None:
        super().__init__(event_shape)
        if not DF_MIN < initial_df < DF_MAX:
            raise ValueError(f"initial_df must lie in ({DF_MIN}, {DF_MAX}), got {initial_df}")
        self.initial_df = float(initial_df)
        self.raw_log_scale = nn.Parameter(torch.zeros(self.event_shape))
        # ν = DF_MIN + (DF_MAX − DF_MIN)·sigmoid(raw): bounded, smooth, learned.
        p = (initial_df - DF_MIN) / (DF_MAX - DF_MIN)
        self.raw_df = nn.Parameter(torch.full(self.event_shape, float(torch.logit(torch.tensor(p)))))

    def config(self) -> dict:
        return {"initial_df": self.initial_df}

    @property
    def df(self) -> Tensor:
        """Degrees of freedom ν per feature."""
        return DF_MIN + (DF_MAX - DF_MIN) * torch.sigmoid(self.raw_df)

    @property
    def scale(self) -> Tensor:
        """Scale σ per feature (standardised units)."""
        return soft_clamp(self.raw_log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX).exp()

    def distribution(self, params: Tensor) -> Distribution:
        loc = self.param(params, 0)
        return StudentT(self.df.expand_as(loc), loc, self.scale.expand_as(loc), validate_args=False)


@vaeguard.hookimpl
def vaeguard_register_likelihoods(register):
    register("studentt", StudentTLikelihood)
