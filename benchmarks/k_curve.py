"""AUROC and tightness of the score against K, the number of importance samples.

    python benchmarks/k_curve.py                  # the ten shared sets, seeds 0 1 2

One default model per data set and seed (ADBench protocol as in adbench.py), scored on
the test part with K = 1, 4, 16, 64, 256, 1024. Reports mean AUROC, the mean test
log-likelihood (higher = tighter bound) relative to K = 1024, and scoring time.
Writes ``benchmarks/results/k_curve.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
from adbench import DEFAULT_DATA, REPO, dataset_files, load_npz, split_and_scale
from sklearn.metrics import roc_auc_score

from vaeguard import VAEAnomalyDetector

KS = [1, 4, 16, 64, 256, 1024]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "k_curve.md")
    args = ap.parse_args()
    rows = []
    for path in dataset_files(args.data_dir):
        name, X, y = load_npz(path)
        for seed in args.seeds:
            X_tr, X_te, _, y_te = split_and_scale(X, y, seed)
            det = VAEAnomalyDetector(random_state=seed, device="cpu").fit(X_tr)
            ll = {}
            for k in KS:
                t0 = time.perf_counter()
                ll[k] = det.log_likelihood(X_te, n_samples=k)
                rows.append(
                    {
                        "dataset": name,
                        "seed": seed,
                        "K": k,
                        "auroc": roc_auc_score(y_te, -ll[k]),
                        "score_s_per_1k_rows": 1000 * (time.perf_counter() - t0) / len(X_te),
                        "mean_ll": ll[k].mean(),
                    }
                )
            for r in rows[-len(KS) :]:
                r["gap_to_K1024"] = r["mean_ll"] - ll[KS[-1]].mean()
            print(
                f"{name} seed {seed}: " + " ".join(f"K={r['K']} {r['auroc']:.4f}" for r in rows[-len(KS) :]),
                file=sys.stderr,
                flush=True,
            )
    df = pd.DataFrame(rows)
    per_set = df.groupby(["dataset", "K"])["auroc"].mean().unstack("K")
    per_set = per_set.loc[list(dict.fromkeys(df["dataset"]))]
    summary = df.groupby("K").agg(
        auroc=("auroc", "mean"), gap=("gap_to_K1024", "mean"), ms=("score_s_per_1k_rows", "mean")
    )
    lines = [
        "# AUROC and bound tightness against K (importance samples)",
        "",
        f"Command: `python benchmarks/k_curve.py {' '.join(sys.argv[1:])}` (seeds {args.seeds}; CPU, float64 scoring).",
        "",
        "| K | mean AUROC | mean test log p(x) − value at K=1024 (nats) | score s per 1000 rows |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {r.auroc:.4f} | {r.gap:+.3f} | {r.ms:.3f} |" for k, r in summary.iterrows()]
    lines += [
        "",
        "Per data set (mean AUROC over seeds):",
        "",
        "| data set | " + " | ".join(f"K={k}" for k in KS) + " |",
    ]
    lines.append("|---|" + "---|" * len(KS))
    lines += [f"| {n} | " + " | ".join(f"{v:.4f}" for v in r.values) + " |" for n, r in per_set.iterrows()]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
