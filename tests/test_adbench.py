"""The benchmark suite's protocol (benchmarks/adbench.py): splits, scaling, failures as rows, table shape."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import adbench
import synthetic_anomalies as sa

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
    assert lines[0] == "| data set | half | vaeguard | gmm |"
    assert any(line.startswith("| **mean** |") for line in lines) and len(lines) >= 2 + 2 + 3
    # breastw is in half B, Pima in half A: both halves get their mean and vaeguard's standing
    assert any(line.startswith("| *mean, half A (decides)* |") for line in lines)
    assert any(line.startswith("| Pima | A |") for line in lines)
    assert any(line.startswith("- half B: vaeguard") for line in lines)
    assert any(line.startswith("- against gmm per set:") for line in lines)
    assert adbench.plot(df, ["vaeguard", "gmm"], tmp_path / "p.png") is None or (tmp_path / "p.png").stat().st_size > 0
    assert isinstance(df, pd.DataFrame)


def test_the_split_covers_every_shared_set_once_and_halves_are_disjoint():
    a, b = set(adbench.SPLIT["A"]), set(adbench.SPLIT["B"])
    assert not a & b and len(a) == 10 and len(b) == 9
    if SHARED.is_dir():
        assert {p.stem for p in SHARED.glob("*.npz")} == a | b
    assert adbench.split_half("4_breastw") == "B" and adbench.split_half("99_other") == "-"


def test_train_rows_subsamples_the_train_part_only():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(1000, 3)), (rng.random(1000) < 0.1).astype(int)
    X_tr, X_te, y_tr, y_te = adbench.split_and_scale(X, y, seed=0, train_rows=100)
    assert len(X_tr) == len(y_tr) == 100 and len(X_te) == 300
    np.testing.assert_allclose(X_tr.min(0), 0) and np.testing.assert_allclose(X_tr.max(0), 1)
    full = adbench.split_and_scale(X, y, seed=0)
    np.testing.assert_array_equal(y_te, full[3])


def _correlated_normals(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 1))
    X = np.c_[f + 0.3 * rng.normal(size=(n, 1)), -f + 0.3 * rng.normal(size=(n, 1)), rng.normal(size=(n, 1))]
    y = np.r_[np.zeros(n - n // 10, dtype=int), np.ones(n // 10, dtype=int)]
    return X, y


@pytest.mark.parametrize("kind", sa.KINDS)
def test_synthetic_tables_keep_the_counts_and_are_reproducible(kind):
    X, y = _correlated_normals()
    Xs, ys = sa.synthetic_anomalies(X, y, kind, seed=3)
    assert Xs.shape == X.shape and ys.sum() == 300 and np.isfinite(Xs).all()
    again = sa.synthetic_anomalies(X, y, kind, seed=3)
    np.testing.assert_array_equal(again[0], Xs)


def test_dependency_anomalies_keep_the_marginals_and_break_the_correlation():
    X, y = _correlated_normals()
    Xs, ys = sa.synthetic_anomalies(X, y, "dependency", seed=0)
    normal, odd = Xs[ys == 0], Xs[ys == 1]
    assert np.corrcoef(normal[:, 0], normal[:, 1])[0, 1] < -0.8  # the real rows, dependence kept
    # independent columns: the correlation of 300 rows is 0 within a few standard errors (1/sqrt(300))
    assert abs(np.corrcoef(odd[:, 0], odd[:, 1])[0, 1]) < 4 / np.sqrt(300)
    # each column's marginal is kept: means within 4 standard errors, spreads within 20 %
    se = normal.std(0) / np.sqrt(300)
    assert (abs(odd.mean(0) - normal.mean(0)) < 4 * se).all()
    np.testing.assert_allclose(odd.std(0), normal.std(0), rtol=0.2)


def test_local_global_and_clustered_anomalies_sit_where_adbench_puts_them():
    X, y = _correlated_normals()
    span = X.max(0) - X.min(0)
    local_X, local_y = sa.synthetic_anomalies(X, y, "local", seed=0)
    # covariance x 5 around the same centres: the spread is about sqrt(5) times the normal rows'
    ratio = local_X[local_y == 1].std(0) / local_X[local_y == 0].std(0)
    np.testing.assert_allclose(ratio, np.sqrt(sa.ALPHA), rtol=0.25)
    global_X, global_y = sa.synthetic_anomalies(X, y, "global", seed=0)
    odd = global_X[global_y == 1]
    assert (odd.min(0) >= X.min(0) - 0.1 * span - 1e-9).all() and (odd.max(0) <= X.max(0) + 0.1 * span + 1e-9).all()
    clustered_X, clustered_y = sa.synthetic_anomalies(X, y, "clustered", seed=0)
    # the means x 5 in the unit cube: the anomalies' centre moves by 4 x the normal centre's offset from the minimum
    centre = (clustered_X[clustered_y == 0].mean(0) - X.min(0)) / span
    moved = (clustered_X[clustered_y == 1].mean(0) - X.min(0)) / span
    np.testing.assert_allclose(moved, sa.ALPHA * centre, rtol=0.1, atol=0.05)


def test_unknown_kind_is_refused():
    X, y = _correlated_normals(100)
    with pytest.raises(ValueError, match="kind must be one of"):
        sa.synthetic_anomalies(X, y, "strange", seed=0)


def test_readme_table_has_the_halves_their_means_and_the_best_in_bold():
    rows = []
    for dataset, a_or_b in (("campaign", 0.8), ("glass", 0.6), ("cardio", 0.7)):
        for seed in (0, 1):
            rows.append((dataset, seed, "vaeguard", a_or_b + 0.01 * seed, 0.5, 1.0, 0.5, ""))
            rows.append((dataset, seed, "iforest", 0.75, 0.4, 0.1, 0.1, ""))
    df = pd.DataFrame(rows, columns=["dataset", "seed", "method", "auroc", "ap", "fit_s", "score_s", "error"])
    lines = adbench.readme_table(df).splitlines()
    assert lines[0] == "| data set | half | vaeguard | IForest |"
    # half A (campaign, cardio: by name), its mean, then half B (glass), its mean
    assert [line.split(" | ")[0][2:] for line in lines[2:8]] == [
        "campaign", "cardio", "*mean, half A (decides)*", "glass", "*mean, half B (confirms)*", "**mean AUROC, 3 sets**"
    ]  # fmt: skip
    assert lines[2] == "| campaign | A | **0.805** | 0.750 |" and lines[3] == "| cardio | A | 0.705 | **0.750** |"
    assert lines[4] == "| *mean, half A (decides)* | | **0.755** | 0.750 |"
    assert lines[-1] == "| fit + score, 6 runs (s) | | 9 | 1 |"
