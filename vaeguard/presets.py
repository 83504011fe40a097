"""Named estimator presets from ``configs/*.json`` (shipped with the package)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vaeguard.estimators import ESTIMATORS
from vaeguard.resources import shipped_folder


def _config_dir() -> Path:
    return shipped_folder("_configs", "configs")


def list_presets() -> dict[str, str]:
    """Preset names with their one-line descriptions."""
    return {p.stem: json.loads(p.read_text())["description"] for p in sorted(_config_dir().glob("*.json"))}


def load_preset(name: str) -> dict[str, Any]:
    """The preset ``name`` as a dict with ``description``, ``estimator`` and ``params``.

    Raises ``ValueError`` for an unknown preset (listing the known ones) or a preset
    that names an unknown estimator or parameter.
    """
    path = _config_dir() / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    preset = json.loads(path.read_text())
    estimator = preset.get("estimator")
    if estimator not in ESTIMATORS:
        raise ValueError(f"preset {name!r} names an unknown estimator {estimator!r}")
    unknown = set(preset.get("params", {})) - set(ESTIMATORS[estimator]().get_params())
    if unknown:
        raise ValueError(f"preset {name!r} sets unknown parameter(s) of {estimator}: {', '.join(sorted(unknown))}")
    return preset


def make_estimator(name: str, **overrides: Any) -> Any:
    """An unfitted estimator built from preset ``name``; keyword arguments override the preset."""
    preset = load_preset(name)
    return ESTIMATORS[preset["estimator"]](**{**preset.get("params", {}), **overrides})
