"""Hostile model files (issue 17): each crafted file ends in one clear ValueError naming the file (exit 2 on
the command line), within a time and memory bound, never a traceback from deep inside, a hang or a blow-up.

The files carry a valid SHA-256 (recomputed, as an attacker would): the hash protects against accidents, the
loader's structure and schema checks against intent.
"""

import json
import os
import resource
import signal
import time
from contextlib import contextmanager

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from vaeguard import VAEAnomalyDetector, VAETimeSeriesDetector, load, storage
from vaeguard.cli import cli

FAST = dict(epochs=2, hidden_dims=[16], latent_dim=2, n_importance_samples=8, random_state=0, device="cpu")


@pytest.fixture(scope="module")
def table():
    X = np.random.default_rng(0).normal(size=(200, 4))
    return VAEAnomalyDetector(**FAST).fit(X), X


@pytest.fixture(scope="module")
def series():
    t = np.arange(600)
    values = np.sin(t / 5.0) + 0.05 * np.random.default_rng(1).normal(size=600)
    return VAETimeSeriesDetector(window=16, estimator=VAEAnomalyDetector(**FAST)).fit(values)


@contextmanager
def bounded(seconds: float = 20.0, megabytes: float = 300.0):
    """Fail (instead of hanging) after ``seconds``; fail if the process's peak memory grew by more than
    ``megabytes`` (ru_maxrss only grows: a blow-up inside shows)."""

    def expired(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert grown < megabytes, f"peak memory grew by {grown:.0f} MB"
    assert time.perf_counter() - start < seconds


def refused(path, match, **kwargs):
    with bounded(), pytest.raises(ValueError) as caught:
        load(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message.strip(), message
    assert __import__("re").search(match, message), message
    return message


def write_crafted(path, config, arrays, special=None):
    """A model file with a recomputed (valid) hash; ``special(group, arrays)`` may store some arrays its own way
    (it returns the names it stored)."""
    digest = storage.fingerprint(config, arrays)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = storage.FORMAT_NAME
        f.attrs["format_version"] = storage.FORMAT_VERSION
        f.attrs["config"] = json.dumps(config)
        f.attrs["sha256"] = digest
        group = f.create_group("arrays")
        done = special(group, arrays) if special is not None else set()
        for name, a in arrays.items():
            if name not in done:
                group.create_dataset(name, data=a)


def first_weight(arrays):
    return next(k for k in arrays if k.startswith("model.") and arrays[k].ndim == 2)


# -- the file's structure: nothing outside the file is read ------------------------------------
def test_external_storage_is_refused_before_reading(table, tmp_path):
    config, arrays = table[0].model_file_contents()
    name = first_weight(arrays)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.ascontiguousarray(arrays[name]).tobytes())

    def external(group, arrays):
        a = arrays[name]
        group.create_dataset(name, shape=a.shape, dtype=a.dtype, external=[(str(outside), 0, a.nbytes)])
        return {name}

    write_crafted(tmp_path / "m.h5", config, arrays, external)
    refused(tmp_path / "m.h5", "external files")


def test_virtual_datasets_are_refused(table, tmp_path):
    config, arrays = table[0].model_file_contents()
    name = first_weight(arrays)
    with h5py.File(tmp_path / "source.h5", "w") as f:
        f.create_dataset("data", data=arrays[name])

    def virtual(group, arrays):
        layout = h5py.VirtualLayout(shape=arrays[name].shape, dtype=arrays[name].dtype)
        layout[...] = h5py.VirtualSource(str(tmp_path / "source.h5"), "data", shape=arrays[name].shape)
        group.create_virtual_dataset(name, layout)
        return {name}

    write_crafted(tmp_path / "m.h5", config, arrays, virtual)
    refused(tmp_path / "m.h5", "virtual dataset")


@pytest.mark.parametrize("kind", ["external", "soft", "fifo"])
def test_links_are_refused_without_following_them(table, tmp_path, kind):
    config, arrays = table[0].model_file_contents()
    name = first_weight(arrays)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("data", data=arrays[name])
    if kind == "fifo":  # following this link would block forever on open()
        os.mkfifo(tmp_path / "pipe.h5")

    def link(group, arrays):
        if kind == "soft":
            group.create_dataset("real", data=arrays[name])
            group[name] = h5py.SoftLink("/arrays/real")
        else:
            group[name] = h5py.ExternalLink(str(tmp_path / ("pipe.h5" if kind == "fifo" else "other.h5")), "/data")
        return {name}

    write_crafted(tmp_path / "m.h5", config, arrays, link)
    refused(tmp_path / "m.h5", "link|unexpected|not a known")


def test_a_small_file_cannot_declare_a_huge_array(table, tmp_path):
    config, arrays = table[0].model_file_contents()
    arrays["history.train_loss"] = np.zeros(2**27)  # 1 GiB declared; stored as unwritten chunks

    def huge(group, arrays):
        group.create_dataset("history.train_loss", shape=(2**27,), dtype="f8", chunks=(2**16,))
        return {"history.train_loss"}

    write_crafted(tmp_path / "m.h5", config, {**arrays}, huge)
    assert (tmp_path / "m.h5").stat().st_size < 1_000_000
    refused(tmp_path / "m.h5", "declares .* bytes but stores")


def test_compressed_and_non_numeric_arrays_are_refused(table, tmp_path):
    config, arrays = table[0].model_file_contents()
    name = first_weight(arrays)

    def compressed(group, arrays):
        group.create_dataset(name, data=arrays[name], compression="gzip")
        return {name}

    write_crafted(tmp_path / "m.h5", config, arrays, compressed)
    refused(tmp_path / "m.h5", "filtered")
    arrays = {**arrays, name: np.array(["a", "b"], dtype="S1")}
    write_crafted(tmp_path / "s.h5", config, arrays)
    refused(tmp_path / "s.h5", "numbers only")


# -- the configuration: the schema names the field --------------------------------------------
def _crafted_config(table, tmp_path, change):
    config, arrays = table[0].model_file_contents()
    copy = json.loads(json.dumps(config))
    changed = change(copy)
    config = copy if changed is None else changed
    storage.write_model_file(tmp_path / "m.h5", config, arrays)
    return tmp_path / "m.h5"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c["model"].update(hidden_dims=[100_000, 100_000]), r"model\.hidden_dims\[0\]: must be in"),
        (lambda c: c["model"].update(hidden_dims=[-4]), r"model\.hidden_dims\[0\]"),
        (lambda c: c["params"].update(bogus=1), r"params\.bogus: is not a known entry"),
        (lambda c: c["params"].update(hidden_dims=[0]), r"params\.hidden_dims"),
        (lambda c: c["params"].update(n_importance_samples=10**9), r"params\.n_importance_samples"),
        (lambda c: c["model"]["likelihood_options"].update(surprise=3), "surprise"),
        (
            lambda c: c["model"]["likelihood_options"].update(lattice_ceiling=["x"] * c["fitted"]["n_features_in_"]),
            r"lattice_ceiling\[0\] must be a finite number or None, got 'x'",
        ),
        (lambda c: c["fitted"].update(offset_=float("nan")), r"fitted\.offset_: must be a finite number"),
        (
            lambda c: c["fitted"].update(pixel_levels_={"origin": 0, "step": 1, "n_levels": 2, "dtype": "u1", "x": 1}),
            r"fitted\.pixel_levels_\.x: is not a known entry",
        ),
        (lambda c: c["fitted"].update(n_features_in_=5), r"fitted\.n_features_in_"),
        (lambda c: c["fitted"].update(modelled_columns_=[2, 1]), r"fitted\.modelled_columns_: must list the"),
        (lambda c: c["fitted"].update(modelled_columns_=[0, 99]), r"fitted\.modelled_columns_\[1\]: must be in"),
        (lambda c: c["fitted"].update(modelled_columns_="all"), r"fitted\.modelled_columns_: must be a list"),
        (lambda c: c["fitted"].update(constant_rows_=[3]), r"fitted\.constant_rows_: comes with modelled_columns_"),
        (
            lambda c: c["fitted"].update(modelled_columns_=[0, 1, 2, 3], constant_rows_=[0]),
            r"fitted\.constant_rows_: must have 0 entries",
        ),
        (lambda c: c["fitted"].update(threshold_rule_={"rule": "magic"}), r"threshold_rule_\.rule"),
        (lambda c: c.update(estimator="VAETimeSeriesDetector"), r"window_model|fitted"),
        (lambda c: c.update(estimator="Pickle"), "estimator: is 'Pickle'"),
        (lambda c: ["not", "an", "object"], "must be a JSON object"),
    ],
)
def test_a_config_that_breaks_the_schema_is_one_line_naming_the_field(table, tmp_path, change, match):
    refused(_crafted_config(table, tmp_path, change), match)


def test_wide_layers_within_the_limits_are_checked_against_the_weights_before_any_memory(table, tmp_path):
    """60 000-wide layers would take ~15 GB; the network is built on the meta device first and its shapes
    compared with the stored arrays, which do not match."""
    path = _crafted_config(table, tmp_path, lambda c: c["model"].update(hidden_dims=[60_000, 60_000]))
    refused(path, "weights do not fit the network it describes")


def test_impossible_preprocessing_values_are_refused(table, tmp_path):
    config, arrays = table[0].model_file_contents()
    for key, value in (("standardizer.scale", np.nan), ("standardizer.scale", -1.0), ("standardizer.center", np.inf)):
        crafted = {**arrays, key: arrays[key].copy()}
        crafted[key][1] = value
        storage.write_model_file(tmp_path / "m.h5", config, crafted)
        refused(tmp_path / "m.h5", f"arrays/{key}: entry 1")
    crafted = {**arrays, first_weight(arrays): np.full_like(arrays[first_weight(arrays)], np.nan)}
    storage.write_model_file(tmp_path / "w.h5", config, crafted)
    refused(tmp_path / "w.h5", "non-finite")


def test_broken_json_names_the_file(table, tmp_path):
    table[0].save(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "a") as f:
        f.attrs["config"] = "{not json"
    refused(tmp_path / "m.h5", "configuration is not valid JSON")


def test_a_time_series_file_is_checked_too(series, tmp_path):
    window_config, arrays = series.window_model_.model_file_contents()
    series.save(tmp_path / "s.h5")
    assert np.isfinite(load(tmp_path / "s.h5").score_samples(np.sin(np.arange(100) / 5.0))).all()
    config = {
        "estimator": "VAETimeSeriesDetector",
        "params": {"window": 16},
        "fitted": {"window_": 16, "n_channels_": 2, "offset_": 0.0},
        "window_model": window_config,
    }
    storage.write_model_file(tmp_path / "c.h5", config, arrays)
    refused(tmp_path / "c.h5", "window model's input")
    config["fitted"] = {"window_": 16, "n_channels_": 1, "offset_": float("inf")}
    storage.write_model_file(tmp_path / "c.h5", config, arrays)
    refused(tmp_path / "c.h5", r"fitted\.offset_")


# -- authenticity: a signature the plain hash cannot give ---------------------------------------
def test_signed_files_load_only_with_a_trusted_key(table, tmp_path):
    det, X = table
    key, other = "k" * 32, b"o" * 32
    det.save(tmp_path / "signed.h5", signing_key=key)
    det.save(tmp_path / "plain.h5")
    np.testing.assert_array_equal(
        load(tmp_path / "signed.h5", trusted_keys=[other, key]).score_samples(X), det.score_samples(X)
    )
    load(tmp_path / "signed.h5")  # a signature does not stop a plain load
    refused(tmp_path / "signed.h5", "not signed by any of the trusted keys", trusted_keys=[other])
    refused(tmp_path / "plain.h5", "is not signed", trusted_keys=[key])
    # an edited file with a recomputed hash keeps the old signature, which no longer fits
    config, arrays = det.model_file_contents()
    config["fitted"]["offset_"] = -1e9
    storage.write_model_file(tmp_path / "edited.h5", config, arrays)
    with h5py.File(tmp_path / "signed.h5", "r") as f, h5py.File(tmp_path / "edited.h5", "a") as g:
        g.attrs[storage.SIGNATURE_ATTRIBUTE] = f.attrs[storage.SIGNATURE_ATTRIBUTE]
    refused(tmp_path / "edited.h5", "not signed by any of the trusted keys", trusted_keys=[key])
    with pytest.raises(ValueError, match="at least 16 bytes"):
        det.save(tmp_path / "weak.h5", signing_key="short")


def test_the_command_line_signs_and_checks_through_the_environment(table, tmp_path):
    X = table[1]
    data = tmp_path / "x.csv"
    np.savetxt(data, X[:20], delimiter=",", header="a,b,c,d", comments="")
    runner = CliRunner()
    fit = ["fit", str(data), "-o", str(tmp_path / "m.h5"), "--param", "epochs=1"]
    fitted = runner.invoke(cli, fit, env={"VAEGUARD_SIGNING_KEY": "s" * 32})
    assert fitted.exit_code == 0, fitted.output
    score = ["score", str(tmp_path / "m.h5"), str(data), "-o", str(tmp_path / "out.csv")]
    ok = runner.invoke(cli, score, env={"VAEGUARD_TRUSTED_KEYS": "s" * 32})
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, score, env={"VAEGUARD_TRUSTED_KEYS": "t" * 32})
    assert bad.exit_code == 2 and "not signed by any of the trusted keys" in bad.output
    crafted = _crafted_config(table, tmp_path, lambda c: c["fitted"].update(offset_=float("nan")))
    out = runner.invoke(cli, ["score", str(crafted), str(data), "-o", str(tmp_path / "out2.csv")])
    assert out.exit_code == 2 and "fitted.offset_" in out.output and "Traceback" not in out.output


def test_the_fuzzing_campaign_ends_in_clear_errors_or_correct_results(tmp_path):
    """benchmarks/fuzz.py (crafted model files, containers and tables, each under a time and an
    address-space limit, in its own process): no traceback, no silent wrong result, no hang, no blow-up."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "fuzz.md").read_text()
    total = re.search(r"\| \*\*all\*\* \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", report)
    cases, clear, handled, *bad = (int(v) for v in total.groups())
    assert cases > 900 and clear + handled == cases and bad == [0, 0, 0, 0], report[:3000]


def _hostile_cells():
    from hypothesis import strategies as st

    words = ["", "n/a", "NA", "  ", "text", "1,5", "0x10", "1e400", "-1e400", "1e-400", "\ufeff1", "a\nb", "ünï", '"']
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(-(10**30), 10**30).map(str),
        st.sampled_from(words),
        st.floats(-1e6, 1e6).map(lambda v: f"{v:.6g}"),
    )


def test_hostile_csv_cells_end_in_a_score_or_a_marked_row(table, tmp_path_factory):
    """Property: whatever the cells (huge, tiny, non-finite, text in numbers, BOM, quoted newlines, none),
    `score_file --on-bad-row nan` answers every row, finite or NaN, and a row of plain numbers gets the score
    the API gives those numbers."""
    import csv

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from vaeguard.batch import score_file
    from vaeguard.data import DataError, Source

    det = VAEAnomalyDetector(**FAST).fit(pd.DataFrame(table[1], columns=["a", "b", "c", "d"]))
    folder = tmp_path_factory.mktemp("cells")

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.lists(_hostile_cells(), min_size=4, max_size=4), min_size=0, max_size=6))
    def check(rows):
        path = folder / "in.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["a", "b", "c", "d"])
            writer.writerows(rows)
        try:
            run = score_file(det, Source.parse(str(path)), str(folder / "out.csv"), on_bad_row="nan")
        except DataError as exc:  # a file-level problem: one line naming the file
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
        out = pd.read_csv(folder / "out.csv")
        assert run.rows == len(rows) == len(out)
        scores = out["log_likelihood"].to_numpy(dtype=float)
        for row, score in zip(rows, scores, strict=True):
            try:
                values = [float(cell) for cell in row]
            except ValueError:
                continue
            if (
                all(np.isfinite(values))
                and all(abs(v) < 1e15 for v in values)
                and all(c.strip() == c and c for c in row)
            ):
                expected = det.score_samples(pd.DataFrame([values], columns=["a", "b", "c", "d"]))[0]
                assert np.isclose(score, expected, rtol=1e-9, atol=1e-9), (row, score, expected)
        assert np.all(np.isfinite(scores) | out["is_outlier"].isna().to_numpy())

    check()
