"""One-class anomaly detection on scikit-learn's digits: vaeguard on images against PyOD's VAE and IForest.

    python benchmarks/images.py                       # 8×8 digits (levels 0..16), seeds 0 1 2
    python benchmarks/images.py --size 32 --seeds 0   # digits upscaled to 32×32 uint8 images

Protocol (per class c = 0..9 and seed s): permute the 1797 images with
``default_rng(c)``; the first 70 % are the training pool and the rest the test set. Each
detector is fitted on the pool's images of digit c and scores every test image; AUROC
with the other digits as the anomalies. The mean over the ten classes is reported per
seed (the seed goes to the detectors; the split depends only on c).

vaeguard gets the images as they are ((n, 8, 8) float levels 0..16, or (n, 32, 32) uint8)
and scores them by log p(x) in nats with its defaults; the peers get flattened pixels.
``--size 32`` upsamples each digit bilinearly to 32×32 and rounds to uint8 0..255, a
larger image check of the same defaults (no download needed).
Writes ``images.md`` and ``images.csv`` (or ``images-32.*``) to ``benchmarks/results``.
Peers need the ``[bench]`` extra (PyOD).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from results_file import write_results
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
TRAIN_SHARE = 0.7


def one_class_split(images: np.ndarray, labels: np.ndarray, digit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training images of ``digit`` from the pool, all test images, test anomaly labels 1 = other digit)."""
    order = np.random.default_rng(digit).permutation(len(images))
    cut = int(TRAIN_SHARE * len(images))
    pool, test = order[:cut], order[cut:]
    train = pool[labels[pool] == digit]
    return images[train], images[test], (labels[test] != digit).astype(int)


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    """Digits (levels 0..16) resized bilinearly to size × size and rounded to uint8 0..255."""
    tensor = torch.from_numpy(images[:, None] * (255.0 / 16.0))
    big = torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return big[:, 0].round().clamp(0, 255).numpy().astype(np.uint8)


def vaeguard_scores(train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    from vaeguard import VAEAnomalyDetector

    det = VAEAnomalyDetector(random_state=seed, device="cpu").fit(train)
    return -np.asarray(det.score_samples(test))


def pyod_scores(name: str) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
    def run(train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
        flat_train, flat_test = train.reshape(len(train), -1).astype(float), test.reshape(len(test), -1).astype(float)
        if name == "pyod_vae":
            from pyod.models.vae import VAE

            det = VAE(random_state=seed, verbose=0, device="cpu")
        else:
            from pyod.models.iforest import IForest

            det = IForest(random_state=seed)
        return det.fit(flat_train).decision_function(flat_test)

    return run


METHODS = {"vaeguard": vaeguard_scores, "pyod_vae": pyod_scores("pyod_vae"), "iforest": pyod_scores("iforest")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=8, help="image side: 8 (as shipped) or larger (upsampled uint8)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    digits = load_digits()
    images = digits.images if args.size == 8 else upscale(digits.images, args.size)
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            for digit in range(10):
                train, test, anomalous = one_class_split(images, digits.target, digit)
                t0 = time.perf_counter()
                scores = METHODS[method](train, test, seed)
                rows.append(
                    {
                        "seed": seed,
                        "method": method,
                        "digit": digit,
                        "auroc": roc_auc_score(anomalous, scores),
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(f"seed {seed} {method:9s} digit {digit} AUROC {rows[-1]['auroc']:.4f}", file=sys.stderr)
    df = pd.DataFrame(rows)
    stem = "images" if args.size == 8 else f"images-{args.size}"
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / f"{stem}.csv", index=False)
    text = report(df, args.size, " ".join(sys.argv[1:]))
    write_results(args.out / f"{stem}.md", text)
    print(text)


def report(df: pd.DataFrame, size: int, arguments: str) -> str:
    """The markdown table of a run: mean AUROC per seed and method, seconds, and AUROC per digit."""
    methods = list(dict.fromkeys(df["method"]))
    seeds = sorted(df["seed"].unique())
    per_digit = df.groupby(["digit", "method"])["auroc"].mean().unstack()[methods]
    per_seed = df.groupby(["seed", "method"])["auroc"].mean().unstack()[methods]
    seconds = df.groupby("method")["seconds"].sum()[methods] / len(seeds)
    means = per_seed.mean()
    command = f"python benchmarks/images.py {arguments}".strip()
    kind = "8×8, float64 levels 0..16" if size == 8 else f"{size}×{size} uint8, upsampled"

    def row(label: str, values: pd.Series, fmt: str = "{:.4f}", best: bool = True) -> str:
        top = values.max()
        cells = [f"**{fmt.format(v)}**" if best and v == top else fmt.format(v) for v in values]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [
        f"# One-class digits ({kind}): AUROC, mean over the ten digits",
        "",
        f"Command: `{command}` (CPU, 2 cores). Seeds {', '.join(map(str, seeds))}; "
        "split by `default_rng(digit)`, first 70 % the training pool; vaeguard with its defaults.",
        "",
        "| | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    lines += [row(f"seed {s}", per_seed.loc[s]) for s in seeds]
    lines.append(row("**mean**", means))
    lines.append(row("seconds per seed (fit + score, ten digits)", seconds, "{:.0f}", best=False))
    lines += ["", "Per digit (mean over seeds):", "", "| digit | " + " | ".join(methods) + " |"]
    lines.append("|---|" + "---|" * len(methods))
    lines += [row(str(d), per_digit.loc[d]) for d in range(10)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
