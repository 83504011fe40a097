"""Scoring time of the default detector, this version against another one (issue 15's budget: scoring at most
2x as long as before issue 15 on the ten first ADBench sets).

    python benchmarks/scoring_time.py --csv /tmp/now.csv                 # the vaeguard on sys.path
    git worktree add /tmp/before 36dd24a                                 # the last commit before issue 15's score
    (cd /tmp/before && VAEGUARD_LOAD_PLUGINS= PYTHONPATH=. python "$OLDPWD/benchmarks/scoring_time.py" \\
        --csv /tmp/before.csv)                                           # (installed plugins may not load there)
    python benchmarks/scoring_time.py --compare /tmp/before.csv /tmp/now.csv   # writes results/scoring_time.md

For each set and seed: ADBench's split and scaling (as in ``adbench.py``), the default detector fitted
on the train part, its test rows scored three times, the fastest counting; one torch thread. Each
version scores its own fitted models: what is compared is what a user of each version waits for.
``scoring_cost.py`` instead compares the two proposals on the same model within one version.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adbench import DEFAULT_DATA, REPO, load_npz, protocol_split
from results_file import write_results
from scoring_cost import TEN

REPEATS = 3


def measure(data_dir: Path, sets: list[str], seeds: list[int]) -> pd.DataFrame:
    """Fit and score every set and seed with the vaeguard on ``sys.path``: one row each."""
    import vaeguard
    from vaeguard import VAEAnomalyDetector

    rows = []
    for name in sets:
        _, X, y = load_npz(next(data_dir.glob(f"*_{name}.npz")))
        for seed in seeds:
            X_train, X_test, _ = protocol_split(X, y, seed)
            t0 = time.perf_counter()
            det = VAEAnomalyDetector(random_state=seed, device="cpu", verbose=0).fit(X_train)
            fit_s = time.perf_counter() - t0
            det.score_samples(X_test[:20])  # first-call costs (lazy imports) are not scoring
            times = []
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                det.score_samples(X_test)
                times.append(time.perf_counter() - t0)
            rows.append(
                {"dataset": name, "seed": seed, "rows": len(X_test), "fit_s": fit_s, "score_s": min(times),
                 "vaeguard": str(Path(vaeguard.__file__).resolve().parents[1])}
            )  # fmt: skip
            print(f"{name:12s} seed {seed} score {min(times):.3f} s (fit {fit_s:.1f} s)", flush=True)
    return pd.DataFrame(rows)


def compare(before: pd.DataFrame, now: pd.DataFrame, names: tuple[str, str]) -> list[str]:
    """Markdown: per set the summed scoring time of each version over the seeds both have, and the ratio."""
    both = before.merge(now, on=["dataset", "seed"], suffixes=("_before", "_now"))
    per = both.groupby("dataset", sort=False)[["score_s_before", "score_s_now"]].sum()
    lines = [
        f"| data set | {names[0]} s | {names[1]} s | ratio |",
        "|---|---|---|---|",
    ]
    for name, r in per.iterrows():
        lines.append(
            f"| {name} | {r.score_s_before:.2f} | {r.score_s_now:.2f} | {r.score_s_now / r.score_s_before:.2f}× |"
        )
    total = per.sum()
    lines.append(
        f"| **all** | {total.score_s_before:.2f} | {total.score_s_now:.2f} | "
        f"**{total.score_s_now / total.score_s_before:.2f}×** |"
    )
    lines += [
        "",
        f"Seeds {sorted(int(s) for s in both.seed.unique())}; fastest of {REPEATS} scorings of each set's test rows.",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sets", nargs="+", default=list(TEN))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--csv", type=Path, help="measure the vaeguard on sys.path; write its times here")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "NOW"), help="two CSVs of --csv runs")
    ap.add_argument("--names", nargs=2, default=["before issue 15 (36dd24a)", "now"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scoring_time.md")
    args = ap.parse_args()
    if args.compare:
        lines = [
            "# Scoring time: the default score now against the score before issue 15",
            "",
            "Command: `python benchmarks/scoring_time.py` (see its docstring: one `--csv` run per version, then "
            "`--compare`)  ",
            f"torch {torch.__version__}, {platform.machine()} CPU, one torch thread per process.",
            "",
            *compare(*(pd.read_csv(p) for p in args.compare), tuple(args.names)),
        ]
        write_results(args.out, "\n".join(lines))
        print("\n".join(lines))
        return
    if args.csv is None:
        ap.error("give --csv (measure) or --compare (summarise)")
    torch.set_num_threads(1)
    np.seterr(all="ignore")
    measure(args.data_dir, args.sets, args.seeds).to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
