"""Writes the model files that tests/test_storage.py keeps as fixtures, with the inputs and scores they gave.

Run once, by the code whose files must stay readable (the commit is in ``written_by.txt``):
``python tests/data/make_model_files.py``. Do not rerun after changing the model file
format: the point of the fixtures is that files written before a change still load and
give identical scores.
"""

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from vaeguard import VAEAnomalyDetector, VAETimeSeriesDetector

HERE = Path(__file__).parent
FAST = {"epochs": 3, "hidden_dims": [16], "latent_dim": 2, "n_importance_samples": 8}


def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "length": rng.normal(10, 2, 300),
            "width": rng.normal(0, 1, 300),
            "count": rng.integers(0, 5, 300),
            "colour": rng.choice(["red", "green", "blue"], 300),
        }
    )


def series() -> np.ndarray:
    return np.sin(np.arange(600) / 5) + 0.05 * np.random.default_rng(1).normal(size=600)


def main() -> None:
    frame = table()
    det = VAEAnomalyDetector(**FAST, random_state=0).fit(frame)  # a mixture of 3 (a small table)
    det.save(HERE / "table-0.1.h5")
    ts = VAETimeSeriesDetector(window=16, stride=2, random_state=0, estimator=VAEAnomalyDetector(**FAST)).fit(series())
    ts.save(HERE / "series-0.1.h5")
    np.savez(
        HERE / "model-file-scores-0.1.npz",
        table=np.asarray(det.score_samples(frame.iloc[:50])),
        table_offset=det.offset_,
        series=ts.score_samples(series()[:200]),
    )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    (HERE / "written_by.txt").write_text(f"vaeguard at commit {commit}\n")


if __name__ == "__main__":
    main()
