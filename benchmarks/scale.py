"""Defaults across data sizes: fit and score time and memory from 100 to 1,000,000 rows.

    python benchmarks/scale.py                 # 100, 10k, 1M rows × 20 columns
    python benchmarks/scale.py --rows 1000 100000

Data: a 3-factor probabilistic-PCA model with σ = 0.3 (the true log-density is known, so
the table also shows how far the held-out mean score is from it). Writes
``benchmarks/results/scale.md``.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vaeguard import VAEAnomalyDetector

REPO = Path(__file__).resolve().parents[1]


def ppca(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    W = np.random.default_rng(0).normal(size=(d, 3))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3)) @ W.T + 0.3 * rng.normal(size=(n, d))
    cov = W @ W.T + 0.09 * np.eye(d)
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("ni,ij,nj->n", X, np.linalg.inv(cov), X)
    return X, -0.5 * (maha + logdet + d * math.log(2 * math.pi))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100, 10_000, 1_000_000])
    ap.add_argument("--columns", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.md")
    args = ap.parse_args()
    X_test, logp_test = ppca(10_000, args.columns, seed=99)
    lines = [
        "# Default settings across data sizes",
        "",
        f"Command: `python benchmarks/scale.py {' '.join(sys.argv[1:])}`  ",
        f"torch {torch.__version__}, CPU ({platform.machine()}, {torch.get_num_threads()} torch threads). "
        f"Data: 3-factor PPCA, {args.columns} columns, σ = 0.3; scores on 10,000 held-out rows.",
        "",
        "| rows | epochs run | batch | fit s | score 10k rows s | rows/s scored "
        "| held-out mean score − true log p (nats) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in args.rows:
        X, _ = ppca(n, args.columns, seed=1)
        det = VAEAnomalyDetector(random_state=0)
        t0 = time.perf_counter()
        det.fit(X)
        t1 = time.perf_counter()
        scores = det.score_samples(X_test)
        t2 = time.perf_counter()
        assert np.all(np.isfinite(scores))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        from vaeguard.estimators import auto_batch_size

        row = (
            f"| {n:,} | {len(det.history_.train_loss)} | {auto_batch_size(n)} | {t1 - t0:.1f} | {t2 - t1:.2f} | "
            f"{len(X_test) / (t2 - t1):,.0f} | {scores.mean() - logp_test.mean():+.2f} | {rss:.0f} |"
        )
        print(row, file=sys.stderr, flush=True)
        lines.append(row)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
