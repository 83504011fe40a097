"""Readers and writers for the command line: CSV, Parquet, HDF5 and NPZ, in chunks, with atomic, resumable output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vaeguard.storage import atomic_write

#: File suffixes per format.
FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".gz": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".npz": "npz",
}


class DataError(ValueError):
    """A problem with a data file that the user can fix; the message names the file (and row, column)."""


@dataclass(frozen=True)
class Source:
    """A data file and, for HDF5 and NPZ, the dataset or array in it (``file.h5:/group/data``, ``file.npz:X``)."""

    path: Path
    key: str | None
    format: str

    @classmethod
    def parse(cls, spec: str | os.PathLike[str], key: str | None = None) -> Source:
        """Read ``spec`` (a path, optionally ``path:key``) and check that the file exists and has a known format."""
        text = str(spec)
        if key is None and ":" in text and not Path(text).exists():
            text, key = text.rsplit(":", 1)
        path = Path(text)
        suffix = path.suffix.lower()
        if suffix not in FORMATS:
            raise DataError(
                f"{text!r}: unknown file type {suffix or '(none)'!r}; use .csv, .parquet, .h5/.hdf5 (with :DATASET) "
                "or .npz (with :ARRAY)"
            )
        if not path.is_file():
            raise DataError(f"{text!r}: no such file")
        if path.stat().st_size == 0:
            raise DataError(f"{text!r} is empty")
        return cls(path, key, FORMATS[suffix])

    def __str__(self) -> str:
        return str(self.path) + (f":{self.key}" if self.key else "")


def _csv_options(source: Source) -> dict[str, Any]:
    return {"sep": "\t" if source.path.name.lower().endswith((".tsv", ".tsv.gz")) else ","}


def _array(source: Source) -> Any:
    """The HDF5 dataset (lazy) or NPZ array of a source."""
    if source.format == "npz":
        try:
            archive = np.load(source.path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{str(source)!r} is not a readable .npz file: {exc}") from exc
        names = list(archive.files)
        key = source.key or (names[0] if len(names) == 1 else None)
        if key not in names:
            raise DataError(
                f"{str(source)!r}: name the array as FILE.npz:ARRAY; arrays in the file: {', '.join(names)}"
            )
        return archive[key]
    import h5py

    try:
        handle = h5py.File(source.path, "r")
    except OSError as exc:
        raise DataError(f"{str(source)!r} is not a readable HDF5 file: {exc}") from exc
    datasets: list[str] = []
    handle.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
    key = source.key or (datasets[0] if len(datasets) == 1 else None)
    if key is None or key.lstrip("/") not in datasets:
        raise DataError(
            f"{str(source)!r}: name the dataset as FILE.h5:/PATH; datasets in the file: {', '.join(datasets) or 'none'}"
        )
    return handle[key]


def _frame_of(block: np.ndarray) -> pd.DataFrame | np.ndarray:
    """A table from a 2-D block (columns x0, x1, ... or the fields of a structured array); images stay arrays."""
    if block.dtype.names:
        return pd.DataFrame({name: block[name] for name in block.dtype.names})
    if block.ndim == 1:
        block = block[:, None]
    if block.ndim == 2:
        return pd.DataFrame(block, columns=[f"x{j}" for j in range(block.shape[1])])
    return np.asarray(block)


def count_rows(source: Source) -> int:
    """Number of data rows (samples) in the source; for CSV a fast count of its lines."""
    if source.format == "parquet":
        return int(_parquet_file(source).metadata.num_rows)
    if source.format in ("hdf5", "npz"):
        return int(_array(source).shape[0])
    if source.path.suffix.lower() == ".gz":
        return sum(len(block) for block in _csv_blocks(source, 1_000_000))
    lines, last = 0, b"\n"
    with open(source.path, "rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return max(0, lines + (last != b"\n") - 1)  # minus the header


def _parquet_file(source: Source) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(source.path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{str(source)!r} is not a valid Parquet file (truncated or damaged?): {exc}") from exc


def iter_chunks(source: Source, chunk_rows: int, start_row: int = 0) -> Iterator[pd.DataFrame | np.ndarray]:
    """Blocks of exactly ``chunk_rows`` rows (the last may be shorter) from row ``start_row`` on.

    Tables come as DataFrames with the file's columns, images (arrays with more than two
    dimensions) as arrays. Memory holds one block at a time (an NPZ array is read whole).
    """
    if source.format in ("hdf5", "npz"):
        array = _array(source)
        for start in range(start_row, array.shape[0], chunk_rows):
            yield _frame_of(np.asarray(array[start : start + chunk_rows]))
        return
    if source.format == "parquet":
        yield from _rechunk(_parquet_batches(source), chunk_rows, start_row)
        return
    yield from _rechunk(_csv_blocks(source, chunk_rows), chunk_rows, start_row)


def _parquet_batches(source: Source) -> Iterator[pd.DataFrame]:
    import pyarrow as pa

    try:
        for batch in _parquet_file(source).iter_batches(batch_size=65536):
            yield batch.to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{str(source)!r} could not be read to the end (truncated or damaged?): {exc}") from exc


def _csv_blocks(source: Source, chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        reader = pd.read_csv(source.path, chunksize=chunk_rows, encoding="utf-8", **_csv_options(source))
        yield from reader
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{str(source)!r} has no columns (an empty CSV file?)") from exc
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{str(source)!r} is not UTF-8 text (bytes {exc.object[exc.start : exc.start + 4]!r} cannot be decoded); "
            "re-encode it as UTF-8"
        ) from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"{str(source)!r} is not a well-formed CSV file: {exc}") from exc


def _rechunk(blocks: Iterator[pd.DataFrame], chunk_rows: int, start_row: int) -> Iterator[pd.DataFrame]:
    """Re-cut a stream of frames into frames of ``chunk_rows`` rows, skipping the first ``start_row`` rows."""
    pending: list[pd.DataFrame] = []
    held = 0
    to_skip = start_row
    for block in blocks:
        if to_skip:
            drop = min(to_skip, len(block))
            block, to_skip = block.iloc[drop:], to_skip - drop
        if not len(block):
            continue
        pending.append(block)
        held += len(block)
        while held >= chunk_rows:
            joined = pd.concat(pending, ignore_index=True)
            yield joined.iloc[:chunk_rows].reset_index(drop=True)
            rest = joined.iloc[chunk_rows:]
            pending, held = [rest], len(rest)
    if held:
        yield pd.concat(pending, ignore_index=True)


def read_all(source: Source, max_rows: int | None = None, seed: int = 0) -> tuple[pd.DataFrame | np.ndarray, int]:
    """The whole source, or a uniform random sample of ``max_rows`` rows of it; returns (data, rows in the file).

    Sampling streams the file (reservoir sampling by random keys), so memory stays
    about ``max_rows`` rows.
    """
    rng = np.random.default_rng(seed)
    if max_rows is None:
        blocks = list(iter_chunks(source, 100_000))
        if not blocks:
            raise DataError(f"{str(source)!r} holds no rows")
        whole = pd.concat(blocks, ignore_index=True) if isinstance(blocks[0], pd.DataFrame) else np.concatenate(blocks)
        return whole, len(whole)
    kept: pd.DataFrame | np.ndarray | None = None
    keys = np.empty(0)
    total = 0
    for block in iter_chunks(source, 100_000):
        total += len(block)
        block_keys = rng.random(len(block))
        kept = block if kept is None else _concat(kept, block)
        keys = np.concatenate([keys, block_keys])
        if len(keys) > max_rows:
            keep = np.sort(np.argpartition(keys, max_rows)[:max_rows])
            kept, keys = _take(kept, keep), keys[keep]
    if kept is None:
        raise DataError(f"{str(source)!r} holds no rows")
    return kept, total


def _concat(a: pd.DataFrame | np.ndarray, b: pd.DataFrame | np.ndarray) -> pd.DataFrame | np.ndarray:
    if isinstance(a, pd.DataFrame):
        return pd.concat([a, b], ignore_index=True)
    return np.concatenate([a, b])


def _take(data: pd.DataFrame | np.ndarray, rows: np.ndarray) -> pd.DataFrame | np.ndarray:
    return data.iloc[rows].reset_index(drop=True) if isinstance(data, pd.DataFrame) else data[rows]


def write_table(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a frame to .csv or .parquet atomically (:func:`vaeguard.storage.atomic_write`)."""
    path = Path(path)
    if _output_format(path) == "parquet":
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def join_parquet_parts(parts: list[Path], path: str | os.PathLike[str]) -> int:
    """Join Parquet part files into one .csv or .parquet at ``path``, one part in memory at a time; the row count.

    The output is written atomically (:func:`vaeguard.storage.atomic_write`).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    kind = _output_format(path)
    if not parts:
        raise DataError("no rows were scored: nothing to write")
    rows = 0

    def join(tmp: str) -> None:
        nonlocal rows
        writer = None
        try:
            for i, part in enumerate(parts):
                table = pq.read_table(part)
                rows += table.num_rows
                if kind == "parquet":
                    writer = writer or pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
                else:
                    table.to_pandas().to_csv(tmp, index=False, header=i == 0, mode="w" if i == 0 else "a")
        finally:
            if writer is not None:
                writer.close()

    atomic_write(path, join)
    return rows


def _output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise DataError(
        f"{str(path)!r}: results are written as CSV (.csv) or Parquet (.parquet, .pq), chosen by the name's "
        f"extension; {suffix or 'no extension'!r} is neither (or '-' for CSV on stdout)"
    )


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on writing ``path`` (a lock file ``PATH.lock`` beside it) for the block.

    A second run writing the same output while the first holds the lock is refused with a
    ``DataError`` at once (no waiting, no interleaved rows). The lock file is removed when the
    block ends; a lock left by a killed run holds no lock and is taken over. Where the system has
    no ``fcntl`` (Windows), the block runs without a lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms CI runs
        yield
        return
    lock = Path(path).with_name(Path(path).name + ".lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(
                f"another run is writing {str(path)!r} (it holds {str(lock)!r}); wait for it to end or choose "
                "another output"
            ) from None
        try:  # the file may have been removed (and another made) by a run that just finished: lock the current one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def chunk_digest(chunk: pd.DataFrame | np.ndarray, previous: str = "") -> str:
    """SHA-256 (hex) chaining ``previous`` with the contents of an input chunk: its column names and values
    (pandas' row hashes) or an array's dtype, shape and bytes. Equal chains mean equal inputs, chunk by chunk."""
    h = hashlib.sha256(previous.encode())
    if isinstance(chunk, pd.DataFrame):
        h.update(json.dumps([str(c) for c in chunk.columns]).encode())
        h.update(pd.util.hash_pandas_object(chunk, index=False).to_numpy().tobytes())
    else:
        a = np.ascontiguousarray(chunk)
        h.update(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())
    return h.hexdigest()


class ResumableWriter:
    """Writes a table chunk by chunk to ``PATH.partial`` and renames it to ``PATH`` when :meth:`finish` is called.

    After each chunk the progress (rows done, bytes written, the run's settings) is saved
    to ``PATH.partial.json``, so a killed run leaves no file under the final name and a
    later run with the same settings can :meth:`resume` after the last complete chunk.
    CSV chunks are appended to one file; Parquet chunks are parts in a folder, joined
    into one file at the end.
    """

    def __init__(self, path: str | os.PathLike[str], settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.format = _output_format(self.path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.state_path = self.path.with_name(self.path.name + ".partial.json")
        self.settings = settings
        self.rows_done = 0
        self.extra: dict[str, Any] = {}
        self._bytes = 0
        self._parts = 0

    def resume(self) -> bool:
        """Continue a run killed part way: True when there was one with the same settings to continue.

        Raises ``DataError`` when the partial output was made with other settings.
        """
        if not self.state_path.is_file() or not self.partial.exists():
            return False
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if state.get("settings") != self.settings:
            changed = sorted(
                k
                for k in set(self.settings) | set(state.get("settings", {}))
                if self.settings.get(k) != state.get("settings", {}).get(k)
            )
            raise DataError(
                f"the partial output {str(self.partial)!r} was made with other settings ({', '.join(changed)}); "
                "run without --resume to start over"
            )
        self.rows_done, self._bytes, self._parts = state["rows_done"], state["bytes"], state["parts"]
        self.extra = state.get("extra", {})
        if self.format == "csv":
            with open(self.partial, "r+b") as handle:  # drop anything written after the last complete chunk
                handle.truncate(self._bytes)
        else:
            for part in self.partial.glob("part-*.parquet"):
                if int(part.stem.split("-")[1]) >= self._parts:
                    part.unlink()
        return True

    def start(self) -> None:
        """Start afresh, discarding any partial output."""
        self.discard()
        if self.format == "parquet":
            self.partial.mkdir(parents=True)
        else:
            self.partial.write_bytes(b"")
        self.rows_done, self._bytes, self._parts, self.extra = 0, 0, 0, {}

    def write(self, frame: pd.DataFrame, rows_read: int, **extra: Any) -> None:
        """Append ``frame`` (the results of ``rows_read`` input rows) and record the progress."""
        if self.format == "csv":
            with open(self.partial, "ab") as handle:
                frame.to_csv(handle, index=False, header=self._bytes == 0)
                handle.flush()
                os.fsync(handle.fileno())
                self._bytes = handle.tell()
        else:
            frame.to_parquet(self.partial / f"part-{self._parts:06d}.parquet", index=False)
            self._parts += 1
        self.rows_done += rows_read
        self.extra.update(extra)
        state = {
            "settings": self.settings,
            "rows_done": self.rows_done,
            "bytes": self._bytes,
            "parts": self._parts,
            "extra": self.extra,
        }
        atomic_write(self.state_path, lambda tmp: Path(tmp).write_text(json.dumps(state)))

    def finish(self) -> None:
        """Move the complete output to its final name."""
        if self.format == "csv":
            os.replace(self.partial, self.path)
        else:
            join_parquet_parts(sorted(self.partial.glob("part-*.parquet")), self.path)
            shutil.rmtree(self.partial)
        self.state_path.unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove the partial output and its progress record."""
        if self.partial.is_dir():
            shutil.rmtree(self.partial)
        else:
            self.partial.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
