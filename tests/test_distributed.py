"""Scoring on a Dask LocalCluster (2 worker processes) gives the scores of local scoring (to float64 rounding)."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from vaeguard import VAEAnomalyDetector
from vaeguard.cli import cli

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dask")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(900, 3)) @ rng.normal(size=(3, 3)), columns=["a", "b", "c"])
    frame.insert(0, "key", np.arange(5000, 5900))
    det = VAEAnomalyDetector(epochs=3, hidden_dims=[16], latent_dim=2, n_importance_samples=8, random_state=0)
    det.fit(frame[["a", "b", "c"]])
    det.save(d / "m.h5")
    return d, frame, det


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def test_score_dask_equals_local_scoring(setup, client):
    from vaeguard.distributed import score_dask

    d, frame, det = setup
    ddf = dd.from_pandas(frame, npartitions=4)
    scores = score_dask(d / "m.h5", ddf).compute()
    assert list(scores.columns) == ["id", "log_likelihood", "decision", "is_outlier", "log_likelihood_std", "pareto_k"]
    assert scores["id"].tolist() == list(range(900))  # row numbers across partitions
    # equal to float64 rounding: BLAS may round the last bit differently for other batch shapes
    local = det.score_samples(frame[["a", "b", "c"]])
    np.testing.assert_allclose(scores["log_likelihood"].to_numpy(), local, rtol=0, atol=1e-12)
    keyed = score_dask(d / "m.h5", ddf, id_column="key").compute()
    assert keyed["id"].tolist() == frame["key"].tolist()
    assert len(client.scheduler_info()["workers"]) == 2


def test_score_command_with_the_dask_engine(setup, tmp_path):
    d, frame, _ = setup
    frame.iloc[:450].to_parquet(tmp_path / "part-0.parquet", index=False)
    frame.iloc[450:].to_parquet(tmp_path / "part-1.parquet", index=False)
    frame.to_parquet(tmp_path / "all.parquet", index=False)
    runner = CliRunner()
    parts = str(tmp_path / "part-*.parquet")
    distributed_run = runner.invoke(
        cli, ["score", str(d / "m.h5"), parts, "-o", str(tmp_path / "dask.csv"), "--engine", "dask", "--device", "cpu"]
    )
    assert distributed_run.exit_code == 0, distributed_run.output
    local_run = runner.invoke(cli, ["score", str(d / "m.h5"), str(tmp_path / "all.parquet"), "-o",
                                    str(tmp_path / "local.csv")])  # fmt: skip
    assert local_run.exit_code == 0, local_run.output
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "dask.csv"), pd.read_csv(tmp_path / "local.csv"), check_exact=False, rtol=1e-12
    )
    missing = runner.invoke(cli, ["score", str(d / "m.h5"), str(tmp_path / "nothing-*.csv"), "-o", "x.csv",
                                  "--engine", "dask"])  # fmt: skip
    assert missing.exit_code == 2 and "no files match" in missing.stderr


def test_a_second_dask_writer_of_the_same_output_is_refused(setup, client, tmp_path):
    from vaeguard.data import DataError, output_lock
    from vaeguard.distributed import _write_dask, score_dask

    d, frame, _ = setup
    scores = score_dask(d / "m.h5", dd.from_pandas(frame, npartitions=2))
    out = tmp_path / "out.parquet"
    with output_lock(out), pytest.raises(DataError, match="another run is writing"):
        _write_dask(scores, str(out))
    assert not out.exists()
    assert _write_dask(scores, str(out)) == len(frame) and len(pd.read_parquet(out)) == len(frame)
