"""Disentanglement on procedural shapes: plain VAE, β-VAE, β-TCVAE and FactorVAE, with the metrics that judge them.

    python benchmarks/disentanglement.py                    # 3 seeds, 10 000 training images
    python benchmarks/disentanglement.py --seeds 0 --n 4000 --epochs 20   # a quick look
    python benchmarks/disentanglement.py --image-size 16 --n 5000 --epochs 30  # what a 2-core CPU affords
    python benchmarks/disentanglement.py --from-csv --image-size 16 --n 5000 --epochs 30  # the summary again
    python benchmarks/disentanglement.py --n 4000 --epochs 20 --name disentanglement-32  # 32×32, results of its own

Data: ``vaeguard.datasets.make_shapes`` (32×32 binary images; factors shape, scale,
rotation, x, y, each uniform), training images from ``random_state=seed``, 5 000
evaluation images from ``random_state=1000 + seed``. Models: the image defaults (conv
networks, Bernoulli pixels) with ``latent_dim=10``, ``trim_fraction=0`` (clean data) and
the regularizer of the row: none; ``beta`` β = 4; ``tc`` β = 6 (minibatch-stratified
estimator); ``factor`` γ = 10.

Metrics on the evaluation images' posterior means: MIG (20 bins), DCI (random forests),
FactorVAE score (800 votes of 64 images, the generator re-rendering fixed factors), active
units; and the price in likelihood: held-out log p(x) (importance sampling, K = 64) and the
reconstruction term E_q[log p(x|z)], nats per image. Writes
``benchmarks/results/disentanglement.md`` and ``disentanglement.csv`` with a traversal
picture per model (seed 0) in ``benchmarks/results/disentanglement/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from results_file import write_results

from vaeguard import VAEAnomalyDetector
from vaeguard.datasets import SHAPES_FACTORS, make_shapes, render_shapes
from vaeguard.metrics import active_units, dci, factor_vae_score, mutual_information_gap
from vaeguard.objectives import elbo
from vaeguard.report import image_grid_figure

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = {
    "VAE": {},
    "β-VAE (β = 4)": {"regularizer": "beta", "regularizer_params": {"beta": 4.0}},
    "β-TCVAE (β = 6)": {"regularizer": "tc", "regularizer_params": {"beta": 6.0}},
    "FactorVAE (γ = 10)": {"regularizer": "factor", "regularizer_params": {"gamma": 10.0}},
}
#: File names of the traversal pictures.
SLUGS = dict(zip(MODELS, ("vae", "beta-vae", "beta-tcvae", "factorvae"), strict=True))
LATENT_DIM = 10
#: Adam's step size of every model here: the results files were measured at 1e-3, the images'
#: default before session 11 (images now default to 3e-3; quality log I11), so it is pinned.
LEARNING_RATE = 1e-3
EVAL_IMAGES = 5000


def reconstruction_term(det: VAEAnomalyDetector, images: np.ndarray, seed: int) -> float:
    """Mean E_q[log p(x|z)] (one draw per image), nats per image."""
    model = det._scoring_model()
    x = det.to_model_space(images).x
    x = x.to(det.device_, next(model.parameters()).dtype)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), 1000):
            xb = x[start : start + 1000]
            eps = torch.randn(1, len(xb), det.latent_dim_, generator=g).to(xb.device, xb.dtype)
            total += float(elbo(model, xb, eps)[1].sum())
    return total / len(x)


def traversal_picture(det: VAEAnomalyDetector, image: np.ndarray, path: Path) -> None:
    """Rows: latent dimensions by KL (largest first); columns: values −2.5..2.5 of that dimension."""
    values = np.linspace(-2.5, 2.5, 9)
    order = [int(d) for d in np.argsort(-np.asarray(det.kl_per_dimension_))]
    rows = np.concatenate([det.traverse(image, d, values) for d in order])
    labels = [f"z{d} {det.kl_per_dimension_[d]:.1f}" for d in order]
    image_grid_figure(rows, len(values), labels).savefig(path, format="png")


def run(seed: int, n: int, epochs: int | str, size: int, results: str = "disentanglement") -> list[dict]:
    train, _ = make_shapes(n, image_size=size, random_state=seed)
    evaluation, factors = make_shapes(EVAL_IMAGES, image_size=size, random_state=1000 + seed)
    rows = []
    for name, params in MODELS.items():
        start = time.perf_counter()
        det = VAEAnomalyDetector(
            latent_dim=LATENT_DIM,
            trim_fraction=0.0,
            epochs=epochs,
            learning_rate=LEARNING_RATE,
            random_state=seed,
            device="cpu",
            **params,
        ).fit(train)
        fit_s = time.perf_counter() - start
        codes = np.asarray(det.transform(evaluation))
        scores = dci(codes, factors, random_state=seed)
        row = {
            "seed": seed,
            "model": name,
            "MIG": mutual_information_gap(codes, factors),
            "FactorVAE score": factor_vae_score(
                det.transform,
                lambda f, rng: render_shapes(f, size),
                list(SHAPES_FACTORS.values()),
                random_state=seed,
            ),
            "DCI disentanglement": scores["disentanglement"],
            "DCI completeness": scores["completeness"],
            "DCI informativeness": scores["informativeness"],
            "active units": active_units(codes),
            "log p(x)": float(np.mean(det.score_samples(evaluation[:2000]))),
            "E_q log p(x|z)": reconstruction_term(det, evaluation[:2000], seed),
            "fit s": fit_s,
        }
        rows.append(row)
        print(
            f"seed {seed} {name}: MIG {row['MIG']:.3f}, FactorVAE {row['FactorVAE score']:.3f}, "
            f"active {row['active units']}, log p {row['log p(x)']:.1f} ({fit_s:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        if seed == 0:
            folder = RESULTS / results
            folder.mkdir(parents=True, exist_ok=True)
            traversal_picture(det, evaluation[0], folder / f"traversal-{SLUGS[name]}.png")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=10_000, help="training images per seed")
    parser.add_argument("--epochs", default="auto", help="'auto' or a number")
    parser.add_argument("--image-size", type=int, default=32, help="canvas side in pixels (≥ 16)")
    parser.add_argument(
        "--name", default="disentanglement", help="results as NAME.md, NAME.csv and pictures in NAME/ (results/)"
    )
    parser.add_argument("--from-csv", action="store_true", help="rewrite the summary from NAME.csv without fitting")
    args = parser.parse_args()
    epochs = args.epochs if args.epochs == "auto" else int(args.epochs)
    if args.from_csv:
        table = pd.read_csv(RESULTS / f"{args.name}.csv")
        args.seeds = sorted(table["seed"].unique())
    else:
        rows = [row for seed in args.seeds for row in run(seed, args.n, epochs, args.image_size, args.name)]
        table = pd.DataFrame(rows)
        table.to_csv(RESULTS / f"{args.name}.csv", index=False)
    summary = table.drop(columns="seed").groupby("model", sort=False).agg(["mean", "std"])
    metric_names = [c for c in table.columns if c not in ("seed", "model")]
    lines = [
        "# Disentanglement on procedural shapes" + (" (mean ± sd over seeds)" if len(args.seeds) > 1 else ""),
        "",
        f"Command: `python benchmarks/disentanglement.py --seeds {' '.join(map(str, args.seeds))} --n {args.n} "
        f"--epochs {args.epochs} --image-size {args.image_size}"
        + ("" if args.name == "disentanglement" else f" --name {args.name}")
        + f"` (CPU, 2 cores). {args.n} training images of "
        f"{args.image_size}×{args.image_size} per seed, {EVAL_IMAGES} "
        f"evaluation images; latent_dim {LATENT_DIM}. log p(x) and E_q log p(x|z) in nats per image on 2000 "
        "evaluation images.",
        "",
        "| model | " + " | ".join(metric_names) + " |",
        "|---|" + "---|" * len(metric_names),
    ]
    for model, stats in summary.iterrows():
        cells = [
            f"{stats[(m, 'mean')]:.3g}" + (f" ± {stats[(m, 'std')]:.2g}" if len(args.seeds) > 1 else "")
            for m in metric_names
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    mig, mig_sd = summary[("MIG", "mean")], summary[("MIG", "std")]
    gap = mig["β-TCVAE (β = 6)"] - mig["VAE"]
    ratio = mig["β-TCVAE (β = 6)"] / max(mig["VAE"], 1e-12)
    per_seed = table.pivot(index="seed", columns="model", values="MIG")[list(MODELS)]
    wins = int((per_seed["β-TCVAE (β = 6)"] > per_seed["VAE"]).sum())
    lines += [
        "",
        f"β-TCVAE's MIG is {ratio:.2f} × the plain VAE's (target ≥ 2).",
        "",
        "MIG per seed:",
        "",
        "| seed | " + " | ".join(MODELS) + " |",
        "|---|" + "---|" * len(MODELS),
        *(f"| {seed} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for seed, row in per_seed.iterrows()),
        "",
        "## Reading",
        "",
        f"- β-TCVAE's MIG is above the VAE's on {wins} of {len(per_seed)} seeds; the seed-to-seed spread of every "
        f"model (sd {mig_sd.min():.2f}–{mig_sd.max():.2f}) is "
        + (
            "as large as the gaps between models, as Locatello et al. (2019) found at scale."
            if mig_sd.max() >= abs(gap)
            else "smaller than the gap between β-TCVAE and the VAE."
        ),
        "- The β-TCVAE penalty does what it says: it lowers the total correlation of the codes (quality log D5: "
        "0.28 → 0.10 nats on a 2-factor table). Low total correlation does not single out the factors' axes, "
        "though: a nonlinear encoder can make a rotated code factorised, so which axes a model finds is left to "
        "the seed and the architecture (D3–D5: longer training and larger batches did not change this).",
        f"- Setting: {args.image_size}×{args.image_size} canvases, {args.n} images, {args.epochs} epochs, about "
        f"{summary[('fit s', 'mean')].median():.0f} s per model fit on 2 CPU cores; the published gaps come from "
        "64×64 dSprites and hundreds of thousands of steps.",
        "",
        "Traversals (seed 0, one evaluation image; rows are latent dimensions by KL, largest first, "
        "with their KL in nats): "
        + ", ".join(f"[{name}]({args.name}/traversal-{SLUGS[name]}.png)" for name in MODELS)
        + ".",
        "",
    ]
    write_results(RESULTS / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
