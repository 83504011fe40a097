"""vaeguard: variational autoencoders for anomaly detection, compression and representation.

The public face: detectors, :func:`load`, :func:`compress` / :func:`decompress`, and
:data:`hookimpl` for plugin authors.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vaeguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from vaeguard.compression import compress, decompress
from vaeguard.estimators import VAEAnomalyDetector
from vaeguard.hookspecs import hookimpl
from vaeguard.persistence import load
from vaeguard.timeseries import VAETimeSeriesDetector

__all__ = [
    "VAEAnomalyDetector",
    "VAETimeSeriesDetector",
    "__version__",
    "compress",
    "decompress",
    "hookimpl",
    "load",
]
