"""Model files ↔ detectors: :func:`load` reads a file written by either detector's ``save``.

This module sits above both detectors (it knows them; neither knows it), so the two
detector modules do not import each other. The file format itself (HDF5, JSON config,
SHA-256, the one atomic write) is :mod:`vaeguard.storage`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vaeguard import storage
from vaeguard.estimators import VAEAnomalyDetector
from vaeguard.plugins import get_part
from vaeguard.schema import SchemaError, check_model_file
from vaeguard.timeseries import VAETimeSeriesDetector


def load(
    path: str | os.PathLike[str], *, device: str = "auto", trusted_keys: Sequence[bytes | str] | None = None
) -> Any:
    """Load a fitted estimator (either kind) from a model file written by ``save``.

    Nothing in the file is unpickled or executed, and nothing outside it is read (links,
    external storage and virtual datasets are refused before any data is). The file is
    verified against its SHA-256, its configuration and arrays against the model file's
    schema (:mod:`vaeguard.schema`: types, ranges, known keys, finite numbers, sizes), and
    the network's weights against the network's shapes before it is built. Parts are
    looked up among the installed plugins by name (a missing plugin is a ``ValueError``
    naming it).

    The SHA-256 shows the file is intact, not who wrote it: anyone who edits a file can
    recompute it. For files that travel between machines, sign them
    (``save(path, signing_key=key)``) and load them with ``trusted_keys=[key]``: an
    unsigned file, or one signed with another key, is then refused.

    Parameters
    ----------
    path : str or PathLike
    device : str, default="auto"
        Where to put the model.
    trusted_keys : list of bytes or str, optional
        Accept only files signed (HMAC-SHA256) with one of these keys.

    Raises
    ------
    ValueError
        For a truncated, altered, unsafe or foreign file, one that breaks the schema, a part
        no installed plugin provides, or (with ``trusted_keys``) a missing or wrong
        signature. The message names the file and, for the schema, the field.
    """
    estimators = {"VAEAnomalyDetector": VAEAnomalyDetector, "VAETimeSeriesDetector": VAETimeSeriesDetector}
    config, arrays, digest = storage.read_model_file(path, trusted_keys=trusted_keys)
    try:
        check_model_file(config, arrays, estimators)
    except SchemaError as exc:
        raise ValueError(f"{str(path)!r} is not a valid model file: {exc}") from None
    spec = config.get("window_model", config)["model"]
    for kind, key in (("encoders", "encoder"), ("likelihoods", "likelihood")):
        try:
            get_part(kind, spec[key])
        except ValueError as exc:
            raise ValueError(
                f"{str(path)!r} needs the {key} {spec[key]!r}, which no loaded plugin provides "
                f"(install or enable the plugin that registers it): {exc}"
            ) from exc
    try:
        return estimators[config["estimator"]].from_model_file_contents(config, arrays, digest, device)
    except (ValueError, TypeError) as exc:  # e.g. likelihood options its class does not take
        raise ValueError(f"{str(path)!r} is not a valid model file: {exc}") from exc
