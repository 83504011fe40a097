"""A self-contained HTML report of a model on a data set: scores, the most anomalous rows, the latent map, training."""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vaeguard.batch import condition_columns, feature_columns, score_chunk
from vaeguard.data import DataError
from vaeguard.scoring import PARETO_K_RELIABLE

if TYPE_CHECKING:  # for type hints only: this module reaches the estimator lazily
    from vaeguard.estimators import VAEAnomalyDetector

#: Rows listed in the "most anomalous" table.
TOP_ROWS = 20
#: Points drawn in the latent map at most.
MAP_POINTS = 5000

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 960px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; }
th { text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .note { color: #666; font-size: 0.9em; }
"""


def _figure(width: float = 7.0, height: float = 3.2) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise DataError('the report draws with matplotlib: pip install "vaeguard[plot]"') from exc
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _embed(fig: Any, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def histogram_range(log_px: np.ndarray, offset: float) -> float:
    """The left edge of the score histogram: far enough below the threshold to show it and the rows around it
    (the threshold less four times its distance to the median, or the 0.5th percentile where that is nearer),
    so that a few far-out rows (thousands of nats down) do not squeeze the bulk into one bar."""
    median = float(np.median(log_px))
    return max(float(np.percentile(log_px, 0.5)), min(offset, median) - 4 * max(abs(median - offset), 1.0))


def _histogram(log_px: np.ndarray, offset: float) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    finite = log_px[np.isfinite(log_px)]
    low = histogram_range(finite, offset) if len(finite) else 0.0
    below = int((finite < low).sum())
    ax.hist(np.clip(finite, low, None), bins=60, color="#4c72b0")
    ax.axvline(offset, color="#c44e52", linestyle="--", label=f"threshold {offset:.2f} nats")
    ax.set_xlabel(f"log p(x), nats ({below:,} rows below {low:.1f} drawn at the left edge)")
    ax.set_ylabel("rows")
    ax.legend()
    return _embed(fig, "histogram of the log-likelihoods with the threshold")


def _latent_map(codes: np.ndarray, log_px: np.ndarray, offset: float) -> str:
    if codes.shape[1] > 2:  # the two directions of largest spread
        centered = codes - codes.mean(axis=0)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        codes, axes = centered @ vt[:2].T, ("principal direction 1", "principal direction 2")
    elif codes.shape[1] == 2:
        axes = ("z1", "z2")
    else:
        codes, axes = np.column_stack([codes[:, 0], np.zeros(len(codes))]), ("z1", "")
    fig = _figure(6.0, 4.6)
    ax = fig.add_subplot()
    low = histogram_range(log_px, offset) if len(log_px) else None  # far-out rows take the darkest colour
    points = ax.scatter(codes[:, 0], codes[:, 1], c=log_px, s=6, cmap="viridis", vmin=low)
    fig.colorbar(points, ax=ax, label="log p(x), nats (lower: the darkest colour)", extend="min")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    return _embed(fig, "posterior means of the rows, coloured by log-likelihood")


def _against_labels(log_px: np.ndarray, y: np.ndarray, offset: float) -> str:
    """AUROC, average precision, ROC and precision–recall curves, and the confusion at the threshold, of the scored
    rows against their labels (``y`` True = anomaly)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    if y.all() or not y.any():
        return '<p class="note">The labels hold one class only: no curves.</p>'
    outlyingness = -log_px
    auroc, ap = roc_auc_score(y, outlyingness), average_precision_score(y, outlyingness)
    fpr, tpr, _ = roc_curve(y, outlyingness)
    precision, recall, _ = precision_recall_curve(y, outlyingness)
    flagged = log_px < offset
    at_fpr, at_recall = float(flagged[~y].mean()), float(flagged[y].mean())
    fig = _figure(8.0, 3.6)
    roc, pr = fig.subplots(1, 2)
    roc.plot(fpr, tpr, color="#4c72b0", label=f"AUROC {auroc:.3f}")
    roc.plot([0, 1], [0, 1], color="#bbb", linestyle=":")
    roc.scatter([at_fpr], [at_recall], color="#c44e52", zorder=3, label="the threshold")
    roc.set_xlabel("false-positive rate")
    roc.set_ylabel("recall (true-positive rate)")
    roc.legend(loc="lower right")
    pr.plot(recall, precision, color="#4c72b0", label=f"average precision {ap:.3f}")
    pr.axhline(y.mean(), color="#bbb", linestyle=":", label=f"anomaly share {y.mean():.3f}")
    if flagged.any():
        pr.scatter([at_recall], [y[flagged].mean()], color="#c44e52", zorder=3, label="the threshold")
    pr.set_xlabel("recall")
    pr.set_ylabel("precision")
    pr.legend(loc="lower left")
    counts = {
        ("anomaly", "flagged"): int((y & flagged).sum()),
        ("anomaly", "not flagged"): int((y & ~flagged).sum()),
        ("normal", "flagged"): int((~y & flagged).sum()),
        ("normal", "not flagged"): int((~y & ~flagged).sum()),
    }
    confusion = [
        '<table id="confusion"><tr><th>at the threshold</th><th>flagged</th><th>not flagged</th></tr>',
        *(
            f"<tr><th>{truth} ({int((y if truth == 'anomaly' else ~y).sum()):,} rows)</th>"
            f'<td class="num">{counts[(truth, "flagged")]:,}</td>'
            f'<td class="num">{counts[(truth, "not flagged")]:,}</td></tr>'
            for truth in ("anomaly", "normal")
        ),
        "</table>",
    ]
    shown = "n/a" if not flagged.any() else f"{y[flagged].mean():.3f}"
    return "\n".join(
        [
            f'<p id="label-metrics">AUROC <b>{auroc:.4f}</b>, average precision <b>{ap:.4f}</b> over '
            f"{len(y):,} labelled rows ({int(y.sum()):,} anomalies); at the threshold: precision {shown}, "
            f"recall {at_recall:.3f}, false-positive rate {at_fpr:.4f}.</p>",
            _embed(fig, "ROC and precision-recall curves of the log-likelihood against the labels"),
            *confusion,
        ]
    )


def _training_curves(history: Any) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    epochs = np.arange(1, len(history.train_loss) + 1)
    ax.plot(epochs, history.train_loss, label="training −ELBO")
    if history.validation_loss and np.isfinite(history.validation_loss).any():
        ax.plot(epochs[: len(history.validation_loss)], history.validation_loss, label="validation −ELBO")
    ax.axvline(history.best_epoch + 1, color="#888", linestyle=":", label="weights kept")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per row (standardised units)")
    ax.legend()
    return _embed(fig, "training and validation loss per epoch")


def image_grid_figure(images: np.ndarray, columns: int = 8, row_labels: list[str] | None = None) -> Any:
    """A matplotlib figure of ``images`` (n, H, W) or (n, C, H, W) in rows of ``columns``, one grey scale for all."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 4:  # (n, C, H, W): show channel-last colour, or the first channel
        images = np.moveaxis(images, 1, -1) if images.shape[1] == 3 else images[:, 0]
    n = len(images)
    cols = min(columns, n)
    rows = int(np.ceil(n / cols))
    fig = _figure(cols * 0.9 + (0.6 if row_labels else 0), rows * 0.9)
    low, high = np.nanmin(images), np.nanmax(images)
    for i, image in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        shown = (image - low) / (high - low) if high > low else image
        ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        if row_labels and i % cols == 0:
            ax.set_ylabel(row_labels[i // cols], fontsize=7)
    return fig


def _image_grid(images: np.ndarray, title: str, columns: int = 8, row_labels: list[str] | None = None) -> str:
    return _embed(image_grid_figure(images, columns, row_labels), title)


#: Values of a latent dimension in the traversal pictures, and how many dimensions they show.
TRAVERSAL_VALUES = (-2.5, -1.5, -0.5, 0.5, 1.5, 2.5)
TRAVERSAL_DIMS = 8


def latent_pictures(
    det: VAEAnomalyDetector, base: np.ndarray, other: np.ndarray, seed: int = 0, condition: Any = None
) -> dict[str, tuple[Any, str]]:
    """Figures of an image model's latent space: ``{name: (figure, alt text)}``.

    ``samples``: 8 samples from the prior and 8 from the aggregate posterior (two rows);
    ``traversals``: image ``base`` decoded with each of the most used latent dimensions
    (largest KL first, at most :data:`TRAVERSAL_DIMS`) set to :data:`TRAVERSAL_VALUES`;
    ``interpolation``: 8 steps along the slerp path from ``base`` to ``other``. A
    conditional model draws every picture under the one ``condition``.
    """
    rows = [det.sample(8, random_state=seed, condition=condition)]
    labels = ["prior"]
    if getattr(det, "aggregate_posterior_", None) is not None:
        rows.append(det.sample(8, random_state=seed, source="aggregate", condition=condition))
        labels.append("aggregate")
    kl = getattr(det, "kl_per_dimension_", None)
    order = np.argsort(-np.asarray(kl)) if kl is not None else np.arange(det.latent_dim_)
    dims = [int(d) for d in order[:TRAVERSAL_DIMS]]
    traversal = np.concatenate([np.asarray(det.traverse(base, d, TRAVERSAL_VALUES, condition=condition)) for d in dims])
    dim_labels = [f"z{d}" + (f" ({kl[d]:.1f} nats)" if kl is not None else "") for d in dims]
    return {
        "samples": (image_grid_figure(np.concatenate(rows), 8, labels), "samples from the prior and the aggregate"),
        "traversals": (
            image_grid_figure(traversal, len(TRAVERSAL_VALUES), dim_labels),
            f"latent traversals, values {', '.join(map(str, TRAVERSAL_VALUES))}",
        ),
        "interpolation": (
            image_grid_figure(np.asarray(det.interpolate(base, other, steps=8, condition=condition)), 8),
            "slerp path",
        ),
    }


def build_report(
    det: VAEAnomalyDetector,
    data: pd.DataFrame | np.ndarray,
    *,
    title: str,
    rows_in_file: int,
    id_column: str | None = None,
    labels: Any = None,
) -> str:
    """The report's HTML, one page with every image embedded.

    Sections: a summary of the model and data, the histogram of log-likelihoods with the
    threshold, with ``labels`` (one per row, true = anomaly) the ROC and precision–recall
    curves, AUROC and the confusion at the threshold, the most anomalous rows (by their
    ``id_column`` values when given) with their top contributing columns (tables), a 2-D
    map of the posterior means, the training curves, and for image models samples (prior and
    aggregate posterior), latent traversals and an interpolation (:func:`latent_pictures`).
    """
    columns = feature_columns(det)
    results, _ = score_chunk(det, data, explain=columns is not None, on_bad_row="nan", id_column=id_column)
    log_px = results["log_likelihood"].to_numpy()
    features = data if columns is None else data[columns]
    scored = np.isfinite(log_px)
    keep = np.flatnonzero(scored)[:MAP_POINTS]
    subset = features[keep] if columns is None else features.iloc[keep]
    conditioned = condition_columns(det)
    codes = det.transform(subset, condition=None if conditioned is None else data[conditioned].iloc[keep])
    flagged = int((results["is_outlier"] == True).sum())  # noqa: E712 (nullable booleans)
    spec = det.model_spec_
    summary = [
        ("rows in the file", f"{rows_in_file:,}"),
        ("rows in this report", f"{len(data):,}" + (" (a random sample)" if len(data) < rows_in_file else "")),
        ("rows that could not be scored", f"{int((~scored).sum()):,}"),
        ("flagged as outliers", f"{flagged:,} ({flagged / max(1, scored.sum()):.1%})"),
        (
            "unreliable estimates (Pareto k̂ > 0.7)",
            f"{int((results['pareto_k'] > PARETO_K_RELIABLE).sum()):,}"
            " (their log p(x) and its error bar are not to be trusted; more importance samples help)",
        ),
        ("threshold", f"{det.offset_:.3f} nats ({det.threshold_rule_.get('rule')})"),
        ("model", f"{spec['encoder']} networks, {spec['likelihood']} likelihood, latent_dim {det.latent_dim_}"),
        ("model file SHA-256", det.fingerprint_ or "(not saved)"),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<section id="summary"><table>',
        *(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary),
        "</table></section>",
        '<section id="score-histogram"><h2>Log-likelihoods and the threshold</h2>',
        _histogram(log_px[scored], det.offset_),
        "</section>",
        *(
            []
            if labels is None
            else [
                '<section id="labels"><h2>Against the labels</h2>',
                _against_labels(log_px[scored], np.asarray(labels, dtype=bool)[scored], det.offset_),
                "</section>",
            ]
        ),
        '<section id="most-anomalous"><h2>The most anomalous rows</h2>',
        ""
        if columns is None
        else '<p class="note">Top features: the columns least likely given the rest of the row, each against '
        "what is usual for that column in training (<code>feature_scores</code>).</p>",
        _top_rows(results, data, columns, id_column),
        "</section>",
        '<section id="latent-map"><h2>Latent map</h2>',
        f'<p class="note">Posterior means of {len(keep):,} rows.</p>',
        _latent_map(codes, log_px[keep], det.offset_),
        "</section>",
        '<section id="training-curves"><h2>Training</h2>',
        _training_curves(det.history_),
        "</section>",
    ]
    if columns is None:
        worst = np.argsort(np.where(scored, log_px, np.inf))[: min(16, int(scored.sum()))]
        typical = np.argsort(np.where(scored, -log_px, np.inf))[:2]  # the two most likely images
        images = np.asarray(data)
        pictures = {
            name: _embed(fig, alt)
            for name, (fig, alt) in latent_pictures(det, images[typical[0]], images[typical[-1]]).items()
        }
        parts += [
            '<section id="samples"><h2>Samples from the model</h2>',
            '<p class="note">Top row: codes from the prior N(0, I); bottom row: from the aggregate posterior '
            "(a Gaussian mixture fitted to the training codes).</p>",
            pictures["samples"],
            '<h2 id="traversals">Latent traversals</h2>',
            '<p class="note">The most likely image of this file, with one latent dimension at a time (rows, most '
            f"used first) set to {', '.join(map(str, TRAVERSAL_VALUES))}.</p>",
            pictures["traversals"],
            '<h2 id="interpolation">Interpolation</h2>',
            '<p class="note">Decoded points on the spherical path between the codes of the two most likely images.</p>',
            pictures["interpolation"],
            "<h2>The most anomalous images</h2>",
            _image_grid(images[worst], "the most anomalous images"),
            "</section>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def _top_rows(results: pd.DataFrame, data: Any, columns: list[str] | None, id_column: str | None = None) -> str:
    order = results["log_likelihood"].fillna(np.inf).to_numpy().argsort(kind="stable")[:TOP_ROWS]
    header = ["id" if id_column else "row", "log p(x) (nats)", "± (nats)", "k̂", "decision"] + (
        ["top features"] if columns is not None else []
    )
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i in order:
        row = results.iloc[i]
        cells = [
            f"<td>{html.escape(str(row['id']))}</td>",
            f'<td class="num">{row["log_likelihood"]:.3f}</td>',
            f'<td class="num">{row["log_likelihood_std"]:.3f}</td>',
            f'<td class="num">{row["pareto_k"]:.2f}</td>',
            f'<td class="num">{row["decision"]:.3f}</td>',
        ]
        if columns is not None:
            cells.append(f"<td>{html.escape(str(row['top_features']).replace(';', ', '))}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)
