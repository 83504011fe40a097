"""What the honest score costs: scoring time and accuracy, encoder's proposal against the default.

    python benchmarks/scoring_cost.py            # the ten original shared sets, seeds 0 1 2;
                                                 # writes benchmarks/results/scoring_cost.md

For each set and seed (ADBench's split and scaling, as in ``adbench.py``) the default
detector is fitted once; its test rows are then scored two ways on that same model, each
timed twice in alternation (the faster of the two counts):

- *encoder*: the encoder's q(z|x) as the proposal (vaeguard's score before issue 15);
- *default*: the score as shipped (a widened proposal; rows that the probe flags beyond
  the model's own threshold get a proposal fitted to them, mixed with the encoder's; in
  latent spaces of one or two dimensions those rows and the rows below the model's search
  floor are searched for on a grid).

Accuracy, in latent spaces too large for the exact quadrature of ``likelihood_accuracy.py``:
on up to 100 anomalies and 100 normal test rows, each estimate (K = 64, the first model of
the mixture) is compared with a reference made with K = 2048 draws — the larger of the two
proposals' estimates, as both are stochastic lower bounds that tighten with K.

One torch thread per worker, ``--jobs`` workers (2 by default, the machine's cores).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adbench import DEFAULT_DATA, REPO, load_npz, split_and_scale
from results_file import write_results

TEN = ("Ionosphere", "Pima", "breastw", "cardio", "mammography", "optdigits", "satellite", "thyroid", "vowels", "yeast")
#: Draws of the reference estimate and rows (per class) it is computed on.
REFERENCE_SAMPLES, ACCURACY_ROWS = 2048, 100


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@torch.no_grad()
def _estimate(model, x, eps, proposal) -> np.ndarray:
    from vaeguard.objectives import importance_terms
    from vaeguard.scoring import _proposal_rows

    out = []
    for start in range(0, x.shape[0], 50):
        where = slice(start, start + 50)
        p = None if proposal is None else _proposal_rows(proposal, where)
        logw = importance_terms(model, x[where], eps, proposal=p)[0].double()
        out.append((torch.logsumexp(logw, 0) - math.log(eps.shape[0])).numpy())
    return np.concatenate(out)


def accuracy(det, X: np.ndarray, y: np.ndarray, seed: int) -> dict:
    """Errors (nats) of the two K = 64 estimates against the K = 2048 reference, first model only."""
    from vaeguard import scoring

    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:ACCURACY_ROWS] for c in (1, 0)])
    x = det.to_model_space(X[rows]).x
    model = det._scoring_model(det.model_)
    model.eval()
    widen = 2 * math.log(scoring.PROPOSAL_WIDTH)
    with torch.no_grad():
        mu, logvar = model.encode(x)
    encoder = (mu, logvar)
    default = scoring._fitted_proposals(
        model, x, None, None, det._refine_eps().double(), det._probe_threshold_of(0), None, det._search_floor_of(0)
    )[0]
    eps = scoring.common_random_numbers(det.n_importance_samples, det.latent_dim_, det.score_seed_).double()
    big = scoring.common_random_numbers(REFERENCE_SAMPLES, det.latent_dim_, det.score_seed_ + 7).double()
    reference = np.maximum(_estimate(model, x, big, (mu, logvar + widen)), _estimate(model, x, big, default))
    anomaly = y[rows] == 1
    out = {}
    for name, proposal in (("encoder", encoder), ("default", default)):
        err = _estimate(model, x, eps, proposal) - reference
        out[f"{name}_within_half_nat"] = float(np.mean(np.abs(err) <= 0.5))
        out[f"{name}_anomalies_within_half_nat"] = float(np.mean(np.abs(err[anomaly]) <= 0.5))
        out[f"{name}_worst"] = float(err.min())
    return out


def run_task(task: tuple[Path, int]) -> dict:
    torch.set_num_threads(1)
    from vaeguard import VAEAnomalyDetector

    path, seed = task
    name, X, y = load_npz(path)
    X_tr, X_te, _, y_te = split_and_scale(X, y, seed)
    det = VAEAnomalyDetector(random_state=seed, device="cpu")
    fit_s, _ = _timed(lambda: det.fit(X_tr))
    encoder_s, default_s = [], []
    for _ in range(2):
        det._refine_eps = lambda: None  # the encoder's proposal: scoring before issue 15
        t, encoder_scores = _timed(lambda: det.score_samples(X_te))
        encoder_s.append(t)
        del det._refine_eps
        t, default_scores = _timed(lambda: det.score_samples(X_te))
        default_s.append(t)
    inputs = det.to_model_space(X_te)
    x, mask, c = inputs.x, inputs.mask, inputs.condition
    diagnosed = det._log_likelihood_internal(x, mask, det.n_importance_samples, return_std=True, condition=c)
    from sklearn.metrics import roc_auc_score

    row = {
        "dataset": name,
        "seed": seed,
        "rows": len(X_te),
        "latent_dim": det.latent_dim_,
        "models": len(det._mixture_members()),
        "probe_threshold": float(np.mean(det.probe_thresholds_)) if det.probe_thresholds_ else np.nan,
        "refined_share": float(np.mean(diagnosed.refined)),
        "unreliable_share": float(np.mean(diagnosed.pareto_k > 0.7)),
        "fit_s": fit_s,
        "encoder_score_s": min(encoder_s),
        "default_score_s": min(default_s),
        "encoder_auroc": roc_auc_score(y_te, -encoder_scores),
        "default_auroc": roc_auc_score(y_te, -default_scores),
    }
    return row | accuracy(det, X_te, y_te, seed)


def report(df: pd.DataFrame, command: str, wall: float) -> str:
    import vaeguard

    per_set = df.groupby("dataset", sort=False).agg(
        latent_dim=("latent_dim", "first"),
        threshold=("probe_threshold", "mean"),
        refined=("refined_share", "mean"),
        unreliable=("unreliable_share", "mean"),
        encoder_s=("encoder_score_s", "sum"),
        default_s=("default_score_s", "sum"),
        enc_auroc=("encoder_auroc", "mean"),
        def_auroc=("default_auroc", "mean"),
        enc_acc=("encoder_within_half_nat", "mean"),
        def_acc=("default_within_half_nat", "mean"),
        enc_worst=("encoder_worst", "min"),
        def_worst=("default_worst", "min"),
    )
    lines = [
        "# Scoring cost and accuracy: the encoder's proposal against the default score",
        "",
        f"Command: `{command}`  ",
        f"vaeguard {vaeguard.__version__}, torch {torch.__version__}, {platform.machine()} CPU, "
        f"1 torch thread per worker, wall {wall:.0f} s. Times: test rows only, same fitted model, "
        "best of two alternating runs, summed over seeds.",
        "",
        "| data set | latent | probe threshold (nats) | rows refined | k̂ > 0.7 | encoder s | default s | ratio "
        "| AUROC encoder | AUROC default | within 0.5 nat: encoder | default | worst: encoder | default |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in per_set.iterrows():
        lines.append(
            f"| {name} | {r.latent_dim} | {r.threshold:.2f} | {r.refined:.1%} | {r.unreliable:.1%} "
            f"| {r.encoder_s:.2f} | {r.default_s:.2f} "
            f"| {r.default_s / r.encoder_s:.2f}× | {r.enc_auroc:.4f} | {r.def_auroc:.4f} | {r.enc_acc:.1%} "
            f"| {r.def_acc:.1%} | {r.enc_worst:+.2f} | {r.def_worst:+.2f} |"
        )
    total_e, total_d = df.encoder_score_s.sum(), df.default_score_s.sum()
    lines += [
        f"| **all** | | | {df.refined_share.mean():.1%} | {df.unreliable_share.mean():.1%} "
        f"| {total_e:.2f} | {total_d:.2f} | **{total_d / total_e:.2f}×** "
        f"| {df.encoder_auroc.mean():.4f} | {df.default_auroc.mean():.4f} | {df.encoder_within_half_nat.mean():.1%} "
        f"| {df.default_within_half_nat.mean():.1%} | {df.encoder_worst.min():+.2f} | {df.default_worst.min():+.2f} |",
        "",
        f"Anomalies within 0.5 nat of the reference: encoder {df.encoder_anomalies_within_half_nat.mean():.1%}, "
        f"default {df.default_anomalies_within_half_nat.mean():.1%}. Fit (training, probe calibration, "
        f"threshold) {df.fit_s.sum():.0f} s in all.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sets", nargs="+", default=list(TEN))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scoring_cost.md")
    args = ap.parse_args()
    paths = {load_npz(p)[0]: p for p in sorted(args.data_dir.glob("*.npz"))}
    tasks = [(paths[name], seed) for name in args.sets for seed in args.seeds]
    start = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            rows = list(pool.imap(run_task, tasks))
    else:
        rows = [run_task(t) for t in tasks]
    for row in rows:
        print(
            f"{row['dataset']} seed {row['seed']}: refined {row['refined_share']:.1%}, "
            f"{row['encoder_score_s']:.2f}s -> {row['default_score_s']:.2f}s",
            file=sys.stderr,
        )
    df = pd.DataFrame(rows)
    df.to_csv(args.out.with_suffix(".csv"), index=False)
    text = report(df, "python " + " ".join(["benchmarks/scoring_cost.py", *sys.argv[1:]]), time.perf_counter() - start)
    write_results(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
