"""ADBench's unsupervised protocol over a folder of ``.npz`` files, vaeguard against peers.

For each data set and seed: a stratified 70/30 split, MinMaxScaler fitted on the train
part, every detector fitted on the unlabeled train part, AUROC and average precision on
the test part, fit and score seconds. A failed run becomes a row with its error.

    python benchmarks/adbench.py                                  # the ten shared sets, seeds 0 1 2
    python benchmarks/adbench.py --data-dir DIR --seeds 0 --methods vaeguard pyod_vae

Writes ``adbench.csv``, ``adbench.md`` and ``adbench.png`` (vaeguard against the best peer per
data set) to ``--out`` (default ``benchmarks/results``).
Peers need the ``[bench]`` extra (PyOD).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from results_file import write_results
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import MinMaxScaler

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "adbench"


class Detector:
    """fit(X) and anomaly scores (higher = more anomalous) for one method."""

    def __init__(self, fit: Callable, score: Callable) -> None:
        self.fit, self.score = fit, score


VAEGUARD_PARAMS: dict = {}
#: Experiments only: a Python expression of the training table's shape ``(n, d)`` giving
#: further arguments, e.g. ``"{'latent_dim': 2} if n < 500 else {}"``.
VAEGUARD_PARAMS_BY_SHAPE: list[str] = []


def make_vaeguard(seed: int) -> Detector:
    from vaeguard import VAEAnomalyDetector

    det = VAEAnomalyDetector(**{"random_state": seed, "device": "cpu", **VAEGUARD_PARAMS})

    def fit(X: np.ndarray) -> None:
        for expression in VAEGUARD_PARAMS_BY_SHAPE:
            det.set_params(**eval(expression, {"math": __import__("math")}, {"n": X.shape[0], "d": X.shape[1]}))
        det.fit(X)

    return Detector(fit, lambda X: -det.score_samples(X))


def make_pyod(name: str) -> Callable[[int], Detector]:
    def factory(seed: int) -> Detector:
        if name == "pyod_vae":
            from pyod.models.vae import VAE

            det = VAE(random_state=seed, verbose=0, device="cpu")
        elif name == "pyod_ae":
            from pyod.models.auto_encoder import AutoEncoder

            det = AutoEncoder(random_state=seed, verbose=0, device="cpu")
        elif name == "iforest":
            from pyod.models.iforest import IForest

            det = IForest(random_state=seed)
        elif name == "ecod":
            from pyod.models.ecod import ECOD

            det = ECOD()
        else:
            raise ValueError(name)
        return Detector(det.fit, det.decision_function)

    return factory


def make_gmm(seed: int) -> Detector:
    from sklearn.mixture import GaussianMixture

    det = GaussianMixture(n_components=5, covariance_type="full", random_state=seed)
    return Detector(det.fit, lambda X: -det.score_samples(X))


METHODS: dict[str, Callable[[int], Detector]] = {
    "vaeguard": make_vaeguard,
    "pyod_vae": make_pyod("pyod_vae"),
    "pyod_ae": make_pyod("pyod_ae"),
    "iforest": make_pyod("iforest"),
    "ecod": make_pyod("ecod"),
    "gmm": make_gmm,
}


def run_one(method: str, X_train, X_test, y_test, seed: int) -> dict:
    row: dict = {"method": method}
    try:
        torch.manual_seed(seed)
        det = METHODS[method](seed)
        t0 = time.perf_counter()
        det.fit(X_train)
        t1 = time.perf_counter()
        scores = np.asarray(det.score(X_test), dtype=np.float64)
        t2 = time.perf_counter()
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"{int((~np.isfinite(scores)).sum())} non-finite scores")
        row |= {
            "auroc": roc_auc_score(y_test, scores),
            "ap": average_precision_score(y_test, scores),
            "fit_s": t1 - t0,
            "score_s": t2 - t1,
            "error": "",
        }
    except Exception as exc:
        row |= {
            "auroc": np.nan,
            "ap": np.nan,
            "fit_s": np.nan,
            "score_s": np.nan,
            "error": f"{type(exc).__name__}: {exc}",
        }
        traceback.print_exc(file=sys.stderr)
    return row


#: The fixed split of the nineteen shared sets into two halves, drawn before any of the
#: nine later sets was scored (``numpy.random.default_rng(14).permutation`` of the sorted
#: file stems, the first ten in A). A default is decided on one half and kept only when
#: the other half confirms it (``benchmarks/quality-log.md``).
SPLIT = {
    "A": (
        "22_magic.gamma", "23_mammography", "26_optdigits", "29_Pima", "38_thyroid",
        "39_vertebral", "47_yeast", "5_campaign", "6_cardio", "7_Cardiotocography",
    ),
    "B": (
        "14_glass", "18_Ionosphere", "20_letter", "28_pendigits", "30_satellite",
        "40_vowels", "41_Waveform", "43_WDBC", "4_breastw",
    ),
}  # fmt: skip


#: A result's data set name (the file stem without its number) → its half of :data:`SPLIT`.
HALF_OF_SET = {stem.split("_", 1)[1]: half for half, stems in SPLIT.items() for stem in stems}
#: How the tables label each half's mean.
HALF_LABELS = {"A": "mean, half A (decides)", "B": "mean, half B (confirms)"}


def split_half(stem: str) -> str:
    """``"A"`` or ``"B"`` for a shared set's file stem, ``"-"`` for a set outside the split."""
    return next((half for half, stems in SPLIT.items() if stem in stems), "-")


def dataset_files(data_dir: Path) -> list[Path]:
    """The ``.npz`` files of a folder, in ADBench's numeric order (``4_breastw`` before ``18_Ionosphere``)."""
    return sorted(
        data_dir.glob("*.npz"), key=lambda p: (int(p.name.split("_")[0]) if p.name[0].isdigit() else 0, p.name)
    )


def load_npz(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """``(name, X, y)`` of an ADBench-style file; the name drops the numeric prefix."""
    with np.load(path, allow_pickle=False) as d:
        X, y = np.asarray(d["X"], dtype=np.float64), np.asarray(d["y"]).astype(int)
    return path.stem.split("_", 1)[-1], X, y


def split_and_scale(
    X: np.ndarray, y: np.ndarray, seed: int, train_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ADBench's protocol: stratified 70/30 split, MinMaxScaler fitted on the train part only.

    ``train_rows`` keeps a random subsample (seeded by ``seed``) of that many training rows
    before scaling; the test part is unchanged.
    """
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)
    if train_rows is not None and train_rows < len(X_tr):
        keep = np.random.default_rng(seed).permutation(len(X_tr))[:train_rows]
        X_tr, y_tr = X_tr[keep], y_tr[keep]
    scaler = MinMaxScaler().fit(X_tr)
    return scaler.transform(X_tr), scaler.transform(X_te), y_tr, y_te


#: The protocol's variations (``--anomalies``, ``--train-rows``); the same in every worker.
PROTOCOL: dict = {"anomalies": "real", "train_rows": None}


def protocol_split(X: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X_train, X_test, y_test)`` of one set and seed under :data:`PROTOCOL`.

    ``anomalies`` other than "real" replaces the set by one of ADBench's synthetic
    anomaly types made from its normal rows (:mod:`synthetic_anomalies`, seeded by the
    seed); ``train_rows`` keeps a random subsample of that many training rows (the
    small-sample stress: the test part is unchanged, the scaler is fitted on the rows kept).
    """
    if PROTOCOL["anomalies"] != "real":
        from synthetic_anomalies import synthetic_anomalies

        X, y = synthetic_anomalies(X, y, PROTOCOL["anomalies"], seed)
    X_tr, X_te, _, y_te = split_and_scale(X, y, seed, PROTOCOL["train_rows"])
    return X_tr, X_te, y_te


def run_task(task: tuple[Path, int, list[str]]) -> list[dict]:
    """One data set × seed, every method on the same split (a unit of work for a worker process)."""
    path, seed, methods = task
    name, X, y = load_npz(path)
    X_tr, X_te, y_te = protocol_split(X, y, seed)
    return [{"dataset": name, "seed": seed} | run_one(method, X_tr, X_te, y_te, seed) for method in methods]


def _init_worker(params: dict, by_shape: list[str], protocol: dict, threads: int) -> None:
    VAEGUARD_PARAMS.update(params)
    VAEGUARD_PARAMS_BY_SHAPE[:] = by_shape
    PROTOCOL.update(protocol)
    torch.set_num_threads(threads)


def run(data_dir: Path, seeds: list[int], methods: list[str], jobs: int = 1, sets: str = "all") -> pd.DataFrame:
    """One row per data set × seed × method: AUROC, AP, fit and score seconds, error.

    ``jobs`` > 1 runs that many worker processes with one torch thread each (the rows come
    back in the same order); ``sets`` picks the half of the fixed split (:data:`SPLIT`).
    """
    files = [p for p in dataset_files(data_dir) if sets == "all" or split_half(p.stem) == sets]
    if not files:
        raise SystemExit(f"no .npz files in {data_dir}")
    tasks = [(path, seed, methods) for path in files for seed in seeds]
    total = len(tasks) * len(methods)
    rows: list[dict] = []
    if jobs > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        state = (dict(VAEGUARD_PARAMS), list(VAEGUARD_PARAMS_BY_SHAPE), dict(PROTOCOL), 1)
        pool = ctx.Pool(jobs, initializer=_init_worker, initargs=state)
        results = pool.imap(run_task, tasks)
    else:
        pool, results = None, map(run_task, tasks)
    for row in (row for task_rows in results for row in task_rows):
        rows.append(row)
        print(
            f"[{len(rows)}/{total}] {row['dataset']:14s} seed {row['seed']} {row['method']:9s} "
            f"AUROC {row['auroc']:.4f} fit {row['fit_s']:.1f}s {row['error']}",
            file=sys.stderr,
            flush=True,
        )
    if pool is not None:
        pool.close()
        pool.join()
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, methods: list[str], path: Path) -> Path | None:
    """Bar chart of mean AUROC per data set: vaeguard against the best peer on that set."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'vaeguard[plot]')", file=sys.stderr)
        return None
    per = df.groupby(["dataset", "method"])["auroc"].mean().unstack("method")
    per = per.loc[list(dict.fromkeys(df["dataset"]))]
    peers = [m for m in methods if m != "vaeguard" and m in per]
    if "vaeguard" not in per or not peers:
        return None
    best_peer = per[peers].max(axis=1)
    best_name = per[peers].idxmax(axis=1)
    x = np.arange(len(per))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(per)), 4))
    ax.bar(x - 0.2, per["vaeguard"], 0.4, label=f"vaeguard (mean {per['vaeguard'].mean():.3f})")
    ax.bar(x + 0.2, best_peer, 0.4, label=f"best peer per data set (mean {best_peer.mean():.3f})", color="0.6")
    for i, name in enumerate(best_name):
        ax.text(x[i] + 0.2, best_peer.iloc[i] + 0.01, name, ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x, per.index, rotation=30, ha="right")
    ax.set_ylabel("AUROC (mean over seeds)")
    ax.set_ylim(0, 1.12)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("ADBench unsupervised protocol")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarise(df: pd.DataFrame, methods: list[str]) -> str:
    """The results as markdown: mean AUROC per set and method, the means of each half of :data:`SPLIT`,
    mean AP, total seconds, and vaeguard's standing (per-set wins and losses, seed spread)."""
    per = df.groupby(["dataset", "method"])["auroc"].mean().unstack("method")[methods]
    order = list(dict.fromkeys(df["dataset"]))
    per = per.loc[order]
    half_of = pd.Series(HALF_OF_SET).reindex(per.index).fillna("-")
    rows = [per]
    for half in ("A", "B"):
        if (half_of == half).any() and (half_of != half).any():
            rows.append(per[half_of == half].mean().rename(f"*{HALF_LABELS[half]}*").to_frame().T)
    rows.append(per.mean().rename("**mean**").to_frame().T)
    rows.append(df.groupby("method")["ap"].mean()[methods].rename("mean AP").to_frame().T)
    table = pd.concat(rows)
    times = df.groupby("method")[["fit_s", "score_s"]].sum().sum(axis=1)[methods]
    lines = [
        "| data set | half | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for idx, r in table.iterrows():
        half = half_of.get(idx, "")
        lines.append(f"| {idx} | {half} | " + " | ".join(f"{v:.4f}" for v in r.values) + " |")
    lines.append("| total fit+score s | | " + " | ".join(f"{times[m]:.1f}" for m in methods) + " |")
    peers = [m for m in methods if m != "vaeguard"]
    if "vaeguard" in methods and peers:
        lines += ["", *standing(df, per, half_of, peers)]
    errors = df[df["error"].fillna("") != ""]
    if len(errors):
        lines.append("")
        lines.append(f"{len(errors)} failed runs:")
        lines += [f"- {r.dataset} seed {r.seed} {r.method}: {r.error}" for r in errors.itertuples()]
    return "\n".join(lines)


def standing(df: pd.DataFrame, per: pd.DataFrame, half_of: pd.Series, peers: list[str]) -> list[str]:
    """vaeguard against the best peer (by mean over the sets) overall and per half, per-set wins, seed spread."""
    best = per[peers].mean().idxmax()
    lines = []
    for half, mask in [("all sets", half_of == half_of), ("half A", half_of == "A"), ("half B", half_of == "B")]:
        if mask.any():
            sub = per[mask]
            gap = sub["vaeguard"].mean() - sub[peers].mean().max()
            lines.append(
                f"- {half}: vaeguard {sub['vaeguard'].mean():.4f}, best peer {sub[peers].mean().idxmax()} "
                f"{sub[peers].mean().max():.4f} ({gap:+.4f})"
            )
    wins = per["vaeguard"] - per[best]
    lines.append(
        f"- against {best} per set: {int((wins > 0).sum())} wins, {int((wins < 0).sum())} losses; "
        f"largest loss {wins.idxmin()} {wins.min():+.4f}"
    )
    if "pyod_vae" in peers:
        gap = per["vaeguard"] - per["pyod_vae"]
        lines.append(
            f"- against PyOD VAE: mean {gap.mean():+.4f}; sets more than 0.05 below: "
            + (", ".join(f"{k} {v:+.3f}" for k, v in gap[gap < -0.05].items()) or "none")
        )
    by_seed = df[df.method == "vaeguard"].groupby("seed")["auroc"].mean()
    if len(by_seed) > 1:
        lines.append(
            f"- vaeguard's mean over the sets per seed: {', '.join(f'{v:.4f}' for v in by_seed)} "
            f"(spread {by_seed.max() - by_seed.min():.4f})"
        )
    return lines


#: The README's names of the methods, in its column order.
README_METHODS = {
    "vaeguard": "vaeguard",
    "pyod_vae": "PyOD VAE",
    "pyod_ae": "PyOD AE",
    "iforest": "IForest",
    "ecod": "ECOD",
    "gmm": "GMM (5, full)",
}


def readme_table(df: pd.DataFrame) -> str:
    """The README's results table from a run's rows: mean AUROC per set (3 decimals, the best of each row in bold),
    the sets of half A then of half B by name, each half's mean, the mean over all sets, mean AP and total seconds."""
    methods = [m for m in README_METHODS if m in set(df["method"])]
    ok = df[df["error"].fillna("") == ""] if "error" in df else df
    auroc = ok.groupby(["dataset", "method"])["auroc"].mean().unstack()[methods]
    ap = ok.groupby(["dataset", "method"])["ap"].mean().unstack()[methods]
    seconds = (ok["fit_s"] + ok["score_s"]).groupby(ok["method"]).sum()[methods]

    def row(label: str, which: str, values: list[float]) -> str:
        best = max(round(v, 3) for v in values)
        cells = [f"**{v:.3f}**" if round(v, 3) == best else f"{v:.3f}" for v in values]
        head = f"| {label} | {which} |" if which else f"| {label} | |"
        return head + " " + " | ".join(cells) + " |"

    lines = ["| data set | half | " + " | ".join(README_METHODS[m] for m in methods) + " |"]
    lines.append("|---|---|" + "---|" * len(methods))
    for which, label in HALF_LABELS.items():
        sets = sorted((s for s in auroc.index if HALF_OF_SET.get(s) == which), key=str.lower)
        lines += [row(s, which, auroc.loc[s].tolist()) for s in sets]
        if sets:
            lines.append(row(f"*{label}*", "", auroc.loc[sets].mean().tolist()))
    lines.append(row(f"**mean AUROC, {len(auroc)} sets**", "", auroc.mean().tolist()))
    lines.append(row("mean average precision", "", ap.mean().tolist()))
    lines.append(
        f"| fit + score, {len(ok) // len(methods)} runs (s) | | " + " | ".join(f"{v:.0f}" for v in seconds) + " |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["vaeguard", "pyod_vae", "pyod_ae", "iforest", "ecod", "gmm"],
        choices=list(METHODS),
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--name", default="adbench", help="file stem of the results")
    ap.add_argument("--params", default="{}", help="JSON of VAEAnomalyDetector arguments (experiments only)")
    ap.add_argument(
        "--params-by-shape",
        default=None,
        help="a Python expression of the training shape (n, d) giving more arguments (experiments only)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes, one torch thread each")
    ap.add_argument("--sets", choices=["all", "A", "B"], default="all", help="a half of the fixed split")
    ap.add_argument(
        "--anomalies",
        choices=["real", "local", "clustered", "global", "dependency"],
        default="real",
        help="the sets' own anomalies, or one of ADBench's synthetic types made from their normal rows",
    )
    ap.add_argument("--from-csv", type=Path, default=None, help="summarise an earlier run's CSV without fitting")
    ap.add_argument("--train-rows", type=int, default=None, help="subsample the train part to this many rows")
    ap.add_argument(
        "--readme-table", action="store_true", help="with --from-csv: print the README's results table and stop"
    )
    args = ap.parse_args()
    import json

    VAEGUARD_PARAMS.update(json.loads(args.params))
    PROTOCOL.update(anomalies=args.anomalies, train_rows=args.train_rows)
    if args.params_by_shape:
        VAEGUARD_PARAMS_BY_SHAPE.append(args.params_by_shape)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.from_csv:
        df = pd.read_csv(args.from_csv, dtype={"error": str}, keep_default_na=False, na_values={"auroc": [""]})
        args.methods = [m for m in args.methods if m in set(df["method"])]
        if args.readme_table:
            print(readme_table(df[df["method"].isin(args.methods)]), end="")
            return
    else:
        df = run(args.data_dir, args.seeds, args.methods, args.jobs, args.sets)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.from_csv:
        df.to_csv(args.out / f"{args.name}.csv", index=False)
    import vaeguard

    seeds = sorted(int(s) for s in df["seed"].unique())
    variation = "" if args.anomalies == "real" else f", synthetic **{args.anomalies}** anomalies from the normal rows"
    if args.train_rows:
        variation += f", the train part subsampled to **{args.train_rows} rows**"
    threads = (
        "1 torch thread per worker, " + f"{args.jobs} workers"
        if args.jobs > 1
        else f"{torch.get_num_threads()} torch threads"
    )
    header = (
        f"# ADBench unsupervised protocol: mean AUROC over seeds {seeds}\n\n"
        f"Command: `python benchmarks/adbench.py {' '.join(sys.argv[1:])}`  \n"
        f"vaeguard {vaeguard.__version__}, torch {torch.__version__}, CPU ({platform.machine()}, {threads})"
        + ("" if args.from_csv else f", wall {time.perf_counter() - start:.0f} s")
        + ".\n"
        "Stratified 70/30 split per seed, MinMaxScaler on train, fit on the unlabeled train part, "
        f"AUROC on test{variation}.\n"
        "Halves: the fixed split of the shared sets (`SPLIT` in this script); "
        "defaults are decided on A and confirmed on B.\n\n"
    )
    text = header + summarise(df, args.methods) + "\n"
    write_results(args.out / f"{args.name}.md", text)
    plot(df, args.methods, args.out / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
