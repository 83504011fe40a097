"""``compress`` / ``decompress``: data through a fitted model's codec into a small self-describing container.

The container is a documented binary layout, kept small because it is paid for by every file::

    b"VGZ2"                       magic and format version 2
    uint32, little-endian          length of the header
    header                         compact UTF-8 JSON: codec, codec_params, n_samples, kind
                                   ("array" or "frame"), shape, dtype, columns (frames), info
                                   (what the codec reports, e.g. its initial bits)
    32 bytes                       SHA-256 fingerprint of the model (its model file's digest)
    32 bytes                       SHA-256 of the original data (:func:`data_digest`)
    32 bytes                       SHA-256 of the container: every byte before it, and the payload
    payload                        the codec's bytes

Any damage (a flipped bit, a truncation, an edited header), whatever the codec, is caught
by the container's SHA-256 before anything is decoded; a lossless codec's output is also
checked against the data's SHA-256. The header is checked field by field (one line naming
the field) and may not declare more decoded data than this machine's memory holds.
Version 1 containers (``VGZ1``: a uint16 header length, no container SHA-256) still decode.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vaeguard import storage
from vaeguard.parts import declares
from vaeguard.plugins import build_part

if TYPE_CHECKING:  # for type hints only: this module reaches the estimator lazily
    from vaeguard.estimators import VAEAnomalyDetector

MAGIC = b"VGZ2"
#: Containers of format version 1 (uint16 header length, no container SHA-256): still read.
MAGIC_V1 = b"VGZ1"


def _estimator(model: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        from vaeguard.persistence import load

        model = load(model, device="cpu")
    if not hasattr(model, "model_"):
        raise ValueError("model must be a fitted vaeguard estimator or the path of a model file")
    if getattr(model, "condition_encoder_", None) is not None:
        raise ValueError("the codecs do not take conditions: a conditional model (conditional=True) cannot compress")
    return model


def model_fingerprint(det: VAEAnomalyDetector) -> str:
    """The SHA-256 of the estimator's model file (computed the same way for a model not saved yet)."""
    return det.fingerprint_ or storage.fingerprint(*det.model_file_contents())


def data_digest(X: Any) -> str:
    """SHA-256 of data in a canonical form: an array's dtype, shape and bytes, or a DataFrame's CSV text."""
    h = hashlib.sha256()
    if isinstance(X, pd.DataFrame):
        h.update(b"frame\0" + X.to_csv(index=False).encode())
    else:
        a = np.ascontiguousarray(X)
        h.update(f"array\0{a.dtype.str}\0{a.shape}\0".encode() + a.tobytes())
    return h.hexdigest()


def _with_progress(codec: Any, progress: Callable[[int], None] | None) -> dict[str, Any]:
    """``{"progress": progress}`` for a codec that declares ``reports_progress`` (the keyword is optional)."""
    if progress is None or not declares(codec, "reports_progress"):
        return {}
    return {"progress": progress}


def compress(
    model: Any,
    X: Any,
    codec: str = "bitsback",
    codec_params: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> bytes:
    """Compress ``X`` with a fitted model; returns the container's bytes.

    Parameters
    ----------
    model : estimator or str or PathLike
        A fitted :class:`~vaeguard.VAEAnomalyDetector` or the path of its model file.
    X : array-like, DataFrame or images
        Data like the model's training data, without missing values.
    codec : str, default="bitsback"
        A registered codec (``vaeguard plugins`` lists them).
    codec_params : dict, optional
        The codec's settings, e.g. ``{"latent_bits": 10}``.
    progress : callable, optional
        Called with the number of samples coded since its last call (e.g. a tqdm bar's
        ``update``), by codecs that report progress (both built-in ones do).

    Returns
    -------
    bytes
        Decompress with :func:`decompress` and the same model.
    """
    det = _estimator(model)
    coder = build_part("codecs", codec, codec_params, "parameters")
    inputs = det.to_model_space(X)
    x, mask = inputs.x, inputs.mask
    if coder.lossless and inputs.impossible is not None:
        row, col = (int(i) for i in np.argwhere(inputs.impossible)[0])
        raise ValueError(
            f"row {row}, element {col} holds a value the model gives no probability (off its lattice, levels or "
            "support): lossless coding would change it; refit with discrete_columns that cover it"
        )
    if mask is not None:
        row = int(np.flatnonzero(~mask.reshape(len(mask), -1).numpy().all(axis=1))[0])
        raise ValueError(f"row {row} has missing values; only complete data can be compressed")
    unseen = det.input_space_.unseen_constants(inputs)
    if unseen is not None:  # a column left out of the networks comes back as its one training value
        row, col = (int(i) for i in np.argwhere(unseen)[0])
        value = inputs.values.reshape(len(inputs), -1)[row, col]
        if np.isnan(value):
            raise ValueError(f"row {row} has missing values; only complete data can be compressed")
        if coder.lossless:
            raise ValueError(
                f"row {row}, column {det.input_space_.column_name(col)} holds {value:g}, but the column held one "
                "value in every training row and the model gives it back as that value: lossless coding would "
                "change it; refit on data where the column varies"
            )
    payload, info = coder.encode(det.coding_model(), x, **_with_progress(coder, progress))
    frame = isinstance(X, pd.DataFrame)
    original = X if frame else np.asarray(X)
    header = {
        "codec": codec,
        "codec_params": coder.params(),
        "n_samples": int(x.shape[0]),
        "kind": "frame" if frame else "array",
        "shape": list(original.shape),
        "info": info,
    }
    if frame:
        header["columns"] = [str(c) for c in X.columns]
    else:
        header["dtype"] = original.dtype.str
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    front = MAGIC + struct.pack("<I", len(encoded)) + encoded
    front += bytes.fromhex(model_fingerprint(det)) + bytes.fromhex(data_digest(original))
    return front + hashlib.sha256(front + payload).digest() + payload


#: Header entries every container has, and those of an array's and a frame's.
HEADER_KEYS = {"codec", "codec_params", "n_samples", "kind", "shape", "info"}
HEADER_KEYS_BY_KIND = {"array": {"dtype"}, "frame": {"columns"}}


def _check_header(header: Any) -> dict[str, Any]:
    """The header's fields, each of the right type and consistent with the others; else one ``ValueError``."""

    def bad(field: str, problem: str) -> ValueError:
        return ValueError(f"the compressed file's header is invalid: {field} {problem}")

    if not isinstance(header, dict):
        raise bad("the header", "is not a JSON object")
    kind = header.get("kind")
    if "kind" not in header:
        raise bad("'kind'", "is missing")
    if not isinstance(kind, str) or kind not in HEADER_KEYS_BY_KIND:
        raise bad("'kind'", f"must be 'array' or 'frame', got {kind!r}")
    expected = HEADER_KEYS | HEADER_KEYS_BY_KIND[kind]
    for key in sorted(expected - set(header)):
        raise bad(f"{key!r}", "is missing")
    for key in sorted(set(header) - expected):
        raise bad(f"{key!r}", "is not a known entry")
    if not isinstance(header["codec"], str):
        raise bad("'codec'", "must be text")
    for key in ("codec_params", "info"):
        if not isinstance(header[key], dict):
            raise bad(f"{key!r}", "must be a JSON object")
    n = header["n_samples"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise bad("'n_samples'", f"must be a whole number ≥ 0, got {n!r}")
    shape = header["shape"]
    whole = isinstance(shape, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape)
    if not whole or not shape:
        raise bad("'shape'", f"must be a list of whole numbers ≥ 0, got {shape!r}")
    if shape[0] != n:
        raise bad("'shape'", f"{shape} does not start with n_samples = {n}")
    if kind == "frame":
        columns = header["columns"]
        if not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
            raise bad("'columns'", "must be a list of names")
        if len(shape) != 2 or len(columns) != shape[1]:
            raise bad("'columns'", f"name {len(columns)} columns but the shape is {shape}")
    else:
        try:
            dtype = np.dtype(header["dtype"])
        except TypeError:
            dtype = np.dtype(object)
        if dtype.kind not in "biuf":
            raise bad("'dtype'", f"must be a numeric dtype, got {header['dtype']!r}")
    return header


def read_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header, payload)`` of a container; the header gains ``model_sha256`` and ``data_sha256`` (hex).

    Checks the container's SHA-256 (format 2) and the header's fields. Raises ``ValueError``
    for data that is not a vaeguard container, is truncated or altered, or whose header is invalid.
    """
    if len(data) < 6 or data[:4] not in (MAGIC, MAGIC_V1):
        raise ValueError("not a vaeguard compressed file (it does not start with VGZ2 or VGZ1)")
    version1 = data[:4] == MAGIC_V1
    start = 6 if version1 else 8
    if len(data) < start:
        raise ValueError("the compressed file is truncated or altered")
    (length,) = struct.unpack("<H" if version1 else "<I", data[4:start])
    end = start + length
    digests = 64 if version1 else 96
    if len(data) < end + digests:
        raise ValueError("the compressed file is truncated or altered")
    if not version1:
        stored = data[end + 64 : end + 96]
        if hashlib.sha256(data[: end + 64] + data[end + 96 :]).digest() != stored:
            raise ValueError("the compressed file is truncated or altered: its SHA-256 does not match its contents")
    try:
        header = json.loads(data[start:end].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError("the compressed file's header is truncated or altered") from exc
    header = _check_header(header)
    header["model_sha256"] = data[end : end + 32].hex()
    header["data_sha256"] = data[end + 32 : end + 64].hex()
    return header, data[end + digests :]


def _memory_bytes() -> int | None:
    """This machine's physical memory in bytes, where the system says it (None elsewhere)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def decompress(model: Any, data: bytes, progress: Callable[[int], None] | None = None) -> Any:
    """The data that :func:`compress` compressed, given the same model: an array or DataFrame as it was.

    ``progress``, if given, is called with the number of samples decoded since its last call
    (by codecs that report progress, as for :func:`compress`).

    Raises ``ValueError`` when the data was compressed with another model (naming both
    fingerprints), or is truncated, altered or not a vaeguard container.
    """
    det = _estimator(model)
    header, payload = read_header(data)
    mine = model_fingerprint(det)
    if header["model_sha256"] != mine:
        raise ValueError(
            f"this data was compressed with the model {header['model_sha256'][:12]}…, not with this one "
            f"({mine[:12]}…); decompress it with the model file that compressed it"
        )
    n = header["n_samples"]
    decoded = n * math.prod(det.coding_model().network.likelihood.event_shape) * 8  # float64 model-space values
    memory = _memory_bytes()
    if memory is not None and decoded > memory:
        raise ValueError(
            f"the compressed file declares {n} samples ({decoded / 2**30:.1f} GiB decoded), more than this "
            f"machine's memory ({memory / 2**30:.1f} GiB): it is altered, or meant for a larger machine"
        )
    coder = build_part("codecs", header["codec"], header["codec_params"], "parameters")
    try:
        x = coder.decode(det.coding_model(), payload, int(header["n_samples"]), **_with_progress(coder, progress))
    except (ValueError, RuntimeError, OverflowError, IndexError) as exc:
        raise ValueError(f"the compressed data is truncated or altered: it could not be decoded ({exc})") from exc
    out = det.from_model_space(x.numpy())
    if header["kind"] == "frame":
        out = out if isinstance(out, pd.DataFrame) else pd.DataFrame(out)
        out.columns = header["columns"]
    else:
        out = np.asarray(out).reshape(header["shape"]).astype(np.dtype(header["dtype"]), copy=False)
    if coder.lossless and data_digest(out) != header["data_sha256"]:
        raise ValueError("the compressed data is truncated or altered: it decodes to data with another SHA-256")
    return out
