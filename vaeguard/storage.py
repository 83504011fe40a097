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
import hmac
import json
import math
import os
import secrets
from collections.abc import Sequence
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


def write_model_file(
    path: str | os.PathLike[str],
    config: dict[str, Any],
    arrays: dict[str, np.ndarray],
    signing_key: bytes | str | None = None,
) -> str:
    """Write a model file atomically; returns its fingerprint (hex SHA-256).

    With ``signing_key`` the file also carries its signature (:func:`signature_of`), which
    ``read_model_file(path, trusted_keys=[key])`` checks.
    """
    import h5py

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    for name in arrays:
        if "/" in name or not name:
            raise ValueError(f"array name {name!r} cannot be stored (empty or contains '/')")
    digest = fingerprint(config, arrays)
    signature = None if signing_key is None else signature_of(digest, signing_key)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["config"] = json.dumps(config, sort_keys=True)
            f.attrs["versions"] = json.dumps(_versions(), sort_keys=True)
            f.attrs["sha256"] = digest
            if signature is not None:
                f.attrs[SIGNATURE_ATTRIBUTE] = signature
            group = f.create_group("arrays")
            for name, a in arrays.items():
                group.create_dataset(name, data=a)

    atomic_write(path, write)
    return digest


#: The file attribute holding the optional signature (hex HMAC-SHA256 of the fingerprint).
SIGNATURE_ATTRIBUTE = "hmac_sha256"
#: The shortest signing key accepted, in bytes (a secret shorter than this can be guessed).
MIN_KEY_BYTES = 16


def _key_bytes(key: bytes | str) -> bytes:
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_KEY_BYTES:
        raise ValueError(f"a signing key must be at least {MIN_KEY_BYTES} bytes (e.g. secrets.token_hex(32))")
    return raw


def signature_of(digest: str, key: bytes | str) -> str:
    """The signature of a model file with fingerprint ``digest``: hex HMAC-SHA256 under ``key`` (``hmac``).

    It proves that someone holding ``key`` wrote (or approved) exactly these contents; the
    plain SHA-256 only shows the file is intact, as anyone who edits a file can recompute it.
    """
    return hmac.new(_key_bytes(key), f"{FORMAT_NAME}\0{digest}".encode(), hashlib.sha256).hexdigest()


def _check_signature(path: Path, digest: str, signature: str | None, trusted_keys: Sequence[bytes | str]) -> None:
    if isinstance(trusted_keys, (str, bytes)):
        trusted_keys = [trusted_keys]
    keys = list(trusted_keys)
    if not keys:
        raise ValueError("trusted_keys is empty: give at least one key, or None to skip the signature check")
    if signature is None:
        raise ValueError(f"{str(path)!r} is not signed, and only files signed by a trusted key are accepted")
    if not any(hmac.compare_digest(signature_of(digest, key), signature) for key in keys):
        raise ValueError(f"{str(path)!r} is not signed by any of the trusted keys")


#: The most arrays a model file may hold (a mixture of 64 models of a deep network holds a few thousand).
MAX_ARRAYS = 20_000
#: The most dimensions an array of a model file may have.
MAX_ARRAY_DIMS = 8


def _refuse(path: Path, what: str) -> ValueError:
    return ValueError(f"{str(path)!r} is not a safe model file: {what}")


def _checked_datasets(path: Path, f: Any) -> dict[str, Any]:
    """The datasets under ``/arrays``, each checked before any of its data is read.

    Only hard links to datasets stored in the file itself are accepted: no soft or external
    links, no external storage, no virtual datasets, no filters (the writer uses none),
    numeric dtypes only, and storage as large as the data it declares, so that reading
    them needs no more memory than the file's own size (a small file cannot declare a
    huge array).
    """
    import h5py

    file_size = path.stat().st_size
    for name in f:
        if name != "arrays":
            raise _refuse(path, f"unexpected entry {name!r} at the top level (only 'arrays' belongs there)")
    link = f.get("arrays", getlink=True)
    if link is None:
        raise _refuse(path, "it has no 'arrays' group")
    if not isinstance(link, h5py.HardLink) or not isinstance(f["arrays"], h5py.Group):
        raise _refuse(path, "'arrays' is a link or not a group")
    group = f["arrays"]
    names = list(group)
    if len(names) > MAX_ARRAYS:
        raise _refuse(path, f"it holds {len(names)} arrays; at most {MAX_ARRAYS} are allowed")
    datasets, total = {}, 0
    for name in names:
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            kind = type(link).__name__.replace("Link", " link").lower()
            kind = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
            where = "to another place or file; only data stored in the file itself is read"
            raise _refuse(path, f"array {name!r} is {kind} ({where})")
        ds = group[name]
        if not isinstance(ds, h5py.Dataset):
            raise _refuse(path, f"'arrays/{name}' is not a dataset")
        plist = ds.id.get_create_plist()
        if ds.is_virtual or plist.get_layout() == h5py.h5d.VIRTUAL:
            raise _refuse(path, f"array {name!r} is a virtual dataset (its data lives in other files)")
        if plist.get_external_count() > 0:
            raise _refuse(path, f"array {name!r} keeps its data in external files")
        if plist.get_layout() not in (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
            raise _refuse(path, f"array {name!r} has an unknown storage layout")
        if plist.get_nfilters() > 0:
            raise _refuse(path, f"array {name!r} is filtered (compressed); model files store arrays plainly")
        dtype = ds.dtype
        if dtype.names is not None or dtype.kind not in "biuf" or dtype.itemsize > 16:
            raise _refuse(path, f"array {name!r} has dtype {dtype}; model files hold numbers only")
        if ds.ndim > MAX_ARRAY_DIMS:
            raise _refuse(path, f"array {name!r} has {ds.ndim} dimensions; at most {MAX_ARRAY_DIMS} are allowed")
        nbytes = math.prod(ds.shape) * dtype.itemsize
        if nbytes and ds.id.get_storage_size() < nbytes:
            raise _refuse(
                path,
                f"array {name!r} declares {nbytes} bytes but stores {ds.id.get_storage_size()}: "
                "the file does not hold the data it describes",
            )
        total += nbytes
        if total > file_size:
            raise _refuse(path, f"its arrays declare more bytes than the file holds ({file_size})")
        datasets[name] = ds
    return datasets


def read_model_file(
    path: str | os.PathLike[str], trusted_keys: Sequence[bytes | str] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """Read and verify a model file: ``(config, arrays, fingerprint)``.

    Nothing outside the file is read: links, external storage and virtual datasets are
    refused before any data is, and every array's declared size is checked against the
    storage it has (memory stays within the file's size). Then the SHA-256 is checked,
    and with ``trusted_keys`` the file's signature (:func:`signature_of`): a file not signed
    by one of them is refused.

    Raises
    ------
    FileNotFoundError
        When there is no such file.
    ValueError
        When the file is not HDF5, is truncated, is not a vaeguard model, has an unknown
        format version, reaches outside itself, declares more data than it holds, its
        contents do not match the stored SHA-256, or (with ``trusted_keys``) it is not signed
        by a trusted key. The message names the file.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a regular file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{str(path)!r} is not a readable HDF5 file (truncated or not a model file): {exc}") from exc
    try:
        with f:
            if f.attrs.get("format") != FORMAT_NAME:
                raise ValueError(f"{str(path)!r} is an HDF5 file but not a vaeguard model file")
            version = f.attrs.get("format_version", -1)
            if not isinstance(version, (int, np.integer)) or int(version) != FORMAT_VERSION:
                raise ValueError(
                    f"{str(path)!r} has model format version {version!r}; this vaeguard reads version {FORMAT_VERSION}"
                )
            text, stored = f.attrs.get("config"), f.attrs.get("sha256")
            if not isinstance(text, str) or not isinstance(stored, str):
                raise ValueError(f"{str(path)!r} lacks its configuration or its SHA-256 (or they are not text)")
            try:
                config = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r}: its configuration is not valid JSON ({exc})") from exc
            datasets = _checked_datasets(path, f)
            arrays = {name: np.asarray(ds[()]) for name, ds in datasets.items()}
            signature = f.attrs.get(SIGNATURE_ATTRIBUTE)
    except ValueError:
        raise
    except Exception as exc:  # any h5py failure inside means a damaged file
        raise ValueError(f"{str(path)!r} is damaged and cannot be read: {exc}") from exc
    digest = fingerprint(config, arrays)
    if digest != stored:
        raise ValueError(
            f"{str(path)!r} failed its integrity check (SHA-256 {digest[:12]}… != stored {stored[:12]}…): "
            "the file was altered or corrupted"
        )
    if trusted_keys is not None:
        _check_signature(path, digest, signature if isinstance(signature, str) else None, trusted_keys)
    return config, arrays, digest
