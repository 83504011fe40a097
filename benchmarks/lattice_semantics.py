"""Lattice columns and impossible values (issue 15, part 2), each case of the issue fitted and scored.

    python benchmarks/lattice_semantics.py      # prints the tables, writes
                                                # benchmarks/results/lattice_semantics.md

Part 1 fits small models on 600 rows (a lattice column beside two normal columns) and
scores rows that differ only in the lattice column: impossible values (a negative count,
a half count, a value between ratings, a value off a 0.5 grid) against possible ones.
Part 2 shows the lattice decision (``find_lattice``) for the columns the issue found
unstable. Part 3 scores an 8 × 8 digit (17 levels) with one pixel off the levels.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _fit(column: np.ndarray):
    from vaeguard import VAEAnomalyDetector

    rng = np.random.default_rng(0)
    X = np.column_stack([column, rng.normal(size=len(column)), rng.normal(size=len(column))])
    return VAEAnomalyDetector(random_state=0, epochs=40, n_models=1).fit(X), X


def score_rows(name: str, column: np.ndarray, values: list[float]) -> list[dict]:
    """Scores of rows (value, 0, 0) for each value, against the training rows' scores."""
    det, X = _fit(column)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the impossible values are the point here
        train = det.score_samples(X)
        rows = np.array([[v, 0.0, 0.0] for v in values])
        scores = det.score_samples(rows)
        impossible = det.standardizer_.impossible(rows)[:, 0]
    kind = det.column_types_.iloc[0]
    return [
        {
            "column": name,
            "treated as": f"{kind['kind']}, step {kind['step']:g}"
            + ("" if np.isnan(kind["lower"]) else f", nothing below {kind['lower']:g}")
            + ("" if np.isnan(kind["upper"]) else f" or above {kind['upper']:g}"),
            "value": f"{v:g}",
            "impossible": bool(bad),
            "log p(row) (nats)": f"{s:.1f}",
            "rank among training rows": f"below all {len(train)}" if s < train.min() else f"{(train < s).mean():.0%}",
        }
        for v, s, bad in zip(values, scores, impossible, strict=True)
    ]


def _symmetry_error() -> np.ndarray:
    from sklearn.datasets import load_breast_cancer

    return load_breast_cancer(as_frame=True).data["symmetry error"].to_numpy()


def decision_rows() -> list[dict]:
    from vaeguard.preprocessing import find_lattice

    rng = np.random.default_rng(0)
    ints = rng.integers(0, 500, size=1000).astype(float)
    cases = {
        "counts 0..499 (1000 rows)": ints,
        "the same + one 2000": np.r_[ints, 2000.0],
        "the same + one 3.5": np.r_[ints, 3.5],
        "ratings {1, 3, 5}": rng.choice([1.0, 3.0, 5.0], size=300),
        **{f"N(100, 15) to 0.1, n = {n}": np.round(rng.normal(100, 15, size=n), 1) for n in (20, 200, 2000)},
        "N(100, 15) to 0.01, n = 2000": np.round(rng.normal(100, 15, size=2000), 2),
        "N(100, 15) to 0.1 as float32, n = 2000": np.round(rng.normal(100, 15, size=2000), 1).astype(np.float32),
        "lognormal to 3 significant figures, n = 2000": np.array(
            [float(f"{v:.3g}") for v in rng.lognormal(-3, 0.6, size=2000)]
        ),
        "breast cancer 'symmetry error' (4 significant figures)": _symmetry_error(),
    }
    out = []
    for name, column in cases.items():
        lattice = find_lattice(np.asarray(column, dtype=np.float64))
        out.append({"column": name, "kind": lattice.kind, "step": f"{lattice.step:.6g}", "why": lattice.reason})
    return out


def image_rows() -> list[dict]:
    from sklearn.datasets import load_digits

    from vaeguard import VAEAnomalyDetector

    digits = load_digits().images[:600]
    det = VAEAnomalyDetector(random_state=0, epochs=20).fit(digits)
    odd = digits[:1].copy()
    odd[0, 3, 4] = 16.5
    nearest = odd.copy()
    nearest[0, 3, 4] = 16.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a, b = det.score_samples(odd)[0], det.score_samples(nearest)[0]
    return [
        {"image": "digit 0, pixel (3, 4) = 16 (a level)", "log p (nats)": f"{b:.1f}"},
        {"image": "digit 0, pixel (3, 4) = 16.5 (off the 17 levels)", "log p (nats)": f"{a:.1f}"},
    ]


def table(rows: list[dict]) -> list[str]:
    header = list(rows[0])
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lattice_semantics.md")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    counts = np.minimum(rng.poisson(3, size=600), 20).astype(float)
    counts[0] = 20.0
    scored = [
        *score_rows("counts 0..20", counts, [-1.0, 0.0, 3.0, 20.0, 3.5, 4.0, 2.5]),
        *score_rows("a 0.5 grid", np.round(rng.normal(5, 1, size=600) * 2) / 2, [5.0, 5.2371, 4.75, 5.25]),
        *score_rows("ratings {1, 3, 5}", rng.choice([1.0, 3.0, 5.0], size=600), [5.0, 6.0, 7.0]),
        *score_rows("a flag {0, 1} (20 % ones)", (rng.random(600) < 0.2).astype(float), [0.0, 1.0, 2.0, -1.0, 0.5]),
    ]
    parts = [
        "# Lattice columns and impossible values (issue 15, part 2)\n",
        "Command: `python benchmarks/lattice_semantics.py`. A value off its column's lattice, below 0 in a "
        "lattice column whose training values start at 0, or a third value in a two-valued (binary) column, is "
        "impossible under the model: it is scored as its nearest possible value (halves round up) less 100 nats, "
        "with a warning naming the column.\n",
        "## Scores (a lattice column beside two N(0, 1) columns, 600 rows, 40 epochs; rows (value, 0, 0))\n",
        *table(scored),
        "\n## The lattice decision (`vaeguard.preprocessing.find_lattice`)\n",
        *table(decision_rows()),
        "\n## Images: a pixel off the levels (8 × 8 digits, 17 levels, 600 images, 20 epochs)\n",
        *table(image_rows()),
    ]
    text = "\n".join(parts) + "\n"
    print(text, file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
