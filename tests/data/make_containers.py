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


def main() -> None:
    images = binary_digits()
    det = VAEAnomalyDetector(
        encoder="mlp", likelihood="bernoulli", hidden_dims=[32], latent_dim=4, epochs=5, random_state=0
    ).fit(images[:200])
    det.save(HERE / "digits-bernoulli-0.1.h5")
    data = compress(det, images[200:], codec="bitsback", codec_params={"streams": 2})
    (HERE / "digits-bitsback-0.1.vgz").write_bytes(data)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    (HERE / "containers_written_by.txt").write_text(f"vaeguard at commit {commit}\n")


if __name__ == "__main__":
    main()
