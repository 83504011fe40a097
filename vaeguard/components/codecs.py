"""Built-in codecs: ``bitsback`` (lossless bits-back coding with ANS) and ``latent`` (lossy, quantised latent codes).

A codec turns a fitted estimator's model of the data into a compressor. Every probability
the entropy coder sees is computed the same way on both sides: on the CPU, in the
container's precision (float32 by default; float64 tables rounded to a grid of 2⁻⁴⁰), with
one torch thread per group of streams, on batches of the same shapes — so the bits do not
depend on thread counts, the CPUs free, or the device the model was trained on. (A CPU whose
BLAS or vector kernels round otherwise could decode other bits; the container's SHA-256 of
the data then refuses the result.) Entropy coding uses ``constriction``'s ANS coder (fast
approximate table quantisation, ``perfect=False``, on both sides unless ``exact_tables``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from vaeguard.detector import available_cpus
from vaeguard.hookspecs import hookimpl
from vaeguard.parts import CodingModel, declare

#: Probabilities are rounded to multiples of this before the coder quantises them.
PROBABILITY_GRID = 2.0**-40
#: Seed of the random words that start the bits-back stack (the decoder checks it gets them back).
INITIAL_SEED = 20261126
#: Smallest standard deviation (in steps) of the latent codec's code model: a constant code costs ~0 bits.
MIN_CODE_SPREAD = 0.1
#: The largest step the payload's float16 can hold (a dimension the decoder ignores gets it).
FLOAT16_MAX = float(np.finfo(np.float16).max)
#: Scrambled Sobol points (and their seed) over which the latent codec averages the decoder for E_p(z)[f(z)].
MARGINAL_DRAWS = 1024
MARGINAL_SEED = 20261126


@contextlib.contextmanager
def coding_model(det: CodingModel, dtype: torch.dtype = torch.float64) -> Iterator[Any]:
    """A CPU copy of the network in ``dtype`` for the coder's probabilities, run with one torch thread (restored
    after)."""
    threads = torch.get_num_threads()
    model = copy.deepcopy(det.network).to(device="cpu", dtype=dtype).eval()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield model
    finally:
        torch.set_num_threads(threads)


def _no_progress(done: int) -> None:
    """The default progress callback of the codecs: tells no one."""


#: Adding and then subtracting this rounds a float64 in [0, 1] to a multiple of :data:`PROBABILITY_GRID`, half
#: to even: the sum lies in [2¹², 2¹³), where float64 steps are exactly 2⁻⁴⁰, and its mantissa's parity is the grid
#: point's (1.5 · 2¹² is an even multiple of the grid).
_GRID_SHIFT = 1.5 * 2.0**12


def _rounded(p: torch.Tensor, in_place: bool = False) -> np.ndarray:
    """``p`` (probabilities in [0, 1]) rounded to multiples of :data:`PROBABILITY_GRID` (half to even), float64 numpy.

    Equal to ``np.round(p / grid) * grid`` to the bit (containers written when it was computed that way decode
    alike) in two passes; ``in_place`` overwrites ``p`` (a float64 tensor the caller no longer needs) instead of
    allocating.
    """
    mine = p if in_place and p.dtype == torch.float64 else p.to(torch.float64, copy=True)
    return mine.add_(_GRID_SHIFT).sub_(_GRID_SHIFT).numpy()


def _constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ValueError("the codecs need the 'constriction' package: pip install constriction") from exc
    return constriction


#: The symbol tables of a batch are computed for at most this many entries at a time (at least one sample's),
#: by precision. float64: a 28 × 28 8-bit image's 784 × 256 masses are 1.6 MB, and ten of them at once leave the
#: CPU's cache (over twice the time per image, measured). float32: five such images at once, fewer and larger
#: operations for the coding threads to take turns at (1.2 against 1.0 MB/s with two groups, quality log C23).
#: The chunks depend on the model's shape alone, so both sides agree; in float32 they are part of the format (an
#: elementwise kernel may round a strided view's elements otherwise than a contiguous one's, measured on softplus).
TABLE_CHUNK_ENTRIES = {torch.float64: 1 << 18, torch.float32: 1 << 20}


def _table_chunks(likelihood: Any, batch: int, dtype: torch.dtype = torch.float64) -> list[range]:
    """The samples of a batch whose symbol tables are computed together: chunks within :data:`TABLE_CHUNK_ENTRIES`."""
    size = max(1, TABLE_CHUNK_ENTRIES[dtype] // (math.prod(likelihood.event_shape) * likelihood.n_symbols))
    return [range(start, min(start + size, batch)) for start in range(0, batch, size)]


def _symbol_tables(likelihood: Any, params: torch.Tensor) -> np.ndarray:
    """P(x_j = k | z) for the decoder's ``params`` of a chunk of samples: (samples, elements, symbols).

    In float64 (the decoder's ``params`` are) the tables are rounded to :data:`PROBABILITY_GRID`; in float32
    the coder takes them as they are (float32 numpy).
    """
    probabilities = likelihood.symbol_probabilities(params)
    if params.dtype == torch.float32:
        tables = probabilities.to(torch.float32).contiguous().numpy()
    else:
        tables = _rounded(probabilities, in_place=_fresh(probabilities, params, likelihood))
    return tables.reshape(len(params), -1, likelihood.n_symbols)


def _fresh(t: torch.Tensor, params: torch.Tensor, likelihood: Any) -> bool:
    """Whether ``t`` owns its memory: not a view, and sharing it with neither ``params`` nor the likelihood's
    parameters and buffers (a plugin may return a table it keeps), so that rounding it in place harms nothing."""
    shared = {params.untyped_storage().data_ptr()}
    shared.update(x.untyped_storage().data_ptr() for x in (*likelihood.parameters(), *likelihood.buffers()))
    return not t._is_view() and t.untyped_storage().data_ptr() not in shared


def stream_groups(streams: int, groups: int) -> list[range]:
    """The streams of each of ``groups`` groups: contiguous, as even as can be (the first ones one larger)."""
    size, extra = divmod(streams, groups)
    bounds = np.cumsum([0] + [size + (g < extra) for g in range(groups)])
    return [range(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def run_groups(work: Callable[[range, threading.Event], None], groups: Sequence[range], threads: int) -> None:
    """``work(group, stop)`` for every group, on up to ``threads`` threads at once (the caller's own when one).

    Each call runs with gradients off and one torch thread, both settings of the thread that runs it: a new
    thread's BLAS would otherwise use every CPU and round some products otherwise (a 198-wide float32 or
    float64 layer, measured), and the bits would depend on the thread. The first error stops the others
    (``stop`` is set; ``work`` checks it between steps) and is raised here, as is an interrupt.
    """
    stop = threading.Event()

    def guarded(group: range) -> None:
        torch.set_num_threads(1)
        with torch.no_grad():
            try:
                work(group, stop)
            except BaseException:
                stop.set()
                raise

    if threads <= 1 or len(groups) == 1:
        for group in groups:
            guarded(group)
        return
    pool = ThreadPoolExecutor(max_workers=min(threads, len(groups)), thread_name_prefix="vaeguard-codec")
    try:
        for future in [pool.submit(guarded, group) for group in groups]:
            future.result()
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def first_pass(model: Any, latent_dim: int, dtype: torch.dtype) -> None:
    """One pass of the coding ``model`` on the calling thread, before the groups' threads start.

    Libraries that set themselves up on first use (the BLAS choosing its kernels for this CPU) then do so once,
    not in two threads at once: without it, a fresh process that decoded a three-group container on two threads
    failed about once in 30 runs (measured in session 27).
    """
    with torch.no_grad():
        params = model.decode(torch.zeros(1, latent_dim, dtype=dtype))
        model.likelihood.symbol_probabilities(params)
        model.encode(torch.zeros((1, *model.likelihood.event_shape), dtype=dtype))


def _locked(progress: Callable[[int], None]) -> Callable[[int], None]:
    """``progress`` made safe to call from the coding threads (one call at a time)."""
    lock = threading.Lock()

    def told(done: int) -> None:
        with lock:
            progress(done)

    return told


def stream_rows(n: int, streams: int) -> list[np.ndarray]:
    """The rows each of ``streams`` lock-step streams codes at each step: step t holds stream s's t-th sample.

    Stream s owns the contiguous samples [s·m, (s + 1)·m), m = ⌈n / streams⌉; a step lists
    the rows of the streams that still have a sample, so encoder and decoder evaluate the
    networks on batches of the same shape.
    """
    m = max(1, math.ceil(n / streams))
    return [np.arange(t, n, m) for t in range(m)]


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
        """Bucket masses of N(μ, σ²) per dimension (in float64) for ``mu``, ``logvar`` of shape (..., latent_dim):
        shape (..., latent_dim, 2**bits), each sample's the same whatever the batch."""
        mu, logvar = mu.double(), logvar.double()
        cdf = torch.special.ndtr((self.edges - mu[..., None]) * torch.exp(-0.5 * logvar)[..., None])
        return _rounded(cdf[..., 1:] - cdf[..., :-1], in_place=True)

    def codes(self, buckets: np.ndarray) -> torch.Tensor:
        return self.centres[torch.from_numpy(np.asarray(buckets, dtype=np.int64))]


#: ``streams="auto"``: one stack per this many samples, or per :data:`RAW_BITS_PER_STREAM` bits of raw data where
#: that gives more (large samples), at most :data:`MAX_AUTO_STREAMS` stacks.
SAMPLES_PER_STREAM, MAX_AUTO_STREAMS = 500, 64
#: A stack costs about 350 bits (its initial words and final state): one per 2²⁰ raw bits is under 0.04 % of the
#: raw size, and gives large samples larger lock steps (10,000 8-bit 28 × 28 images: 59 stacks, 1.29 / 1.35 MB/s
#: against 1.08 / 1.14 with 20; quality log C23).
RAW_BITS_PER_STREAM = 1 << 20
#: ``groups="auto"``: the streams' groups (threads at once) for samples of at least :data:`GROUPED_ELEMENTS`
#: values, else one. The coder's own work (constriction, Python) holds the GIL and the threads take turns at it:
#: only samples with much work outside it (networks and tables of large images) gain. Measured at 10,000 images,
#: 20 stacks, two CPUs (quality log C23): 8-bit 28 × 28 1.17 against 0.89 MB/s, binarised 28 × 28 2.66 against
#: 2.49; binarised 8 × 8 0.57 against 1.18 (half the speed). More groups than two gain nothing on two CPUs.
AUTO_GROUPS, GROUPED_ELEMENTS = 2, 512
#: The coder's floating-point types by name; "auto" is float32 when encoding (see :class:`BitsBackCodec`).
PRECISIONS = {"auto": None, "float32": torch.float32, "float64": torch.float64}


@declare(reports_progress=True)
class BitsBackCodec:
    """Lossless bits-back coding (BB-ANS) of discrete data under a VAE.

    Per sample: pop the latent buckets z from the stack with q(z|x), push x with p(x|z),
    push z with the uniform prior. The expected net cost is the negative ELBO (of the
    discretised latent) in bits; the stack starts with ``initial_words`` random 32-bit
    words, the "initial bits" that the first samples borrow.

    With ``streams`` > 1 the samples are split into that many contiguous blocks, each coded
    on a stack of its own; the stacks advance in lock step, so the networks see one batch
    per step instead of one sample (faster), at the price of each stack's initial bits. The
    payload then starts with the number of 32-bit words of each stack (uint32).

    Parameters
    ----------
    latent_bits : int, default=8
        Buckets per latent dimension: 2**latent_bits. Each sample's posterior table has
        latent_dim × 2**latent_bits masses, the coder's main cost: 8 bits code 10 000 binarised
        28 × 28 images 1.9 × as fast as 12 at the same net size (0.2149 against 0.2148 bits/dim),
        and the 8 × 8 sets of ``benchmarks/compression.py`` no larger (binarised 0.4093 against
        0.4118: fewer near-empty buckets for the fast quantisation to leak mass to); 6 bits start
        to cost (+0.9 % on the 28 × 28 images). Quality log C21.
    initial_words : int or None, default=None
        Random 32-bit words that seed each stack; default: enough for one sample's latent
        code (latent_dim × latent_bits / 32, plus 2).
    streams : int or "auto", default="auto"
        Stacks coded in lock step. "auto": one per :data:`SAMPLES_PER_STREAM` samples, or per
        :data:`RAW_BITS_PER_STREAM` bits of raw data where that gives more (at most
        :data:`MAX_AUTO_STREAMS`), so that the stacks' initial bits and final words (about 350
        bits each at 32 latent dimensions) stay below 0.7 bits per sample (0.4 % of a binarised
        28 × 28 image's bits) and 0.04 % of the raw size, while a step batches ten or more
        samples per group at 10,000; :meth:`encode` fixes the number, and the container
        stores it.
    exact_tables : bool, default=False
        Quantise each probability table exactly (``constriction``'s ``perfect=True``): the net
        size then approaches the discretised-latent −ELBO itself, about 0.3 bits per 8 × 8
        binary image less than the fast approximate tables, at some 40 times the time
        (quality log C20).
    groups : int or "auto", default="auto"
        The streams are split into this many contiguous groups; each group advances in lock
        step on its own thread, so groups run at once on different CPUs (at most as many
        threads as the process may use; decoding needs no more CPUs than encoding did). The
        networks see a group's samples as one batch, so the number is part of the format:
        :meth:`encode` fixes it and the container stores it (none stored means one group, as
        in containers written before groups existed). "auto": :data:`AUTO_GROUPS` for samples
        of at least :data:`GROUPED_ELEMENTS` values (28 × 28 images), else one; at most one per
        stream.
    precision : {"auto", "float32", "float64"}, default="auto"
        The floating-point type of the networks and pixel tables on both sides (always on the
        CPU, one torch thread per group; float64 tables are rounded to a grid of 2⁻⁴⁰, float32
        ones taken as they are; the latent posterior's tables are float64 either way).
        "auto": float32 (half the arithmetic of float64, and as good for coding: the coder
        quantises each probability to 2⁻²⁴ anyway; 1.7 × as fast on 8-bit images, quality log
        C23). Part of the format like ``groups``: none stored means float64, as in containers
        written before the option existed.
    """

    lossless = True

    def __init__(
        self,
        latent_bits: int = 8,
        initial_words: int | None = None,
        streams: int | str = "auto",
        exact_tables: bool = False,
        groups: int | str = "auto",
        precision: str = "auto",
    ) -> None:
        self.buckets = LatentBuckets(latent_bits)
        if initial_words is not None and int(initial_words) < 1:
            raise ValueError(f"initial_words must be a positive integer, got {initial_words!r}")
        if streams != "auto" and (
            isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= 4096
        ):
            raise ValueError(f"streams must be 'auto' or an integer in [1, 4096], got {streams!r}")
        if not isinstance(exact_tables, bool):
            raise ValueError(f"exact_tables must be true or false, got {exact_tables!r}")
        if groups != "auto" and (isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= 4096):
            raise ValueError(f"groups must be 'auto' or an integer in [1, 4096], got {groups!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.initial_words = None if initial_words is None else int(initial_words)
        self.streams: int | str = streams
        self.exact_tables = exact_tables
        self.groups: int | str = groups
        self.precision = precision

    def stream_count(self, n: int, raw_bits: float = 0.0) -> int:
        """The stacks for ``n`` samples of ``raw_bits`` each: ``streams``, or for "auto" :data:`SAMPLES_PER_STREAM`."""
        if self.streams != "auto":
            return int(self.streams)
        return max(1, min(MAX_AUTO_STREAMS, max(n // SAMPLES_PER_STREAM, int(n * raw_bits) // RAW_BITS_PER_STREAM)))

    def group_count(self, streams: int, sample_size: int) -> int:
        """The groups of ``streams`` stacks of samples of ``sample_size`` values: ``groups`` (for "auto" see
        :data:`AUTO_GROUPS`), at most one per stack."""
        if self.groups != "auto":
            return min(streams, int(self.groups))
        return min(streams, AUTO_GROUPS if sample_size >= GROUPED_ELEMENTS else 1)

    def params(self) -> dict[str, Any]:
        params = {"latent_bits": self.buckets.bits, "initial_words": self.initial_words, "streams": self.streams}
        # fixed by encode; stored unless they are what a container without them means (from before they existed)
        if self.groups not in ("auto", 1):
            params["groups"] = self.groups
        if self.precision not in ("auto", "float64"):
            params["precision"] = self.precision
        if self.exact_tables:  # containers of the fast tables keep the parameters they always had
            params["exact_tables"] = True
        return params

    def _seed(self, latent_dim: int) -> np.ndarray:
        words = self.initial_words or math.ceil(latent_dim * self.buckets.bits / 32) + 2
        return np.random.default_rng(INITIAL_SEED).integers(1, 2**32, size=words, dtype=np.uint64).astype(np.uint32)

    @staticmethod
    def check_model(det: CodingModel) -> None:
        """Raise ``ValueError`` unless the model is of discrete data the coder can code symbol by symbol."""
        if getattr(det.network.likelihood, "n_symbols", None) is None:
            raise ValueError(
                f"codec 'bitsback' is lossless only for discrete data (binary or 8-bit images, categorical tables); "
                f"this model's likelihood {det.likelihood!r} is a density"
            )

    def encode(
        self, det: CodingModel, x: torch.Tensor, progress: Callable[[int], None] = _no_progress
    ) -> tuple[bytes, dict[str, Any]]:
        """Compress the model-space symbols ``x`` (n, *event_shape): ``(payload, info)``.

        ``info`` holds ``initial_bits`` (of every stack) and ``net_bits`` (the payload's bits
        less them and less the stack lengths). ``progress(k)`` is told of every k samples coded.
        """
        constriction = _constriction()
        self.check_model(det)
        seed = self._seed(det.latent_dim)
        likelihood = det.network.likelihood
        raw_bits = math.prod(likelihood.event_shape) * math.log2(likelihood.n_symbols)
        self.streams = self.stream_count(x.shape[0], raw_bits)  # numbers from here on: the container stores them
        self.groups = self.group_count(self.streams, math.prod(likelihood.event_shape))
        self.precision = "float32" if self.precision == "auto" else self.precision
        dtype = PRECISIONS[self.precision]
        steps = stream_rows(x.shape[0], self.streams)
        coders = [constriction.stream.stack.AnsCoder(seed) for _ in steps[0]]
        initial = sum(c.num_bits() for c in coders)
        told = _locked(progress)

        def code(group: range, stop: threading.Event) -> None:
            categorical, prior = self._models(constriction)
            for every_row in steps:
                rows, stacks = every_row[group.start : group.stop], coders[group.start : group.stop]
                if len(rows) == 0 or stop.is_set():
                    return
                xb = x[torch.from_numpy(rows)].to(dtype)
                mu, logvar = model.encode(xb)
                posteriors = self.buckets.posterior(mu, logvar)
                z = np.stack([stacks[s].decode(categorical, posteriors[s]) for s in range(len(rows))]).astype(np.int32)
                params = model.decode(self.buckets.codes(z).to(dtype))
                symbols = xb.reshape(len(rows), -1).numpy().astype(np.int32)
                for chunk in _table_chunks(model.likelihood, len(rows), dtype):
                    tables = _symbol_tables(model.likelihood, params[chunk.start : chunk.stop])
                    for s, table in zip(chunk, tables, strict=True):
                        stacks[s].encode_reverse(symbols[s], categorical, table)
                        stacks[s].encode_reverse(z[s], prior)
                told(len(rows))

        with coding_model(det, dtype) as model:
            first_pass(model, det.latent_dim, dtype)
            run_groups(code, stream_groups(self.streams, self.groups), available_cpus())
        stacks = [c.get_compressed().astype("<u4") for c in coders]
        words = sum(len(w) for w in stacks)
        head = b"" if len(stacks) == 1 else np.array([len(w) for w in stacks], dtype="<u4").tobytes()
        payload = head + b"".join(w.tobytes() for w in stacks)
        return payload, {"initial_bits": int(initial), "net_bits": int(words * 32 - initial)}

    def decode(
        self, det: CodingModel, payload: bytes, n: int, progress: Callable[[int], None] = _no_progress
    ) -> torch.Tensor:
        """The ``n`` samples' symbols, float64 (n, *event_shape); checks every stack ends at its random seed."""
        constriction = _constriction()
        self.check_model(det)
        streams = self.stream_count(n)
        steps = stream_rows(n, streams)
        coders = [constriction.stream.stack.AnsCoder(words) for words in self._stacks(payload, len(steps[0]))]
        event_shape = det.network.likelihood.event_shape
        out = torch.zeros((n, *event_shape), dtype=torch.float64)
        size = math.prod(event_shape)
        told = _locked(progress)
        # a container from before groups and precision existed stores neither: one group, float64
        groups = stream_groups(streams, 1 if self.groups == "auto" else min(streams, int(self.groups)))
        dtype = PRECISIONS[self.precision] or torch.float64

        def code(group: range, stop: threading.Event) -> None:
            categorical, prior = self._models(constriction)
            for every_row in reversed(steps):
                rows, stacks = every_row[group.start : group.stop], coders[group.start : group.stop]
                if len(rows) == 0:
                    continue
                if stop.is_set():
                    return
                z = np.stack([stacks[s].decode(prior, det.latent_dim) for s in range(len(rows))]).astype(np.int32)
                params = model.decode(self.buckets.codes(z).to(dtype))
                for chunk in _table_chunks(model.likelihood, len(rows), dtype):
                    tables = _symbol_tables(model.likelihood, params[chunk.start : chunk.stop])
                    for s, table in zip(chunk, tables, strict=True):
                        symbols = stacks[s].decode(categorical, table)
                        if len(symbols) != size:  # pragma: no cover - constriction decodes one symbol per table row
                            raise ValueError("the compressed data does not fit this model")
                        out[rows[s]] = torch.from_numpy(symbols.astype(np.float64)).reshape(event_shape)
                mu, logvar = model.encode(out[torch.from_numpy(rows)].to(dtype))
                posteriors = self.buckets.posterior(mu, logvar)
                for s in range(len(rows)):
                    stacks[s].encode_reverse(z[s], categorical, posteriors[s])
                told(len(rows))

        with coding_model(det, dtype) as model:
            first_pass(model, det.latent_dim, dtype)
            run_groups(code, groups, available_cpus())
        seed = self._seed(det.latent_dim)
        if not all(np.array_equal(c.get_compressed(), seed) for c in coders):
            raise ValueError("the compressed data is damaged: decoding did not end at the stacks' initial words")
        return out

    def _models(self, constriction: Any) -> tuple[Any, Any]:
        """The coder's entropy models, the tables' and the prior's: each group makes its own (no object of the
        coder's is shared between threads)."""
        return (
            constriction.stream.model.Categorical(perfect=self.exact_tables),
            constriction.stream.model.Uniform(self.buckets.count),
        )

    @staticmethod
    def _stacks(payload: bytes, count: int) -> list[np.ndarray]:
        """The ``count`` stacks' words of a payload (one stack: all of it; more: lengths first)."""
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        if count == 1:
            return [words]
        lengths = words[:count].astype(np.int64)
        if len(words) != count + lengths.sum():
            raise ValueError("the compressed data is damaged: its stack lengths do not add up")
        return np.split(words[count:], np.cumsum(lengths)[:-1])


@declare(reports_progress=True)
class LatentCodec:
    """Lossy coding through the latent code: quantised codes, entropy coded; decoded by the decoder's mean.

    The codes are chosen by rate–distortion optimisation, for the squared error in the
    data's units (pixel levels, the columns' own units) against the bits they cost:

    1. *Steps per dimension.* Each latent dimension d gets its own step
       Δ_d = ``step`` · √(ḡ / g_d), where g_d is the mean over the samples of
       ‖∂f(z)/∂z_d‖² at their posterior means (f: the decoder's mean, in data units) and ḡ
       the mean of the g_d. A step along any dimension then moves the reconstruction by
       about the same distance, ``step`` · √ḡ — as quantising principal components with one
       step does — and dimensions the decoder ignores get steps so coarse that they cost
       nothing.
    2. *Refinement.* Starting at the posterior means, Adam minimises
       D(z) + λ·R(z) for each sample: D the summed squared error of f(z), R the bits of z
       under a Gaussian fitted to the posterior means, and λ = (ln 2 / 6) · ``step``² · ḡ,
       the squared error one more bit saves on a dimension at this step (a uniform
       quantiser's high-rate slope, 2 ln 2 · Δ²/12 per bit).
    3. *Quantisation.* Codes are round(z_d / Δ_d); then two passes move each code one step
       up or down where that lowers D + λ·R with R under the codes' own model.
    4. *Entropy coding.* The integer codes of each dimension are coded under a quantised
       Gaussian with the codes' mean and standard deviation; the payload carries them and
       the step as float16 for each dimension with a non-zero code (6 bytes), and one bit
       for each all-zero dimension (:func:`encode_integer_codes`): at coarse steps, where
       most dimensions are all zero, side information costs next to nothing.

    Decoding returns the decoder's mean at z = code · Δ, in the data's units (pixel levels
    and lattice columns rounded). A smaller ``step`` spends more bits for less distortion.
    When every code is zero (the coarsest steps: the payload says nothing about any sample)
    every sample decodes to the model's mean E_p(z)[f(z)] instead, the reconstruction with the
    least expected squared error under the model when z is unknown; f(0), one image the decoder
    draws, is further from the data (quality log C17). It is averaged over
    :data:`MARGINAL_DRAWS` scrambled Sobol points of the N(0, I) prior, the same on every
    machine.

    Parameters
    ----------
    step : float, default=0.5
        Quantisation step, in latent units for a dimension of average sensitivity (the prior
        is N(0, 1)); the rate parameter of the codec.
    refine_steps : int, default=200
        Adam steps of the refinement (0: start from the posterior means as they are).
    """

    lossless = False
    #: Samples refined and quantised together (bounds memory on large inputs).
    block = 2048

    def __init__(self, step: float = 0.5, refine_steps: int = 200) -> None:
        if not (isinstance(step, (int, float)) and 0 < step < 10):
            raise ValueError(f"step must be a number in (0, 10), got {step!r}")
        if int(refine_steps) < 0:
            raise ValueError(f"refine_steps must not be negative, got {refine_steps!r}")
        self.step = float(step)
        self.refine_steps = int(refine_steps)

    def params(self) -> dict[str, Any]:
        return {"step": self.step, "refine_steps": self.refine_steps}

    @staticmethod
    def _weights(det: CodingModel, size: int) -> torch.Tensor:
        """Squared error weight per element: model units → the data's units (standardised columns)."""
        if det.element_scale is None:
            return torch.ones(size, dtype=torch.float64)
        return torch.from_numpy(np.asarray(det.element_scale, dtype=np.float64)) ** 2

    def _objective(self, model: Any, x: torch.Tensor, w: torch.Tensor, lam: float) -> Any:
        """D(z) + λ·R(z) per sample, with R from a Gaussian (center, spread) of the code in z units."""

        def cost(z: torch.Tensor, center: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
            error = (model.likelihood.mean(model.decode(z)).reshape(len(z), -1) - x).square().mul(w).sum(-1)
            bits = ((z - center) / spread).square().sum(-1) / (2 * math.log(2))
            return error + lam * bits

        return cost

    def _sensitivity(self, model: Any, mu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """g_d: mean over the samples of ‖∂f/∂z_d‖² (weighted squared error per latent unit²) at ``mu``, (k,)."""
        mean, k, eps = model.likelihood.mean, mu.shape[1], 1e-4
        sensitivity = torch.zeros(k, dtype=torch.float64)
        for i in range(0, len(mu), self.block):
            m = mu[i : i + self.block]
            base = mean(model.decode(m)).reshape(len(m), -1)
            for d in range(k):
                moved = m.clone()
                moved[:, d] += eps
                change = (mean(model.decode(moved)).reshape(len(m), -1) - base) / eps
                sensitivity[d] += change.square().mul(w).sum()
        return sensitivity / len(mu)

    def _refined(self, cost: Any, mu: torch.Tensor, center: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """Codes of one block fitted to D + λR by Adam, starting at the posterior means ``mu``."""
        z = mu.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=0.05)
        with torch.enable_grad():
            for _ in range(self.refine_steps):
                optimizer.zero_grad()
                cost(z, center, spread).mean().backward()
                optimizer.step()
        return z.detach()

    @staticmethod
    def _rd_rounded(cost: Any, block: torch.Tensor, steps: torch.Tensor, center: torch.Tensor, spread: torch.Tensor):
        """Two passes of ±1 moves of each integer code where they lower D + λR; ``block`` is changed in place."""
        best = cost(block * steps, center, spread)
        for _ in range(2):
            for d in range(block.shape[1]):
                for delta in (-1.0, 1.0):
                    moved = block.clone()
                    moved[:, d] += delta
                    value = cost(moved * steps, center, spread)
                    better = value < best
                    block[better], best = moved[better], torch.where(better, value, best)

    def _codes(
        self, model: Any, x: torch.Tensor, w: torch.Tensor, progress: Callable[[int], None] = _no_progress
    ) -> tuple[np.ndarray, np.ndarray]:
        """(integer codes (n, k), steps Δ (k,)) for the samples ``x`` (model units, float64)."""
        mu = torch.cat([model.encode(x[i : i + self.block])[0] for i in range(0, len(x), self.block)])
        flat = x.reshape(len(x), -1)
        sensitivity = self._sensitivity(model, mu, w)
        average = float(sensitivity.mean())
        if not average > 0:  # a decoder that ignores its code: every sample decodes to the same mean
            return np.zeros(mu.shape, dtype=np.int32), np.full(mu.shape[1], self.step)
        steps = self.step * torch.sqrt(average / sensitivity.clamp_min(1e-12 * average))
        steps = steps.clamp_max(FLOAT16_MAX).half().double()  # as the payload stores them (float16)
        lam = math.log(2) / 6 * self.step**2 * average
        spread = mu.std(0).clamp_min(1e-3) if len(mu) > 1 else torch.ones_like(mu[0])  # one sample: no spread
        center = mu.mean(0)
        for p in model.parameters():
            p.requires_grad_(False)
        blocks = range(0, len(mu), self.block)
        costs = [self._objective(model, flat[i : i + self.block], w, lam) for i in blocks]
        refined = []
        for c, i in zip(costs, blocks, strict=True):  # the refinement is most of the time
            refined.append(self._refined(c, mu[i : i + self.block], center, spread))
            progress(len(refined[-1]))
        q = torch.round(torch.cat(refined) / steps)
        # rate-distortion optimised rounding, under the codes' own quantised-Gaussian model
        q_center, q_spread = q.mean(0) * steps, q.std(0, correction=0).clamp_min(MIN_CODE_SPREAD) * steps
        for c, i in zip(costs, blocks, strict=True):
            self._rd_rounded(c, q[i : i + self.block], steps, q_center, q_spread)
        return q.numpy().astype(np.int32), steps.numpy()

    def encode(
        self, det: CodingModel, x: torch.Tensor, progress: Callable[[int], None] = _no_progress
    ) -> tuple[bytes, dict[str, Any]]:
        with coding_model(det) as model:
            codes, steps = self._codes(model, x.double(), self._weights(det, math.prod(x.shape[1:])), progress)
        return encode_integer_codes(codes, steps[None]), {}

    def decode(
        self, det: CodingModel, payload: bytes, n: int, progress: Callable[[int], None] = _no_progress
    ) -> torch.Tensor:
        codes, (steps,) = decode_integer_codes(payload, n, det.latent_dim, side_rows=1)
        with coding_model(det) as model:
            if not codes.any():  # nothing was sent about any sample
                mean = self._marginal_mean(model, det.latent_dim)
                out = mean.expand(n, *mean.shape).clone()
            else:
                out = model.likelihood.mean(model.decode(torch.from_numpy(codes.astype(np.float64) * steps)))
        progress(n)  # one decoder pass for all samples
        return out

    def _marginal_mean(self, model: Any, latent_dim: int) -> torch.Tensor:
        """E_p(z)[f(z)] under the N(0, I) prior (f: the decoder's mean), one sample's shape, float64."""
        sobol = torch.quasirandom.SobolEngine(latent_dim, scramble=True, seed=MARGINAL_SEED)
        uniform = sobol.draw(MARGINAL_DRAWS, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        draws = torch.special.ndtri(uniform).split(self.block)
        return sum(model.likelihood.mean(model.decode(z)).sum(0) for z in draws) / MARGINAL_DRAWS


def encode_integer_codes(codes: np.ndarray, column_side: np.ndarray | None = None) -> bytes:
    """Integer codes (n, k) entropy coded under a quantised Gaussian per column; the model travels with them.

    Only columns with a non-zero code are coded; an all-zero column costs one bit. Layout,
    little-endian: a bit mask of the coded columns (⌈k/8⌉ bytes, column d in bit d % 8 of
    byte d // 8); if any column is coded, the codes' range (two int32), then for each coded
    column its codes' mean and standard deviation (the latter at least
    :data:`MIN_CODE_SPREAD`) and its rows of ``column_side`` as float16, then the ANS words
    (uint32). Both sides code with the float16 values, so the side information is
    2·(2 + m) bytes per coded column for ``column_side`` of shape (m, k). Shared by the
    ``latent`` codec (its steps ride in ``column_side``) and the PCA baseline of its benchmark.
    """
    constriction = _constriction()
    k = codes.shape[1]
    side = np.zeros((0, k)) if column_side is None else np.asarray(column_side, dtype=np.float64).reshape(-1, k)
    coded = (codes != 0).any(axis=0)
    head = np.packbits(coded, bitorder="little").tobytes()
    if not coded.any():
        return head
    codes = codes[:, coded]
    moments = np.stack([codes.mean(axis=0), np.maximum(codes.std(axis=0), MIN_CODE_SPREAD)])
    moments = np.concatenate([moments, side[:, coded]]).astype("<f2")
    center, spread = moments[:2].astype(np.float64)
    low, high = int(codes.min()), int(codes.max())
    high = max(high, low + 1)  # constriction's quantised models need two symbols at least
    coder = constriction.stream.stack.AnsCoder()
    model = constriction.stream.model.QuantizedGaussian(low, high)
    coder.encode_reverse(
        codes.reshape(-1).astype(np.int32), model, np.tile(center, len(codes)), np.tile(spread, len(codes))
    )
    head += np.array([low, high], dtype="<i4").tobytes() + moments.tobytes()
    return head + coder.get_compressed().astype("<u4").tobytes()


def decode_integer_codes(payload: bytes, n: int, k: int, side_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, k) int32, column side information (side_rows, k), 0 for uncoded columns) of
    :func:`encode_integer_codes`."""
    constriction = _constriction()
    mask_bytes = -(-k // 8)
    coded = np.unpackbits(np.frombuffer(payload[:mask_bytes], dtype=np.uint8), count=k, bitorder="little") == 1
    codes, side = np.zeros((n, k), dtype=np.int32), np.zeros((side_rows, k))
    m = int(coded.sum())
    if m == 0:
        return codes, side
    low, high = (int(v) for v in np.frombuffer(payload[mask_bytes : mask_bytes + 8], dtype="<i4"))
    start = mask_bytes + 8
    moments = np.frombuffer(payload[start : start + 2 * m * (2 + side_rows)], dtype="<f2").astype(np.float64)
    moments = moments.reshape(2 + side_rows, m)
    side[:, coded] = moments[2:]
    words = np.frombuffer(payload[start + 2 * m * (2 + side_rows) :], dtype="<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    model = constriction.stream.model.QuantizedGaussian(low, high)
    codes[:, coded] = coder.decode(model, np.tile(moments[0], n), np.tile(moments[1], n)).reshape(n, m)
    return codes, side


@hookimpl
def vaeguard_register_codecs(register):
    register("bitsback", BitsBackCodec)
    register("latent", LatentCodec)
