"""Named presets from ``configs/*.toml`` (shipped with the package), or any ``.toml`` file."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from vaeguard.resources import shipped_folder

ALLOWED_KEYS = {"description", "estimator", "params"}


def _config_dir() -> Path:
    return shipped_folder("_configs", "configs")


def list_presets() -> dict[str, str]:
    """Preset names with their one-line descriptions."""
    return {p.stem: read_preset(p)["description"] for p in sorted(_config_dir().glob("*.toml"), key=lambda p: p.stem)}


def read_preset(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """A preset as a dict with ``description``, ``estimator`` and ``params``.

    ``name_or_path`` is a shipped preset's name (``"tabular"``) or a path to a ``.toml``
    file. Raises ``ValueError`` for an unknown name (listing the known ones), a file that
    is not valid TOML, or an unknown top-level key (naming the allowed ones).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = _config_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in _config_dir().glob("*.toml")))
            raise ValueError(f"unknown preset {str(name_or_path)!r}; known presets: {known}")
    elif not path.is_file():
        raise FileNotFoundError(f"no preset file at {str(path)!r}")
    try:
        preset = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid TOML: {exc}") from exc
    unknown = set(preset) - ALLOWED_KEYS
    if unknown:
        raise ValueError(
            f"{str(path)!r} has unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(ALLOWED_KEYS))}"
        )
    if not isinstance(preset.get("params", {}), dict):
        raise ValueError(f"{str(path)!r}: 'params' must be a table of constructor arguments")
    return {
        "description": preset.get("description", ""),
        "estimator": preset.get("estimator"),
        "params": preset.get("params", {}),
    }


class PresetMixin:
    """Adds :meth:`from_config` to an estimator: build it from a preset."""

    @classmethod
    def from_config(cls, name_or_path: str | os.PathLike[str], **overrides: Any) -> Any:
        """An unfitted estimator from a preset (``configs/NAME.toml``) or a ``.toml`` file.

        Keyword arguments override the preset. A preset for another estimator, or an
        unknown parameter, is a ``ValueError`` that names it (and lists the allowed ones).

        Examples
        --------
        >>> from vaeguard import VAEAnomalyDetector
        >>> VAEAnomalyDetector.from_config("tabular-fast", random_state=0).epochs
        30
        """
        preset = read_preset(name_or_path)
        if preset["estimator"] not in (None, cls.__name__):
            raise ValueError(f"preset {str(name_or_path)!r} is for {preset['estimator']}, not {cls.__name__}")
        params = {**preset["params"], **overrides}
        allowed = cls().get_params()  # type: ignore[attr-defined]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} in preset {str(name_or_path)!r}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        return cls(**params)
