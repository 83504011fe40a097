"""Peak memory of scoring (issue 18): resident memory while scoring against after loading the model and the input.

Two default models are fitted once (an 8 × 8 digits model on one class of scikit-learn's
digits, a 20-column table model on probabilistic-PCA rows) and saved; then, for each size, a
fresh process loads the model file, builds the input (digits repeated; PCA rows), reads its
resident set size (RSS), scores with ``score_samples`` and reads its peak RSS
(``VmHWM``). Target: peak ≤ 2 × the RSS before scoring. Writes
``benchmarks/results/scoring_memory.md``.

    python benchmarks/scoring_memory.py [--images 1000 10000 100000] [--rows 10000 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from results_file import write_results

REPO = Path(__file__).resolve().parents[1]
TARGET = 2.0


def table_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(100)
    W, mu = rng.normal(size=(20, 3)), rng.normal(size=20)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)) @ W.T + mu + 0.3 * rng.normal(size=(n, 20))


def digit_images(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    images = load_digits().images
    return np.concatenate([images] * (n // len(images) + 1))[:n]


def fit_models(folder: Path) -> None:
    from sklearn.datasets import load_digits

    from vaeguard import VAEAnomalyDetector

    digits = load_digits()
    VAEAnomalyDetector(random_state=0, device="cpu").fit(digits.images[digits.target == 3]).save(folder / "images.h5")
    VAEAnomalyDetector(random_state=0, device="cpu").fit(table_rows(5000, 1)).save(folder / "table.h5")


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB. Not ``ru_maxrss``: a child started by fork and exec
    inherits its parent's maximum in it, so a parent's fit would show up as the child's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(kind: str, n: int, folder: Path) -> dict:
    """In this (fresh) process: load, build the input, score; the RSS figures in MB."""
    import time

    from vaeguard import load

    def rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    det = load(folder / f"{kind}.h5", device="cpu")
    X = digit_images(n) if kind == "images" else table_rows(n, 2)
    before = rss_mb()
    started = time.perf_counter()
    scores = det.score_samples(X)
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    assert np.isfinite(scores).all()
    return {"kind": kind, "n": n, "before_mb": before, "peak_mb": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--rows", type=int, nargs="*", default=[10000, 100000])
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # KIND N FOLDER: one measurement
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scoring_memory.md"))
    args = parser.parse_args()
    if args.measure:
        kind, n, folder = args.measure
        print(json.dumps(measure(kind, int(n), Path(folder))))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        fit_models(Path(tmp))
        for kind, sizes in (("images", args.images), ("table", args.rows)):
            for n in sizes:
                done = subprocess.run(
                    [sys.executable, __file__, "--measure", kind, str(n), tmp],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(results[-1], flush=True)
    lines = [
        "# Peak memory of scoring: resident memory while scoring against before it",
        "",
        f"Command: `python benchmarks/scoring_memory.py` on {platform.machine()}, CPU, {os.cpu_count()} cores. Each "
        "size in a fresh process: load the model file, build the input, RSS (before); `score_samples`; peak RSS "
        f"(`VmHWM`). Target: peak ≤ {TARGET:g} × before. Images: default model of one digit class (8 × 8, "
        'discretized logistic; the MLP, as `encoder="auto"` picks below 16 × 16); '
        "table: default model of 20-column probabilistic-PCA rows. K = 64.",
        "",
        "| input | size | RSS before MB | peak MB | peak / before | scoring s | per s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r["peak_mb"] / r["before_mb"]
        lines.append(
            f"| {r['kind']} | {r['n']:,} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | "
            f"{ratio:.2f}{'' if ratio <= TARGET else ' (over)'} | {r['seconds']:.1f} | {r['n'] / r['seconds']:,.0f} |"
        )
    write_results(Path(args.out), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
