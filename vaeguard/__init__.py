"""vaeguard: variational autoencoders for anomaly detection, compression and representation.

The public face: detectors, :func:`load`, :func:`compress` / :func:`decompress`, and
:data:`hookimpl` for plugin authors.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vaeguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vaeguard.compression import compress, decompress
    from vaeguard.estimators import VAEAnomalyDetector
    from vaeguard.hookspecs import hookimpl
    from vaeguard.persistence import load
    from vaeguard.timeseries import VAETimeSeriesDetector

#: Where each public name lives; imported on first use (PEP 562), so that ``import vaeguard`` and
#: the command line's ``--version`` or ``--help`` do not pay for torch and scikit-learn.
_PUBLIC = {
    "VAEAnomalyDetector": "vaeguard.estimators",
    "VAETimeSeriesDetector": "vaeguard.timeseries",
    "compress": "vaeguard.compression",
    "decompress": "vaeguard.compression",
    "hookimpl": "vaeguard.hookspecs",
    "load": "vaeguard.persistence",
}

__all__ = [
    "VAEAnomalyDetector",
    "VAETimeSeriesDetector",
    "__version__",
    "compress",
    "decompress",
    "hookimpl",
    "load",
]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vaeguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
