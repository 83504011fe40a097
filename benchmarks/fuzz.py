"""A fuzzing campaign against hostile and odd input (issue 17): crafted model files, compression containers and
tables, each case under a time limit and an address-space limit; the counts go to ``benchmarks/results/fuzz.md``.

Each case ends in one of:

- **clear error**: a ``ValueError`` (the library) or exit code 2 with one line (the command line);
- **handled**: success where success is right: a valid but odd input gives the reference result, a harmless
  edit of a file loads and scores finite values;
- **traceback**: any other exception, or an exit code other than 0 and 2;
- **silent wrong**: success where the input must be refused, or a result that differs from the reference;
- **hang**: over the time limit (``--seconds``);
- **memory blow-up**: a ``MemoryError`` under the address-space limit (``--memory-gib`` beyond the baseline).

    python benchmarks/fuzz.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import signal
import struct
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
OUTCOMES = ["clear error", "handled", "traceback", "silent wrong", "hang", "memory blow-up"]
BAD_VALUES = [None, -1, 0, 1e308, float("nan"), "x", [], {}, True, [10**9]]


class Wrong(Exception):
    """The case succeeded where it must not have, or gave another result than the reference."""


def run_case(case: Callable[[], str], seconds: float) -> tuple[str, str]:
    """Run one case under the time limit; its outcome and a short detail."""

    def expired(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return case()
    except Wrong as exc:
        return "silent wrong", str(exc)[:200]
    except TimeoutError:
        return "hang", f"over {seconds} s"
    except MemoryError:
        return "memory blow-up", "MemoryError"
    except ValueError as exc:
        text = str(exc)
        return ("clear error", text.splitlines()[0][:200]) if text else ("traceback", "an empty ValueError")
    except Exception as exc:  # any other exception is a traceback a user would see
        return "traceback", f"{type(exc).__name__}: {str(exc)[:150]} @ {traceback.extract_tb(exc.__traceback__)[-1]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


# -- model files ---------------------------------------------------------------------------------------
def _write(path: Path, config, arrays, special=None) -> None:
    """A model file with a recomputed SHA-256; ``special(group, arrays)`` stores some arrays its own way."""
    from vaeguard import storage

    with h5py.File(path, "w") as f:
        f.attrs["format"] = storage.FORMAT_NAME
        f.attrs["format_version"] = storage.FORMAT_VERSION
        f.attrs["config"] = json.dumps(config)
        f.attrs["sha256"] = storage.fingerprint(config, arrays)
        group = f.create_group("arrays")
        done = special(group, arrays) if special else set()
        for name, a in arrays.items():
            if name not in done:
                group.create_dataset(name, data=a)


def _load_and_score(path: Path, X, must_refuse: bool) -> tuple[str, str]:
    from vaeguard import load

    det = load(path)
    if must_refuse:
        raise Wrong("loaded a file that must be refused")
    scores = np.asarray(det.score_samples(X))
    if not np.isfinite(scores).all():
        raise Wrong("loaded, then gave non-finite scores")
    return "handled", "loaded and scored finite values"


def _leaves(value, path=()) -> Iterator[tuple]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value and len(value) <= 8:
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, i))
    else:
        yield path


def _set(config, path, value):
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def model_file_cases(folder: Path, det, X) -> Iterator[tuple[str, Callable[[], tuple[str, str]]]]:
    config, arrays = det.model_file_contents()
    weight = next(k for k in arrays if k.startswith("model.") and arrays[k].ndim == 2)
    (folder / "outside.bin").write_bytes(np.ascontiguousarray(arrays[weight]).tobytes())
    with h5py.File(folder / "source.h5", "w") as f:
        f.create_dataset("data", data=arrays[weight])
    os.mkfifo(folder / "pipe.h5")

    def stored(kind):
        def special(group, arrays):
            a = arrays[weight]
            if kind == "external storage":
                group.create_dataset(
                    weight, shape=a.shape, dtype=a.dtype, external=[(str(folder / "outside.bin"), 0, a.nbytes)]
                )
            elif kind == "virtual dataset":
                layout = h5py.VirtualLayout(shape=a.shape, dtype=a.dtype)
                layout[...] = h5py.VirtualSource(str(folder / "source.h5"), "data", shape=a.shape)
                group.create_virtual_dataset(weight, layout)
            elif kind == "external link":
                group[weight] = h5py.ExternalLink(str(folder / "source.h5"), "/data")
            elif kind == "external link to a FIFO":
                group[weight] = h5py.ExternalLink(str(folder / "pipe.h5"), "/data")
            elif kind == "soft link":
                group.create_dataset("elsewhere", data=a)
                group[weight] = h5py.SoftLink("/arrays/elsewhere")
            elif kind == "1 GiB declared, nothing stored":
                group.create_dataset(weight, shape=(2**27,), dtype="f8", chunks=(2**16,))
            elif kind == "gzip-filtered":
                group.create_dataset(weight, data=a, compression="gzip")
            return {weight}

        return special

    kinds = ["external storage", "virtual dataset", "external link", "external link to a FIFO", "soft link",
             "1 GiB declared, nothing stored", "gzip-filtered"]  # fmt: skip
    for i, kind in enumerate(kinds):
        path = folder / f"structure{i}.h5"
        declared = {**arrays, weight: np.zeros(2**27)} if kind.startswith("1 GiB") else arrays
        _write(path, config, declared, stored(kind))
        yield f"model file: {kind}", lambda path=path: _load_and_score(path, X, must_refuse=True)
    n = 0
    for leaf in _leaves(config):
        for value in BAD_VALUES:
            crafted = copy.deepcopy(config)
            _set(crafted, leaf, value)
            path = folder / f"leaf{n}.h5"
            n += 1
            _write(path, crafted, arrays)
            name = f"model file: {'.'.join(map(str, leaf))} = {value!r}"
            yield name, lambda path=path: _load_and_score(path, X, must_refuse=False)
    for key in [k for k in arrays if not k.startswith(("model.", "member"))] + [weight]:
        for label, change in (("NaN", lambda a: np.full_like(a, np.nan, dtype=float)),
                              ("one entry fewer", lambda a: a.reshape(-1)[:-1]),
                              ("text", lambda a: np.array(["x"] * max(1, a.size), dtype="S1"))):  # fmt: skip
            if arrays[key].size == 0:
                continue
            path = folder / f"array{n}.h5"
            n += 1
            _write(path, config, {**arrays, key: change(arrays[key])})
            must = not key.startswith(("history.", "latent.", "aggregate."))
            yield f"model file: array {key} {label}", lambda path=path, must=must: _load_and_score(path, X, must)
    for label, text in (("broken JSON", "{not json"), ("a JSON list", "[1, 2]"), ("empty", "")):
        path = folder / f"json{n}.h5"
        n += 1
        det.save(path)
        with h5py.File(path, "a") as f:
            f.attrs["config"] = text
        yield f"model file: config {label}", lambda path=path: _load_and_score(path, X, must_refuse=True)


# -- compression containers -------------------------------------------------------------------------------
def _reseal(blob: bytes, change) -> bytes:
    (length,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8 : 8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    front = blob[:4] + struct.pack("<I", len(encoded)) + encoded + blob[8 + length : 8 + length + 64]
    payload = blob[8 + length + 96 :]
    return front + hashlib.sha256(front + payload).digest() + payload


def _decompress(model, blob: bytes, original, must_refuse: bool) -> tuple[str, str]:
    from vaeguard import decompress

    out = decompress(model, blob)
    same = np.array_equal(np.asarray(out), np.asarray(original))
    if must_refuse and not same:
        raise Wrong("decoded altered data without complaint")
    return "handled", "decoded the original data" if same else "decoded (lossy codec)"


def container_cases(models) -> Iterator[tuple[str, Callable[[], tuple[str, str]]]]:
    from vaeguard import compress, decompress

    rng = np.random.default_rng(0)
    for codec, model, data in models:
        blob = compress(model, data, codec=codec)
        reference = np.asarray(decompress(model, blob))

        def case(altered: bytes, must_refuse: bool = True, model=model, reference=reference):
            return lambda: _decompress(model, altered, reference, must_refuse)

        for position in rng.choice(len(blob), 40, replace=False):
            flipped = bytearray(blob)
            flipped[position] ^= 1 << int(rng.integers(8))
            yield f"container {codec}: bit flip at byte {position}", case(bytes(flipped))
        for cut in (1, 4, 33, len(blob) // 2, len(blob) - 5):
            yield f"container {codec}: {cut} bytes cut", case(blob[:-cut])
        (length,) = struct.unpack("<I", blob[4:8])
        for key in json.loads(blob[8 : 8 + length]):
            yield f"container {codec}: header without {key!r}", case(_reseal(blob, lambda h, k=key: h.pop(k)))
            for value in BAD_VALUES:
                altered = _reseal(blob, lambda h, k=key, v=value: h.__setitem__(k, v))
                yield f"container {codec}: header {key} = {value!r}", case(altered, must_refuse=key != "info")
        huge = _reseal(blob, lambda h: h.update(n_samples=10**11, shape=[10**11, *h["shape"][1:]]))
        yield f"container {codec}: n_samples = 1e11", case(huge)


# -- tables on the command line -----------------------------------------------------------------------------
def table_cases(folder: Path, model_path: Path, X: np.ndarray) -> Iterator[tuple[str, Callable[[], tuple[str, str]]]]:
    from click.testing import CliRunner

    from vaeguard import load
    from vaeguard.cli import cli

    det = load(model_path)
    columns = ["a", "b", "c", "d"]
    clean = pd.DataFrame(X[:20], columns=columns)
    reference = np.asarray(det.score_samples(clean))

    def score(text: bytes, on_bad_row: str, expect: str, bad_rows=(), compare: bool = True) -> tuple[str, str]:
        """Score ``text`` as a CSV file. ``expect``: "ok" (exit 0; with ``compare`` the scores must equal the
        clean rows', NaN or left out for ``bad_rows``; without, they must be finite), "error" (exit 2 with one
        line) or "either"."""
        data = folder / f"t{time.perf_counter_ns()}.csv"
        data.write_bytes(text)
        out = folder / f"o{time.perf_counter_ns()}.csv"
        result = CliRunner().invoke(
            cli, ["score", str(model_path), str(data), "-o", str(out), "--on-bad-row", on_bad_row]
        )
        if result.exit_code == 2:
            lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
            if expect == "ok":
                raise Wrong(f"refused a valid input: {result.output.strip()[:150]}")
            return "clear error", lines[-1][:200] if lines else result.output.strip()[:200]
        if result.exit_code != 0:
            raise RuntimeError(f"exit {result.exit_code}: {result.output.strip()[-200:]}")
        if expect == "error":
            raise Wrong("scored an input that must be refused")
        got = pd.read_csv(out)["log_likelihood"].to_numpy(dtype=np.float64)
        if not compare:
            good = np.delete(got, list(bad_rows)) if on_bad_row != "skip" else got
            if not np.isfinite(good).all():
                raise Wrong("non-finite scores for rows that could be scored")
            return "handled", f"{len(got)} rows scored"
        want = reference.copy()
        want[list(bad_rows)] = np.nan
        if on_bad_row == "skip":
            want = np.delete(reference, list(bad_rows))
        if got.shape != want.shape or not np.allclose(got, want, equal_nan=True, rtol=1e-9, atol=1e-9):
            raise Wrong("scores differ from the clean input's")
        return "handled", "scores equal the reference"

    body = clean.to_csv(index=False, float_format="%.17g")
    yield "table: the clean file", lambda: score(body.encode(), "error", "ok")
    yield "table: a UTF-8 BOM", lambda: score(b"\xef\xbb\xbf" + body.encode(), "error", "ok")
    yield "table: CRLF line ends", lambda: score(body.replace("\n", "\r\n").encode(), "error", "ok")
    yield (
        "table: columns reordered",
        lambda: score(clean[["d", "c", "b", "a"]].to_csv(index=False, float_format="%.17g").encode(), "error", "ok"),
    )
    extra = clean.assign(note=['text with "quotes", commas\nand a newline'] * len(clean))
    yield (
        "table: an extra text column with quoted newlines",
        lambda: score(extra.to_csv(index=False, float_format="%.17g").encode(), "error", "ok"),
    )
    wide = pd.concat(
        [clean, pd.DataFrame(np.zeros((len(clean), 10_000)), columns=[f"z{i}" for i in range(10_000)])], axis=1
    )
    yield (
        "table: 10 000 extra columns",
        lambda: score(wide.to_csv(index=False, float_format="%.17g").encode(), "error", "ok"),
    )
    missing = ["", "n/a", "NA", "NaN", "null"]  # pandas' missing-value markers: scored by the marginal of the others
    for cell in [*missing, "inf", "-inf", "1e400", "text", "1,5", "0x10", "  "]:
        lines = body.splitlines()
        row = lines[3].split(",")
        row[1] = f'"{cell}"' if "," in cell else cell
        broken = ("\n".join([*lines[:3], ",".join(row), *lines[4:]]) + "\n").encode()
        for mode in ("error", "nan", "skip"):
            if cell in missing:
                yield (
                    f"table: cell {cell!r} (missing), --on-bad-row {mode}",
                    lambda b=broken, m=mode: score(b, m, "ok", compare=False),
                )
                continue
            expect = "error" if mode == "error" else "ok"
            yield (
                f"table: cell {cell!r}, --on-bad-row {mode}",
                lambda b=broken, m=mode, e=expect: score(b, m, e, bad_rows=(2,)),
            )
    yield (
        "table: a column missing",
        lambda: score(clean[["a", "b", "c"]].to_csv(index=False).encode(), "error", "error"),
    )
    yield "table: header only", lambda: score(b"a,b,c,d\n", "error", "ok", compare=False)
    yield "table: an empty file", lambda: score(b"", "error", "error")
    yield "table: Latin-1 bytes", lambda: score(body.encode() + "é,1,2,3\n".encode("latin-1"), "error", "error")
    garbage = bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8))
    yield "table: binary garbage", lambda: score(garbage, "error", "error")
    for value in ("1e308", "-1e308", "1e-320", "5e-324"):
        extreme = clean.copy()
        extreme.iloc[4, 0] = float(value)
        text = extreme.to_csv(index=False, float_format="%.17g").encode()
        yield f"table: a value of {value}", lambda t=text: score(t, "error", "either", compare=False)


def main() -> None:
    from vaeguard import VAEAnomalyDetector

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--memory-gib", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    table = VAEAnomalyDetector(epochs=3, hidden_dims=[16], latent_dim=2, random_state=0, device="cpu").fit(frame)
    from sklearn.datasets import load_digits

    digits = load_digits().images
    binary = VAEAnomalyDetector(epochs=3, random_state=0, device="cpu").fit((digits[:300] >= 8).astype(np.uint8))
    levels = VAEAnomalyDetector(epochs=3, random_state=0, device="cpu").fit(digits[:300])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        table.save(folder / "table.h5")
        cases = [
            *(("model files", *c) for c in model_file_cases(folder, table, frame.iloc[:20])),
            *(
                ("containers", *c)
                for c in container_cases(
                    [("bitsback", binary, (digits[300:310] >= 8).astype(np.uint8)), ("latent", levels, digits[300:310])]
                )
            ),
            *(("tables", *c) for c in table_cases(folder, folder / "table.h5", X)),
        ]
        # the address-space limit: the baseline after setup, plus the allowance
        with open("/proc/self/status") as status:
            vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
        limit = vm + int(args.memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        results = [(group, name, *run_case(case, args.seconds)) for group, name, case in cases]
    counts = {
        group: Counter(outcome for g, _, outcome, _ in results if g == group)
        for group in dict.fromkeys(r[0] for r in results)
    }
    lines = [
        "# Fuzzing campaign: hostile and odd input",
        "",
        f"Command: `python benchmarks/fuzz.py` ({len(results)} cases, {time.perf_counter() - started:.0f} s; "
        f"each under {args.seconds:g} s and {args.memory_gib:g} GiB of address space beyond the baseline). "
        "Outcomes as defined in the script's docstring; the last four must be 0.",
        "",
        "| inputs | cases | " + " | ".join(OUTCOMES) + " |",
        "|---|---|" + "---|" * len(OUTCOMES),
    ]
    for group, counter in counts.items():
        lines.append(f"| {group} | {sum(counter.values())} | " + " | ".join(str(counter[o]) for o in OUTCOMES) + " |")
    total = Counter(r[2] for r in results)
    lines.append(f"| **all** | {len(results)} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    failures = [r for r in results if r[2] not in ("clear error", "handled")]
    lines += ["", "## Cases that did not end in a clear error or a correct result", ""]
    lines += [f"- {group}: {name} → **{outcome}**: {detail}" for group, name, outcome, detail in failures] or ["None."]
    lines += ["", "## Edits of files that loaded or decoded (the value was harmless, the result checked)", ""]
    lines += [
        f"- {name}: {detail}" for group, name, outcome, detail in results if group != "tables" and outcome == "handled"
    ]
    lines += ["", "## A sample of the clear errors", ""]
    seen = set()
    for group, name, outcome, detail in results:
        if outcome == "clear error" and (group, detail[:40]) not in seen and len(seen) < 25:
            seen.add((group, detail[:40]))
            lines.append(f"- {name}: `{detail}`")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 12 + len(counts)]))


if __name__ == "__main__":
    main()
