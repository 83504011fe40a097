"""The HDF5 model file: round trip, integrity, refusal of damaged and foreign files, atomic writes."""

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import vaeguard
from vaeguard import VAEAnomalyDetector, load, plugins, storage


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(150, 3))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, data):
    from conftest import FAST

    det = VAEAnomalyDetector(**FAST, random_state=0).fit(data)
    path = tmp_path_factory.mktemp("m") / "model.h5"
    det.save(path)
    return det, path


def test_round_trip_gives_identical_scores(model_file, data):
    det, path = model_file
    loaded = load(path)
    np.testing.assert_array_equal(loaded.score_samples(data), det.score_samples(data))
    np.testing.assert_array_equal(loaded.predict(data), det.predict(data))
    np.testing.assert_array_equal(loaded.transform(data), det.transform(data))
    assert loaded.get_params() == det.get_params()
    assert loaded.fingerprint_ == det.fingerprint_ and len(loaded.fingerprint_) == 64
    assert loaded.history_.train_loss == pytest.approx(det.history_.train_loss)


def test_file_holds_json_config_and_arrays_only(model_file):
    _, path = model_file
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "vaeguard-model"
        config = json.loads(f.attrs["config"])
        assert config["model"]["likelihood"] == "diag_gaussian"
        assert all(isinstance(f["arrays"][k], h5py.Dataset) for k in f["arrays"])
        assert all(f["arrays"][k].dtype.kind == "f" for k in f["arrays"])  # numbers, no objects


def test_truncated_file_is_refused(model_file, tmp_path):
    _, path = model_file
    raw = path.read_bytes()
    for cut in (len(raw) // 2, 100, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.h5"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="not a readable HDF5|damaged|integrity"):
            load(bad)


def alter_weights(f: h5py.File) -> None:
    name = next(k for k in f["arrays"] if k.startswith("model."))
    f["arrays"][name][...] = f["arrays"][name][()] + 1e-3


def alter_config(f: h5py.File) -> None:
    config = json.loads(f.attrs["config"])
    config["fitted"]["offset_"] = 123.0
    f.attrs["config"] = json.dumps(config, sort_keys=True)


@pytest.mark.parametrize("alter", [alter_weights, alter_config])
def test_altered_files_are_refused(model_file, tmp_path, alter):
    _, path = model_file
    bad = tmp_path / "altered.h5"
    bad.write_bytes(path.read_bytes())
    with h5py.File(bad, "r+") as f:
        alter(f)
    with pytest.raises(ValueError, match="integrity check"):
        load(bad)


def test_foreign_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ValueError, match="not a vaeguard model file"):
        load(foreign)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        load(text)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.h5")


def test_missing_plugin_is_named_and_nothing_is_imported(tmp_path, data, monkeypatch):
    from conftest import FAST

    path = tmp_path / "t.h5"
    VAEAnomalyDetector(**FAST, likelihood="studentt", random_state=0).fit(data).save(path)
    monkeypatch.setattr(plugins, "_GLOBAL_PM", plugins.make_plugin_manager(load_entrypoints=False))
    with pytest.raises(ValueError, match="needs the likelihood 'studentt', which no loaded plugin provides"):
        load(path)


def test_writes_are_atomic(model_file, tmp_path, monkeypatch):
    det, path = model_file
    target = tmp_path / "model.h5"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.File, "create_dataset", fail, raising=False)
    monkeypatch.setattr(h5py.Group, "create_dataset", fail)
    with pytest.raises(OSError, match="disk full"):
        det.save(target)
    assert target.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == ["model.h5"]  # and no temporary file is left


def test_fingerprint_covers_names_shapes_and_values():
    a = {"w": np.zeros((2, 3))}
    base = storage.fingerprint({"k": 1}, a)
    assert base != storage.fingerprint({"k": 2}, a)
    assert base != storage.fingerprint({"k": 1}, {"w": np.zeros((3, 2))})
    assert base != storage.fingerprint({"k": 1}, {"v": np.zeros((2, 3))})
    assert base == storage.fingerprint({"k": 1}, {"w": np.zeros((2, 3))})
    assert vaeguard.__version__


def test_atomic_write_replaces_the_target_whole_or_leaves_it_as_it_was(tmp_path):
    """The one temp-file-and-rename routine every writer uses (model files, tables, reports, .npz, pictures)."""
    import pytest

    from vaeguard.storage import atomic_write

    target = tmp_path / "out.txt"
    target.write_text("old")

    def half_then_fail(tmp):
        with open(tmp, "w") as handle:
            handle.write("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    # permissions as open() gives a new file (not mkstemp's owner-only 0o600), or the replaced file's
    mask = os.umask(0)
    os.umask(mask)
    fresh = tmp_path / "fresh.txt"
    atomic_write(fresh, lambda tmp: Path(tmp).write_text("x"))
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~mask
    target.chmod(0o640)
    atomic_write(target, lambda tmp: Path(tmp).write_text("newer"))
    assert target.stat().st_mode & 0o777 == 0o640


def test_model_files_written_by_an_earlier_version_still_load_and_score_the_same():
    """Fixtures written by the code named in tests/data/written_by.txt (make_model_files.py): a table
    mixture with lattice and categorical columns, and a time-series detector. Any later change of the
    file format or of scoring must keep reading them and giving the same scores (CPU scoring: to the
    rounding of the tables' likelihood terms, computed in float32 since the files were written: each
    of some twenty operations rounds to 2⁻²⁴ of its size, so a row's score to ~1e-6 of its size)."""
    import sys

    from vaeguard import load

    data = Path(__file__).parent / "data"
    sys.path.insert(0, str(data))
    try:
        from make_model_files import series, table
    finally:
        sys.path.remove(str(data))
    expected = np.load(data / "model-file-scores-0.1.npz")
    det = load(data / "table-0.1.h5")
    assert len(det.models_) == 3 and det.offset_ == float(expected["table_offset"])
    np.testing.assert_allclose(det.score_samples(table().iloc[:50]), expected["table"], rtol=2e-6, atol=1e-9)
    ts = load(data / "series-0.1.h5")
    np.testing.assert_allclose(ts.score_samples(series()[:200]), expected["series"], rtol=2e-6, atol=1e-9)
