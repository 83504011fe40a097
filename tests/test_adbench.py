"""The benchmark suite's protocol (benchmarks/adbench.py): splits, scaling, failures as rows, table shape."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import adbench

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "adbench"


def test_split_is_stratified_70_30_and_scaled_on_train_only():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 3)) * [1, 10, 100]
    y = (rng.random(1000) < 0.1).astype(int)
    X_tr, X_te, y_tr, y_te = adbench.split_and_scale(X, y, seed=0)
    assert len(X_tr) == 700 and len(X_te) == 300
    assert y_tr.mean() == pytest.approx(y.mean(), abs=0.005) and y_te.mean() == pytest.approx(y.mean(), abs=0.01)
    np.testing.assert_allclose(X_tr.min(0), 0) and np.testing.assert_allclose(X_tr.max(0), 1)
    assert (X_te.min(0) < 0).any() or (X_te.max(0) > 1).any()  # the test part is not rescaled to [0, 1]
    again = adbench.split_and_scale(X, y, seed=0)
    np.testing.assert_array_equal(again[0], X_tr)


def test_files_are_ordered_numerically_and_named_without_prefix(tmp_path):
    for name in ["18_b", "4_a", "123_c"]:
        np.savez(tmp_path / f"{name}.npz", X=np.zeros((4, 2)), y=np.array([0, 0, 1, 1]))
    files = adbench.dataset_files(tmp_path)
    assert [f.stem for f in files] == ["4_a", "18_b", "123_c"]
    name, X, y = adbench.load_npz(files[0])
    assert name == "a" and X.shape == (4, 2) and y.dtype.kind == "i"


def test_a_failing_method_is_a_row_not_a_crash(monkeypatch):
    def broken(seed):
        raise RuntimeError("no such detector")

    monkeypatch.setitem(adbench.METHODS, "broken", broken)
    X = np.random.default_rng(0).normal(size=(50, 2))
    row = adbench.run_one("broken", X, X, np.r_[np.zeros(40), np.ones(10)], seed=0)
    assert np.isnan(row["auroc"]) and row["error"] == "RuntimeError: no such detector"


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/adbench")
def test_smoke_two_small_sets_one_seed(tmp_path, monkeypatch):
    for name in ["4_breastw.npz", "29_Pima.npz"]:
        (tmp_path / name).write_bytes((SHARED / name).read_bytes())
    monkeypatch.setitem(adbench.VAEGUARD_PARAMS, "epochs", 5)
    df = adbench.run(tmp_path, [0], ["vaeguard", "gmm"])
    assert df.shape[0] == 4 and set(df["dataset"]) == {"breastw", "Pima"}
    assert df["error"].eq("").all() and df["auroc"].between(0, 1).all()
    table = adbench.summarise(df, ["vaeguard", "gmm"])
    lines = table.splitlines()
    assert lines[0] == "| data set | vaeguard | gmm |"
    assert any(line.startswith("| **mean** |") for line in lines) and len(lines) >= 2 + 2 + 3
    assert adbench.plot(df, ["vaeguard", "gmm"], tmp_path / "p.png") is None or (tmp_path / "p.png").stat().st_size > 0
    assert isinstance(df, pd.DataFrame)
