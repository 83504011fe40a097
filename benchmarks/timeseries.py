"""Time-series anomaly detection on the shared series: vaeguard against a matrix profile and windowed IForest.

    python benchmarks/timeseries.py          # UCR 135, mitdb_ecg, NAB_facility_1 from ../shared/data/timeseries

Each detector is fitted on the series' anomaly-free training part and scores every step of
the whole series. Reported on the steps after the training part: per-step AUROC, and the
UCR archive's rule (a hit when the top-scoring step lies inside a labelled region widened
by max(L, 100) steps on each side, L its length). Peers: the matrix-profile discord score
(``stumpy.stump`` with m = 100 on the whole series; a step's score is the largest over the
windows covering it) and IForest on sliding windows of 100 steps (same spreading).
Writes ``benchmarks/results/timeseries.md``; peers need the ``[bench]`` extra.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from results_file import write_results
from sklearn.metrics import roc_auc_score

from vaeguard.timeseries import VAETimeSeriesDetector

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "timeseries"
#: name → (file, number of anomaly-free training steps)
SERIES = {
    "UCR 135": ("135_UCR_Anomaly_InternalBleeding16_TEST.csv", 1200),
    "mitdb_ecg": ("mitdb_ecg.csv", 5000),
    "NAB_facility_1": ("NAB_facility_1.csv", 1007),
}
M = 100


def spread_max(window_scores: np.ndarray, m: int, n_steps: int) -> np.ndarray:
    """Per-step score: the largest score among the length-m windows covering the step."""
    padded = np.concatenate([np.full(m - 1, -np.inf), window_scores, np.full(m - 1, -np.inf)])
    return sliding_window_view(padded, m).max(axis=1)[:n_steps]


def matrix_profile(values: np.ndarray, train_end: int) -> np.ndarray:
    import stumpy

    profile = stumpy.stump(values[:, 0], M)[:, 0].astype(np.float64)
    return spread_max(profile, M, len(values))


def windowed_iforest(values: np.ndarray, train_end: int) -> np.ndarray:
    from sklearn.ensemble import IsolationForest

    windows = sliding_window_view(values[:, 0], M)
    forest = IsolationForest(random_state=0).fit(windows[: train_end - M + 1])
    return spread_max(-forest.score_samples(windows), M, len(values))


def vaeguard_detector(values: np.ndarray, train_end: int) -> np.ndarray:
    det = VAETimeSeriesDetector(random_state=0).fit(values[:train_end])
    return -np.asarray(det.score_samples(values))  # higher = more anomalous


METHODS = {"vaeguard": vaeguard_detector, "matrix_profile": matrix_profile, "iforest_windows": windowed_iforest}


def regions(labels: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) inclusive of each run of 1s."""
    edges = np.diff(np.r_[0, labels, 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1, strict=True))


def ucr_hit(scores: np.ndarray, labels: np.ndarray, start: int) -> bool:
    """The UCR rule on steps from ``start``: the top step inside a labelled region ± max(L, 100)."""
    top = start + int(np.argmax(scores[start:]))
    return any(a - max(b - a + 1, 100) <= top <= b + max(b - a + 1, 100) for a, b in regions(labels))


def daphnet_false_alarms(data_dir: Path) -> str:
    """Multivariate support, speed and false alarms on Daphnet (9 channels, no labelled anomalies)."""
    table = pd.read_csv(data_dir / "Daphnet_S06R02E0.csv")
    values = table.drop(columns=["timestamp", "is_anomaly"]).to_numpy(dtype=np.float64)
    half = len(values) // 2
    t0 = time.perf_counter()
    det = VAETimeSeriesDetector(random_state=0).fit(values[:half])
    t1 = time.perf_counter()
    flagged = np.asarray(det.predict(values)) == -1
    t2 = time.perf_counter()
    return (
        f"Daphnet_S06R02E0 ({values.shape[1]} channels, {len(values)} steps, no labelled anomalies): fitted on the "
        f"first {half} steps in {t1 - t0:.0f} s (window {det.window_}), scored all steps in {t2 - t1:.1f} s "
        f"({len(values) / (t2 - t1):,.0f} steps/s); at the default threshold (contamination=0.01) "
        f"{flagged[:half].mean():.1%} of the training steps and {flagged[half:].mean():.1%} of the unseen second "
        "half are flagged."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "timeseries.md")
    args = ap.parse_args()
    rows = []
    for name, (filename, train_end) in SERIES.items():
        table = pd.read_csv(args.data_dir / filename)
        labels = table.pop("is_anomaly").to_numpy()
        values = table.drop(columns="timestamp").to_numpy(dtype=np.float64)
        for method in args.methods:
            t0 = time.perf_counter()
            try:
                scores = METHODS[method](values, train_end)
                row = {
                    "series": name,
                    "method": method,
                    "auroc": roc_auc_score(labels[train_end:], scores[train_end:]),
                    "hit": ucr_hit(scores, labels, train_end),
                    "seconds": time.perf_counter() - t0,
                    "error": "",
                }
            except Exception as exc:
                row = {
                    "series": name,
                    "method": method,
                    "auroc": np.nan,
                    "hit": False,
                    "seconds": np.nan,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            rows.append(row)
            print(f"{name:15s} {method:16s} AUROC {row['auroc']:.3f} hit {row['hit']} {row['error']}", file=sys.stderr)
    df = pd.DataFrame(rows)
    auroc = df.pivot(index="series", columns="method", values="auroc")[args.methods].loc[list(SERIES)]
    hits = df.pivot(index="series", columns="method", values="hit")[args.methods].loc[list(SERIES)]
    secs = df.groupby("method")["seconds"].sum()[args.methods]
    lines = [
        "# Time-series anomaly detection: per-step AUROC after the training part, and UCR hits",
        "",
        f"Command: `python benchmarks/timeseries.py {' '.join(sys.argv[1:])}` (CPU, 2 cores).",
        "",
        "| series | " + " | ".join(args.methods) + " |",
        "|---|" + "---|" * len(args.methods),
    ]
    for series in auroc.index:
        cells = [f"{auroc.loc[series, m]:.3f} ({'hit' if hits.loc[series, m] else 'miss'})" for m in args.methods]
        lines.append(f"| {series} | " + " | ".join(cells) + " |")
    lines.append("| seconds (fit + score, all series) | " + " | ".join(f"{secs[m]:.0f}" for m in args.methods) + " |")
    errors = df[df.error != ""]
    lines += [f"- {r.series} {r.method}: {r.error}" for r in errors.itertuples()]
    lines += ["", daphnet_false_alarms(args.data_dir)]
    write_results(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
