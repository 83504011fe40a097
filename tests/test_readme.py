"""Every command in the README's shell blocks runs, in order, on files made from the shipped data.

The files the commands name (train.csv, big.parquet, digits.npz, sales.csv, ...) are written
first from the shipped thyroid table and scikit-learn's digits; ``make`` lines are the two
set-up commands (CI runs them) and are left out. The multi-process fits run in a slow test.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: Commands that start several training processes: the slow test runs them.
MULTI_PROCESS = re.compile(r"--nproc-per-node|^torchrun")


def readme_commands() -> list[str]:
    """The command lines of the README's ```bash blocks, in order, comments dropped (``make`` lines left out)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("make ")]


@pytest.fixture(scope="module")
def shipped_files(tmp_path_factory):
    """The files the README's commands read, made from the shipped data."""
    from sklearn.datasets import load_digits

    from vaeguard.datasets import load_dataset

    d = tmp_path_factory.mktemp("readme")
    X, y = load_dataset("thyroid", return_X_y=True, as_frame=True)
    table = X.assign(id=[f"p{i:04d}" for i in range(len(X))])
    table.to_csv(d / "train.csv", index=False)
    table.to_csv(d / "big.csv", index=False)
    table.to_parquet(d / "big.parquet", index=False)
    table.assign(label=y.to_numpy()).to_csv(d / "test.csv", index=False)
    table[y.to_numpy() == 0].to_csv(d / "normal.csv", index=False)
    images = (load_digits().images >= 8).astype(np.uint8)
    np.savez(d / "digits.npz", images=images[:1200])
    np.savez(d / "held_out.npz", images=images[1200:])
    rng = np.random.default_rng(0)
    sales = X.iloc[:3000].assign(
        shop=rng.choice(["north", "south"], 3000), weekday=rng.choice(["mon", "tue", "wed"], 3000)
    )
    sales.iloc[:2000].to_csv(d / "sales.csv", index=False)
    sales.iloc[2000:].to_csv(d / "new.csv", index=False)
    return d


def run_line(line: str, where: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", line], cwd=where, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_names_its_commands():
    commands = readme_commands()
    assert len(commands) >= 15 and all(c.split()[0] in ("vaeguard", "torchrun") for c in commands), commands


def test_every_readme_command_runs_on_the_shipped_data(shipped_files):
    for line in readme_commands():
        if MULTI_PROCESS.search(line):
            continue
        result = run_line(line, shipped_files)
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, line
    # what the commands made, as the README says
    restored = np.load(shipped_files / "restored.npz")["images"]
    assert np.array_equal(restored, np.load(shipped_files / "held_out.npz")["images"])
    scores = pd.read_parquet(shipped_files / "scores.parquet")
    assert len(scores) == 3772 and scores["id"].iloc[0] == "p0000" and "top_features" in scores
    assert "Against the labels" in (shipped_files / "report.html").read_text()
    assert set(
        pd.read_csv(shipped_files / "monday.csv")[["shop", "weekday"]].drop_duplicates().itertuples(index=False)
    ) == {("north", "mon")}


@pytest.mark.slow
def test_the_readme_multi_process_commands_run(shipped_files):
    for line in readme_commands():
        if MULTI_PROCESS.search(line):
            result = run_line(line, shipped_files)
            assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
            assert (shipped_files / "big.h5").exists()
