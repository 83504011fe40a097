"""Lossless compression: vaeguard's bitsback codec against general-purpose compressors, in bits per dimension.

    python benchmarks/compression.py            # lossless
    python benchmarks/compression.py --lossy    # and the rate-distortion curves

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

Lossy (``--lossy`` adds it): rate (bits per sample, whole file) against distortion (MSE in
the data's units) of the ``latent`` codec over quantisation steps, against PCA with as many
components as the latent has dimensions, its coefficients standardised, quantised with
the same steps and coded the same way (a quantised Gaussian per dimension, its mean and
spread sent as 2 float64 per dimension); on the 17-level digits and ADBench's satellite.
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


STEPS = (2.0, 1.0, 0.5, 0.2, 0.1)

LOSSLESS_READING = [
    "## Reading the lossless tables",
    "",
    "- The codec's output (net, and with its initial bits) is smaller than every general-purpose compressor on all",
    "  three data sets, and the net size is within 0.6 % of the model's −ELBO (the target was 2 %); the latent's",
    "  discretisation (2¹² equal-mass buckets per dimension) costs that little.",
    "- The whole file adds the container: a fixed ~250 bytes (header JSON, the model's and the data's SHA-256). On",
    "  the 397 digit images that is 0.08 bits/dim and the file still beats the best peer; on the 205-row table it",
    "  is 1.1 bits/dim and the file is larger than zstd's. Small inputs should be compressed together.",
    "- Speed is the weak side: one sample at a time, in float64 on one CPU thread (which is what makes the bits",
    "  independent of batch size, threads and device), about 0.04 MB/s. Several independent stacks over blocks of",
    "  samples would parallelise it at the price of their initial bits; not built.",
    "",
]
LOSSY_READING = [
    "## Reading the lossy tables",
    "",
    "- The target, the latent codec at least as good as PCA at every rate, is **not met**. Digits: from about",
    "  35 bits/image up the latent codec has the lower error at the same rate (50 bits: MSE 2.73 against PCA's",
    "  ~3.2; 86 bits: 2.40 against 2.77); at the lowest rate PCA is better (25 bits: 6.56 against 7.62 at 28",
    "  bits). Satellite: the latent codec wins below about 28 bits/row (18 bits: 14.9 against PCA's 22.5 at 20",
    "  bits) and its error stops near 11.8, where PCA goes on to 6.0 with more bits.",
    "- Codes are fitted to each sample by gradient steps on the squared error (model units) plus",
    '  rate_weight · ½‖z‖², a MAP fit under Gaussian noise of a tenth of the data\'s variance (`rate_weight="auto"`);',
    "  without that refinement the codec stops at the decoder's mean at the posterior mean (digits MSE 3.15, worse",
    "  than PCA at every rate). What remains is the decoder's own floor: the model is trained for likelihood",
    "  (per-element scales, 10 % trimmed minibatches), not squared error, and satellite's 9-dimensional code",
    "  cannot reconstruct as finely as 9 principal components at high rates.",
    "",
]


def pca_rate_distortion(train: np.ndarray, test: np.ndarray, k: int, step: float, levels: bool) -> tuple[float, float]:
    """(bits per sample, MSE) of PCA with k components, standardised coefficients quantised with ``step``."""
    import constriction
    from sklearn.decomposition import PCA

    flat_train, flat_test = train.reshape(len(train), -1), test.reshape(len(test), -1)
    pca = PCA(k).fit(flat_train)
    scale = np.sqrt(pca.explained_variance_)
    codes = np.round(pca.transform(flat_test) / scale / step).astype(np.int32)
    center, spread = codes.mean(axis=0), np.maximum(codes.std(axis=0), 0.5)
    coder = constriction.stream.stack.AnsCoder()
    model = constriction.stream.model.QuantizedGaussian(int(codes.min()), int(codes.max()))
    coder.encode_reverse(codes.reshape(-1), model, np.tile(center, len(codes)), np.tile(spread, len(codes)))
    bits = coder.num_bits() + 2 * 64 * k + 64  # the codes, the per-dimension mean and spread, the range
    rebuilt = pca.inverse_transform(codes * step * scale)
    if levels:
        rebuilt = np.clip(np.round(rebuilt), flat_train.min(), flat_train.max())
    return bits / len(test), float(((rebuilt - flat_test) ** 2).mean())


def lossy_section() -> list[str]:
    images = load_digits().images
    order = np.random.default_rng(0).permutation(len(images))
    satellite = np.load(SHARED / "30_satellite.npz")
    normal = satellite["X"][satellite["y"] == 0]
    rows = np.random.default_rng(0).permutation(len(normal))
    cut = int(0.7 * len(normal))
    sets = {
        "17-level digits": (images[order[:1400]], images[order[1400:]], True),
        "satellite (36 columns, normal rows)": (normal[rows[:cut]], normal[rows[cut:]], False),
    }
    lines = ["## Lossy: the latent codec against PCA (rate in bits per sample, distortion as MSE)", ""]
    for name, (train, test, levels) in sets.items():
        det = VAEAnomalyDetector(random_state=0, device="cpu").fit(train)
        k = det.latent_dim_
        lines += [
            f"### {name}: {len(test)} held-out samples; latent_dim = PCA components = {k}",
            "",
            "| step | latent bits/sample | latent MSE | PCA bits/sample | PCA MSE |",
            "|---|---|---|---|---|",
        ]
        for step in STEPS:
            blob = compress(det, test, codec="latent", codec_params={"step": step})
            back = np.asarray(decompress(det, blob), dtype=np.float64)
            mse = float(((back - test) ** 2).mean())
            pca_bits, pca_mse = pca_rate_distortion(train, test, k, step, levels)
            lines.append(f"| {step} | {8 * len(blob) / len(test):.1f} | {mse:.4g} | {pca_bits:.1f} | {pca_mse:.4g} |")
        lines.append("")
    return lines


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
    lines += LOSSLESS_READING
    if "--lossy" in sys.argv:
        lines += lossy_section() + LOSSY_READING
    out = REPO / "benchmarks" / "results" / "compression.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
