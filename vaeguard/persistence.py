"""Model files ↔ detectors: :func:`load` reads a file written by either detector's ``save``.

This module sits above both detectors (it knows them; neither knows it), so the two
detector modules do not import each other. The file format itself (HDF5, JSON config,
SHA-256, the one atomic write) is :mod:`vaeguard.storage`.
"""

from __future__ import annotations

import os
from typing import Any

from vaeguard import storage
from vaeguard.estimators import VAEAnomalyDetector
from vaeguard.plugins import get_part
from vaeguard.timeseries import VAETimeSeriesDetector


def load(path: str | os.PathLike[str], *, device: str = "auto") -> Any:
    """Load a fitted estimator (either kind) from a model file written by ``save``.

    The file is verified against its SHA-256 first; nothing in it is unpickled or
    executed, and parts are looked up among the installed plugins by name (a missing
    plugin is a ``ValueError`` naming it).

    Parameters
    ----------
    path : str or PathLike
    device : str, default="auto"
        Where to put the model.

    Raises
    ------
    ValueError
        For a truncated, altered or foreign file, or a part no installed plugin provides.
    """
    estimators = {"VAEAnomalyDetector": VAEAnomalyDetector, "VAETimeSeriesDetector": VAETimeSeriesDetector}
    config, arrays, digest = storage.read_model_file(path)
    name = config.get("estimator")
    if name not in estimators:
        raise ValueError(f"{str(path)!r} holds an unknown estimator {name!r}; known: {', '.join(estimators)}")
    spec = config.get("window_model", config).get("model", {})
    for kind, key in (("encoders", "encoder"), ("likelihoods", "likelihood")):
        try:
            get_part(kind, spec.get(key))
        except ValueError as exc:
            raise ValueError(
                f"{str(path)!r} needs the {key} {spec.get(key)!r}, which no installed plugin provides "
                f"(install the plugin that registers it): {exc}"
            ) from exc
    try:
        return estimators[name].from_model_file_contents(config, arrays, digest, device)
    except KeyError as exc:
        raise ValueError(f"{str(path)!r} lacks the entry {exc} that a model file must have") from exc
