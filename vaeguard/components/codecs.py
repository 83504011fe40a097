"""Built-in codecs: ``bitsback`` (lossless bits-back coding with ANS) and ``latent`` (lossy, quantised latent codes).

A codec turns a fitted estimator's model of the data into a compressor. Every probability
the entropy coder sees is computed the same way on both sides: on the CPU, in float64,
with one thread, one sample at a time, and rounded to a grid of 2⁻⁴⁰ — so the bits do
not depend on batch sizes, thread counts or the device the model was trained on.
Entropy coding uses ``constriction``'s ANS coder (``perfect=False`` on both sides).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vaeguard.hookspecs import hookimpl

#: Probabilities are rounded to multiples of this before the coder quantises them.
PROBABILITY_GRID = 2.0**-40
#: Seed of the random words that start the bits-back stack (the decoder checks it gets them back).
INITIAL_SEED = 20261126


@contextlib.contextmanager
def coding_model(det: Any) -> Iterator[Any]:
    """A float64 CPU copy of the estimator's network, evaluated with one thread, for computing coder probabilities."""
    threads = torch.get_num_threads()
    model = copy.deepcopy(det.model_).to("cpu").double().eval()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield model
    finally:
        torch.set_num_threads(threads)


def _rounded(p: torch.Tensor) -> np.ndarray:
    table = p.double().numpy()
    return np.round(table / PROBABILITY_GRID) * PROBABILITY_GRID


def _constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ValueError("the codecs need the 'constriction' package: pip install constriction") from exc
    return constriction


def _symbol_table(model: Any, codes: torch.Tensor) -> np.ndarray:
    """P(x_j = k | z) for one sample's latent ``codes``: one row per element, one column per symbol."""
    likelihood = model.likelihood
    return _rounded(likelihood.symbol_probabilities(model.decode(codes[None]))[0].reshape(-1, likelihood.n_symbols))


class LatentBuckets:
    """The latent discretisation: ``2**bits`` buckets per dimension of equal mass under the N(0, 1) prior.

    The prior is uniform over buckets; a posterior N(μ, σ²) gives bucket k the mass
    Φ((e_{k+1} − μ)/σ) − Φ((e_k − μ)/σ); a bucket's code is z = Φ⁻¹((k + ½)/2^bits).
    """

    def __init__(self, bits: int) -> None:
        if not 1 <= int(bits) <= 16:
            raise ValueError(f"latent_bits must be an integer in [1, 16], got {bits!r}")
        self.bits = int(bits)
        self.count = 1 << self.bits
        k = torch.arange(self.count + 1, dtype=torch.float64)
        self.edges = torch.special.ndtri(k / self.count)
        self.centres = torch.special.ndtri((torch.arange(self.count, dtype=torch.float64) + 0.5) / self.count)

    def posterior(self, mu: torch.Tensor, logvar: torch.Tensor) -> np.ndarray:
        """Bucket masses of N(μ, σ²) per dimension, shape (latent_dim, 2**bits)."""
        cdf = torch.special.ndtr((self.edges[None, :] - mu[:, None]) * torch.exp(-0.5 * logvar)[:, None])
        return _rounded(cdf[:, 1:] - cdf[:, :-1])

    def codes(self, buckets: np.ndarray) -> torch.Tensor:
        return self.centres[torch.from_numpy(np.asarray(buckets, dtype=np.int64))]


class BitsBackCodec:
    """Lossless bits-back coding (BB-ANS) of discrete data under a VAE.

    Per sample: pop the latent buckets z from the stack with q(z|x), push x with p(x|z),
    push z with the uniform prior. The expected net cost is the negative ELBO (of the
    discretised latent) in bits; the stack starts with ``initial_words`` random 32-bit
    words, the "initial bits" that the first samples borrow.

    Parameters
    ----------
    latent_bits : int, default=12
        Buckets per latent dimension: 2**latent_bits.
    initial_words : int or None, default=None
        Random 32-bit words that seed the stack; default: enough for one sample's latent
        code (latent_dim × latent_bits / 32, plus 2).
    """

    lossless = True

    def __init__(self, latent_bits: int = 12, initial_words: int | None = None) -> None:
        self.buckets = LatentBuckets(latent_bits)
        if initial_words is not None and int(initial_words) < 1:
            raise ValueError(f"initial_words must be a positive integer, got {initial_words!r}")
        self.initial_words = None if initial_words is None else int(initial_words)

    def params(self) -> dict[str, Any]:
        return {"latent_bits": self.buckets.bits, "initial_words": self.initial_words}

    def _seed(self, latent_dim: int) -> np.ndarray:
        words = self.initial_words or math.ceil(latent_dim * self.buckets.bits / 32) + 2
        return np.random.default_rng(INITIAL_SEED).integers(1, 2**32, size=words, dtype=np.uint64).astype(np.uint32)

    @staticmethod
    def check_model(det: Any) -> None:
        """Raise ``ValueError`` unless the estimator models discrete data the coder can code symbol by symbol."""
        if getattr(det.model_.likelihood, "n_symbols", None) is None:
            raise ValueError(
                f"codec 'bitsback' is lossless only for discrete data (binary or 8-bit images, categorical tables); "
                f"this model's likelihood {det.model_spec_['likelihood']!r} is a density"
            )

    def encode(self, det: Any, x: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
        """Compress the model-space symbols ``x`` (n, *event_shape): ``(payload, info)``.

        ``info`` holds ``initial_bits`` and ``net_bits`` (the payload's bits less them).
        """
        constriction = _constriction()
        self.check_model(det)
        categorical = constriction.stream.model.Categorical(perfect=False)
        prior = constriction.stream.model.Uniform(self.buckets.count)
        seed = self._seed(det.latent_dim_)
        coder = constriction.stream.stack.AnsCoder(seed)
        initial = coder.num_bits()
        with coding_model(det) as model:
            for i in range(x.shape[0]):
                xi = x[i : i + 1].double()
                mu, logvar = model.encode(xi)
                z = coder.decode(categorical, self.buckets.posterior(mu[0], logvar[0]))
                table = _symbol_table(model, self.buckets.codes(z))
                coder.encode_reverse(xi.reshape(-1).numpy().astype(np.int32), categorical, table)
                coder.encode_reverse(np.asarray(z, dtype=np.int32), prior)
        words = coder.get_compressed()
        return words.astype("<u4").tobytes(), {"initial_bits": int(initial), "net_bits": int(len(words) * 32 - initial)}

    def decode(self, det: Any, payload: bytes, n: int) -> torch.Tensor:
        """The ``n`` samples' symbols, float64 (n, *event_shape); checks the stack ends at its random seed."""
        constriction = _constriction()
        self.check_model(det)
        categorical = constriction.stream.model.Categorical(perfect=False)
        prior = constriction.stream.model.Uniform(self.buckets.count)
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
        event_shape = det.model_.likelihood.event_shape
        out = torch.zeros((n, *event_shape), dtype=torch.float64)
        size = math.prod(event_shape)
        with coding_model(det) as model:
            for i in reversed(range(n)):
                z = coder.decode(prior, det.latent_dim_)
                symbols = coder.decode(categorical, _symbol_table(model, self.buckets.codes(z)))
                if len(symbols) != size:  # pragma: no cover - constriction decodes one symbol per table row
                    raise ValueError("the compressed data does not fit this model")
                xi = torch.from_numpy(symbols.astype(np.float64)).reshape(1, *event_shape)
                out[i] = xi[0]
                mu, logvar = model.encode(xi)
                coder.encode_reverse(
                    np.asarray(z, dtype=np.int32), categorical, self.buckets.posterior(mu[0], logvar[0])
                )
        if not np.array_equal(coder.get_compressed(), self._seed(det.latent_dim_)):
            raise ValueError("the compressed data is damaged: decoding did not end at the stack's initial words")
        return out


class LatentCodec:
    """Lossy coding through the latent code: quantised posterior means, entropy coded; decoded by the decoder's mean.

    Each sample's code starts at its posterior mean μ(x) and is refined by gradient steps
    on the squared error between the sample and the decoder's mean (in the model's units:
    pixel levels, standardised columns), plus ``rate_weight`` times the prior's ½‖z‖²,
    which keeps codes cheap; then it is rounded to a multiple of ``step``. The integer codes
    of each latent dimension are entropy coded under a quantised Gaussian whose mean and
    standard deviation are fitted to the codes being compressed and sent with them (two
    float64 per dimension). Decoding maps the codes back to z = code·step and returns the
    decoder's mean there, in the data's units (pixel levels and lattice columns rounded).
    A smaller ``step`` spends more bits for less distortion.

    Parameters
    ----------
    step : float, default=0.5
        Quantisation step in latent units (the prior is N(0, 1)).
    refine_steps : int, default=200
        Adam steps that fit each code to its sample (0: the posterior mean as it is).
    rate_weight : float or "auto", default="auto"
        Weight of ½‖z‖² against the summed squared error (model units) in the refinement:
        larger values keep codes nearer the prior's centre, so they cost fewer bits. The
        refinement is a MAP fit under Gaussian noise of variance rate_weight / 2; "auto"
        sets that variance to a tenth of the data's per-element variance (model units), so
        the weight follows the data's scale.
    """

    lossless = False

    def __init__(self, step: float = 0.5, refine_steps: int = 200, rate_weight: float | str = "auto") -> None:
        if not (isinstance(step, (int, float)) and 0 < step < 10):
            raise ValueError(f"step must be a number in (0, 10), got {step!r}")
        if int(refine_steps) < 0 or (rate_weight != "auto" and not float(rate_weight) >= 0):
            raise ValueError("refine_steps and rate_weight must not be negative (rate_weight may be 'auto')")
        self.step = float(step)
        self.refine_steps = int(refine_steps)
        self.rate_weight = rate_weight if rate_weight == "auto" else float(rate_weight)

    def params(self) -> dict[str, Any]:
        return {"step": self.step, "refine_steps": self.refine_steps, "rate_weight": self.rate_weight}

    def _refine(self, model: Any, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """Codes fitted to the samples: Adam on the squared error of the decoder's mean (+ the rate term)."""
        if self.refine_steps == 0:
            return mu
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        z = mu.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=0.05)
        target = x.reshape(len(x), -1)
        weight = 2 * 0.1 * float(target.var()) if self.rate_weight == "auto" else self.rate_weight
        with torch.enable_grad():
            for _ in range(self.refine_steps):
                optimizer.zero_grad()
                error = (model.likelihood.mean(model.decode(z)).reshape(len(x), -1) - target).square().sum(-1)
                loss = (error + weight * 0.5 * z.square().sum(-1)).mean()
                loss.backward()
                optimizer.step()
        return z.detach()

    def encode(self, det: Any, x: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
        constriction = _constriction()
        with coding_model(det) as model:
            mu = torch.cat([model.encode(x[i : i + 1].double())[0] for i in range(x.shape[0])])
            z = self._refine(model, x.double(), mu).numpy()
        codes = np.round(z / self.step).astype(np.int32)
        center = codes.mean(axis=0)
        spread = np.maximum(codes.std(axis=0), 0.5)
        low, high = int(codes.min()), int(codes.max())
        coder = constriction.stream.stack.AnsCoder()
        model_q = constriction.stream.model.QuantizedGaussian(low, high)
        coder.encode_reverse(codes.reshape(-1), model_q, np.tile(center, len(codes)), np.tile(spread, len(codes)))
        words = coder.get_compressed().astype("<u4")
        head = np.array([low, high], dtype="<i4").tobytes() + center.astype("<f8").tobytes()
        head += spread.astype("<f8").tobytes()
        return head + words.tobytes(), {"latent_bits": int(len(words) * 32), "side_bits": 8 * len(head)}

    def decode(self, det: Any, payload: bytes, n: int) -> torch.Tensor:
        constriction = _constriction()
        dims = det.latent_dim_
        low, high = (int(v) for v in np.frombuffer(payload[:8], dtype="<i4"))
        center = np.frombuffer(payload[8 : 8 + 8 * dims], dtype="<f8")
        spread = np.frombuffer(payload[8 + 8 * dims : 8 + 16 * dims], dtype="<f8")
        words = np.frombuffer(payload[8 + 16 * dims :], dtype="<u4").astype(np.uint32)
        coder = constriction.stream.stack.AnsCoder(words)
        model_q = constriction.stream.model.QuantizedGaussian(low, high)
        codes = coder.decode(model_q, np.tile(center, n), np.tile(spread, n)).reshape(n, dims)
        with coding_model(det) as model:
            z = torch.from_numpy(codes.astype(np.float64) * self.step)
            return model.likelihood.mean(model.decode(z))


@hookimpl
def vaeguard_register_codecs(register):
    register("bitsback", BitsBackCodec)
    register("latent", LatentCodec)
