"""Scoring data in chunks, as the command line and Dask do: row checks, the result columns, and whole files
(resumable, atomic) with :func:`score_file`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vaeguard.data import DataError, ResumableWriter, Source, chunk_digest, iter_chunks, output_lock
from vaeguard.detector import decision, is_outlier

if TYPE_CHECKING:  # for type hints only: this module reaches the estimator lazily
    from vaeguard.estimators import VAEAnomalyDetector

#: How many of the most unlikely columns ``explain`` names per row.
TOP_FEATURES = 3
ON_BAD_ROW = ("error", "skip", "nan")


def feature_columns(det: VAEAnomalyDetector) -> list[str] | None:
    """The columns a fitted table model reads (its training column names), or None for an image model."""
    space = det.input_space_
    return None if space.images else space.columns


def condition_columns(det: VAEAnomalyDetector) -> list[str] | None:
    """The columns a conditional table model reads its conditions from (the names of ``y`` in fit), else None.

    Refuses a conditional image model: the command line has no place for its conditions.
    """
    space = det.input_space_
    if space.condition_columns is not None and space.images:
        raise DataError("this image model is conditional: score it from Python, with condition=")
    return space.condition_columns


def check_columns(det: VAEAnomalyDetector, columns: list[str], source: str) -> None:
    """Raise ``DataError`` when ``columns`` lack any of the model's feature (or condition) columns."""
    needed = feature_columns(det)
    if needed is None:
        condition_columns(det)
        return
    needed = needed + (condition_columns(det) or [])
    missing = [c for c in needed if c not in set(columns)]
    if missing:
        raise DataError(
            f"{source} lacks column(s) {', '.join(map(repr, missing[:5]))}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''} that the model was trained on; "
            f"its columns are {', '.join(map(repr, columns[:10]))}{' ...' if len(columns) > 10 else ''}"
        )


def score_chunk(
    det: VAEAnomalyDetector,
    chunk: pd.DataFrame | np.ndarray,
    *,
    row_offset: int = 0,
    id_column: str | None = None,
    n_samples: int | None = None,
    explain: bool = False,
    on_bad_row: str = "error",
) -> tuple[pd.DataFrame, int]:
    """Score one chunk; returns (results, rows skipped).

    Results have the columns ``id`` (the ``id_column`` or the row number in the file),
    ``log_likelihood`` (nats), ``decision`` (log-likelihood − ``offset_``),
    ``is_outlier``, ``log_likelihood_std`` (the estimate's standard error, nats) and
    ``pareto_k`` (the reliability diagnostic k̂ of the importance weights: above 0.7 the
    estimate is not to be trusted), plus ``top_features`` (the columns with the lowest
    :meth:`~vaeguard.VAEAnomalyDetector.feature_scores`, ``;``-separated) with ``explain``.
    A row that cannot be scored (a value that is not a number, infinite, an unseen
    category, nothing observed) raises ``DataError`` naming its row and column, unless
    ``on_bad_row`` is "skip" (drop it) or "nan" (NaN scores for it).
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {', '.join(ON_BAD_ROW)}, got {on_bad_row!r}")
    rows = np.arange(row_offset, row_offset + len(chunk))
    columns = feature_columns(det)
    conditioned = condition_columns(det)
    if columns is None:  # images: the chunk is an array of them, checked as a whole
        if explain:
            raise DataError("--explain names columns of tables; this is an image model")
        ids = rows
        bad = np.zeros(len(chunk), bool)
        inputs = det.to_model_space(chunk) if len(chunk) else None
    else:
        ids = chunk[id_column].to_numpy() if id_column is not None else rows
        conditions = None if conditioned is None else chunk[conditioned]
        checked = det.input_space_.check_rows(chunk, conditions)  # the one check of these rows
        bad, inputs = checked.bad, checked.inputs
        if checked.problems and on_bad_row == "error":
            i, column, value, why = checked.problems[0]
            where = f"row {rows[i]}" + (f" (id {ids[i]!r})" if id_column is not None else "")
            what = f"column {column!r} holds {value!r}, {why}" if column else why
            raise DataError(f"{where}: {what}; fix the data or pass --on-bad-row skip|nan")
    good = ~bad
    log_px, std, k_hat = (np.full(len(chunk), np.nan) for _ in range(3))
    top: list[str] = [""] * len(chunk)
    if inputs is not None:
        estimate = det.log_likelihood(
            inputs,
            n_samples=n_samples,
            return_std=True,
            return_diagnostic=True,
            return_feature_scores=explain,  # the rows are checked once; one more scoring pass per column
        )
        log_px[good], std[good], k_hat[good] = (np.asarray(part) for part in estimate[:3])
        if explain:
            shares = estimate[3].to_numpy()
            order = np.argsort(np.nan_to_num(shares, nan=np.inf), axis=1)[:, :TOP_FEATURES]
            names = np.asarray(columns, dtype=object)
            for i, picks in zip(np.flatnonzero(good), order, strict=True):
                top[i] = ";".join(names[picks])
    decision_values = decision(log_px, det.offset_)
    results = pd.DataFrame(
        {
            "id": ids,
            "log_likelihood": log_px,
            "decision": decision_values,
            "is_outlier": pd.array(np.where(good, is_outlier(decision_values), False), dtype="boolean"),
            "log_likelihood_std": std,
            "pareto_k": k_hat,
        }
    )
    results.loc[bad, "is_outlier"] = pd.NA
    if explain:
        results["top_features"] = top
    if on_bad_row == "skip":
        return results[good].reset_index(drop=True), int(bad.sum())
    return results, int(bad.sum())


@dataclass
class ScoreRun:
    """What :func:`score_file` did: input rows read in all (those before a resume included), rows that could
    not be scored (left out or given NaN, by ``on_bad_row``), and the row it resumed after (0: a fresh run)."""

    rows: int
    skipped: int
    resumed_from: int


def score_file(
    det: VAEAnomalyDetector,
    source: Source,
    output: str | None,
    *,
    chunk_rows: int = 10_000,
    id_column: str | None = None,
    n_samples: int | None = None,
    explain: bool = False,
    on_bad_row: str = "error",
    resume: bool = False,
    progress: Callable[[int], Any] | None = None,
    notify: Callable[[str], Any] | None = None,
    stream: IO[str] | None = None,
) -> ScoreRun:
    """Score a file in chunks of ``chunk_rows`` rows with :func:`score_chunk`; memory stays flat.

    ``output`` (.csv or .parquet) appears under its name only when complete; with ``resume``
    a stopped run with the same settings continues after its last whole chunk. ``output``
    None writes CSV to ``stream`` instead. ``progress(k)`` is told of every k rows done
    (first of the rows a resume skips); ``notify(message)`` of a resume and of the input's columns
    that the model does not read (ignored).
    """
    settings = {
        "model": det.fingerprint_,
        "data": [str(source), source.path.stat().st_size, source.path.stat().st_mtime_ns],
        "chunk_rows": chunk_rows,
        "id_column": id_column,
        "explain": explain,
        "n_samples": n_samples,
        "on_bad_row": on_bad_row,
    }
    with contextlib.ExitStack() as stack:
        if output is not None:
            stack.enter_context(output_lock(output))  # one writer per output: a second run is refused at once
        options = {"id_column": id_column, "n_samples": n_samples, "explain": explain, "on_bad_row": on_bad_row}
        return _score_file(det, source, output, settings, chunk_rows, options, resume, progress, notify, stream)


def _input_prefix_digest(source: Source, chunk_rows: int, rows: int) -> str:
    """The chained digest (:func:`chunk_digest`) of the first ``rows`` rows of ``source``, read in chunks."""
    digest, seen = "", 0
    if rows == 0:
        return digest
    for chunk in iter_chunks(source, chunk_rows):
        digest, seen = chunk_digest(chunk, digest), seen + len(chunk)
        if seen >= rows:
            break
    return digest


def empty_results(det: VAEAnomalyDetector, explain: bool = False) -> pd.DataFrame:
    """The result columns of :func:`score_chunk` with no rows (for an input without rows)."""
    columns = {
        "id": pd.Series(dtype=np.int64),
        "log_likelihood": pd.Series(dtype=np.float64),
        "decision": pd.Series(dtype=np.float64),
        "is_outlier": pd.Series(dtype="boolean"),
        "log_likelihood_std": pd.Series(dtype=np.float64),
        "pareto_k": pd.Series(dtype=np.float64),
    }
    if explain:
        columns["top_features"] = pd.Series(dtype=object)
    return pd.DataFrame(columns)


def _score_file(
    det: VAEAnomalyDetector,
    source: Source,
    output: str | None,
    settings: dict[str, Any],
    chunk_rows: int,
    options: dict[str, Any],
    resume: bool,
    progress: Callable[[int], Any] | None,
    notify: Callable[[str], Any] | None,
    stream: IO[str] | None,
) -> ScoreRun:
    writer = None if output is None else ResumableWriter(output, settings)
    start = skipped = resumed_from = 0
    digest = ""
    if writer is not None:
        if resume and writer.resume():
            start, skipped = writer.rows_done, int(writer.extra.get("skipped", 0))
            digest = _input_prefix_digest(source, chunk_rows, start)
            if digest != writer.extra.get("input_sha256"):
                raise DataError(
                    f"{source} has changed in its first {start} rows since the partial run scored them "
                    "(or the partial output predates this check); run without --resume to start over"
                )
            resumed_from = start
            if notify is not None:
                notify(f"resuming after row {start}")
        else:
            writer.start()
    if progress is not None:
        progress(start)
    try:
        return _score_chunks(det, source, writer, chunk_rows, options, start, skipped, resumed_from, digest, progress,
                             notify, stream)  # fmt: skip
    except BaseException:
        if writer is not None and writer.rows_done == 0:  # nothing a --resume could use: leave nothing behind
            writer.discard()
        raise


def _score_chunks(
    det: VAEAnomalyDetector,
    source: Source,
    writer: ResumableWriter | None,
    chunk_rows: int,
    options: dict[str, Any],
    start: int,
    skipped: int,
    resumed_from: int,
    digest: str,
    progress: Callable[[int], Any] | None,
    notify: Callable[[str], Any] | None,
    stream: IO[str] | None,
) -> ScoreRun:
    """The chunks of :func:`score_file` from row ``start`` on, written by ``writer`` (or to ``stream``)."""
    first = True
    for chunk in iter_chunks(source, chunk_rows, start_row=start):
        if first and hasattr(chunk, "columns"):
            check_columns(det, [str(c) for c in chunk.columns], str(source))
            if options["id_column"] is not None and options["id_column"] not in chunk.columns:
                raise DataError(f"{source} has no column {options['id_column']!r} for --id-column")
            if notify is not None:
                used = set(feature_columns(det) or []) | set(condition_columns(det) or []) | {options["id_column"]}
                ignored = [str(c) for c in chunk.columns if c not in used]
                if ignored:
                    more = f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
                    notify(
                        f"{source}: scoring the model's {len(feature_columns(det) or [])} column(s); ignoring "
                        f"{', '.join(map(repr, ignored[:5]))}{more}"
                    )
        results, bad = score_chunk(det, chunk, row_offset=start, **options)
        skipped += bad
        start += len(chunk)
        digest = chunk_digest(chunk, digest)
        if writer is None:
            results.to_csv(stream, index=False, header=first)
        else:
            writer.write(results, len(chunk), skipped=skipped, input_sha256=digest)
        first = False
        if progress is not None:
            progress(len(chunk))
    if start == 0:  # an input without rows: the result columns and no rows, whatever the format
        empty = empty_results(det, options["explain"])
        if writer is None:
            empty.to_csv(stream, index=False)
        else:
            writer.write(empty, 0, skipped=0, input_sha256=digest)
    if writer is not None:
        writer.finish()
    return ScoreRun(start, skipped, resumed_from)
