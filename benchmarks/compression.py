"""Lossless compression: vaeguard's bitsback codec against general-purpose compressors, in bits per dimension.

    python benchmarks/compression.py

Data (held-out parts only are compressed):
- binarised digits (pixel ≥ 8 of 16) and 17-level digits (0..16): scikit-learn's digits
  permuted with ``default_rng(0)``; the first 1400 images train the model, the other 397
  are compressed;
- a categorical table: ADBench's breastw (9 columns with values 1..10, 683 rows; the
  shared copy), permuted with ``default_rng(0)``, 70 % train, 30 % compressed.

vaeguard: the defaults (images: conv networks, ``bernoulli`` / ``discretized_logistic``;
the table with ``likelihood="categorical"``), ``bitsback`` with ``latent_bits=12``.
Reported: its net size, its size with the initial bits, the model's −ELBO (K = 256) and
−log₂ p(x) (importance sampling, K = 1000) on the same data, and gzip -9, bz2 -9,
lzma/xz -9, zstd -19 on the raw bytes (binarised images: ``np.packbits``; others one byte
per value), plus PNG (a mosaic of all images, Pillow, optimize=True) for images.
Throughput: MB/s of raw (one byte per value) data through compress and decompress.
Writes ``benchmarks/results/compression.md``; needs the ``[bench]`` extra (zstandard, Pillow).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from vaeguard import VAEAnomalyDetector, compress, decompress
from vaeguard.compression import read_header

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "adbench"


def data_sets() -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """name → (train, held_out, estimator parameters)."""
    images = load_digits().images
    order = np.random.default_rng(0).permutation(len(images))
    train, test = images[order[:1400]], images[order[1400:]]
    table = np.load(SHARED / "4_breastw.npz")["X"].astype(np.int64)
    rows = np.random.default_rng(0).permutation(len(table))
    cut = int(0.7 * len(table))
    return {
        "binarised digits (8×8, 2 levels)": ((train >= 8).astype(np.uint8), (test >= 8).astype(np.uint8), {}),
        "17-level digits (8×8, 0..16)": (train.astype(np.uint8), test.astype(np.uint8), {}),
        "breastw table (9 columns, 1..10)": (
            table[rows[:cut]].astype(np.uint8),
            table[rows[cut:]].astype(np.uint8),
            {"likelihood": "categorical"},
        ),
    }


def raw_bytes(data: np.ndarray, binary: bool) -> bytes:
    return np.packbits(data.reshape(-1)).tobytes() if binary else np.ascontiguousarray(data, dtype=np.uint8).tobytes()


def general_purpose(data: np.ndarray, binary: bool) -> dict[str, int]:
    """Compressed sizes in bits."""
    import zstandard

    raw = raw_bytes(data, binary)
    sizes = {
        "gzip -9": len(gzip.compress(raw, 9)),
        "bz2 -9": len(bz2.compress(raw, 9)),
        "xz -9": len(lzma.compress(raw, preset=9)),
        "zstd -19": len(zstandard.ZstdCompressor(level=19).compress(raw)),
    }
    if data.ndim == 3:
        sizes["PNG (mosaic)"] = len(png_mosaic(data, binary))
    return {k: 8 * v for k, v in sizes.items()}


def png_mosaic(images: np.ndarray, binary: bool) -> bytes:
    from PIL import Image

    n, h, w = images.shape
    cols = 20
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    picture = Image.fromarray(canvas * 255 if binary else canvas, mode="L")
    if binary:
        picture = picture.convert("1")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    # the mosaic's padding cells are free for PNG too; the size is of the whole picture
    return buffer.getvalue()


def main() -> None:
    lines = [
        "# Lossless compression of held-out data: bits per dimension (lower is better)",
        "",
        "Command: `python benchmarks/compression.py` (CPU, 2 cores). bitsback net = the payload less the initial "
        "bits (random words that seed the stack); −ELBO and −log₂ p(x) are the model's own estimates on the same data.",
        "",
    ]
    for name, (train, test, params) in data_sets().items():
        binary = train.max() == 1
        det = VAEAnomalyDetector(random_state=0, device="cpu", **params).fit(train)
        dims = test.size
        start = time.perf_counter()
        blob = compress(det, test, codec_params={"latent_bits": 12})
        compress_s = time.perf_counter() - start
        start = time.perf_counter()
        back = decompress(det, blob)
        decompress_s = time.perf_counter() - start
        if not np.array_equal(back, test):
            raise SystemExit(f"{name}: the round trip is not exact")
        header, _ = read_header(blob)
        info = header["info"]
        elbo = -np.asarray(det.elbo(test, n_samples=256)).sum() / math.log(2)
        log_px = -np.asarray(det.log_likelihood(test, n_samples=1000)).sum() / math.log(2)
        peers = general_purpose(test, binary)
        best_name = min(peers, key=peers.get)
        rows = {
            "**vaeguard bitsback** (net)": info["net_bits"],
            "vaeguard bitsback with the initial bits": info["net_bits"] + info["initial_bits"],
            "vaeguard bitsback, whole file (container header included)": 8 * len(blob),
            "model −ELBO": elbo,
            "model −log₂ p(x) (IS, K = 1000)": log_px,
            **peers,
        }
        lines += [
            f"## {name}: {len(test)} held-out samples, {dims:,} dimensions",
            "",
            f"Model: {det.model_spec_['encoder']} + {det.model_spec_['likelihood']}, latent_dim {det.latent_dim_}, "
            f"trained on {len(train)} samples.",
            "",
            "| coder | bits/dim | vs −ELBO |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v / dims:.4f} | {v / elbo - 1:+.1%} |" for k, v in rows.items()]
        mb = dims / 1e6
        lines += [
            "",
            f"Net size vs the best general-purpose compressor ({best_name}): "
            f"{info['net_bits'] / peers[best_name] - 1:+.1%}. Initial bits: {info['initial_bits']} "
            f"({info['initial_bits'] / dims:.4f} bits/dim here). Throughput: compress {mb / compress_s:.3f} MB/s, "
            f"decompress {mb / decompress_s:.3f} MB/s (raw one byte per value; {compress_s:.2f} s / "
            f"{decompress_s:.2f} s).",
            "",
        ]
        print(
            f"{name}: net {info['net_bits'] / dims:.4f} bpd, best peer {peers[best_name] / dims:.4f}", file=sys.stderr
        )
    out = REPO / "benchmarks" / "results" / "compression.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
