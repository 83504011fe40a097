"""scikit-learn style detection on tables and images: :class:`VAEAnomalyDetector` (read by :func:`vaeguard.load`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import logsumexp
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, OutlierMixin, TransformerMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from vaeguard import storage
from vaeguard.conditions import ConditionEncoder
from vaeguard.ddp import current_group
from vaeguard.detector import decision, labels, on_own_threads, previous_fit_kept_on_failure
from vaeguard.generation import AGGREGATE_ROWS, AggregatePosterior, LatentSpaceMixin
from vaeguard.inputs import InputSpace, ModelInputs
from vaeguard.metrics import ACTIVE_UNIT_VARIANCE
from vaeguard.model import VAE
from vaeguard.objectives import kl_per_dimension
from vaeguard.parts import CodingModel, Likelihood, declares
from vaeguard.plugins import build_part, get_part
from vaeguard.preprocessing import ColumnCoder, PixelLevels, Standardizer, scale_free_moments
from vaeguard.presets import PresetMixin
from vaeguard.scoring import (
    PROBE_GAIN,
    REFINE_SAMPLES,
    SEARCH_GRID,
    Probe,
    common_random_numbers,
    cpu_scoring_copy,
    evidence_lower_bound,
    importance_sampled_log_likelihood,
    posterior_means,
    probe_rows,
    probe_threshold,
    search_floor,
)
from vaeguard.training import (
    KL_SCHEDULES,
    TRAINING_PRECISIONS,
    TrainingConfig,
    TrainingHistory,
    native_bfloat16,
    train,
    train_models,
)

#: Optimisation steps the automatic epoch count aims at (early stopping usually ends sooner).
AUTO_STEPS = 3000
#: Training rows scored to set ``offset_`` at most; larger training sets use a random subsample
#: of :func:`offset_rows` rows. Scoring every row of a 30 000-row table cost more than its training.
OFFSET_ROWS = 10_000
#: ... and at least this many (or all of them).
MIN_OFFSET_ROWS = 2_000
#: The subsample's percentile flags ``contamination`` of the whole set to within this relative standard error.
OFFSET_RELATIVE_ERROR = 0.07
#: Training rows whose per-column conditionals give ``feature_baseline_`` (their median).
FEATURE_BASELINE_ROWS = 500
#: Of those, the rows whose exact per-column conditionals correct the one-pass estimate's offset.
EXACT_BASELINE_ROWS = 64
#: ... and at most this many row × column conditionals (16 rows of a 64-column table), at least 8 rows.
EXACT_BASELINE_CELLS = 1024
#: Rows (row × left-out column) that one scoring call of the exact per-column conditionals takes.
CONDITIONAL_BATCH_ROWS = 4096
#: Tables with at most this many columns get exact per-column conditionals in :meth:`VAEAnomalyDetector.
#: feature_scores` (one importance-sampling pass per column); wider tables and images the one-pass estimate.
EXACT_CONDITIONAL_COLUMNS = 64
#: Training rows whose probe gains set each model's probe threshold (a random subsample beyond).
PROBE_CALIBRATION_ROWS = 2000
#: ``n_models="auto"``: tables of at most this many rows get :data:`SMALL_TABLE_MODELS` models.
SMALL_TABLE_ROWS = 2000
SMALL_TABLE_MODELS = 3
#: ``n_models="auto"``: tables of at least this many modelled columns get one model, however few their rows.
WIDE_TABLE_COLUMNS = 512


#: ``trim_fraction="auto"``: the share of each minibatch left out of the loss, for tables and for images.
TABLE_TRIM_FRACTION = 0.3
IMAGE_TRIM_FRACTION = 0.1
#: ``learning_rate="auto"``: Adam's step size for tables (and series) and for images.
TABLE_LEARNING_RATE = 1e-3
IMAGE_LEARNING_RATE = 3e-3
#: ``batch_size="auto"``: the smallest automatic minibatch for tables and for images.
TABLE_MIN_BATCH = 32
IMAGE_MIN_BATCH = 128


#: ``encoder="auto"``: images of at least this many values (C·H·W) get convolutional networks, smaller ones the MLP.
CONV_MIN_IMAGE_VALUES = 256


def auto_encoder(images: bool, values: int) -> str:
    """The network family of ``encoder="auto"``: "conv" for images of at least 16 × 16 values, else "mlp".

    On the one-class digits (quality log I12) the MLP beats the convolutions on 8 × 8 images
    (0.9923 against 0.9903 over seeds 0–2, every seed, at half the time: a 3 × 3 kernel's view
    of 64 pixels is most of the image), and loses at 16 × 16 (0.9907 against 0.9923) and at
    32 × 32 (digits 2, 8, 9: −0.004 to −0.028).
    """
    return "conv" if images and values >= CONV_MIN_IMAGE_VALUES else "mlp"


#: ``training_precision="auto"``: an MLP trains in bfloat16 (where the CPU has it) when one of its linear layers
#: holds at least this many weights (a table of 512 columns or more: the decoder's last layer of 256 × 2d).
BFLOAT16_LAYER_WEIGHTS = 1 << 18


def bfloat16_pays(encoder: str, model: VAE) -> bool:
    """Whether bfloat16 arithmetic sets a model's training time: the conv family, and MLPs with a layer of at
    least :data:`BFLOAT16_LAYER_WEIGHTS` weights.

    Measured on this project's benchmarks (quality log I15, Q71): a 32 × 32 digit model's fit
    0.65–0.69 ×; a wide 0/1 table's training (three 256-wide models, one after another in
    bfloat16 instead of side by side in float32) 0.5–0.76 × at 700 to 2000 columns, none at 500
    (14.6 s against 14.7 s) nor at 200, and 1.8 × the time at 100 columns, where a step is
    per-operation overhead and the models no longer train side by side.
    """
    if encoder == "conv":
        return True
    weights = (m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return max(weights, default=0) >= BFLOAT16_LAYER_WEIGHTS


def default_latent_dim(n_inputs: int) -> int:
    """Latent size from the input width: about d/4, clipped to [2, 32]."""
    return int(min(32, max(2, math.ceil(n_inputs / 4))))


def auto_trim_fraction(images: bool) -> float:
    """``trim_fraction="auto"``: 0.3 for tables, 0.1 for images.

    Tables were decided on half A of the shared ADBench sets and confirmed on half B and on
    fresh seeds: with early stopping on the trimmed objective, 0.2 beat 0.1 on both halves
    (quality log Q22), and 0.3 beats 0.2 on both (Q61). Images keep the 0.1 they were
    measured with (quality log I1–I8).
    """
    return IMAGE_TRIM_FRACTION if images else TABLE_TRIM_FRACTION


def auto_n_models(n_rows: int, images: bool, columns: int = 0) -> int:
    """Models in the mixture for ``n_models="auto"``: 3 for tables of at most 2000 rows and fewer than 512
    modelled ``columns``, else 1.

    A small table gives a single VAE a high variance (its AUROC moves by up to ±0.1 with
    the seed); an equal mixture of three averages it out, at three times a fit that is
    cheap at that size (quality log Q5, Q8). A wide table (one-hot or bag-of-words columns)
    is where the three cost most, 2.8 × the fit and score of one, and there the mixture
    showed no gain beyond seed noise: one model against three on eight shared sets one-hot
    encoded to 505–1152 columns, seeds 0–5, paired +0.002 ± 0.005 on half A and −0.005 ± 0.003
    on half B, and 0.913 against 0.915 on a synthetic 2000-column table (quality log Q74).
    """
    if images or n_rows > SMALL_TABLE_ROWS or columns >= WIDE_TABLE_COLUMNS:
        return 1
    return SMALL_TABLE_MODELS


def _probe_rows(probes: list[Probe] | None, rows: torch.Tensor) -> list[Probe] | None:
    """Each model's probe of the rows ``rows`` (None for None)."""
    return None if probes is None else [p.rows(rows) for p in probes]


def offset_rows(contamination: float) -> int:
    """Training rows whose ``100·contamination`` percentile sets ``offset_`` (a random subsample of larger sets).

    The fraction of the whole set beyond the percentile of m random rows has the standard
    error √(c(1 − c)/m); m = (1 − c)/(c·e²) makes it e = :data:`OFFSET_RELATIVE_ERROR` of c, within
    [:data:`MIN_OFFSET_ROWS`, :data:`OFFSET_ROWS`]: 2 000 rows for c = 0.1 (10 % ± 0.67 %), 3 878 for
    c = 0.05, 10 000 for c = 0.01 (1 % ± 0.1 %). The threshold's scoring pass then costs a
    fraction of the fit on large tables (mammography, 7 828 rows: 4.5 s of an 8 s fit with all rows).
    """
    wanted = math.ceil((1.0 - contamination) / (contamination * OFFSET_RELATIVE_ERROR**2))
    return int(min(OFFSET_ROWS, max(MIN_OFFSET_ROWS, wanted)))


def log_mean_exp(values: np.ndarray) -> np.ndarray:
    """log((1/M) Σ_m exp(values_m)) over the first axis (M), computed stably."""
    return logsumexp(values, axis=0) - math.log(values.shape[0])


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; anything else as torch reads it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device torch knows ('cpu', 'cuda', 'cuda:1', 'auto')") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'")
    return resolved


def auto_batch_size(n: int, images: bool = False) -> int:
    """n/32 rounded to a power of two, within [32, 512] for tables and [128, 512] for images."""
    smallest = IMAGE_MIN_BATCH if images else TABLE_MIN_BATCH
    return int(2 ** round(math.log2(min(512, max(smallest, n / 32)))))


def auto_learning_rate(images: bool) -> float:
    """Adam's step size for ``learning_rate="auto"``: 1e-3 for tables, 3e-3 for images.

    Images take wider minibatches (at least 128) at a 3× step: on the one-class digits the
    same AUROC or better (8 × 8, seeds 0–2: 0.9897 → 0.9903; 32 × 32: 0.9859 → 0.9935) at
    0.67× the time on 8 × 8, where each small convolution step is mostly per-operation
    overhead (quality log I9–I11). Wider batches at 1e-3 lose AUROC (fewer steps); tables
    gained nothing from the same change (quality log Q29).
    """
    return IMAGE_LEARNING_RATE if images else TABLE_LEARNING_RATE


def auto_epochs(n: int, batch_size: int) -> int:
    """Epochs for about :data:`AUTO_STEPS` steps, within [10, 300]."""
    steps_per_epoch = math.ceil(n / batch_size)
    return int(min(300, max(10, math.ceil(AUTO_STEPS / steps_per_epoch))))


def _input_space_part(name: str, doc: str, *, absent: bool = False) -> property:
    """A read-only fitted attribute that is part ``name`` of ``input_space_`` (``absent``: missing when None)."""

    def read(self: Any) -> Any:
        space = self.__dict__.get("input_space_")
        value = None if space is None else getattr(space, name)
        if space is None or (absent and value is None):
            raise AttributeError(f"{type(self).__name__} has no {name} (not fitted, or not fitted on such data)")
        return value

    return property(read, doc=doc)


class VAEAnomalyDetector(
    LatentSpaceMixin, PresetMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, OutlierMixin, BaseEstimator
):
    """Anomaly detection by the importance-sampled log-likelihood of a variational autoencoder.

    The model p(x) = ∫ p(x|z) p(z) dz is trained by maximising the ELBO; each sample is
    scored by an importance-sampled estimate of log p(x) in nats, in the units of the
    data as given (internal standardisation adds its log-Jacobian). Higher is more normal.

    Parameters
    ----------
    latent_dim : int or "auto", default="auto"
        Size of z; "auto" is about n_features/4 within [2, 32], counting the columns
        the networks read (not those that held one value in every training row).
    hidden_dims : list of int or "auto", default="auto"
        Encoder hidden widths (the decoder mirrors them); "auto" is two layers of
        2·n_features within [32, 256], counted likewise.
    encoder : str, default="auto"
        Network family, by registered name (``vaeguard plugins`` lists them); "auto" is
        "conv" for images of at least 16 × 16 values (C·H·W ≥ 256) and "mlp" for smaller
        images and for tables.
    encoder_params : dict, optional
        Further options of the family (e.g. ``{"channels": 3}`` for "temporal").
    likelihood : str, default="auto"
        Observation model by registered name: "diag_gaussian" (mean and σ per feature
        per row from the decoder), "gaussian" (σ per feature, shared by all rows),
        "bernoulli" (0/1 data, two-level images), "categorical" (integers 0..K−1),
        "discretized_logistic" (pixel levels), or a plugin's (e.g. "studentt"). σ is
        bounded below (e⁻⁶ of a column's standard deviation), so no density is unbounded.
        "auto": for tables "diag_gaussian" (a DataFrame with categorical, string or
        boolean columns gets "mixed": numeric columns as with "diag_gaussian", the others
        as categoricals over the levels seen in training); for images "bernoulli" when
        the pixels take two values, "discretized_logistic" when they lie on a lattice of
        levels (uint8: all 256), else "diag_gaussian".
    epochs : int or "auto", default="auto"
        Maximum epochs; "auto" aims at about 3000 optimisation steps (10 to 300 epochs).
        Early stopping on a validation split usually ends sooner.
    batch_size : int or "auto", default="auto"
        Minibatch size; "auto" is n/32 rounded to a power of two within [32, 512] for tables
        and time series, within [128, 512] for images. In a fit across processes (torchrun)
        it is the global batch, shared among the ranks.
    learning_rate : float or "auto", default="auto"
        Adam's step size; "auto" is 1e-3 for tables and time series, 3e-3 for images
        (whose automatic minibatches are wider).
    n_importance_samples : int, default=64
        K, the importance samples per row in :meth:`score_samples`.
    n_models : int or "auto", default="auto"
        M, the VAEs fitted (each with its own seed) and averaged in probability: the
        model is the equal mixture p(x) = (1/M) Σ_m p_m(x), so scores stay log-likelihoods.
        "auto": 3 for tables of at most 2000 rows (where one small model's scores vary
        most with the seed and a fit is cheap) and fewer than 512 modelled columns, else 1
        (and 1 for images). The likelihood
        methods (:meth:`score_samples`, :meth:`log_likelihood`, :meth:`elbo`,
        :meth:`bits_per_dim`, thresholds) use the mixture; :meth:`transform`,
        :meth:`sample`, :meth:`reconstruct`, :meth:`feature_scores` and the compression
        codecs use the first model (``model_``), whose latent space is the one reported.
    contamination : float in (0, 0.5], default=0.1
        Expected fraction of outliers in the training data. ``offset_`` is the
        ``100·contamination`` percentile of the training scores, so :meth:`predict`
        flags that fraction of the training rows as outliers (on larger tables, the
        percentile of a random subsample: 2,000 rows for ``contamination=0.1``, within
        ±0.67 % of the fraction; up to 10,000 rows for small fractions, to keep the error
        within 7 % of the fraction; see :func:`offset_rows`). Ignored when ``offset``
        is given; :meth:`set_threshold` replaces the rule after fitting.
    offset : float or None, default=None
        An explicit threshold on :meth:`score_samples`, in nats (log p(x) below it is an
        outlier), instead of the ``contamination`` quantile.
    discrete_columns : {"auto", "none"} or list of str or int, default="auto"
        Which numeric columns are lattices (counts, ratings, flags, quantised values),
        scored by the probability mass of their cell rather than a density (for the
        likelihoods that support it: "gaussian", "diag_gaussian", "mixed"). "auto": a
        column is a lattice when all but 1 % of its training values are origin + k·step,
        with the step at least 1/1000 of the column's interquartile range
        (:func:`vaeguard.preprocessing.find_lattice`); a column with exactly two values
        is binary (a flag, a one-hot or bag-of-words indicator): P(the upper value) =
        Φ((μ − m)/σ) with m their midpoint; name it in a list to make it an ordinary
        lattice (a count that took two values in training). A list names exactly the lattice
        columns (names for a DataFrame, positions otherwise); "none": every column
        continuous. :attr:`column_types_` says how each column was treated and why.
        A value off its column's lattice, below 0 in a column whose training values
        are ≥ 0 and include 0, or a third value in a binary column, is impossible
        under the model: it is scored as the
        nearest lattice point, 100 nats less likely (an impossible value ranks like a
        14 σ outlier), with a warning naming the column. Scores are then densities of
        the continuous columns × masses of the lattice ones.
    handle_unknown : {"error", "ignore"}, default="error"
        A category not seen in training, at score time: "error" raises a ``ValueError``
        naming the column, row and value; "ignore" treats it as missing (the row is
        scored on its other columns).
    trim_fraction : float in [0, 0.5) or "auto", default="auto"
        Robust training on contaminated data: after the KL warm-up, the rows of each
        minibatch with the lowest ELBO (this fraction of them) are left out of the loss,
        so a few anomalies in the training data pull the model less towards them. Early
        stopping watches the same trimmed mean on the validation rows. This trades exact
        maximum likelihood for robustness; 0 trains on every row. "auto": 0.3 for tables
        (quality log Q22, Q61), 0.1 for images (the time-series detector passes 0.1 to its
        window model).
    validation_fraction : float in [0, 1), default=0.1
        Share of the training rows held out for early stopping (none when fewer than
        20 rows would be held out).
    regularizer : str or None, default=None
        A registered regularizer added to the training loss (``vaeguard plugins`` lists
        them): "beta" (β-VAE, β·KL), "tc" (β-TCVAE: mutual information, total
        correlation and dimension-wise KL weighted α, β, γ) or "factor" (FactorVAE:
        γ·total correlation from a discriminator). None trains on the plain ELBO.
        Regularised models trade likelihood (and so detection scores) for a more
        factorised code; scores are still importance-sampled log p(x). With β < 1 (more
        information in the code, e.g. for lossy compression) set ``trim_fraction=0``: a
        compression model must code every row, also those trimming leaves out of the fit.
    regularizer_params : dict, optional
        The regularizer's settings, e.g. ``{"beta": 4}``, ``{"beta": 6, "estimator":
        "mss"}``, ``{"gamma": 10}``.
    kl_schedule : {"linear", "cyclical", "constant"}, default="linear"
        Weight of the KL term over training: "linear" ramps it from 0 to 1 over the
        first 10 % of steps; "cyclical" repeats such a ramp (over half of each cycle) in
        4 cycles, which counters posterior collapse (Fu et al. 2019); "constant" keeps 1.
    free_bits : float ≥ 0, default=0.0
        A floor, in nats per latent dimension, on the minibatch-mean KL: a dimension below
        it is not pushed further towards the prior (Kingma et al. 2016), which keeps
        dimensions from collapsing. 0 disables it.
    objective : {"elbo", "iwae"}, default="elbo"
        The training objective: the ELBO, or the importance-weighted bound with
        ``iwae_samples`` draws per row (Burda et al. 2016), tighter on log p(x) and with
        posteriors that may be broader than the ELBO's; ``iwae_samples`` times the
        decoder work per step. "iwae" takes no regularizer or free bits.
    iwae_samples : int ≥ 1, default=5
        K of the "iwae" objective (ignored for "elbo").
    training_precision : {"auto", "float32", "bfloat16"}, default="auto"
        What the encoder and decoder compute in during training steps. "bfloat16" runs
        their matrix products and convolutions under ``torch.autocast`` (outputs cast back
        before the likelihood; parameters, optimiser, loss terms, validation and every
        score stay in float32). "auto": "bfloat16" for convolutional models (images from
        16 × 16) and for MLPs with a layer of at least 2¹⁸ weights (tables of 512 columns
        or more) on a CPU that computes bfloat16 in hardware (AMX or AVX512-BF16,
        e.g. Intel Sapphire Rapids): a 32 × 32 digit model fits in 0.68 × the time at the
        same AUROC (quality log I15), a 2000-column table's models train in 0.5–0.6 × (Q71).
        "float32" everywhere else: smaller tables' networks gain nothing (a step is
        per-operation overhead), emulated bfloat16 is slower than float32, and on CUDA
        (whose cuDNN convolutions already use TF32) bfloat16 is not measured yet. Kept as
        ``training_precision_``.
    conditional : bool, default=False
        Fit a conditional VAE, p(x|c) = ∫ p(x|z, c) p(z) dz with q(z|x, c): ``fit(X, y)``
        takes the conditions c as ``y`` (one value per row, or several columns: strings,
        booleans and integers are categories, one-hot coded; floats are numbers,
        standardised), and every method that reads or makes samples then takes them as
        ``condition=`` (:meth:`score_samples` scores log p(x|c); :meth:`sample` draws from
        p(x|c)). False: ``y`` is ignored, as scikit-learn's detectors do.
    device : str, default="auto"
        "auto" (CUDA when present), "cpu", "cuda", "cuda:N". In a fit across processes,
        "auto" and "cuda" mean each rank's GPU (its local rank).
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation, shuffling, the validation split and the importance
        samples: the same seed gives the same scores on the same device.
    verbose : bool or int, default=False
        Show training progress on stderr.
    n_jobs : int or None, default=None
        Torch threads for this estimator's work (fit, scoring, sampling, ...), set for each
        call and restored after it. None: one thread. On an idle 2-CPU machine a second
        thread saves 0–28 % (the demo's fit nothing, scoring a quarter); on a busy one it
        makes the same work 1.5–4 times slower than one thread
        (``benchmarks/results/threads.md``). −1: every available CPU, for an idle machine
        and large scoring jobs. scikit-learn's name and meaning (−2: all CPUs but one).

    Attributes
    ----------
    model_ : VAE
        The trained torch module (the first of ``models_``).
    models_ : list of VAE
        Every model of the mixture (``n_models`` of them); ``models_[0]`` is ``model_``.
    offset_ : float
        Threshold on :meth:`score_samples` (nats); ``decision_function = score_samples - offset_``.
    threshold_rule_ : dict
        How ``offset_`` was set: ``{"rule": "contamination", ...}``, ``{"rule": "offset", ...}``
        or ``{"rule": "fpr", "fpr": ..., "n_normal_rows": ...}`` (:meth:`set_threshold`).
    latent_dim_ : int
        The latent size used.
    history_ : TrainingHistory
        Per-epoch training and validation loss: the objective trained (−ELBO unless a
        regularizer, free bits or ``objective="iwae"`` is set), nats, standardised units.
    latent_variance_ : ndarray of shape (latent_dim_,)
        Variance over the training rows of each dimension's posterior mean (None for model
        files written before it existed).
    active_units_ : int
        Latent dimensions in use: those with ``latent_variance_ > 0.01`` (Burda et al.
        2016); the others have collapsed to the prior.
    kl_per_dimension_ : ndarray of shape (latent_dim_,)
        Mean KL(q(z_d|x) ‖ N(0, 1)) over the training rows, nats per dimension.
    aggregate_posterior_ : AggregatePosterior or None
        A Gaussian mixture fitted to the training rows' posterior means, for
        ``sample(source="aggregate")``; fitted on first use (a fit that only detects never
        needs it: 3 s of a 20 000-row table's fit), and before a model file is written.
    probe_thresholds_ : list of float or None
        Per model of the mixture: the rise of a row's ELBO (nats) in the scoring probe
        above which the row gets a proposal fitted to it — the median rise over (up to
        2000) training rows plus one nat (:func:`vaeguard.scoring.probe_threshold`). None
        for convolutional models, which are not probed.
    search_floors_ : list of float or None
        Per model of the mixture, for latent spaces of one or two dimensions: the ELBO at
        the encoder's q (nats) below which a row's posterior is searched for on a grid —
        the 10th percentile over (up to 2000) training rows
        (:func:`vaeguard.scoring.search_floor`). None per model for larger latent spaces,
        and None for convolutional models and for model files written before it.
    feature_baseline_ : ndarray of shape (n_features,) or None
        Per column (per pixel for images): the median over (up to 500) training rows of the
        column's log-likelihood given the rest of the row, log p(x_j | x_−j) in nats, data
        units, by the one-pass estimate (:func:`vaeguard.scoring.per_feature_log_likelihood`);
        :meth:`feature_scores` reports each value against it. None for model files written
        before it existed.
    fingerprint_ : str or None
        SHA-256 of the model file this estimator was saved to or loaded from.
    condition_encoder_ : ConditionEncoder or None
        For ``conditional=True``: how the conditions become the vector c (their columns,
        categories, scales); None otherwise.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Present when fitted on a DataFrame with string column names.

    column_types_ : DataFrame or None
        For a table: one row per column (index: the column names) with its ``kind``
        ("continuous", "lattice", "categorical" or "constant"), lattice ``step``,
        ``origin``, ``lower`` and ``upper`` bound (NaN where none; a two-valued column
        has both: it is binary) and the ``reason`` in words. A "constant" column stays
        out of the networks: after m training rows of one value, another value costs
        log(m + 1) nats more (Laplace's rule of succession).
        None for images.
    image_shape_ : tuple of int or None
        For a model of images, the shape of one image as given, ``(H, W)`` or ``(C, H, W)``.
    pixel_levels_ : PixelLevels or None
        For images on a lattice of levels: the map between pixel values and levels.

    Notes
    -----
    Input is a table (array-like or DataFrame of shape (n_samples, n_features)) or images
    (an array of shape (n_samples, H, W) or (n_samples, C, H, W)). Per-row results of a
    DataFrame come back as a ``pandas.Series`` with the DataFrame's index.

    With a discrete likelihood (pixel levels, categories, bits) the scores are log
    probabilities, so −score/ln 2 is the sample's code length in bits (:meth:`bits_per_dim`).

    Examples
    --------
    >>> import numpy as np
    >>> from vaeguard import VAEAnomalyDetector
    >>> X = np.random.default_rng(0).normal(size=(300, 4))
    >>> det = VAEAnomalyDetector(epochs=5, random_state=0).fit(X)
    >>> det.score_samples(X[:3]).shape
    (3,)
    """

    _parameter_constraints: dict = {  # noqa: RUF012 (scikit-learn convention)
        "latent_dim": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "hidden_dims": [StrOptions({"auto"}), list, tuple],
        "encoder": [str],
        "encoder_params": [dict, None],
        "likelihood": [str],
        "epochs": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither")],
        "n_importance_samples": [Interval(Integral, 1, None, closed="left")],
        "n_models": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "contamination": [Interval(Real, 0, 0.5, closed="right")],
        "offset": [Real, None],
        "discrete_columns": [StrOptions({"auto", "none"}), list, tuple],
        "handle_unknown": [StrOptions({"error", "ignore"})],
        "trim_fraction": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "regularizer": [str, None],
        "regularizer_params": [dict, None],
        "kl_schedule": [StrOptions(set(KL_SCHEDULES))],
        "free_bits": [Interval(Real, 0, None, closed="left")],
        "objective": [StrOptions({"elbo", "iwae"})],
        "iwae_samples": [Interval(Integral, 1, None, closed="left")],
        "training_precision": [StrOptions({"auto", *TRAINING_PRECISIONS})],
        "conditional": ["boolean"],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "n_jobs": [Integral, None],
    }

    def __init__(
        self,
        *,
        latent_dim: int | str = "auto",
        hidden_dims: list[int] | tuple[int, ...] | str = "auto",
        encoder: str = "auto",
        encoder_params: dict | None = None,
        likelihood: str = "auto",
        epochs: int | str = "auto",
        batch_size: int | str = "auto",
        learning_rate: float | str = "auto",
        n_importance_samples: int = 64,
        n_models: int | str = "auto",
        contamination: float = 0.1,
        offset: float | None = None,
        discrete_columns: str | list[str | int] = "auto",
        handle_unknown: str = "error",
        trim_fraction: float | str = "auto",
        validation_fraction: float = 0.1,
        regularizer: str | None = None,
        regularizer_params: dict | None = None,
        kl_schedule: str = "linear",
        free_bits: float = 0.0,
        objective: str = "elbo",
        iwae_samples: int = 5,
        training_precision: str = "auto",
        conditional: bool = False,
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        verbose: bool | int = False,
        n_jobs: int | None = None,
    ) -> None:
        self.latent_dim = latent_dim
        self.hidden_dims = hidden_dims
        self.encoder = encoder
        self.encoder_params = encoder_params
        self.likelihood = likelihood
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.n_importance_samples = n_importance_samples
        self.n_models = n_models
        self.contamination = contamination
        self.offset = offset
        self.discrete_columns = discrete_columns
        self.handle_unknown = handle_unknown
        self.trim_fraction = trim_fraction
        self.validation_fraction = validation_fraction
        self.regularizer = regularizer
        self.regularizer_params = regularizer_params
        self.kl_schedule = kl_schedule
        self.free_bits = free_bits
        self.objective = objective
        self.iwae_samples = iwae_samples
        self.training_precision = training_precision
        self.conditional = conditional
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.n_jobs = n_jobs

    # -- input ---------------------------------------------------------------------------
    # -- the fitted input space's parts, under the names scikit-learn and earlier versions give them --------
    n_features_in_ = _input_space_part("n_features", "Number of features (columns, or pixels × channels) seen in fit.")
    feature_names_in_ = _input_space_part(
        "feature_names", "Names of the columns seen in fit (a DataFrame with string column names only).", absent=True
    )
    image_shape_ = _input_space_part("image_shape", "Shape of one training image, (H, W) or (C, H, W); else None.")
    image_dtype_ = _input_space_part("image_dtype", "The training images' dtype (samples come back in it); else None.")
    column_coder_ = _input_space_part("column_coder", "Codes a DataFrame's categorical columns; None without them.")
    standardizer_ = _input_space_part(
        "standardizer", "Centre, scale and lattices of a continuous model's columns; None for discrete likelihoods."
    )
    pixel_levels_ = _input_space_part("pixel_levels", "The pixel levels of discrete images; None otherwise.")
    condition_encoder_ = _input_space_part("condition_encoder", "Codes a conditional model's conditions; else None.")

    def _scoring_model(self, model: VAE | None = None) -> VAE:
        """A model (default ``model_``) as scoring uses it: a float64 copy on the CPU, float32 on an accelerator.

        On the CPU, float64 makes a row's score independent of the other rows in its
        batch to ~1e-12 nats (float32 matrix kernels round differently by batch shape), with
        convolutions in float32 blocks of fixed size and the tables' likelihood terms in float32
        (:func:`~vaeguard.scoring.cpu_scoring_copy`);
        on CUDA, float32 keeps the throughput and the scores agree to ~1e-5 nats.
        """
        model = self.model_ if model is None else model
        if torch.device(self.device_).type != "cpu":
            return model
        # one float64 copy per model, made on first use and kept while the model's parameters
        # are the same tensors, unchanged in place (their version counters): not a copy per call
        state = tuple((id(p), p._version) for p in model.parameters())
        cache = self.__dict__.setdefault("_scoring_copies", {})
        kept = cache.get(id(model))
        if kept is None or kept[0] is not model or kept[1] != state:
            kept = cache[id(model)] = (model, state, cpu_scoring_copy(model))
        return kept[2]

    @property
    def aggregate_posterior_(self) -> AggregatePosterior | None:
        """The aggregate posterior (the class's Attributes), fitted to the training rows' codes on first use."""
        codes = self.__dict__.pop("_aggregate_codes", None)
        if codes is not None:
            posterior = AggregatePosterior.fit(codes, self.score_seed_) if len(codes) > 1 else None
            self.__dict__["_aggregate_posterior"] = posterior
        if "_aggregate_posterior" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__} has no aggregate_posterior_ before it is fitted")
        return self.__dict__["_aggregate_posterior"]

    @aggregate_posterior_.setter
    def aggregate_posterior_(self, value: AggregatePosterior | None) -> None:
        self.__dict__.pop("_aggregate_codes", None)
        self.__dict__["_aggregate_posterior"] = value

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the float64 scoring copies (remade on first use)."""
        state = super().__getstate__()
        state.pop("_scoring_copies", None)
        return state

    def _mixture_members(self) -> list[VAE]:
        """The models of the mixture (files written before ``models_`` existed hold one)."""
        return getattr(self, "models_", None) or [self.model_]

    # -- fitting -------------------------------------------------------------------------
    def _lattice_request(self, space: InputSpace) -> bool | np.ndarray:
        """``discrete_columns`` as ``Standardizer.fit`` takes it: True/False, or a mask of the named columns."""
        if isinstance(self.discrete_columns, str):
            return self.discrete_columns == "auto"
        d = space.n_features
        names = [] if space.feature_names is None else space.columns
        mask = np.zeros(d, bool)
        for item in self.discrete_columns:
            if isinstance(item, (Integral, np.integer)) and not isinstance(item, bool) and 0 <= item < d:
                mask[int(item)] = True
            elif isinstance(item, str) and item in names:
                mask[names.index(item)] = True
            else:
                known = f"the columns are {', '.join(map(repr, names))}" if names else f"positions 0 .. {d - 1}"
                raise ValueError(f"discrete_columns names {item!r}, which is not a column of X; {known}")
        return mask

    def _table_likelihood(self, X: np.ndarray, space: InputSpace) -> tuple[str, Likelihood, Standardizer | None]:
        """The likelihood for a table (its registered name and the object) and the standardizer, if any."""
        d = X.shape[1]
        name = "diag_gaussian" if self.likelihood == "auto" else self.likelihood
        lik_cls = get_part("likelihoods", name)
        coder = space.column_coder
        names = [space.column_name(j) for j in range(d)]
        categorical = coder is not None and coder.categorical.any()
        if categorical and name not in ("diag_gaussian", "mixed"):
            raise ValueError(
                f"categorical columns need likelihood 'auto' (the default), 'diag_gaussian' or 'mixed', "
                f"not {self.likelihood!r}"
            )
        if lik_cls.discrete and not categorical:
            return name, lik_cls((d,), **lik_cls.options_from_data(X)), None
        lattices = self._lattice_request(space) if categorical or lik_cls.supports_bin_widths else False
        standardizer = Standardizer.fit(
            X, detect_lattice=lattices, categorical=coder.categorical if categorical else None, names=names
        )
        # the columns constant in training are left out of the model (InputSpace.modelled)
        modelled = InputSpace.modelled_columns(standardizer)
        keep = np.arange(d) if modelled is None else modelled
        options: dict[str, Any] = (
            {"n_categories": [coder.n_categories[j] for j in keep]}
            if categorical
            else lik_cls.options_from_data(X[:, keep])
        )
        if standardizer.discrete.any():
            options["bin_widths"] = standardizer.bin_widths[keep].tolist()
            for bound, values in (("floor", standardizer.lattice_floor), ("ceiling", standardizer.lattice_ceiling)):
                if values is not None:
                    options[f"lattice_{bound}"] = [None if np.isnan(v) else float(v) for v in values[keep]]
        width = (len(keep),)
        if categorical:
            return "mixed", get_part("likelihoods", "mixed")(width, **options), standardizer
        return name, lik_cls(width, **options), standardizer

    def _image_likelihood(
        self, X: np.ndarray, space: InputSpace
    ) -> tuple[str, Likelihood, Standardizer | None, PixelLevels | None]:
        """The likelihood for images ``X`` (n, C, H, W), with the standardizer or the pixel levels it reads."""
        event_shape = X.shape[1:]
        pixels = PixelLevels.fit(X, space.image_dtype)
        name = self.likelihood
        if name == "auto":
            name = "diag_gaussian" if pixels is None else "discretized_logistic"
            if pixels is not None and pixels.n_levels == 2:
                name = "bernoulli"
        lik_cls = get_part("likelihoods", name)
        if lik_cls.discrete:
            if pixels is None:
                raise ValueError(
                    f"likelihood {name!r} needs pixel values on a lattice of levels (e.g. uint8 images); "
                    "these are continuous: use likelihood='diag_gaussian'"
                )
            if name == "bernoulli" and pixels.n_levels != 2:
                raise ValueError(
                    f"likelihood 'bernoulli' is for two-level images; these have {pixels.n_levels} levels: "
                    "use 'discretized_logistic'"
                )
            # options for the whole range of levels (uint8: all 256), not only the levels seen
            options = lik_cls.options_from_data(np.array([[0.0, pixels.n_levels - 1.0]]))
            return name, lik_cls(event_shape, **options), None, pixels
        # continuous models: one scale for all pixels, so the network sees the image as it is
        d = math.prod(event_shape)
        observed = X[~np.isnan(X)]
        mean, spread = (
            (float(m[0]) for m in scale_free_moments(observed.reshape(-1, 1))) if observed.size else (0.0, 1.0)
        )
        center, scale = np.full(d, mean), np.full(d, spread if spread > 0 else 1.0)
        options = lik_cls.options_from_data(X.reshape(len(X), -1))
        if pixels is not None and lik_cls.supports_bin_widths and self.discrete_columns != "none":
            standardizer = Standardizer(center, scale, np.full(d, pixels.origin), np.full(d, pixels.step))
            options["bin_widths"] = standardizer.bin_widths.tolist()
        else:
            standardizer = Standardizer(center, scale)
        return name, lik_cls(event_shape, **options), standardizer, None

    def _training_precision(self, encoder: str, device: torch.device, model: VAE) -> str:
        """``training_precision`` resolved: "auto" is bfloat16 where it pays (:func:`bfloat16_pays`) on hardware
        that has it."""
        if self.training_precision != "auto":  # a known value: fit validated the parameters
            return self.training_precision
        measured = device.type == "cpu"  # where bfloat16 training was measured (quality log I15, Q71)
        return "bfloat16" if bfloat16_pays(encoder, model) and measured and native_bfloat16(device) else "float32"

    def _build_model(
        self,
        encoder: str,
        likelihood: Likelihood,
        latent_dim: int,
        hidden_dims: list[int] | None,
        mask_input: bool = False,
        condition_dim: int = 0,
        networks_on: str | None = None,
    ) -> VAE:
        """The VAE of ``encoder``'s family around ``likelihood``; ``networks_on="meta"`` builds the networks
        without memory (shapes only: what a model file's arrays must match before anything is allocated)."""
        family = get_part("encoders", encoder)
        options = {**(self.encoder_params or {}), "output_shape": likelihood.event_shape}
        if hidden_dims is not None:
            options["hidden_dims"] = list(hidden_dims)
        if condition_dim:
            if not declares(family, "takes_conditions"):
                raise ValueError(
                    f"encoder {encoder!r} cannot build a conditional VAE (its family does not declare "
                    "takes_conditions: vaeguard.parts.declare); the built-in 'mlp' and 'conv' can"
                )
            options["condition_dim"] = int(condition_dim)
        input_shape = likelihood.encoder_input_shape
        if mask_input:  # the mask is appended to the flattened input
            input_shape = (math.prod(input_shape) + math.prod(likelihood.event_shape),)
        try:
            with torch.device(networks_on) if networks_on else contextlib.nullcontext():
                enc, dec = family(input_shape, latent_dim, likelihood.param_count, **options)
        except TypeError as exc:
            raise ValueError(f"encoder {encoder!r} does not accept these options: {exc}") from exc
        return VAE(enc, dec, likelihood, latent_dim, mask_input=mask_input, condition_dim=condition_dim)

    def _model_inputs(self, X: Any, condition: Any = None) -> ModelInputs:
        """User input ``X`` (or :class:`ModelInputs` already made by :meth:`to_model_space` or a job's row check)
        in model space; a warning names values the model gives no probability."""
        check_is_fitted(self)
        if isinstance(X, ModelInputs):
            if condition is not None:
                raise ValueError("ModelInputs carry their conditions: pass condition=None with them")
            inputs = X
        else:
            inputs = self.input_space_.encode(X, condition)
        message = self.input_space_.impossible_message(inputs)
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=4)
        return inputs

    def to_model_space(self, X: Any, condition: Any = None) -> ModelInputs:
        """``X`` (and a conditional model's ``condition``) as the networks see it, checked against the fit.

        The rows are validated as :meth:`score_samples` validates them (errors name the row
        and column); values off a column's lattice or outside its support are marked in
        ``impossible`` (no warning here: what they mean is the caller's to say). The
        scoring methods take the result in place of ``X``.
        """
        check_is_fitted(self)
        return self.input_space_.encode(X, condition)

    @on_own_threads
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> VAEAnomalyDetector:
        """Train the VAE on the rows of ``X`` (n_samples, n_features).

        A fit that fails (bad input, a diverging loss, an interrupt) leaves the estimator as
        it was: a fitted model stays fitted and usable.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
            Numeric training data; may contain some anomalies.
        y : array-like, Series or DataFrame of shape (n_samples,) or (n_samples, n_conditions)
            With ``conditional=True``, each row's conditions (see the parameter); ignored
            otherwise.

        Returns
        -------
        self
        """
        with previous_fit_kept_on_failure(self):
            return self._fit(X, y)

    def _fit(self, X: Any, y: Any) -> VAEAnomalyDetector:
        self.__dict__.pop("_scoring_copies", None)  # the copies of the models this fit replaces
        if self.offset is not None and not np.isfinite(self.offset):
            raise ValueError(f"offset must be a finite number of nats, got {self.offset!r}")
        if self.conditional and y is None:
            raise ValueError("conditional=True needs the conditions: fit(X, y) with one condition per row")
        observed, X = InputSpace.observe(X, owner=type(self).__name__, handle_unknown=self.handle_unknown)
        n, d = X.shape[0], observed.n_features
        conditions = ConditionEncoder.fit(y, n) if self.conditional else None
        if self.hidden_dims != "auto" and (
            not self.hidden_dims or not all(isinstance(h, Integral) and h > 0 for h in self.hidden_dims)
        ):
            raise ValueError(
                f"hidden_dims must be 'auto' or a non-empty list of positive integers, got {self.hidden_dims!r}"
            )
        images = observed.images
        if images:
            likelihood_name, likelihood, standardizer, pixels = self._image_likelihood(X, observed)
        else:
            likelihood_name, likelihood, standardizer = self._table_likelihood(X, observed)
            pixels = None
        space = observed.with_model(
            standardizer=standardizer,
            pixel_levels=pixels,
            support=likelihood,
            condition_encoder=conditions,
            training_values=X,
        )
        d = math.prod(likelihood.event_shape)  # the values the networks read (a table's varying columns)
        encoder = self.encoder if self.encoder != "auto" else auto_encoder(images, d)
        inputs = space.to_model(X, y if conditions is not None else None)
        x, mask, c = inputs.x, inputs.mask, inputs.condition
        mask_input = mask is not None
        rng = check_random_state(self.random_state)
        fit_seed, score_seed = (int(s) for s in rng.randint(0, 2**31 - 1, size=2))
        n_models = self.n_models if self.n_models != "auto" else auto_n_models(n, images, d)
        member_seeds = [fit_seed, *(int(s) for s in rng.randint(0, 2**31 - 1, size=n_models - 1))]
        latent_dim = self.latent_dim if self.latent_dim != "auto" else default_latent_dim(d)
        hidden = None if self.hidden_dims == "auto" else list(self.hidden_dims)
        batch_size = self.batch_size if self.batch_size != "auto" else auto_batch_size(n, images)
        epochs = self.epochs if self.epochs != "auto" else auto_epochs(n, batch_size)
        device = resolve_device(self.device)
        group = current_group(device)  # inside a torchrun job: train across its processes
        if group is not None:
            device = group.device(device)
        condition_dim = 0 if c is None else conditions.width

        def build_one(seed: int) -> VAE:
            """One model of the mixture, initialised from ``seed``."""
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # the CPU generator only: init runs there
                return self._build_model(
                    encoder, copy.deepcopy(likelihood), latent_dim, hidden, mask_input, condition_dim
                )

        models = [build_one(seed) for seed in member_seeds]
        config = TrainingConfig(
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=self.learning_rate if self.learning_rate != "auto" else auto_learning_rate(images),
            validation_fraction=self.validation_fraction,
            patience=max(10, epochs // 10),
            trim_fraction=self.trim_fraction if self.trim_fraction != "auto" else auto_trim_fraction(images),
            kl_schedule=self.kl_schedule,
            free_bits=float(self.free_bits),
            objective=self.objective,
            iwae_samples=int(self.iwae_samples),
            precision=self._training_precision(encoder, device, models[0]),
        )
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in member_seeds]
        # each model its own regularizer: FactorVAE's discriminator is trained with its model
        regularizers = [build_regularizer(self.regularizer, self.regularizer_params) for _ in models]
        if self.regularizer is None:  # the models train side by side (one vectorised step for all)
            histories = train_models(
                models,
                x,
                config,
                generators=generators,
                device=device,
                verbose=bool(self.verbose),
                mask=mask,
                condition=c,
                group=group,
            )
        else:
            histories = [
                train(
                    member,
                    x,
                    dataclasses.replace(config, regularizer=regularizer),
                    generator=generator,
                    device=device,
                    verbose=bool(self.verbose),
                    mask=mask,
                    condition=c,
                    group=group,
                )
                for member, generator, regularizer in zip(models, generators, regularizers, strict=True)
            ]
        fitted = list(zip(models, histories, generators, strict=True))
        model, history, generator = fitted[0]  # the first model's generator draws the offset's subsample below
        # Fitted state is set only once training has succeeded.
        self.input_space_ = space
        self.column_types_ = space.column_types(likelihood_name)
        self.model_ = model
        self.models_ = models
        self.model_spec_ = {
            "encoder": encoder,
            "likelihood": likelihood_name,
            "likelihood_options": likelihood.config(),
            "latent_dim": int(latent_dim),
            "hidden_dims": hidden,
            "n_features": int(d),
            "event_shape": list(likelihood.event_shape),
            "mask_input": mask_input,
            "condition_dim": 0 if conditions is None else conditions.width,
        }
        self.latent_dim_ = int(latent_dim)
        self.training_precision_ = config.precision
        self.score_seed_ = score_seed
        self.device_ = str(device)
        self.history_ = history
        self.latent_variance_, self.kl_per_dimension_, means = latent_usage(model, x, mask, score_seed, c)
        self.active_units_ = int((self.latent_variance_ > ACTIVE_UNIT_VARIANCE).sum())
        self._aggregate_codes = means  # the aggregate posterior is fitted to them on first use
        self.fingerprint_ = None
        self.probe_thresholds_, self.search_floors_, probes = self._probe_calibration(x, mask, c, generator)
        scored_rows = offset_rows(self.contamination)
        if n > scored_rows:  # the percentile of a large random subsample is as good and far cheaper
            inputs = inputs.rows(torch.randperm(n, generator=generator)[:scored_rows])
            probes = None  # the calibration's probes are of every row, or of another subsample
        # every rank computes the same baseline (a few hundred rows; no collective needed)
        baseline_pick = torch.randperm(len(inputs), generator=generator)[:FEATURE_BASELINE_ROWS]
        if self.offset is not None:  # no threshold to set: only the baseline rows are scored
            picked = inputs.rows(baseline_pick)
            picked_probes = _probe_rows(probes, baseline_pick)
            self.feature_baseline_ = self._feature_baseline(
                picked, self._baseline_feature_scores(picked, picked_probes), picked_probes
            )
            self.threshold_rule_ = {"rule": "offset", "offset": float(self.offset)}
            self.offset_ = float(self.offset)
            return self
        if group is None:  # the baseline rows' conditionals come from the pass that scores them for the threshold
            train_scores, baseline_scores = self._training_scores(inputs, space, baseline_pick, probes)
        else:  # each rank scores its share of the rows; every rank then holds all the scores
            share = group.share(len(inputs))
            mine_rows = torch.arange(len(inputs))[share]
            mine, _ = self._training_scores(inputs.rows(mine_rows), space, None, _probe_rows(probes, mine_rows))
            train_scores = group.gather_scores(mine, len(inputs))
            picked_probes = _probe_rows(probes, baseline_pick)
            baseline_scores = self._baseline_feature_scores(inputs.rows(baseline_pick), picked_probes)
        broken = ~np.isfinite(train_scores)
        if broken.any():
            self.__dict__.pop("offset_", None)  # no model with a threshold that flags nothing (or everything)
            raise ValueError(
                f"after training, {int(broken.sum())} training row(s) have a non-finite log-likelihood "
                f"(first: row {int(np.flatnonzero(broken)[0])} of those scored); the values are beyond float64 "
                "arithmetic once standardised: rescale the extreme column(s) or drop those rows"
            )
        self.feature_baseline_ = self._feature_baseline(
            inputs.rows(baseline_pick), baseline_scores, _probe_rows(probes, baseline_pick)
        )
        self.threshold_rule_ = {"rule": "contamination", "contamination": float(self.contamination)}
        self.offset_ = float(np.percentile(train_scores, 100.0 * self.contamination))
        return self

    def _training_scores(
        self,
        inputs: ModelInputs,
        space: InputSpace,
        baseline_pick: torch.Tensor | None = None,
        probes: list[Probe] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """log p(x) in the data's units (nats) of the training rows that set the threshold, (rows,), and for the
        rows ``baseline_pick`` their per-element conditionals (:meth:`_baseline_feature_scores`) from the same
        scoring pass (a row's score does not depend on the rows scored with it). ``probes``: each model's probe
        of these rows from the calibration (:meth:`_probe_calibration`), not repeated here."""
        if baseline_pick is None:
            value = self._log_likelihood_internal(
                inputs.x, inputs.mask, self.n_importance_samples, condition=inputs.condition, probes=probes
            ).value
            return value + space.row_nats(inputs), None
        others = torch.ones(len(inputs), dtype=torch.bool)
        others[baseline_pick] = False
        rest = torch.arange(len(inputs))[others]
        picked = inputs.rows(baseline_pick)
        picked_values, shares = self._scores_with_conditionals(picked, _probe_rows(probes, baseline_pick))
        value = np.empty(len(inputs))
        value[baseline_pick.numpy()] = picked_values + space.row_nats(picked)
        if len(rest):
            value[rest.numpy()] = self._training_scores(inputs.rows(rest), space, None, _probe_rows(probes, rest))[0]
        return value, shares

    @on_own_threads
    def set_threshold(self, X_normal: Any, fpr: float = 0.01, condition: Any = None) -> VAEAnomalyDetector:
        """Set the threshold so that a fraction ``fpr`` of rows known to be normal is flagged.

        ``offset_`` becomes the ``100·fpr`` percentile of ``score_samples(X_normal)``: on
        data like ``X_normal``, :meth:`predict` then flags about ``fpr`` of the rows (the
        false-positive rate), whatever the contamination of the training data.

        Parameters
        ----------
        X_normal : array-like of shape (n_samples, n_features)
            Rows the user declares normal (e.g. a clean validation set).
        fpr : float in (0, 1), default=0.01
            Target false-positive rate.
        condition : optional
            The rows' conditions, for a conditional model.

        Returns
        -------
        self
        """
        check_is_fitted(self)
        if not isinstance(fpr, Real) or not 0 < fpr < 1:
            raise ValueError(f"fpr must be a number in (0, 1), got {fpr!r}")
        scores = np.asarray(self.score_samples(X_normal, condition=condition))
        if len(scores) * fpr < 1:
            warnings.warn(
                f"{len(scores)} normal rows cannot resolve fpr={fpr}: the threshold is their lowest score",
                UserWarning,
                stacklevel=2,
            )
        self.offset_ = float(np.percentile(scores, 100.0 * fpr))
        self.threshold_rule_ = {"rule": "fpr", "fpr": float(fpr), "n_normal_rows": len(scores)}
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "offset_")  # set last in fit, after training succeeded

    @property
    def _n_features_out(self) -> int:
        return int(self.latent_dim_)

    # -- scoring -------------------------------------------------------------------------
    def _refine_eps(self) -> torch.Tensor | None:
        """The draws that fit a proposal to the rows the encoder serves badly (independent of the K draws).

        MLP models only (tables, windows and images below 16 × 16): convolutional models (larger
        images, "temporal" windows) keep the encoder's proposal, as a probe through their
        decoder costs more than the K draws themselves.
        """
        if self.model_spec_["encoder"] != "mlp":
            return None
        return common_random_numbers(REFINE_SAMPLES, self.latent_dim_, (self.score_seed_ + 1) % 2**31)

    def _probe_calibration(
        self, x: torch.Tensor, mask: torch.Tensor | None, c: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[list[float] | None, list[float | None] | None, list[Probe] | None]:
        """Each model's probe threshold and search floor from the probe of (a subsample of) the training rows,
        and each model's probe of every training row where no subsample was drawn (else None)."""
        refine_eps = self._refine_eps()
        if refine_eps is None:
            return None, None, None
        every_row = x.shape[0] <= PROBE_CALIBRATION_ROWS
        if not every_row:
            keep = torch.randperm(x.shape[0], generator=generator)[:PROBE_CALIBRATION_ROWS]
            x, mask, c = x[keep], (None if mask is None else mask[keep]), (None if c is None else c[keep])
        thresholds, floors, probes = [], [], []
        for m in self._mixture_members():
            model = self._scoring_model(m)
            probe = probe_rows(model, x, refine_eps, mask=mask, device=self.device_, condition=c)
            thresholds.append(probe_threshold(probe.gain.double().numpy()))
            at_encoder = probe.at_encoder.double().numpy()
            floors.append(search_floor(at_encoder) if model.latent_dim in SEARCH_GRID else None)
            probes.append(probe)
        return thresholds, floors, probes if every_row else None

    def _search_floor_of(self, member: int) -> float | None:
        """The search floor of the ``member``-th model (None: no search, e.g. files without one)."""
        floors = getattr(self, "search_floors_", None)
        return None if floors is None else floors[member]

    def _probe_threshold_of(self, member: int) -> float:
        """The probe threshold of the ``member``-th model (:data:`PROBE_GAIN` for files without one)."""
        thresholds = getattr(self, "probe_thresholds_", None)
        return PROBE_GAIN if thresholds is None else float(thresholds[member])

    def _log_likelihood_internal(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        n_samples: int,
        return_std: bool = False,
        condition: torch.Tensor | None = None,
        per_feature: bool = False,
        first_only: bool = False,
        probes: list[Probe] | None = None,
    ):
        """The mixture's estimate (``first_only``: its first model's); with ``per_feature``, the first model's
        per-element shares from the same pass; ``probes``: each model's probe of these rows, computed before."""
        eps = common_random_numbers(n_samples, self.latent_dim_, self.score_seed_)
        refine_eps = self._refine_eps()
        members = [
            importance_sampled_log_likelihood(
                self._scoring_model(m),
                x,
                eps,
                mask=mask,
                return_std=return_std,
                device=self.device_,
                condition=condition,
                refine_eps=refine_eps,
                probe_threshold=self._probe_threshold_of(i),
                per_feature=per_feature and i == 0,
                search_floor=self._search_floor_of(i),
                probes=None if probes is None else probes[i],
            )
            for i, m in enumerate(self._mixture_members()[:1] if first_only else self._mixture_members())
        ]
        result = members[0] if len(members) == 1 else mixture_estimate(members)
        if not np.all(np.isfinite(result.value)):
            row = int(np.flatnonzero(~np.isfinite(result.value))[0])
            raise ValueError(
                f"row {row} got a non-finite log-likelihood ({result.value[row]}): its values are too extreme "
                "for this model to score"
            )
        return result

    @on_own_threads
    def log_likelihood(
        self,
        X: Any,
        n_samples: int | None = None,
        return_std: bool = False,
        condition: Any = None,
        return_diagnostic: bool = False,
        return_feature_scores: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Importance-sampled estimate of log p(x) per row, in nats, in the data's units.

        For an MLP model the proposal is the encoder's q(z|x) widened 1.5 times; a row whose
        ELBO rises in a short probe of gradient steps by more than a nat beyond the
        training rows' median rise (``probe_thresholds_``: the encoder placed q away from
        its posterior, typical of far-out rows) gets a proposal fitted to it, mixed with
        the encoder's (:func:`vaeguard.scoring.importance_sampled_log_likelihood`).
        Convolutional models (images, temporal windows) use the encoder's q(z|x) as it is.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        n_samples : int, optional
            K, the number of importance samples (default ``n_importance_samples``).
            The estimate is a stochastic lower bound that tightens as K grows.
        return_std : bool, default=False
            Also return each estimate's standard error (nats), from the K weights.
        condition : optional
            For a conditional model, the rows' conditions (one per row, or one for all):
            the estimate is then of log p(x|c).

        Returns
        -------
        log_px : ndarray of shape (n_samples,)
            (a Series with the index of ``X`` when ``X`` is a DataFrame, as for every per-row result)
        std : ndarray of shape (n_samples,), only when ``return_std``
        pareto_k : ndarray of shape (n_samples,), only when ``return_diagnostic``
            The Pareto k̂ of each row's importance weights (PSIS; Vehtari et al.): above
            0.7 the estimate and its standard error are not to be trusted (more samples,
            ``n_samples``, help; so does a model that fits the row).
        feature_scores : DataFrame, only when ``return_feature_scores``
            :meth:`feature_scores` of the same rows (checked once; the same draws; for tables one
            more scoring pass per column, for log p(x_−j)).
        """
        value, std, _, k_hat, shares = self._log_likelihood_of(
            X, n_samples, return_std or return_diagnostic, condition, per_feature=return_feature_scores
        )
        out = [_per_row(value, X, "log_likelihood")]
        if return_std:
            out.append(_per_row(std, X, "log_likelihood_std"))
        if return_diagnostic:
            out.append(_per_row(k_hat, X, "pareto_k"))
        if return_feature_scores:
            out.append(shares)
        return out[0] if len(out) == 1 else tuple(out)

    def _log_likelihood_of(
        self, X: Any, n_samples: int | None, return_std: bool = False, condition: Any = None, per_feature: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None, Any]:
        """(log p(x) in data units, standard errors, observed elements per row, Pareto k̂, feature scores) for ``X``.

        The standard errors and k̂ are None unless ``return_std``; the feature scores (as
        :meth:`feature_scores` gives them) None unless ``per_feature``.
        """
        check_is_fitted(self)
        k = self.n_importance_samples if n_samples is None else int(n_samples)
        if k < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        inputs = self._model_inputs(X, condition)
        x, mask = inputs.x, inputs.mask
        exact = per_feature and self._exact_conditionals_apply(x)
        result = self._log_likelihood_internal(
            x, mask, k, return_std, condition=inputs.condition, per_feature=per_feature and not exact
        )
        observed = (~np.isnan(inputs.values.reshape(len(inputs), -1))).sum(1)  # the columns left out included
        value = result.value + self.input_space_.row_nats(inputs)
        shares = None
        if per_feature:
            conditionals = self._exact_conditionals(inputs, result.value, k) if exact else result.per_feature
            shares = self._feature_scores_of(conditionals, inputs, X)
        return value, result.std, observed, result.pareto_k, shares

    @on_own_threads
    def score_samples(self, X: Any, condition: Any = None) -> np.ndarray:
        """Estimated log p(x) per row (nats, data units, K = ``n_importance_samples``); higher = more normal.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        condition : optional
            For a conditional model, the rows' conditions: the score is log p(x|c).

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        return self.log_likelihood(X, condition=condition)

    @on_own_threads
    def score(self, X: Any, y: Any = None, condition: Any = None) -> float:
        """The mean log-likelihood of the rows of ``X``, nats per row (as ``GaussianMixture.score``).

        Higher is a better model of ``X``, so ``GridSearchCV`` without ``scoring=`` picks the
        settings with the best held-out likelihood. ``y`` is ignored.
        """
        return float(np.mean(np.asarray(self.score_samples(X, condition=condition))))

    @on_own_threads
    def decision_function(self, X: Any, condition: Any = None) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for outliers, shape (n_samples,)."""
        check_is_fitted(self)
        return _per_row(decision(np.asarray(self.score_samples(X, condition=condition)), self.offset_), X, "decision")

    @on_own_threads
    def predict(self, X: Any, condition: Any = None) -> np.ndarray:
        """+1 for inliers, −1 for outliers (``decision_function < 0``), shape (n_samples,)."""
        return _per_row(labels(self.decision_function(X, condition=condition)), X, "label")

    @on_own_threads
    def bits_per_dim(self, X: Any, n_samples: int | None = None, condition: Any = None) -> np.ndarray:
        """−log₂ p(x) per observed element (bits/dim), shape (n_samples,).

        For a discrete model (pixel levels, bits, categories) this is the code length an
        entropy coder driven by the model would approach; for densities it is the
        differential analogue (it depends on the data's units).
        """
        log_px, _, observed, _, _ = self._log_likelihood_of(X, n_samples, condition=condition)
        return _per_row(-log_px / (observed * math.log(2)), X, "bits_per_dim")

    @on_own_threads
    def elbo(self, X: Any, n_samples: int | None = None, condition: Any = None) -> np.ndarray:
        """The evidence lower bound per row (nats, data units): E_q[log p(x|z)] − KL(q ‖ p).

        The expectation is averaged over ``n_samples`` draws (default ``n_importance_samples``),
        the same draws :meth:`log_likelihood` uses; the KL is exact. For a mixture of M
        models it is log((1/M) Σ_m exp(ELBO_m)), a lower bound on the mixture's log p(x)
        because each ELBO_m bounds log p_m(x).
        """
        k = self.n_importance_samples if n_samples is None else int(n_samples)
        inputs = self._model_inputs(X, condition)
        eps = common_random_numbers(k, self.latent_dim_, self.score_seed_)
        bounds = [
            evidence_lower_bound(
                self._scoring_model(m), inputs.x, eps, mask=inputs.mask, device=self.device_, condition=inputs.condition
            )
            for m in self._mixture_members()
        ]
        value = log_mean_exp(np.stack(bounds))
        return _per_row(value + self.input_space_.row_nats(inputs), X, "elbo")

    @on_own_threads
    def feature_scores(self, X: Any, condition: Any = None) -> pd.DataFrame:
        """Which columns make each row unlikely, each measured against what is usual for that column.

        Entry (i, j) is log p(x_ij | x_i,−j) − b_j in nats: the log-likelihood of the row's
        value in column j given its other columns, less ``feature_baseline_[j]``, its median
        over (up to 500) training rows (see :meth:`_feature_baseline`). 0 is a value as likely as a
        typical training row's in that column; −20 is e²⁰ times less likely than that.
        Measured so, a column's units, spread or kind (lattice, categorical, continuous) do
        not decide which column is named: only how unusual its value is for that column,
        given the rest of the row — an extreme value, or an ordinary value that does not fit
        the row's other values. The most negative entries of a row are the columns that make
        it anomalous. For a table of at most 64 columns, log p(x_j | x_−j) = log p(x) −
        log p(x_−j) with each term importance-sampled as :meth:`score_samples` does, x_j
        treated as missing for the second (one more scoring pass over the rows without each
        column in turn; an impossible
        value's 100 nats charged to its column). Images and wider tables get the one-pass
        estimate of :func:`vaeguard.scoring.per_feature_log_likelihood` (first model of a
        mixture), cheaper and less exact where one value alone makes a row far-out. Missing
        entries are NaN.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
        condition : optional
            For a conditional model, the rows' conditions.

        Returns
        -------
        DataFrame of shape (n_samples, n_features)
            Columns named like the training data's; the index of ``X`` when it is a DataFrame.
            For images: an array shaped like the images (n_samples, H, W) or
            (n_samples, C, H, W), a map of each pixel's contribution.
        """
        return self._log_likelihood_of(X, None, condition=condition, per_feature=True)[4]

    def _exact_conditionals_apply(self, x: torch.Tensor) -> bool:
        """Whether rows of this model get exact per-column conditionals (tables of at most
        :data:`EXACT_CONDITIONAL_COLUMNS` columns), not the one-pass estimate (images, wider tables)."""
        return not self.input_space_.images and x[0].numel() <= EXACT_CONDITIONAL_COLUMNS

    def _exact_conditionals(
        self, inputs: ModelInputs, full: np.ndarray, k: int, first_only: bool = False
    ) -> np.ndarray:
        """log p(x_j | x_−j) = log p(x) − log p(x_−j) (model space, nats, (n, d)), ``full`` = log p(x) (n,).

        Each log p(x_−j) is an importance-sampling estimate of its own, with column j marked
        missing as a missing value is (its proposal fitted to the rest of the row), so a
        far-out value does not pull the proposal of the rows without it. NaN where x_j is missing.
        """
        x = inputs.x
        observed = torch.ones_like(x, dtype=torch.bool) if inputs.mask is None else inputs.mask
        out = np.full(tuple(x.shape), np.nan)
        # the rows without each column are scored together, up to CONDITIONAL_BATCH_ROWS at a time: one
        # call per batch, not per column, and a row's score does not depend on the rows scored with it
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            rows = torch.cat([keep for _, keep in pending])
            xs, ms = x[rows].clone(), observed[rows].clone()
            start = 0
            for j, keep in pending:
                xs[start : start + len(keep), j], ms[start : start + len(keep), j] = 0.0, False  # as missing
                start += len(keep)
            c = None if inputs.condition is None else inputs.condition[rows]
            rest = self._log_likelihood_internal(xs, ms, k, condition=c, first_only=first_only).value
            start = 0
            for j, keep in pending:
                out[keep.numpy(), j] = full[keep.numpy()] - rest[start : start + len(keep)]
                start += len(keep)
            pending.clear()

        for j in range(x.shape[1]):
            keep = torch.nonzero(observed[:, j] & (observed.sum(1) > 1)).flatten()
            if len(keep):
                pending.append((j, keep))
            if pending and sum(len(r) for _, r in pending) >= CONDITIONAL_BATCH_ROWS:
                flush()
        if pending:
            flush()
        return out

    def _feature_baseline(
        self, inputs: ModelInputs, one_pass: np.ndarray, probes: list[Probe] | None = None
    ) -> np.ndarray:
        """``feature_baseline_``: each element's median over the baseline rows ``inputs`` of the value
        :meth:`feature_scores` reports before the baseline is taken off, (elements,).

        ``one_pass`` are the rows' one-pass estimates of each element's conditional
        (:meth:`_baseline_feature_scores`, the first model's). Where :meth:`feature_scores`
        gives exact per-column conditionals, those differ from the one-pass estimate by a few
        tenths of a nat, steadily for each column (thyroid: up to 0.3; a four-column table:
        0.2): the median of that difference over the first :data:`EXACT_BASELINE_ROWS` rows
        (fewer for wide tables: at most :data:`EXACT_BASELINE_CELLS` conditionals, each a row
        scored without one column), the first model's as the one-pass estimate is, is added,
        so that a typical training row reports about 0 in every column. ``probes``: each model's probe of the
        rows ``inputs``, computed before.
        """
        baseline = _column_medians(one_pass)
        if not self._exact_conditionals_apply(inputs.x):
            return baseline
        width = int(inputs.x[0].numel())
        first = torch.arange(min(len(inputs), EXACT_BASELINE_ROWS, max(8, EXACT_BASELINE_CELLS // width)))
        few = inputs.rows(first)
        k = self.n_importance_samples
        full = self._log_likelihood_internal(
            few.x, few.mask, k, condition=few.condition, first_only=True, probes=_probe_rows(probes, first)
        ).value
        conditionals = self._exact_conditionals(few, full, k, first_only=True)
        exact = self.input_space_.feature_shares(conditionals, few)
        exact = np.asarray(exact, dtype=np.float64).reshape(len(few), -1)
        return baseline + _column_medians(exact - one_pass[: len(few)])

    def _baseline_feature_scores(self, inputs: ModelInputs, probes: list[Probe] | None = None) -> np.ndarray:
        """The one-pass estimate of each element's log p(x_j | x_−j) in the data's units, (rows, elements).

        For training rows, which the encoder serves well, it is within a few tenths of a nat of
        the exact per-column value (thyroid: at most 0.29 nats on the column medians) at the
        cost of one scoring pass instead of one per column (which doubled the fit of small tables).
        """
        return self._scores_with_conditionals(inputs, probes)[1]

    def _scores_with_conditionals(
        self, inputs: ModelInputs, probes: list[Probe] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One scoring pass: each row's model-space log p(x) (rows,) and the one-pass estimate of each element's
        log p(x_j | x_−j) in the data's units (rows, elements)."""
        result = self._log_likelihood_internal(
            inputs.x, inputs.mask, self.n_importance_samples, condition=inputs.condition, per_feature=True,
            probes=probes,
        )  # fmt: skip
        scores = self.input_space_.feature_shares(result.per_feature, inputs)
        return result.value, np.asarray(scores, dtype=np.float64).reshape(len(inputs), -1)

    def _feature_scores_of(self, conditionals: np.ndarray, inputs: ModelInputs, X: Any) -> Any:
        """Model-space log p(x_j | x_−j) ``(n, *event)`` as :meth:`feature_scores` reports them: in the data's
        units and form, less each element's training median (``feature_baseline_``)."""
        scores = self.input_space_.feature_shares(conditionals, inputs, _index_of(X))
        baseline = getattr(self, "feature_baseline_", None)
        if baseline is None:
            warnings.warn(
                "this model file predates the training baseline of feature_scores: the values are log p(x_j | x_-j) "
                "as they are, not against what is usual for each column; refit the model to compare columns",
                UserWarning,
                stacklevel=3,
            )
            return scores
        return scores - baseline.reshape(np.shape(scores)[1:])

    @on_own_threads
    def transform(self, X: Any, condition: Any = None) -> np.ndarray:
        """Posterior means E[z|x] (E[z|x, c] for a conditional model), shape (n_samples, latent_dim_)."""
        inputs = self._model_inputs(X, condition)
        return posterior_means(
            self._scoring_model(), inputs.x, mask=inputs.mask, device=self.device_, condition=inputs.condition
        )

    @on_own_threads
    def inverse_transform(self, Z: Any, condition: Any = None) -> np.ndarray | pd.DataFrame:
        """The decoder's mean at codes ``Z`` (n, latent_dim), in the data's units and form.

        The inverse of :meth:`transform` up to the model's reconstruction error: rows of a
        table (a DataFrame for a model fitted on one), or images of the training shape and
        dtype. Discrete values are rounded to their levels. A conditional model decodes
        under ``condition`` (one per code, or one for all): codes from
        ``transform(X, condition=a)`` decoded with ``condition=b`` carry the samples' style
        over to condition b.
        """
        check_is_fitted(self)
        z = np.asarray(Z, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.latent_dim_:
            raise ValueError(f"codes must have shape (n, {self.latent_dim_}), got {z.shape}")
        if not np.isfinite(z).all():
            row, col = (int(i) for i in np.argwhere(~np.isfinite(z))[0])
            raise ValueError(f"code {row}, dimension {col} is {z[row, col]}")
        c = self.input_space_.condition_tensor(condition, len(z))
        model = self._scoring_model()
        with torch.no_grad():
            dtype = next(model.parameters()).dtype
            zt = torch.from_numpy(z).to(self.device_, dtype)
            params = model.decode(zt, None if c is None else c.to(self.device_, dtype))
            mean = model.likelihood.mean(params).double().cpu().numpy()
        return self.from_model_space(mean)

    @on_own_threads
    @torch.no_grad()
    def sample(
        self, n_samples: int = 1, random_state: int | None = None, source: str = "prior", condition: Any = None
    ) -> np.ndarray | pd.DataFrame:
        """Draw ``n_samples`` samples from the model, in the data's units and form.

        Rows of shape (n_samples, n_features) for a table: lattice-valued (discrete)
        columns on their lattice; a DataFrame with the training columns for a model
        fitted on a DataFrame (categorical columns with their labels). Images of the
        training images' shape, dtype and range, e.g. uint8 in [0, 255].

        ``source="prior"`` draws the codes from N(0, I), which makes the samples those of
        the model p(x); ``"aggregate"`` draws them from :attr:`aggregate_posterior_` (a
        Gaussian mixture fitted to the training rows' codes), which avoids regions of the
        prior the encoder never uses and usually gives samples closer to the data.

        A conditional model draws from p(x|c) for ``condition``: one condition for all
        samples, or one per sample.
        """
        check_is_fitted(self)
        if not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        c = self.input_space_.condition_tensor(condition, int(n_samples))
        if source not in ("prior", "aggregate"):
            raise ValueError(f"source must be 'prior' or 'aggregate', got {source!r}")
        aggregate = getattr(self, "aggregate_posterior_", None)
        if source == "aggregate" and aggregate is None:
            raise ValueError("this model has no aggregate posterior (fitted on one row, or saved by an older version)")
        seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
        device = torch.device(self.device_)
        forked = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):  # seeded draws that leave torch's global state alone
            torch.manual_seed(seed)
            if source == "prior":
                z = torch.randn(int(n_samples), self.latent_dim_)
            else:
                z = torch.from_numpy(aggregate.sample(int(n_samples), np.random.default_rng(seed)))
            self.model_.eval()
            dtype = next(self.model_.parameters()).dtype
            params = self.model_.decode(z.to(device, dtype), None if c is None else c.to(device, dtype))
            x = self.model_.likelihood.sample(params).double().cpu().numpy()
        return self.from_model_space(x)

    @on_own_threads
    @torch.no_grad()
    def reconstruct(self, X: Any, condition: Any = None) -> np.ndarray | pd.DataFrame:
        """The decoder's mean at each sample's posterior mean, in the form of :meth:`sample`.

        Discrete values (pixel levels, lattice columns, categories) are rounded to the
        nearest level; images come back in their dtype and range. Missing entries of
        ``X`` are filled in by the model (an imputation). Shape as ``X``.
        """
        out = self.inverse_transform(self.transform(X, condition=condition), condition=condition)
        if isinstance(out, pd.DataFrame) and isinstance(X, pd.DataFrame):
            out.index = X.index
        return out

    def coding_model(self) -> CodingModel:
        """What a codec sees of this fitted model: the first network, latent size, likelihood and element scales."""
        check_is_fitted(self)
        scale = self.input_space_.model_scale()
        return CodingModel(self.model_, self.latent_dim_, self.model_spec_["likelihood"], scale)

    def from_model_space(self, x: np.ndarray) -> np.ndarray | pd.DataFrame:
        """Model-space values (n, *event_shape) back in the user's units, dtype and form."""
        check_is_fitted(self)
        return self.input_space_.from_model(x)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # NaN = missing: scored by the marginal of the observed entries
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], signing_key: bytes | str | None = None) -> str:
        """Write the fitted model to an HDF5 model file atomically; returns its SHA-256 fingerprint.

        With ``signing_key`` (at least 16 bytes, e.g. ``secrets.token_hex(32)``) the file is also
        signed (HMAC-SHA256), so that ``vaeguard.load(path, trusted_keys=[key])`` can tell it was
        written by a holder of the key; the plain SHA-256 only shows that it is intact.
        """
        check_is_fitted(self)
        config, arrays = self.model_file_contents()
        self.fingerprint_ = storage.write_model_file(path, config, arrays, signing_key=signing_key)
        return self.fingerprint_

    def model_file_contents(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What :meth:`save` writes: the JSON configuration and the named arrays (:mod:`vaeguard.storage`)."""
        config = {
            "estimator": type(self).__name__,
            "params": storable_params(self),
            "model": self.model_spec_,
            "fitted": {
                "offset_": self.offset_,
                "threshold_rule_": self.threshold_rule_,
                "column_coder_": None
                if self.column_coder_ is None
                else {"columns": self.column_coder_.columns, "vocabularies": self.column_coder_.vocabularies},
                "score_seed_": self.score_seed_,
                "latent_dim_": int(self.latent_dim_),
                "training_precision_": self.training_precision_,
                "n_features_in_": int(self.n_features_in_),
                "modelled_columns_": None
                if self.input_space_.modelled is None
                else [int(j) for j in self.input_space_.modelled],
                "constant_rows_": None
                if self.input_space_.constant_rows is None
                else [int(m) for m in self.input_space_.constant_rows],
                "feature_names_in_": [str(c) for c in getattr(self, "feature_names_in_", [])] or None,
                "image_shape_": None if self.image_shape_ is None else list(self.image_shape_),
                "image_dtype_": getattr(self, "image_dtype_", None),
                "pixel_levels_": None if self.pixel_levels_ is None else dataclasses.asdict(self.pixel_levels_),
                "column_types_": None
                if self.standardizer_ is None or self.standardizer_.columns is None
                else [{"kind": c.kind, "reason": c.reason} for c in self.standardizer_.columns],
                "condition_encoder_": None if self.condition_encoder_ is None else self.condition_encoder_.config(),
                "active_units_": None if self.latent_variance_ is None else int(self.active_units_),
                "n_models_": len(self._mixture_members()),
                "probe_thresholds_": getattr(self, "probe_thresholds_", None),
                "search_floors_": getattr(self, "search_floors_", None),
                "best_epoch": self.history_.best_epoch,
                "stopped_early": self.history_.stopped_early,
            },
        }
        arrays = {f"model.{k}": v.detach().cpu().numpy() for k, v in self.model_.state_dict().items()}
        for i, member in enumerate(self._mixture_members()[1:], 1):
            arrays |= {f"member{i}.{k}": v.detach().cpu().numpy() for k, v in member.state_dict().items()}
        arrays["history.train_loss"] = np.asarray(self.history_.train_loss, dtype=np.float64)
        arrays["history.validation_loss"] = np.asarray(self.history_.validation_loss, dtype=np.float64)
        if self.latent_variance_ is not None:
            arrays["latent.variance"] = np.asarray(self.latent_variance_, dtype=np.float64)
            arrays["latent.kl_per_dimension"] = np.asarray(self.kl_per_dimension_, dtype=np.float64)
        if getattr(self, "aggregate_posterior_", None) is not None:
            arrays.update(self.aggregate_posterior_.arrays())
        if getattr(self, "feature_baseline_", None) is not None:
            arrays["feature.baseline"] = np.asarray(self.feature_baseline_, dtype=np.float64)
        if self.standardizer_ is not None:
            arrays["standardizer.center"] = self.standardizer_.center
            arrays["standardizer.scale"] = self.standardizer_.scale
            if self.standardizer_.step is not None:
                arrays["standardizer.origin"] = self.standardizer_.origin
                arrays["standardizer.step"] = self.standardizer_.step
            if self.standardizer_.lower is not None:
                arrays["standardizer.lower"] = self.standardizer_.lower
            if self.standardizer_.upper is not None:
                arrays["standardizer.upper"] = self.standardizer_.upper
        return config, arrays

    @classmethod
    def from_model_file_contents(
        cls, config: dict[str, Any], arrays: dict[str, np.ndarray], digest: str, device: str
    ) -> VAEAnomalyDetector:
        """The fitted detector from a model file's verified contents (:func:`vaeguard.persistence.load` calls it).

        ``digest`` is the file's SHA-256 (``fingerprint_``); ``device`` where the networks go.
        """
        est = cls(**config["params"])
        spec = config["model"]
        fitted = config["fitted"]
        lik_cls = get_part("likelihoods", spec["likelihood"])
        event_shape = tuple(spec.get("event_shape") or (spec["n_features"],))
        likelihood = lik_cls(event_shape, **spec["likelihood_options"])
        n_models = int(fitted.get("n_models_", 1))
        if not 1 <= n_models <= MAX_STORED_MODELS:
            raise ValueError(f"the model file declares {n_models} models; 1 to {MAX_STORED_MODELS} are allowed")
        est.model_spec_ = spec
        est.device_ = str(resolve_device(device))
        architecture = (
            spec["encoder"],
            spec["latent_dim"],
            spec["hidden_dims"],
            spec.get("mask_input", False),
            spec.get("condition_dim", 0),
        )
        encoder, latent_dim, hidden, mask_input, condition_dim = architecture
        # the networks' shapes first, without memory: a file's arrays must match them before any is allocated
        needed = est._build_model(
            encoder, copy.deepcopy(likelihood), latent_dim, hidden, mask_input, condition_dim, networks_on="meta"
        ).state_dict()
        models = []
        for prefix in ["model.", *(f"member{i}." for i in range(1, n_models))]:
            state = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            _check_weights(prefix, state, {k: tuple(v.shape) for k, v in needed.items()})
            model = est._build_model(encoder, copy.deepcopy(likelihood), latent_dim, hidden, mask_input, condition_dim)
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
            models.append(model.to(est.device_).eval())
        est.model_, est.models_ = models[0], models
        standardizer = None
        if "standardizer.center" in arrays:
            st = Standardizer(
                arrays["standardizer.center"],
                arrays["standardizer.scale"],
                arrays.get("standardizer.origin"),
                arrays.get("standardizer.step"),
                arrays.get("standardizer.lower"),
                upper=arrays.get("standardizer.upper"),
            )
            records = fitted.get("column_types_")
            if records is not None:
                st.columns = st.lattices([str(r["kind"]) for r in records], [str(r["reason"]) for r in records])
            standardizer = st
        levels, coder, conditions = (fitted.get(k) for k in ("pixel_levels_", "column_coder_", "condition_encoder_"))
        modelled, constant_rows = _stored_constant_columns(fitted, standardizer)
        est.input_space_ = InputSpace(
            cls.__name__,
            int(fitted["n_features_in_"]),
            np.asarray(fitted["feature_names_in_"], dtype=object) if fitted.get("feature_names_in_") else None,
            image_shape=None if fitted.get("image_shape_") is None else tuple(fitted["image_shape_"]),
            image_dtype=None if fitted.get("image_dtype_") is None else str(fitted["image_dtype_"]),
            column_coder=None if coder is None else ColumnCoder(coder["columns"], coder["vocabularies"]),
            handle_unknown=est.handle_unknown,
            standardizer=standardizer,
            pixel_levels=None if levels is None else PixelLevels(**levels),
            support=models[0].likelihood,
            modelled=modelled,
            constant_rows=constant_rows,
            condition_encoder=None if conditions is None else ConditionEncoder(**conditions),
        )
        est.offset_ = float(fitted["offset_"])
        est.threshold_rule_ = dict(fitted["threshold_rule_"])
        est.score_seed_ = int(fitted["score_seed_"])
        est.latent_dim_ = int(fitted["latent_dim_"])
        est.training_precision_ = str(fitted.get("training_precision_", "float32"))  # files before it: float32
        est.column_types_ = est.input_space_.column_types(spec["likelihood"])
        est.history_ = TrainingHistory(
            list(arrays["history.train_loss"]),
            list(arrays["history.validation_loss"]),
            int(fitted["best_epoch"]),
            bool(fitted["stopped_early"]),
        )
        est.latent_variance_ = arrays.get("latent.variance")
        est.kl_per_dimension_ = arrays.get("latent.kl_per_dimension")
        est.active_units_ = fitted.get("active_units_")
        est.aggregate_posterior_ = AggregatePosterior.from_arrays(arrays)
        est.probe_thresholds_ = _stored_probe_thresholds(fitted.get("probe_thresholds_"), n_models)
        est.search_floors_ = _stored_search_floors(fitted.get("search_floors_"), n_models)
        est.feature_baseline_ = arrays.get("feature.baseline")
        est.fingerprint_ = digest
        return est


#: The most models a model file may hold (a guard against crafted files).
MAX_STORED_MODELS = 64


def _check_weights(prefix: str, state: dict[str, np.ndarray], needed: dict[str, tuple[int, ...]]) -> None:
    """Refuse a model file whose arrays under ``prefix`` are not exactly the network's (names and shapes)."""
    missing, extra = sorted(set(needed) - set(state)), sorted(set(state) - set(needed))
    problem = None
    if missing:
        problem = f"it lacks the array {prefix}{missing[0]}" + (
            f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        )
    elif extra:
        problem = f"it holds the array {prefix}{extra[0]}, which the network does not have"
    else:
        for name, shape in needed.items():
            if tuple(state[name].shape) != shape:
                problem = f"array {prefix}{name} has shape {tuple(state[name].shape)}; the network needs {shape}"
                break
            if state[name].dtype.kind not in "biuf":
                problem = f"array {prefix}{name} has dtype {state[name].dtype}, not numbers"
                break
            if state[name].dtype.kind == "f" and not np.isfinite(state[name]).all():
                problem = f"array {prefix}{name} holds non-finite values"
                break
    if problem is not None:
        raise ValueError(f"the model file's weights do not fit the network it describes: {problem}")


def _finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number (not a bool)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _stored_per_model(value: Any, n_models: int, name: str, accepts: Any, what: str) -> list[float | None] | None:
    """A model file's per-model list ``name``: None (files before it), or ``n_models`` entries that ``accepts``."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n_models or not all(accepts(t) for t in value):
        raise ValueError(f"the model file's {name} must be {n_models} {what}, got {value!r}")
    return [None if t is None else float(t) for t in value]


def _stored_probe_thresholds(value: Any, n_models: int) -> list[float] | None:
    """A model file's ``probe_thresholds_``: None (files before them), or one finite number ≥ 0 per model."""
    accepts = lambda t: _finite_number(t) and t >= 0  # noqa: E731
    return _stored_per_model(value, n_models, "probe_thresholds_", accepts, "finite numbers >= 0")


def _stored_search_floors(value: Any, n_models: int) -> list[float | None] | None:
    """A model file's ``search_floors_``: None (files before them), or per model a finite number or None."""
    accepts = lambda t: t is None or _finite_number(t)  # noqa: E731
    return _stored_per_model(value, n_models, "search_floors_", accepts, "finite numbers or nulls")


def _stored_constant_columns(
    fitted: dict[str, Any], standardizer: Standardizer | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A model file's ``modelled_columns_`` and ``constant_rows_`` (checked by :mod:`vaeguard.schema`): both None
    (every column modelled), or the columns the model reads and the training rows of each other one, whose one
    value the standardizer holds."""
    if fitted.get("modelled_columns_") is None:
        return None, None
    if standardizer is None:
        raise ValueError("the model file's modelled_columns_ needs the standardizer that holds the other columns")
    return np.asarray(fitted["modelled_columns_"], dtype=np.int64), np.asarray(fitted["constant_rows_"], np.int64)


def _column_medians(values: np.ndarray) -> np.ndarray:
    """The median of each column of ``values`` (rows, columns) over its finite entries; 0 for a column without one."""
    finite = np.where(np.isfinite(values), values, np.nan)
    out = np.zeros(values.shape[1])
    seen = ~np.isnan(finite).all(axis=0)
    out[seen] = np.nanmedian(finite[:, seen], axis=0)
    return out


def mixture_estimate(members: list) -> Any:
    """The importance-sampled log-likelihood of an equal mixture from its members' estimates.

    log p̂(x) = log((1/M) Σ_m p̂_m(x)). The members' estimates share the draws ε (common
    random numbers), so their errors may be correlated; the standard error reported is the
    bound that holds whatever the correlation, se(p̂) ≤ (1/M) Σ_m p̂_m se(p̂_m), i.e.
    se(log p̂) ≤ Σ_m w_m se(log p̂_m) with weights w_m = p̂_m / (M p̂) that sum to 1.
    """
    values = np.stack([m.value for m in members])
    value = log_mean_exp(values)
    if members[0].std is None:
        return dataclasses.replace(members[0], value=value)
    weights = np.exp(values - value[None, :]) / len(members)
    std = np.sum(weights * np.stack([m.std for m in members]), axis=0)
    # reliability: the least reliable member's (k̂ and ESS), a proposal fitted in any member
    return dataclasses.replace(
        members[0],
        value=value,
        std=std,
        pareto_k=np.max([m.pareto_k for m in members], axis=0),
        ess=np.min([m.ess for m in members], axis=0),
        refined=np.any([m.refined for m in members], axis=0),
    )


#: Rows encoded at once when measuring the latent dimensions' use after fitting.
LATENT_USAGE_CHUNK = 4096


def build_regularizer(name: str | None, params: dict | None) -> Any:
    """The registered regularizer ``name`` built with ``params`` (None: no regularizer)."""
    if name is None:
        if params:
            raise ValueError("regularizer_params were given without a regularizer")
        return None
    return build_part("regularizers", name, params, "regularizer_params")


@torch.no_grad()
def latent_usage(
    model: Any, x: torch.Tensor, mask: torch.Tensor | None, seed: int, condition: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over the rows of ``x``: the variance of each dimension's posterior mean (k,), the mean KL per dimension
    (k,) in nats, and the posterior means of a random subset of at most :data:`AGGREGATE_ROWS` rows (m, k).

    Streams over the rows, so memory does not grow with them.
    """
    device = next(model.parameters()).device
    n = x.shape[0]
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:AGGREGATE_ROWS])
    total = total_sq = kl = 0.0
    kept = []
    for start in range(0, n, LATENT_USAGE_CHUNK):
        xb = x[start : start + LATENT_USAGE_CHUNK].to(device=device, dtype=torch.get_default_dtype())
        mb = None if mask is None else mask[start : start + LATENT_USAGE_CHUNK].to(device)
        cb = None if condition is None else condition[start : start + LATENT_USAGE_CHUNK].to(device, xb.dtype)
        mu, logvar = model.encode(xb, mb, cb)
        mu64 = mu.double().cpu()
        total = total + mu64.sum(0)
        total_sq = total_sq + mu64.square().sum(0)
        kl = kl + kl_per_dimension(mu, logvar).double().sum(0).cpu()
        rows = keep[(keep >= start) & (keep < start + len(xb))] - start
        kept.append(mu64[torch.from_numpy(rows)])
    mean = total / n
    variance = (total_sq / n - mean.square()).clamp_min(0.0)  # as np.var: divided by n
    return variance.numpy(), (kl / n).numpy(), torch.cat(kept).numpy()


def storable_params(estimator: BaseEstimator) -> dict[str, Any]:
    """``get_params()`` for a model file: a RandomState instance (not storable as JSON) becomes None."""
    params = estimator.get_params()
    if not (params.get("random_state") is None or isinstance(params["random_state"], Integral)):
        params["random_state"] = None
    return params


def _index_of(X: Any) -> pd.Index | None:
    """The row index of ``X`` when it is a DataFrame (results keep it), else None."""
    return X.index if isinstance(X, pd.DataFrame) else None


def _per_row(values: np.ndarray, X: Any, name: str) -> np.ndarray | pd.Series:
    """``values`` as a Series with the index of ``X`` when ``X`` is a DataFrame; else as they are."""
    return pd.Series(values, index=X.index, name=name) if isinstance(X, pd.DataFrame) else values
