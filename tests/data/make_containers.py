"""Writes the compressed containers that tests/test_compression.py keeps as fixtures, with their model and data.

Run once, by the code whose containers must stay decodable (the commit is in
``containers_written_by.txt``): ``python tests/data/make_containers.py``. Do not rerun after
changing a codec's bitstream: the point of the fixtures is that containers written before a
change still decode to the same data.
"""

import subprocess
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from vaeguard import VAEAnomalyDetector, compress

HERE = Path(__file__).parent


def binary_digits() -> np.ndarray:
    """The first 300 of scikit-learn's 8 × 8 digits, binarised at 8 of 16, as uint8 images."""
    return (load_digits().images[:300] >= 8).astype(np.uint8)


def eight_bit_digits() -> np.ndarray:
    """The first 300 of scikit-learn's digits as 16 × 16 8-bit images (levels × 15, each pixel doubled)."""
    return np.kron(load_digits().images[:300] * 15, np.ones((2, 2))).astype(np.uint8)


def write_container(images: np.ndarray, likelihood: str, name: str, streams: int) -> None:
    """Fit a small MLP model to the first 200 images, save it as ``digits-{name}-0.1.h5``, and write the bits-back
    container of the other 100 on ``streams`` stacks as ``digits-{container}-0.1.vgz``."""
    det = VAEAnomalyDetector(
        encoder="mlp", likelihood=likelihood, hidden_dims=[32], latent_dim=4, epochs=5, random_state=0
    ).fit(images[:200])
    det.save(HERE / f"digits-{name}-0.1.h5")
    data = compress(det, images[200:], codec="bitsback", codec_params={"streams": streams})
    container = "bitsback" if name == "bernoulli" else f"{name}-bitsback"  # the first fixture's name, kept
    (HERE / f"digits-{container}-0.1.vgz").write_bytes(data)


def write_eight_bit_container() -> None:
    """A discretised-logistic model of 16 × 16 8-bit digits and an eight-stack container of 100 of them (added
    when the logistic tables came to be computed in place and a few samples at a time: each step's eight samples
    are two chunks of four, so that change and later ones must decode what the code before wrote; written by
    the commit before it, 776347b)."""
    write_container(eight_bit_digits(), "discretized_logistic", "8bit", streams=8)


def main() -> None:
    write_container(binary_digits(), "bernoulli", "bernoulli", streams=2)
    write_eight_bit_container()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    (HERE / "containers_written_by.txt").write_text(f"vaeguard at commit {commit}\n")


if __name__ == "__main__":
    main()
