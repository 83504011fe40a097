"""Data that used to disable detection silently (issue 15, part 3), each case fitted and checked.

    python benchmarks/awkward_data.py            # prints one line per case, writes
                                                 # benchmarks/results/awkward_data.md

Each case fits a small model on 400 rows of three normal columns with the awkward column
in place of the second, plants one row 50 standard deviations out in that column, and
reports the threshold, whether the planted row is flagged and how many training rows are.
The time-series cases fit a constant series, then score it with and without one spike.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def table_case(name: str, column: np.ndarray, outlier: float) -> dict:
    """Fit on three columns with ``column`` second; score a row with ``outlier`` in that column."""
    from vaeguard import VAEAnomalyDetector

    X = np.random.default_rng(0).normal(size=(len(column), 3))
    X[:, 1] = column
    det = VAEAnomalyDetector(random_state=0, epochs=20, n_models=1).fit(X)
    planted = X[:1].copy()
    planted[0, 1] = outlier
    return {
        "case": name,
        "offset_ (nats)": f"{det.offset_:.2f}",
        "planted row flagged": bool(det.predict(planted)[0] == -1),
        "training rows flagged": f"{(det.predict(X) == -1).mean():.1%}",
        "note": "",
    }


def stray_text_case() -> dict:
    """One 'n/a' among 400 numbers in a text column: numeric with a missing cell, new numbers scored."""
    from vaeguard import VAEAnomalyDetector

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"a": rng.normal(size=400), "b": rng.normal(size=400).astype(object), "c": rng.normal(size=400)}
    )
    frame.loc[17, "b"] = "n/a"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        det = VAEAnomalyDetector(random_state=0, epochs=20, n_models=1).fit(frame)
    planted = pd.DataFrame({"a": [0.0], "b": [50.0], "c": [0.0]})
    said = [str(w.message) for w in caught if "not numbers" in str(w.message)]
    return {
        "case": "text column of numbers with one 'n/a'",
        "offset_ (nats)": f"{det.offset_:.2f}",
        "planted row flagged": bool(det.predict(planted)[0] == -1),
        "training rows flagged": f"{(det.predict(frame) == -1).mean():.1%}",
        "note": ("numeric; " + said[0]) if said else "no warning",
    }


def constant_series_case() -> dict:
    from vaeguard import VAEAnomalyDetector, VAETimeSeriesDetector

    flat = np.full(300, 3.0)
    det = VAETimeSeriesDetector(random_state=0, estimator=VAEAnomalyDetector(**{"epochs": 5})).fit(flat)
    spiked = flat.copy()
    spiked[150] = 4.0
    labels = det.predict(spiked)
    return {
        "case": "constant time series (300 steps), one spike at step 150",
        "offset_ (nats)": f"{det.offset_:.2f}",
        "planted row flagged": bool(labels[150] == -1),
        "training rows flagged": f"{(det.predict(flat) == -1).mean():.1%}",
        "note": f"{int((labels == -1).sum())} steps flagged with the spike (its windows; window {det.window_})",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "awkward_data.md")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    noise = rng.normal(size=400)
    rows = [
        table_case("a column near 1e200", 1e200 * (1 + 0.1 * noise), 1e200 * 6.0),
        table_case("a column near 1e154", 1e154 * (1 + 0.1 * noise), 1e154 * 6.0),
        table_case("a column of scale 1e-13", 1e-13 * noise, 50e-13),
        table_case("a column of scale 1e-300", 1e-300 * noise, 50e-300),
        table_case("ordinary (reference)", noise, 50.0),
        stray_text_case(),
        constant_series_case(),
    ]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows]
    for row in rows:
        print(" | ".join(str(v) for v in row.values()), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Awkward data (issue 15, part 3)\n\n"
        "Command: `python benchmarks/awkward_data.py`. Three normal columns, the awkward one second, 400 rows, "
        "20 epochs, one model; the planted row is 50 σ out in the awkward column.\n\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
