"""Torch threads (``n_jobs``) on an idle and on a busy machine: fit and score times (issue 19, section 3).

For each workload and ``n_jobs`` in (1, 2): the time on an idle machine, then with every core
kept busy by other processes (one spinning Python process per CPU, started before and
stopped after each timing). Workloads:

- thyroid fit: the shipped thyroid table (3772 × 6), the default estimator (the demo's fit);
- thyroid score: ``score_samples`` of 75,440 rows (the table 20 times) by that model;
- digits fit: scikit-learn's 8 × 8 digits (1797 images), the default image model, 30 epochs;
- digits score: ``score_samples`` of the 1797 images.

Writes ``benchmarks/results/threads.md``.

    python benchmarks/threads.py
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def busy_machine(on: bool) -> Iterator[None]:
    """Every available CPU kept busy by a spinning process of its own while the block runs (when ``on``)."""
    from vaeguard.detector import available_cpus

    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(available_cpus() if on else 0)
    ]
    try:
        time.sleep(0.5 if on else 0)
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help: what this measures
    from sklearn.datasets import load_digits

    from vaeguard import VAEAnomalyDetector
    from vaeguard.datasets import load_dataset
    from vaeguard.detector import available_cpus

    X, _ = load_dataset("thyroid", return_X_y=True)
    big = np.tile(X, (20, 1))
    digits = load_digits().images
    rows = []
    for jobs in (1, 2):
        for busy in (False, True):
            with busy_machine(busy):
                table = VAEAnomalyDetector(random_state=0, n_jobs=jobs)
                fit_table = timed(lambda t=table: t.fit(X))
                score_table = timed(lambda t=table: t.score_samples(big))
                images = VAEAnomalyDetector(random_state=0, epochs=30, n_jobs=jobs)
                fit_images = timed(lambda m=images: m.fit(digits))
                score_images = timed(lambda m=images: m.score_samples(digits))
            rows.append((jobs, "busy" if busy else "idle", fit_table, score_table, fit_images, score_images))
            print(rows[-1], flush=True)
    lines = [
        "# Torch threads (`n_jobs`) on an idle and a busy machine",
        "",
        f"Command: `python benchmarks/threads.py` ({available_cpus()} CPUs; busy = one spinning Python process per "
        "CPU beside the work). Seconds; lower is better.",
        "",
        "| n_jobs | machine | thyroid fit | thyroid score (75,440 rows) | digits fit (30 epochs) | digits score |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {j} | {m} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} |" for j, m, a, b, c, d in rows]
    by = {(j, m): r[2:] for r in rows for j, m in [r[:2]]}
    ratios = [by[(2, m)][i] / by[(1, m)][i] for m in ("idle", "busy") for i in range(4)]
    lines += [
        "",
        "Two threads against one (time ratio): idle "
        + ", ".join(f"{r:.2f}" for r in ratios[:4])
        + "; busy "
        + ", ".join(f"{r:.2f}" for r in ratios[4:])
        + " (thyroid fit, thyroid score, digits fit, digits score).",
    ]
    out = REPO / "benchmarks" / "results" / "threads.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
