"""Wide binary tables (issue 18): time and AUROC of vaeguard against PyOD's VAE and IsolationForest as the number of
columns grows, on synthetic sparse binary data with planted anomalies.

Each table: ``--rows`` rows of ``d`` binary columns from five "topics" (a row switches each column on with its
topic's probability, sparse: most below 5 %); 5 % of the rows are anomalies: rows of their topic with five columns
switched on that the topic rarely uses (among its quarter least used), the same five at every width. A stratified
70/30 split, every detector fitted on the train part (anomalies included) and scored on the test part; fit and score
seconds, test rows scored per second, AUROC. One torch thread.

    python benchmarks/wide_tables.py [--columns 20 200 2000] [--rows 2000] [--methods vaeguard pyod_vae iforest]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from results_file import write_results
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

REPO = Path(__file__).resolve().parents[1]
TOPICS = 5
ANOMALY_SHARE = 0.05
#: Columns an anomaly switches on that its topic rarely uses (the same number at every width).
FLIPS = 5


def sparse_binary_table(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, d) of 0/1, y (n,) with 1 for the planted anomalies)."""
    rng = np.random.default_rng(seed)
    topics = rng.beta(0.2, 6.0, size=(TOPICS, d))  # sparse: most columns rarely on
    labels = rng.integers(0, TOPICS, size=n)
    probabilities = topics[labels]
    y = (rng.random(n) < ANOMALY_SHARE).astype(int)
    X = (rng.random((n, d)) < probabilities).astype(np.float64)
    for i in np.flatnonzero(y):  # a normal row of its topic with FLIPS columns its topic rarely uses switched on
        rare = np.argsort(topics[labels[i]])[: max(FLIPS, d // 4)]
        X[i, rng.choice(rare, FLIPS, replace=False)] = 1.0
    return X, y


def detector(name: str, seed: int):
    if name == "vaeguard":
        from vaeguard import VAEAnomalyDetector

        det = VAEAnomalyDetector(random_state=seed, device="cpu")
        return det.fit, lambda X: -np.asarray(det.score_samples(X))
    if name == "pyod_vae":
        from pyod.models.vae import VAE

        det = VAE(random_state=seed, verbose=0, device="cpu")
        return det.fit, det.decision_function
    if name == "iforest":
        from sklearn.ensemble import IsolationForest

        det = IsolationForest(random_state=seed)
        return det.fit, lambda X: -det.score_samples(X)
    raise ValueError(f"unknown method {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--columns", type=int, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["vaeguard", "pyod_vae", "iforest"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for d in args.columns:
        X, y = sparse_binary_table(args.rows, d, args.seed)
        train, test, _, y_test = train_test_split(X, y, test_size=0.3, stratify=y, random_state=args.seed)
        for method in args.methods:
            fit, score = detector(method, args.seed)
            start = time.perf_counter()
            fit(train)
            fitted = time.perf_counter()
            scores = score(test)
            done = time.perf_counter()
            rows.append(
                (d, method, fitted - start, done - fitted, len(test) / (done - fitted), roc_auc_score(y_test, scores))
            )
            print(f"{d:5d} columns {method:9s} fit {fitted - start:7.1f} s score {done - fitted:7.1f} s "
                  f"AUROC {rows[-1][-1]:.3f}", flush=True)  # fmt: skip
    lines = [
        "# Wide binary tables: time and AUROC by the number of columns",
        "",
        f"Command: `python benchmarks/wide_tables.py --columns {' '.join(map(str, args.columns))} --rows {args.rows}` "
        f"(synthetic sparse binary tables, {TOPICS} topics, {ANOMALY_SHARE:.0%} planted anomalies of {FLIPS} rare "
        "columns switched on; 70/30 split; "
        "CPU, one torch thread).",
        "",
        "| columns | method | fit s | score s | test rows/s | AUROC |",
        "|---|---|---|---|---|---|",
        *(f"| {d} | {m} | {f:.1f} | {s:.1f} | {r:.0f} | {a:.3f} |" for d, m, f, s, r, a in rows),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out / "wide_tables.md", "\n".join(lines))


if __name__ == "__main__":
    main()
