"""How often the Pareto k̂ diagnostic flags today's score, by latent size (issue 15's k̂-triggered refits).

For each set: ADBench's protocol split (seed 0, 70/30, MinMaxScaler), the default model, and
the share of test rows whose importance weights have k̂ > 0.7 (PSIS: the estimate is not to be
trusted) under ``log_likelihood(return_diagnostic=True)``. There is no exact value to compare
with above two latent dimensions; this measures what a refit triggered by k̂ would cost.

    python benchmarks/pareto_k_share.py [--sets thyroid Pima ...] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import MinMaxScaler

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "adbench"
SETS = ["thyroid", "Pima", "mammography", "cardio", "satellite", "optdigits"]


def main() -> None:
    from vaeguard import VAEAnomalyDetector
    from vaeguard.scoring import PARETO_K_RELIABLE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=SETS)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# Share of rows whose importance weights fail Pareto k̂ (> 0.7), by latent size",
        "",
        "Command: `python benchmarks/pareto_k_share.py` (ADBench split seed 0, default model, K = 64, one thread).",
        "",
        "| data set | latent dim | models | rows k̂ > 0.7: all | normal | anomalies | scoring s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.sets:
        path = next(p for p in sorted(args.data_dir.glob("*.npz")) if p.stem.split("_", 1)[1] == name)
        data = np.load(path)
        X_tr, X_te, _, y_te = train_test_split(data["X"], data["y"], test_size=0.3, stratify=data["y"], random_state=0)
        scaler = MinMaxScaler().fit(X_tr)
        det = VAEAnomalyDetector(random_state=0, device="cpu").fit(scaler.transform(X_tr))
        start = time.perf_counter()
        _, k_hat = det.log_likelihood(scaler.transform(X_te), return_diagnostic=True)
        seconds = time.perf_counter() - start
        flagged = np.asarray(k_hat) > PARETO_K_RELIABLE
        lines.append(
            f"| {name} | {det.latent_dim_} | {len(det.models_)} | {flagged.mean():.1%} | "
            f"{flagged[y_te == 0].mean():.1%} | {flagged[y_te == 1].mean():.1%} | {seconds:.1f} |"
        )
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pareto_k_share.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
