"""``compress`` / ``decompress``: data through a fitted model's codec into a small self-describing container.

The container is a documented binary layout, kept small because it is paid for by every file::

    b"VGZ1"                       magic and format version 1
    uint16, little-endian          length of the header
    header                         compact UTF-8 JSON: codec, codec_params, n_samples, kind
                                   ("array" or "frame"), shape, dtype, columns (frames), info
                                   (what the codec reports, e.g. its initial bits)
    32 bytes                       SHA-256 fingerprint of the model (its model file's digest)
    32 bytes                       SHA-256 of the original data (:func:`data_digest`)
    payload                        the codec's bytes

A damaged or truncated payload is caught when it does not decode to data with the
recorded SHA-256 (the bitsback decoder also checks that its stack ends where it began).
"""

from __future__ import annotations

import hashlib
import json
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

MAGIC = b"VGZ1"


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
        The codec's settings, e.g. ``{"latent_bits": 12}``.
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
    digests = bytes.fromhex(model_fingerprint(det)) + bytes.fromhex(data_digest(original))
    return MAGIC + struct.pack("<H", len(encoded)) + encoded + digests + payload


def read_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header, payload)`` of a container; the header gains ``model_sha256`` and ``data_sha256`` (hex).

    Raises ``ValueError`` for data that is not a vaeguard container or whose header is cut.
    """
    if len(data) < 6 or data[:4] != MAGIC:
        raise ValueError("not a vaeguard compressed file (it does not start with VGZ1)")
    (length,) = struct.unpack("<H", data[4:6])
    end = 6 + length
    try:
        header = json.loads(data[6:end].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError("the compressed file's header is truncated or altered") from exc
    if len(data) < end + 64 or not isinstance(header, dict) or "codec" not in header:
        raise ValueError("the compressed file is truncated or altered")
    header["model_sha256"] = data[end : end + 32].hex()
    header["data_sha256"] = data[end + 32 : end + 64].hex()
    return header, data[end + 64 :]


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
