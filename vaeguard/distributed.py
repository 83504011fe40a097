"""Scoring on Dask: the model loaded once per worker, partitions scored with ``map_partitions``.

Needs the ``[dask]`` extra (``pip install "vaeguard[dask]"``). Training stays in one
process (the README says how multi-GPU training will use ``torchrun``/DDP).
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vaeguard.batch import check_columns, score_chunk
from vaeguard.data import DataError, join_parquet_parts, output_lock


def _require_dask() -> Any:
    try:
        import dask.dataframe as dd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError('Dask scoring needs the [dask] extra: pip install "vaeguard[dask]"') from exc
    return dd


@functools.lru_cache(maxsize=4)
def _worker_model(path: str, fingerprint: str, device: str) -> Any:
    """The model, loaded once per worker process (and checked against the fingerprint the client saw)."""
    from vaeguard.persistence import load

    det = load(path, device=device)
    if det.fingerprint_ != fingerprint:
        raise DataError(f"{path!r} changed while it was being used for scoring (SHA-256 differs)")
    return det


def _score_partition(
    part: pd.DataFrame,
    path: str,
    fingerprint: str,
    device: str,
    id_column: str | None,
    n_samples: int | None,
    offsets: list[int] | None,
    partition_info: dict | None = None,
) -> pd.DataFrame:
    det = _worker_model(path, fingerprint, device)
    start = offsets[partition_info["number"]] if offsets is not None and partition_info is not None else 0
    results, _ = score_chunk(det, part, row_offset=start, id_column=id_column, n_samples=n_samples)
    results.index = part.index
    return results


def score_dask(
    model_path: str | os.PathLike[str],
    ddf: Any,
    *,
    id_column: str | None = None,
    n_samples: int | None = None,
    device: str = "cpu",
) -> Any:
    """Scores of a Dask DataFrame: a lazy Dask DataFrame with one row per input row, same index and partitions.

    Columns: ``id`` (the ``id_column``, or the row number in the whole table),
    ``log_likelihood`` (nats), ``decision``, ``is_outlier``. Each worker loads the model
    file once; rows that cannot be scored
    raise an error naming them. A row's score does not depend on its partition, so the
    result equals scoring the whole table in one process.

    Parameters
    ----------
    model_path : str or PathLike
        A model file every worker can read.
    ddf : dask.dataframe.DataFrame
        Rows with (at least) the model's feature columns.
    id_column : str, optional
        Copied to the ``id`` column.
    n_samples : int, optional
        K, the importance samples per row (default: the model's).
    device : str, default="cpu"
        Where each worker scores.
    """
    _require_dask()
    from vaeguard.persistence import load

    path = str(Path(model_path).resolve())
    det = load(path, device="cpu")
    check_columns(det, [str(c) for c in ddf.columns], "the Dask DataFrame")
    meta = pd.DataFrame(
        {
            "log_likelihood": pd.Series(dtype=np.float64),
            "decision": pd.Series(dtype=np.float64),
            "is_outlier": pd.Series(dtype="boolean"),
            "log_likelihood_std": pd.Series(dtype=np.float64),
            "pareto_k": pd.Series(dtype=np.float64),
        }
    )
    offsets = None
    if id_column is None:  # row numbers: each partition starts where the ones before it end
        lengths = ddf.map_partitions(len).compute()
        offsets = [0, *np.cumsum(lengths).tolist()[:-1]]
    id_dtype = ddf[id_column].dtype if id_column is not None else np.int64
    meta.insert(0, "id", pd.Series(dtype=id_dtype))
    return ddf.map_partitions(
        _score_partition,
        path,
        det.fingerprint_,
        device,
        id_column,
        n_samples,
        offsets,
        meta=meta,
        align_dataframes=False,
    )


def score_files(
    model_path: str,
    pattern: str,
    output: str,
    *,
    scheduler: str = "local",
    id_column: str | None = None,
    n_samples: int | None = None,
    n_workers: int | None = None,
    device: str = "cpu",
) -> int:
    """Score CSV or Parquet files matching ``pattern`` on a Dask cluster into one .csv/.parquet ``output``.

    ``scheduler`` is a scheduler address or "local" (a ``LocalCluster``); ``device`` is where
    each worker scores ("auto": CUDA where the worker has it). The output is written to a
    temporary name and renamed when complete. Returns the number of rows.
    """
    dd = _require_dask()
    from dask.distributed import Client, LocalCluster

    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no files match {pattern!r}")
    kinds = {Path(f).suffix.lower() for f in files}
    if kinds <= {".csv"}:
        ddf = dd.read_csv(files, blocksize="64MB")
    elif kinds <= {".parquet", ".pq"}:
        ddf = dd.read_parquet(files)
    else:
        raise DataError(f"--engine dask reads .csv or .parquet files; {pattern!r} matches {', '.join(sorted(kinds))}")
    cluster = (
        LocalCluster(n_workers=n_workers or 2, threads_per_worker=1, dashboard_address=":0")
        if scheduler == "local"
        else None
    )
    try:
        with Client(cluster or scheduler):
            scores = score_dask(model_path, ddf, id_column=id_column, n_samples=n_samples, device=device)
            return _write_dask(scores, output)
    finally:
        if cluster is not None:
            cluster.close()


def _write_dask(scores: Any, output: str) -> int:
    """Write each partition to a part file in a temporary folder, then join them into ``output`` part by part."""
    target = Path(output)
    parts_dir = target.with_name(f".{target.name}.parts")
    with output_lock(target):  # one writer per output, as for local scoring
        shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir()
        try:
            scores.to_parquet(str(parts_dir), write_index=False, name_function=lambda i: f"part-{i:06d}.parquet")
            return join_parquet_parts(sorted(parts_dir.glob("part-*.parquet")), target)
        finally:
            shutil.rmtree(parts_dir, ignore_errors=True)
