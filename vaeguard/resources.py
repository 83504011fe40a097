"""Folders that ship with the package: inside an installed wheel, or at the top of a source checkout."""

from __future__ import annotations

from pathlib import Path


def shipped_folder(installed: str, source: str) -> Path:
    """``vaeguard/<installed>`` in a wheel, else ``<checkout>/<source>`` (editable installs)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / installed, here.parent / source):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"vaeguard's {source}/ folder is missing from this installation")
