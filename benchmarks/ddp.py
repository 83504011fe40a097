"""Training across processes (issue 18, section 1): 1 process against N processes (torch.distributed, gloo on CPU).

A table of ``--rows`` rows × ``--columns`` columns drawn from probabilistic PCA (4 factors, noise σ = 0.3), the
same default detector (``epochs`` fixed so every run trains as long) fitted by one process with all the machine's
torch threads and by ``torchrun --standalone --nproc-per-node N`` with one thread each. Per run: the fit's wall time
(start-up of the ranks included), the training loop's time and training rows per second, the validation loss after
each epoch, the time to reach the validation loss the one-process run ends with, and the held-out mean
log-likelihood (nats/row) next to the true one. Writes ``benchmarks/results/ddp.md``.

    python benchmarks/ddp.py [--rows 1000000] [--columns 20] [--epochs 3] [--procs 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FACTORS, NOISE = 4, 0.3


def ppca_table(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, d) float32, the exact log-density of each row in nats)."""
    rng = np.random.default_rng(1000 + d)
    W, mu = rng.normal(size=(d, FACTORS)), rng.normal(size=d)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, FACTORS)) @ W.T + mu + NOISE * rng.normal(size=(n, d))
    cov = W @ W.T + NOISE**2 * np.eye(d)
    diff = X - mu
    _, logdet = np.linalg.slogdet(cov)
    quad = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    return X.astype(np.float32), -0.5 * (quad + logdet + d * np.log(2 * np.pi))


def worker(args: argparse.Namespace) -> None:
    """One rank (or the one process): fit, and on rank 0 write the figures as JSON."""
    import torch

    from vaeguard import VAEAnomalyDetector
    from vaeguard.ddp import current_group

    X, _ = ppca_table(args.rows, args.columns, seed=1)
    X_test, truth = ppca_table(20_000, args.columns, seed=2)
    started = time.perf_counter()
    det = VAEAnomalyDetector(random_state=0, epochs=args.epochs, device="cpu").fit(X)
    fit_s = time.perf_counter() - started
    group = current_group()
    if group is not None and not group.is_main:
        return
    history = det.history_
    n_train = round(args.rows * (1 - 0.1))  # the validation split is 10 %
    result = {
        "procs": 1 if group is None else group.world_size,
        "threads": torch.get_num_threads(),
        "fit_s": fit_s,
        "train_s": history.epoch_seconds[-1],
        "epoch_seconds": history.epoch_seconds,
        "validation_loss": history.validation_loss,
        "rows_per_s": n_train * len(history.epoch_seconds) / history.epoch_seconds[-1],
        "heldout": float(np.mean(det.score_samples(X_test))),
        "truth": float(np.mean(truth)),
    }
    Path(args.out).write_text(json.dumps(result))


def run(procs: int, args: argparse.Namespace, out: Path) -> dict:
    common = ["--worker", "--rows", str(args.rows), "--columns", str(args.columns), "--epochs", str(args.epochs)]
    script = str(Path(__file__).resolve())
    if procs == 1:
        command = [sys.executable, script, *common, "--out", str(out)]
        env = dict(os.environ)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
        command += [script, *common, "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO)
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def time_to(loss: float, result: dict) -> float | None:
    for seconds, value in zip(result["epoch_seconds"], result["validation_loss"], strict=True):
        if value <= loss:
            return seconds
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--columns", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp.md"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in args.procs:
            results.append(run(procs, args, Path(tmp) / f"p{procs}.json"))
            print(json.dumps(results[-1]), flush=True)
    target = results[0]["validation_loss"][-1]
    lines = [
        "# Training across processes: 1 process against N (torch.distributed, gloo)",
        "",
        f"Command: `python benchmarks/ddp.py --rows {args.rows} --columns {args.columns} --epochs {args.epochs} "
        f"--procs {' '.join(map(str, args.procs))}` on {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), "
        "CPU only. Data: probabilistic PCA (4 factors, σ = 0.3), the default detector with a fixed epoch count. "
        "One process uses every core's torch thread; N processes one thread each. `batch_size` is the global "
        "batch, so every run takes the same optimisation steps (to float rounding).",
        "",
        f"Time to validation loss: the first epoch whose validation loss is ≤ {target:.4f} (what 1 process ends with).",
        "",
        "| processes | threads each | fit wall s (start-up included) | training s | training rows/s "
        "| time to validation loss s | final validation loss | held-out log p(x) | true log p(x) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reached = time_to(target, r)
        lines.append(
            f"| {r['procs']} | {r['threads']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['rows_per_s']:,.0f} "
            f"| {'—' if reached is None else f'{reached:.1f}'} | {r['validation_loss'][-1]:.4f} "
            f"| {r['heldout']:.3f} | {r['truth']:.3f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
