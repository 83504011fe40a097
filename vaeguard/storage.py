"""The model file: one HDF5 file with the configuration as JSON, arrays as datasets, a SHA-256.

Layout::

    /                 attrs: format="vaeguard-model", format_version, config (JSON),
                             versions (JSON), sha256 (hex digest)
    /arrays/<name>    one dataset per weight or preprocessing array

The digest covers the configuration JSON and every array's name, dtype, shape and bytes,
so any change to the file is detected. Reading never unpickles and never runs anything
from the file. Writes go to a temporary file in the same folder, renamed at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "vaeguard-model"
FORMAT_VERSION = 1


def fingerprint(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 hex digest over the configuration and the arrays (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import torch

    from vaeguard import __version__

    return {"vaeguard": __version__, "torch": torch.__version__, "numpy": np.__version__}


def _temporary_beside(path: Path) -> str:
    """A new, empty file in ``path``'s folder, created as ``open()`` creates files (mode 0o666 less the umask).

    Unlike ``tempfile.mkstemp`` (owner-only 0o600) the process's umask applies, without
    reading it through ``os.umask``, which would change it for every thread for a moment.
    """
    folder = path.parent or Path(".")
    for _ in range(100):
        tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {str(path)!r}")


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path`` (same folder).

    The file gets the permissions of the one it replaces, or those ``open()`` gives a new
    file (not ``mkstemp``'s owner-only ones).
    """
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_model_file(path: str | os.PathLike[str], config: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """Write a model file atomically; returns its fingerprint (hex SHA-256)."""
    import h5py

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    for name in arrays:
        if "/" in name or not name:
            raise ValueError(f"array name {name!r} cannot be stored (empty or contains '/')")
    digest = fingerprint(config, arrays)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["config"] = json.dumps(config, sort_keys=True)
            f.attrs["versions"] = json.dumps(_versions(), sort_keys=True)
            f.attrs["sha256"] = digest
            group = f.create_group("arrays")
            for name, a in arrays.items():
                group.create_dataset(name, data=a)

    atomic_write(path, write)
    return digest


def read_model_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """Read and verify a model file: ``(config, arrays, fingerprint)``.

    Raises
    ------
    FileNotFoundError
        When there is no such file.
    ValueError
        When the file is not HDF5, is truncated, is not a vaeguard model, has an unknown
        format version, or its contents do not match the stored SHA-256.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {str(path)!r}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{str(path)!r} is not a readable HDF5 file (truncated or not a model file): {exc}") from exc
    try:
        with f:
            if f.attrs.get("format") != FORMAT_NAME:
                raise ValueError(f"{str(path)!r} is an HDF5 file but not a vaeguard model file")
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise ValueError(
                    f"{str(path)!r} has model format version {version}; this vaeguard reads version {FORMAT_VERSION}"
                )
            config = json.loads(f.attrs["config"])
            stored = str(f.attrs["sha256"])
            group = f["arrays"]
            arrays = {name: np.asarray(group[name][()]) for name in group}
    except ValueError:
        raise
    except Exception as exc:  # any h5py/JSON failure inside means a damaged file
        raise ValueError(f"{str(path)!r} is damaged and cannot be read: {exc}") from exc
    digest = fingerprint(config, arrays)
    if digest != stored:
        raise ValueError(
            f"{str(path)!r} failed its integrity check (SHA-256 {digest[:12]}… != stored {stored[:12]}…): "
            "the file was altered or corrupted"
        )
    return config, arrays, digest
