"""Training across processes (torch.distributed, gloo on this CPU): the same model as one process, clear failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_estimators import ppca

from vaeguard import load
from vaeguard.ddp import ProcessGroup, _native_log_held_back, describe_failure
from vaeguard.training import TrainingConfig, train

WORKER = Path(__file__).parent / "ddp_worker.py"


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    # faulthandler: a rank that aborts in C++ (SIGABRT) prints where its Python code was
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, **kwargs)


def torchrun_command(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    done = run([*torchrun_command(nproc), str(WORKER), *args])
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    return done


def test_shares_cover_a_batch_contiguously_in_rank_order():
    for world in (1, 2, 3, 5):
        for count in (0, 1, 4, 63, 64):
            groups = [ProcessGroup(rank=r, world_size=world, local_rank=r, backend="gloo") for r in range(world)]
            covered = [i for g in groups for i in range(count)[g.share(count)]]
            assert covered == list(range(count))  # contiguous, in rank order, each row once
            sizes = [len(range(count)[g.share(count)]) for g in groups]
            assert max(sizes) - min(sizes) <= 1


def test_two_processes_train_the_weights_one_process_trains(tmp_path):
    # batch_size is the global batch, every draw is shared and the trimmed rows are chosen
    # from the whole batch, so 2 ranks take the steps one process takes: the same weights
    # and objectives to float32 rounding (20 steps of two stacked models and of one single
    # model, trimming 20 % after the warm-up, with validation, and a last batch of 15 rows
    # split 7 + 8).
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    torchrun(1, "train", str(one), "4")
    torchrun(2, "train", str(two), "4")
    ref = torch.load(one / "rank0.pt")
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    for a, b, c in zip(ref["states"], rank0["states"], rank1["states"], strict=True):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
            assert torch.equal(b[key], c[key]), key  # the ranks end with identical weights
    for kind in ("validation", "train"):
        np.testing.assert_allclose(np.array(rank0[kind]), np.array(ref[kind]), rtol=1e-5)
        assert rank0[kind] == rank1[kind]  # every rank saw the same objectives: they stop alike


def test_a_fit_across_processes_reaches_the_single_process_likelihood(tmp_path):
    # The default fit trims 20 % of each batch, chosen from all ranks' losses as one process
    # would: the two fits differ by float rounding only (measured: 5e-8 nats in the mean),
    # far inside the 0.1 nats/row asked, while fits from different seeds spread by ~0.1.
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    torchrun(1, "fit", str(one))
    torchrun(2, "fit", str(two))
    single, across = np.load(one / "scores.npy"), np.load(two / "scores.npy")
    _, truth = ppca(1000, seed=2)
    assert abs(across.mean() - single.mean()) < 0.1, (across.mean(), single.mean())
    assert abs(across.mean() - truth.mean()) < 0.5
    # the threshold: the training rows' scores, each rank scoring its share, then gathered
    assert np.load(two / "offset.npy")[0] == pytest.approx(np.load(one / "offset.npy")[0], abs=1e-4)


def test_ranks_that_hold_different_rows_are_refused(tmp_path):
    torchrun(2, "shards", str(tmp_path))
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "every process must fit the same rows" in message and "rank 1 holds 150 rows" in message


def test_a_regularizer_is_refused_across_processes():
    group = ProcessGroup(rank=0, world_size=2, local_rank=0, backend="gloo")
    config = TrainingConfig(epochs=1, regularizer=object())
    from ddp_worker import rows, small_vae

    with pytest.raises(ValueError, match="regularizer cannot be trained across processes"):
        train(small_vae(0), rows(), config, generator=torch.Generator(), device=torch.device("cpu"), group=group)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "train.csv"
    X, _ = ppca(3000, seed=1)
    pd.DataFrame(X, columns=[f"c{i}" for i in range(10)]).to_csv(path, index=False)
    return path


def vaeguard_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vaeguard", *args]


@pytest.mark.parametrize("launcher", ["option", "torchrun"])
def test_the_command_line_trains_across_processes_and_rank_0_writes_the_file(table, tmp_path, launcher):
    out = tmp_path / "model.h5"
    fit = ["fit", str(table), "-o", str(out), "--param", "epochs=3"]
    if launcher == "option":
        done = run(vaeguard_cli(*fit, "--nproc-per-node", "2"))
    else:  # the documented alternative: torchrun starts `python -m vaeguard fit` on every rank
        done = run([*torchrun_command(2), "-m", "vaeguard", *fit])
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("wrote ") == 1  # one report, by rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.h5"]  # no temporary or second file
    det = load(out)
    assert det.n_features_in_ == 10 and np.isfinite(det.offset_)


def test_a_failing_rank_is_one_line_naming_it(table, tmp_path):
    done = run(
        vaeguard_cli("fit", str(table), "-o", str(tmp_path / "m.h5"), "--columns", "c1,nope", "--nproc-per-node", "2")
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "training process" in lines[0] and "'nope'" in lines[0], done.stderr
    assert not (tmp_path / "m.h5").exists()


def _workers(parent: int) -> list[int]:
    """The processes that ``parent`` spawned for the ranks (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the rank processes through Linux /proc")
def test_killing_one_rank_ends_the_job_within_seconds(table, tmp_path):
    args = vaeguard_cli(
        "fit", str(table), "-o", str(tmp_path / "m.h5"), "--nproc-per-node", "2", "--param", "epochs=300"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(_workers(job.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _workers(job.pid)
        assert len(workers) == 2, "the ranks did not start"
        time.sleep(3.0)  # into training
        os.kill(workers[-1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = job.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert took < 15, took
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "killed by SIGKILL" in lines[0] and "stopped" in lines[0], err
    assert not (tmp_path / "m.h5").exists()
    assert not _workers(job.pid)


def test_failures_are_described_in_one_line():
    class Failure:
        def __init__(self, exitcode, message, timestamp):
            self.exitcode, self.message, self.timestamp = exitcode, message, timestamp

    text = describe_failure({1: Failure(-9, "", 5), 0: Failure(1, {"message": "ValueError: bad\nmore"}, 7)})
    assert text == "training process 1 failed (killed by SIGKILL); the other processes were stopped"
    text = describe_failure({0: Failure(1, {"message": "ValueError: bad\nmore"}, 7)})
    assert text == "training process 0 failed (ValueError: bad); the other processes were stopped"


def test_what_native_code_logs_while_the_ranks_connect_is_dropped(capfd):
    # gloo writes its connection retries to file descriptor 2 from C++, past sys.stderr;
    # a job whose rank died while connecting printed them above its one-line error
    with pytest.raises(RuntimeError, match="refused"), _native_log_held_back():
        os.write(2, b"[gloo] ERROR failed to connect, retry=1\n")
        raise RuntimeError("connectFullMesh failed: Connection refused")
    with _native_log_held_back():
        os.write(2, b"[gloo] ERROR failed to connect, retry=1\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
