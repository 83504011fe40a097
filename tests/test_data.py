"""Readers and writers: every format in exact chunks, sampling, clear errors, atomic and resumable output."""

import h5py
import numpy as np
import pandas as pd
import pytest

from vaeguard.data import DataError, ResumableWriter, Source, count_rows, iter_chunks, read_all, write_table


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=1003), "b": rng.integers(0, 5, 1003).astype(float)})


@pytest.fixture
def files(table, tmp_path):
    table.to_csv(tmp_path / "t.csv", index=False)
    table.to_parquet(tmp_path / "t.parquet", index=False, row_group_size=300)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["group/table"] = table.to_numpy()
    np.savez(tmp_path / "t.npz", X=table.to_numpy())
    return {
        "csv": str(tmp_path / "t.csv"),
        "parquet": str(tmp_path / "t.parquet"),
        "hdf5": str(tmp_path / "t.h5") + ":/group/table",
        "npz": str(tmp_path / "t.npz") + ":X",
    }


@pytest.mark.parametrize("kind", ["csv", "parquet", "hdf5", "npz"])
def test_every_format_reads_in_exact_chunks_from_any_row(kind, files, table):
    source = Source.parse(files[kind])
    assert source.format == kind and count_rows(source) == 1003
    chunks = list(iter_chunks(source, 250))
    assert [len(c) for c in chunks] == [250, 250, 250, 250, 3]
    whole = pd.concat(chunks, ignore_index=True)
    np.testing.assert_allclose(whole.to_numpy(), table.to_numpy())
    if kind in ("csv", "parquet"):
        assert list(whole.columns) == ["a", "b"]
    else:
        assert list(whole.columns) == ["x0", "x1"]
    rest = pd.concat(list(iter_chunks(source, 250, start_row=500)), ignore_index=True)
    np.testing.assert_allclose(rest.to_numpy(), table.to_numpy()[500:])


def test_images_come_as_arrays(tmp_path):
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    np.savez(tmp_path / "im.npz", images=images)
    chunks = list(iter_chunks(Source.parse(tmp_path / "im.npz"), 2))
    assert [c.shape for c in chunks] == [(2, 4, 4), (2, 4, 4), (1, 4, 4)] and chunks[0].dtype == np.uint8


def test_sampling_keeps_a_uniform_subset_and_says_how_many_there_were(files, table):
    sample, total = read_all(Source.parse(files["csv"]), max_rows=100, seed=1)
    assert total == 1003 and len(sample) == 100
    assert set(sample["a"]) <= set(table["a"])
    again, _ = read_all(Source.parse(files["csv"]), max_rows=100, seed=1)
    pd.testing.assert_frame_equal(sample, again)
    positions = table.reset_index().merge(sample, on=["a", "b"])["index"]
    assert positions.min() < 200 and positions.max() > 800  # drawn from the whole file, not its head
    whole, _ = read_all(Source.parse(files["parquet"]))
    assert len(whole) == 1003


def test_bad_files_get_one_clear_message(tmp_path, files):
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        Source.parse(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_bytes(b"\n\n")
    with pytest.raises(DataError, match="no columns"):
        list(iter_chunks(Source.parse(tmp_path / "blank.csv"), 10))
    (tmp_path / "latin.csv").write_bytes("name,x\nJosé,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_chunks(Source.parse(tmp_path / "latin.csv"), 10))
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a valid Parquet file"):
        list(iter_chunks(Source.parse(tmp_path / "cut.parquet"), 10))
    with pytest.raises(DataError, match="unknown file type '.xlsx'"):
        Source.parse(tmp_path / "t.xlsx")
    with pytest.raises(DataError, match="no such file"):
        Source.parse(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="datasets in the file: group/table"):
        list(iter_chunks(Source.parse(str(tmp_path / "t.h5") + ":/nope"), 10))


def test_writer_output_appears_only_when_complete_and_resumes_after_the_last_chunk(tmp_path, table):
    out = tmp_path / "scores.csv"
    settings = {"model": "abc", "chunk_rows": 400}
    writer = ResumableWriter(out, settings)
    writer.start()
    writer.write(table.iloc[:400], 400)
    writer.write(table.iloc[400:800], 400)
    with open(writer.partial, "ab") as handle:  # a chunk half written when the run was killed
        handle.write(b"0.123,4\n0.5")
    assert not out.exists()
    again = ResumableWriter(out, settings)
    assert again.resume() and again.rows_done == 800
    again.write(table.iloc[800:], 203)
    again.finish()
    assert not again.partial.exists() and not again.state_path.exists()
    pd.testing.assert_frame_equal(pd.read_csv(out), table)
    with pytest.raises(DataError, match=r"other settings \(chunk_rows\)"):
        other = ResumableWriter(tmp_path / "x.csv", settings)
        other.start()
        other.write(table.iloc[:10], 10)
        ResumableWriter(tmp_path / "x.csv", {**settings, "chunk_rows": 10}).resume()
    assert not ResumableWriter(tmp_path / "never.csv", settings).resume()


def test_parquet_output_is_joined_from_its_parts(tmp_path, table):
    out = tmp_path / "scores.parquet"
    writer = ResumableWriter(out, {})
    writer.start()
    writer.write(table.iloc[:500], 500)
    again = ResumableWriter(out, {})
    assert again.resume()
    again.write(table.iloc[500:], 503)
    again.finish()
    pd.testing.assert_frame_equal(pd.read_parquet(out), table)
    write_table(table, tmp_path / "w.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "w.parquet"), table)
    with pytest.raises(DataError, match=r"CSV \(\.csv\) or Parquet \(\.parquet, \.pq\)"):
        ResumableWriter(tmp_path / "x.json", {})


def test_parquet_parts_are_joined_one_at_a_time_into_csv_or_parquet(tmp_path, monkeypatch):
    """How Dask's and the resumable writer's parts become one file: never the whole table in memory at once."""
    import pandas as pd

    from vaeguard.data import join_parquet_parts

    parts = []
    for i in range(3):
        frame = pd.DataFrame({"id": range(i * 4, i * 4 + 4), "score": [0.5 * i] * 4})
        frame["flag"] = pd.array([True, False, None, True], dtype="boolean")
        frame.to_parquet(tmp_path / f"part-{i}.parquet", index=False)
        parts.append(tmp_path / f"part-{i}.parquet")
    whole = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    monkeypatch.setattr(pd, "concat", lambda *a, **k: (_ for _ in ()).throw(AssertionError("concatenated")))
    assert join_parquet_parts(parts, tmp_path / "out.parquet") == 12
    assert join_parquet_parts(parts, tmp_path / "out.csv") == 12
    monkeypatch.undo()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out.parquet"), whole)
    back = pd.read_csv(tmp_path / "out.csv", dtype={"flag": "boolean"})
    pd.testing.assert_frame_equal(back, whole)
