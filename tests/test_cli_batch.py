"""The batch commands: fit, score (chunked, atomic, resumable), evaluate, sample, datasets; bad files and rows."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from vaeguard import load
from vaeguard.cli import cli

FAST = ["--param", "epochs=5", "--param", "hidden_dims=[16]", "--param", "latent_dim=2", "--param",
        "n_importance_samples=8"]  # fmt: skip


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training CSV, a test CSV with planted anomalies in column 'c', and a model trained from the command line."""
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1500, 2))
    values = np.column_stack([z[:, 0], z[:, 1], z[:, 0] + z[:, 1], z[:, 0] - z[:, 1]]) + 0.1 * rng.normal(
        size=(1500, 4)
    )
    frame = pd.DataFrame(values, columns=["a", "b", "c", "d"])
    frame.insert(0, "key", [f"r{i}" for i in range(len(frame))])
    frame.iloc[:1000].to_csv(d / "train.csv", index=False)
    test = frame.iloc[1000:].reset_index(drop=True)
    test["label"] = 0
    test.loc[::25, "c"] += 8.0
    test.loc[::25, "label"] = 1
    test.to_csv(d / "test.csv", index=False)
    test.to_parquet(d / "test.parquet", index=False)
    result = run("fit", str(d / "train.csv"), "-o", str(d / "m.h5"), "--id-column", "key", *FAST)
    assert result.exit_code == 0, result.output
    return d


def test_fit_writes_a_model_of_the_named_columns(workdir):
    det = load(workdir / "m.h5")
    assert list(det.feature_names_in_) == ["a", "b", "c", "d"] and det.epochs == 5
    result = run("fit", str(workdir / "train.csv"), "-o", str(workdir / "m2.h5"), "--columns", "a,b", "--max-rows",
                 "300", "--config", "tabular-fast", "--param", "epochs=2")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1000 rows; training on a random sample of 300" in result.stderr
    small = load(workdir / "m2.h5")
    assert list(small.feature_names_in_) == ["a", "b"] and small.n_importance_samples == 16 and small.epochs == 2


def test_fit_refuses_an_id_or_label_column_in_one_line_naming_it(workdir):
    # issue 19: an id left among the features became 1000 categories; the anomaly labels a feature
    result = run("fit", str(workdir / "train.csv"), "-o", str(workdir / "ids.h5"), *FAST)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "column 'key' has 1000 distinct values in 1000 rows" in result.stderr and "--id-column key" in result.stderr
    assert not (workdir / "ids.h5").exists()
    result = run("fit", str(workdir / "test.csv"), "-o", str(workdir / "labels.h5"), "--id-column", "key", *FAST)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "column 'label' looks like the anomaly labels" in result.stderr and "--label-column label" in result.stderr


@pytest.mark.parametrize("config", [[], ["--config", "tabular"]])
def test_fit_with_a_mistyped_param_is_one_line_naming_the_nearest_parameter(workdir, config):
    result = run("fit", str(workdir / "train.csv"), "-o", str(workdir / "typo.h5"), "--param", "epoch=5", *config)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "--param epoch: no such parameter; did you mean 'epochs'?" in result.stderr
    assert "preset" not in result.stderr and "Traceback" not in result.output


def test_score_says_which_columns_of_the_file_it_ignores(workdir):
    result = run("score", str(workdir / "m.h5"), str(workdir / "test.csv"), "-o", str(workdir / "ign.csv"),
                 "--id-column", "key")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "scoring the model's 4 column(s); ignoring 'label'" in result.stderr
    det = load(workdir / "m.h5")
    with pytest.raises(ValueError, match=r"(?s)unseen at fit time:\n- key\n- label.*X\[model.feature_names_in_\]"):
        det.score_samples(pd.read_csv(workdir / "test.csv"))


def test_jobs_sets_the_models_threads_and_a_bad_value_is_one_line(workdir):
    result = run("fit", str(workdir / "train.csv"), "-o", str(workdir / "jobs.h5"), "--id-column", "key",
                 "--jobs", "2", *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert load(workdir / "jobs.h5").n_jobs == 2
    result = run("score", str(workdir / "jobs.h5"), str(workdir / "test.csv"), "-o", str(workdir / "j.csv"),
                 "--jobs", "0")  # fmt: skip
    assert result.exit_code == 2 and "--jobs: n_jobs must be a non-zero integer or None, got 0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_fit_shows_it_is_alive_in_a_log(workdir):
    # stderr is not a terminal here: a line per tenth of the epochs with the losses, no redrawn bar
    out = str(workdir / "alive.h5")
    result = run("fit", str(workdir / "train.csv"), "-o", out, "--id-column", "key", *FAST, "--param", "epochs=20")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("training: ")]
    assert [line.split(" (")[0] for line in lines] == [f"training: epoch {e}/20" for e in range(2, 21, 2)], lines
    assert "training loss" in lines[0] and "validation loss" in lines[0] and "\r" not in result.stderr
    quiet = run("fit", str(workdir / "train.csv"), "-o", out, "--id-column", "key", *FAST, "--no-progress")
    assert quiet.exit_code == 0 and "training:" not in quiet.stderr


def test_thresholds_from_the_command_line(workdir, tmp_path):
    train, test = str(workdir / "train.csv"), str(workdir / "test.csv")
    fit = ("fit", train, "--id-column", "key", *FAST, "--no-progress")
    assert run(*fit, "-o", str(tmp_path / "c.h5"), "--contamination", "0.02").exit_code == 0
    assert load(tmp_path / "c.h5").threshold_rule_ == {"rule": "contamination", "contamination": 0.02}
    assert run(*fit, "-o", str(tmp_path / "o.h5"), "--offset", "-25").exit_code == 0
    assert load(tmp_path / "o.h5").offset_ == -25.0
    both = run(*fit, "-o", str(tmp_path / "b.h5"), "--offset", "-25", "--contamination", "0.1")
    assert both.exit_code == 2 and "give one" in both.stderr and not (tmp_path / "b.h5").exists()
    # threshold: what set_threshold does, written back to the model file
    normal = pd.read_csv(test).query("label == 0")
    normal.to_csv(tmp_path / "normal.csv", index=False)
    expected = load(tmp_path / "c.h5").set_threshold(normal[["a", "b", "c", "d"]], fpr=0.05)
    result = run("threshold", str(tmp_path / "c.h5"), str(tmp_path / "normal.csv"), "--fpr", "0.05")
    assert result.exit_code == 0, result.output
    again = load(tmp_path / "c.h5")
    assert again.offset_ == expected.offset_ and again.threshold_rule_ == expected.threshold_rule_
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "normal.csv", "o.h5"]  # nothing else left
    # evaluate: the thresholds that reach an FPR and a recall, and what they give
    result = run("evaluate", str(tmp_path / "c.h5"), test, "--label-column", "label", "--fpr", "0.05",
                 "--recall", "0.5", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    scores = again.score_samples(pd.read_csv(test)[["a", "b", "c", "d"]])
    y = pd.read_csv(test)["label"].to_numpy() == 1
    at_fpr = metrics["threshold_for_fpr_0.05"]
    assert at_fpr["threshold"] == pytest.approx(again.offset_) and at_fpr["fpr"] == pytest.approx(0.05, abs=0.005)
    at_recall = metrics["threshold_for_recall_0.5"]
    caught = np.sort(scores[y])
    assert at_recall["recall"] >= 0.5 and (caught < at_recall["threshold"]).sum() == np.ceil(0.5 * y.sum())
    assert (scores < at_recall["threshold"]).sum() == at_recall["flagged"]


def test_score_writes_the_model_scores_with_ids_and_explanations(workdir):
    out = workdir / "scores.parquet"
    result = run("score", str(workdir / "m.h5"), str(workdir / "test.csv"), "-o", str(out), "--id-column", "key",
                 "--explain", "--chunk-rows", "128")  # fmt: skip
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(out)
    assert list(scores.columns) == [
        "id",
        "log_likelihood",
        "decision",
        "is_outlier",
        "log_likelihood_std",
        "pareto_k",
        "top_features",
    ]
    test = pd.read_csv(workdir / "test.csv")
    assert scores["id"].tolist() == test["key"].tolist()
    det = load(workdir / "m.h5")
    expected = det.score_samples(test[["a", "b", "c", "d"]])
    np.testing.assert_allclose(scores["log_likelihood"], expected, rtol=0, atol=1e-9)  # chunking changes nothing
    np.testing.assert_allclose(scores["decision"], expected - det.offset_)
    assert scores["is_outlier"].tolist() == (expected < det.offset_).tolist()
    _, std, k_hat = det.log_likelihood(test[["a", "b", "c", "d"]], return_std=True, return_diagnostic=True)
    np.testing.assert_allclose(scores["log_likelihood_std"], std, rtol=0, atol=1e-9)
    np.testing.assert_allclose(scores["pareto_k"], k_hat, rtol=0, atol=1e-9)
    planted = scores["top_features"][test["label"] == 1].str.split(";").str[0]
    assert (planted == "c").mean() >= 0.9


def test_score_to_stdout_prints_only_the_csv(workdir):
    result = run("score", str(workdir / "m.h5"), str(workdir / "test.parquet"), "-o", "-", "--n-samples", "4")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "id,log_likelihood,decision,is_outlier,log_likelihood_std,pareto_k" and len(lines) == 501
    assert lines[1].startswith("0,")


def test_evaluate_reports_auroc_and_the_threshold(workdir):
    result = run("evaluate", str(workdir / "m.h5"), str(workdir / "test.csv"), "--label-column", "label", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["rows"] == 500 and metrics["anomalies"] == 20
    assert metrics["auroc"] > 0.9 and 0 <= metrics["recall_at_threshold"] <= 1
    text = run("evaluate", str(workdir / "m.h5"), str(workdir / "test.csv"), "--label-column", "label")
    assert "AUROC" in text.stdout and "precision" in text.stdout


def test_sample_and_datasets(workdir):
    out = workdir / "samples.csv"
    result = run("sample", str(workdir / "m.h5"), "-n", "7", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out).shape == (7, 4) and list(pd.read_csv(out).columns) == ["a", "b", "c", "d"]
    listing = run("datasets", "--json")
    assert "thyroid" in json.loads(listing.stdout)


def test_bad_files_exit_2_with_one_line(workdir, tmp_path):
    model = str(workdir / "m.h5")
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "latin.csv").write_bytes("a,b,c,d\n1,2,3,é\n".encode("latin-1"))
    pd.DataFrame({"a": [1.0], "x": [2.0]}).to_csv(tmp_path / "cols.csv", index=False)
    data = (workdir / "test.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    cases = {
        "empty.csv": "is empty",
        "latin.csv": "not UTF-8",
        "cols.csv": "lacks column(s) 'b', 'c', 'd' that the model was trained on",
        "cut.parquet": "not a valid Parquet file",
    }
    for name, message in cases.items():
        result = run("score", model, str(tmp_path / name), "-o", str(tmp_path / "out.csv"))
        assert result.exit_code == 2, (name, result.output)
        assert message in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out.csv").exists()
    debug = CliRunner().invoke(cli, ["--debug", "score", model, str(tmp_path / "cols.csv"), "-o", "-"])
    assert debug.exit_code == 2 and "Traceback" in debug.stderr


@pytest.mark.parametrize("name", ["scores.txt", "scores.tsv", "scores"])
def test_an_output_name_that_is_neither_csv_nor_parquet_is_refused(workdir, tmp_path, name):
    result = run("score", str(workdir / "m.h5"), str(workdir / "test.csv"), "-o", str(tmp_path / name))
    assert result.exit_code == 2 and "results are written as CSV (.csv) or Parquet" in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []


def test_bad_rows_stop_the_run_or_are_skipped_or_get_nan(workdir, tmp_path):
    test = pd.read_csv(workdir / "test.csv")
    test["b"] = test["b"].astype(object)
    test.loc[7, "b"] = "n/a?"
    test.loc[9, "d"] = np.inf
    test.to_csv(tmp_path / "bad.csv", index=False)
    model, bad, out = str(workdir / "m.h5"), str(tmp_path / "bad.csv"), str(tmp_path / "out.csv")
    result = run("score", model, bad, "-o", out, "--id-column", "key")
    assert result.exit_code == 2
    assert "row 7 (id 'r1007'): column 'b' holds 'n/a?', not a number" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]  # no empty out.csv.partial left behind
    skipped = run("score", model, bad, "-o", out, "--on-bad-row", "skip")
    assert skipped.exit_code == 0 and "2 row(s) could not be scored and were left out" in skipped.stderr
    assert "scored 498 rows into" in skipped.stderr  # the rows written, not the rows read
    assert len(pd.read_csv(out)) == 498 and 7 not in pd.read_csv(out)["id"].tolist()
    filled = run("score", model, bad, "-o", out, "--on-bad-row", "nan")
    scores = pd.read_csv(out)
    assert filled.exit_code == 0 and len(scores) == 500
    assert scores["log_likelihood"].isna().tolist() == [i in (7, 9) for i in range(500)]


def test_a_killed_run_leaves_no_output_and_resumes_to_the_same_result(workdir, tmp_path):
    big = pd.concat([pd.read_csv(workdir / "test.csv")] * 40, ignore_index=True)  # 20,000 rows
    big.to_csv(tmp_path / "big.csv", index=False)
    model, data = str(workdir / "m.h5"), str(tmp_path / "big.csv")
    args = ["score", model, data, "--chunk-rows", "500", "--n-samples", "64", "--id-column", "key"]
    whole = run(*args, "-o", str(tmp_path / "whole.csv"))
    assert whole.exit_code == 0, whole.output
    out = tmp_path / "resumed.csv"
    state = tmp_path / "resumed.csv.partial.json"
    code = "import sys; from vaeguard.cli import main; sys.argv[0] = 'vaeguard'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "-o", str(out)], env={**os.environ,
                            "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["rows_done"] >= 2000:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["rows_done"]
    assert 2000 <= done < 20000 and not out.exists()
    resumed = run(*args, "-o", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming after row {done}" in resumed.stderr
    assert out.read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert not state.exists()


def test_image_models_from_npz(tmp_path):
    from sklearn.datasets import load_digits

    np.savez(tmp_path / "digits.npz", images=load_digits().images[:300])
    result = run("fit", str(tmp_path / "digits.npz"), "-o", str(tmp_path / "d.h5"), *FAST)
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "d.h5").model_spec_["encoder"] == "mlp"  # 8 × 8: the MLP below 16 × 16
    scored = run("score", str(tmp_path / "d.h5"), str(tmp_path / "digits.npz"), "-o", str(tmp_path / "s.csv"))
    assert scored.exit_code == 0 and len(pd.read_csv(tmp_path / "s.csv")) == 300
    drawn = run("sample", str(tmp_path / "d.h5"), "-n", "4", "-o", str(tmp_path / "s.npz"))
    assert drawn.exit_code == 0 and np.load(tmp_path / "s.npz")["images"].shape == (4, 8, 8)


def test_report_with_ids_and_labels_as_a_browser_shows_it(workdir, tmp_path):
    from browser import chromium, screenshot, what_is_visible

    out = tmp_path / "report.html"
    result = run("report", str(workdir / "m.h5"), str(workdir / "test.csv"), "-o", str(out), "--id-column", "key",
                 "--label-column", "label")  # fmt: skip
    assert result.exit_code == 0, result.output
    page = out.read_text()
    metrics = page.split('id="label-metrics">')[1].split("</p>")[0]
    auroc = float(metrics.split("AUROC <b>")[1].split("<")[0])
    assert auroc > 0.9, metrics  # the planted anomalies in column c
    test = pd.read_csv(workdir / "test.csv")
    confusion = page.split('<table id="confusion">')[1].split("</table>")[0]
    counts = [int(c.replace(",", "")) for c in re.findall(r'<td class="num">([\d,]+)</td>', confusion)]
    assert sum(counts) == len(test) and counts[0] + counts[1] == int(test["label"].sum())
    most = page.split('id="most-anomalous"')[1].split("</section>")[0]
    assert "<th>id</th>" in most and most.count("<td>r1") == 20  # rows named by their keys
    bad = run("report", str(workdir / "m.h5"), str(workdir / "test.csv"), "-o", str(out), "--label-column", "nope")
    assert bad.exit_code == 2 and "no column(s) 'nope'" in bad.stderr
    if chromium() is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium): the page was not rendered")
    seen = what_is_visible(out, tmp_path)
    assert seen["problems"] == [] and seen["title"].startswith("vaeguard report")
    assert len(seen["images"]) == 4 and all(i["loaded"] and i["width"] > 100 for i in seen["images"]), seen["images"]
    shown = {s["id"]: s for s in seen["sections"]}
    assert list(shown) == ["summary", "score-histogram", "labels", "most-anomalous", "latent-map", "training-curves"]
    assert all(s["height"] > 50 for s in shown.values()) and shown["labels"]["headings"] == ["Against the labels"]
    screenshot(out, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_is_one_self_contained_page_with_its_sections(workdir, tmp_path):
    out = tmp_path / "report.html"
    result = run("report", str(workdir / "m.h5"), str(workdir / "test.csv"), "-o", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text()
    for section in ("summary", "score-histogram", "most-anomalous", "latent-map", "training-curves"):
        assert f'<section id="{section}">' in page
    assert page.count("data:image/png;base64,") == 3 and 'src="http' not in page
    most = page.split('id="most-anomalous"')[1].split("</section>")[0]
    assert most.count("<tr>") == 21 and "c, " in most  # 20 rows; planted anomalies blame column c
    assert "<th>k̂</th>" in most and "unreliable estimates (Pareto k̂ &gt; 0.7)" in page
    images = tmp_path / "digits.npz"
    from sklearn.datasets import load_digits

    np.savez(images, images=load_digits().images[:200])
    assert run("fit", str(images), "-o", str(tmp_path / "d.h5"), *FAST).exit_code == 0
    result = run("report", str(tmp_path / "d.h5"), str(images), "-o", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert '<section id="samples">' in page and 'id="traversals"' in page and 'id="interpolation"' in page
    assert page.count("data:image/png") == 7  # histogram, map, curves; samples, traversals, path, worst
    drawn = run(
        "sample",
        str(tmp_path / "d.h5"),
        "-n",
        "8",
        "-o",
        str(tmp_path / "s.npz"),
        "--source",
        "aggregate",
        "--png",
        str(tmp_path / "pics"),
    )
    assert drawn.exit_code == 0, drawn.output
    assert np.load(tmp_path / "s.npz")["images"].shape == (8, 8, 8)
    for name in ("samples", "traversals", "interpolation"):
        assert (tmp_path / f"pics-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run("sample", str(workdir / "m.h5"), "-o", str(tmp_path / "t.csv"), "--png", str(tmp_path / "t"))
    assert table.exit_code == 2 and "image model" in table.stderr
    # a conditional image model: samples and pictures under one label; scoring from the CLI is refused by name
    digits = load_digits()
    from vaeguard import VAEAnomalyDetector

    VAEAnomalyDetector(conditional=True, epochs=2, random_state=0).fit(digits.images[:200], digits.target[:200]).save(
        tmp_path / "c.h5"
    )
    drawn = run("sample", str(tmp_path / "c.h5"), "-n", "4", "-o", str(tmp_path / "c.npz"), "--condition", "3",
                "--png", str(tmp_path / "c"))  # fmt: skip
    assert drawn.exit_code == 0, drawn.output
    assert np.load(tmp_path / "c.npz")["images"].shape == (4, 8, 8) and (tmp_path / "c-traversals.png").exists()
    refused = run("score", str(tmp_path / "c.h5"), str(images), "-o", str(tmp_path / "c.csv"))
    assert refused.exit_code == 2 and "this image model is conditional" in refused.stderr


def test_progress_goes_to_stderr_only_when_asked(workdir, tmp_path):
    args = ["score", str(workdir / "m.h5"), str(workdir / "test.csv"), "--chunk-rows", "100", "--n-samples", "2"]
    shown = run(*args, "-o", str(tmp_path / "a.csv"), "--progress")
    assert shown.exit_code == 0 and "500/500" in shown.stderr and "rows/s" in shown.stderr
    quiet = run(*args, "-o", "-")  # not a terminal: no progress; stdout holds only the table
    assert "rows/s" not in quiet.stderr and quiet.stdout.startswith("id,log_likelihood")


def test_written_files_follow_the_umask(workdir, tmp_path):
    # issue 19: model files and .vgz files came out 0600 whatever the umask
    from sklearn.datasets import load_digits

    np.savez(tmp_path / "bits.npz", images=(load_digits().images[:300] >= 8).astype(np.uint8))
    before = os.umask(0o027)
    try:
        assert run("fit", str(workdir / "train.csv"), "-o", str(tmp_path / "m.h5"), "--id-column", "key",
                   *FAST).exit_code == 0  # fmt: skip
        assert (
            run("score", str(tmp_path / "m.h5"), str(workdir / "test.csv"), "-o", str(tmp_path / "s.csv")).exit_code
            == 0
        )
        assert run("fit", str(tmp_path / "bits.npz"), "-o", str(tmp_path / "b.h5"), *FAST).exit_code == 0
        assert (
            run("compress", str(tmp_path / "b.h5"), str(tmp_path / "bits.npz"), "-o", str(tmp_path / "b.vgz")).exit_code
            == 0
        )
    finally:
        os.umask(before)
    for name in ("m.h5", "s.csv", "b.h5", "b.vgz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_compress_and_decompress_files(tmp_path):
    from sklearn.datasets import load_digits

    images = (load_digits().images[:400] >= 8).astype(np.uint8)
    np.savez(tmp_path / "bits.npz", images=images)
    assert run("fit", str(tmp_path / "bits.npz"), "-o", str(tmp_path / "b.h5"), *FAST).exit_code == 0
    packed = run(
        "compress", str(tmp_path / "b.h5"), str(tmp_path / "bits.npz"), "-o", str(tmp_path / "b.vgz"), "--progress"
    )
    assert packed.exit_code == 0, packed.output
    assert "bits/dim" in packed.stderr and "400/400" in packed.stderr and "samples/s" in packed.stderr
    restored = run("decompress", str(tmp_path / "b.h5"), str(tmp_path / "b.vgz"), "-o", str(tmp_path / "back.npz"))
    assert restored.exit_code == 0, restored.output
    assert "samples/s" not in restored.stderr  # not a terminal: no progress unless asked
    assert np.array_equal(np.load(tmp_path / "back.npz")["images"], images)  # the key sample writes images under
    assert run("fit", str(tmp_path / "bits.npz"), "-o", str(tmp_path / "other.h5"), *FAST, "--seed", "1").exit_code == 0
    wrong = run("decompress", str(tmp_path / "other.h5"), str(tmp_path / "b.vgz"), "-o", str(tmp_path / "x.npz"))
    assert wrong.exit_code == 2 and "compressed with the model" in wrong.stderr
    assert not (tmp_path / "x.npz").exists()


def test_a_conditional_model_from_the_command_line(tmp_path):
    """fit --condition-columns trains p(features | conditions); score reads each row's conditions from its columns."""
    rng = np.random.default_rng(0)
    centers = {"north": np.array([5.0, 0.0, 5.0]), "south": np.array([-5.0, 4.0, 0.0])}
    region = rng.choice(list(centers), 800)
    values = np.stack([centers[r] for r in region]) + rng.normal(size=(800, 3))
    frame = pd.DataFrame(values, columns=["a", "b", "c"]).assign(region=region)
    frame.to_csv(tmp_path / "train.csv", index=False)
    model = str(tmp_path / "c.h5")
    result = run("fit", str(tmp_path / "train.csv"), "-o", model, "--condition-columns", "region",
                 "--param", "epochs=30")  # fmt: skip
    assert result.exit_code == 0, result.output
    det = load(model)
    assert list(det.feature_names_in_) == ["a", "b", "c"] and det.condition_encoder_.columns == ["region"]
    test = frame.iloc[:40].copy()
    test.loc[::2, "region"] = np.where(test["region"].iloc[::2] == "north", "south", "north")  # the wrong region
    test.loc[5, "region"] = "west"
    test.to_csv(tmp_path / "test.csv", index=False)
    result = run("score", model, str(tmp_path / "test.csv"), "-o", str(tmp_path / "s.csv"))
    assert result.exit_code == 2 and "row 5: column 'region' holds 'west', a condition: label 'west'" in result.stderr
    result = run("score", model, str(tmp_path / "test.csv"), "-o", str(tmp_path / "s.csv"), "--on-bad-row", "nan")
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(tmp_path / "s.csv")["log_likelihood"].to_numpy()
    assert np.isnan(scores[5]) and np.isfinite(np.delete(scores, 5)).all()
    wrong, right = scores[0::2], np.delete(scores[1::2], 2)  # row 5 is the unseen region
    assert wrong.max() < right.min()  # a row under another region's condition is far less likely
    out = tmp_path / "north.csv"
    result = run("sample", model, "-n", "500", "-o", str(out), "--condition", "north")
    assert result.exit_code == 0, result.output
    drawn = pd.read_csv(out)
    assert list(drawn.columns) == ["a", "b", "c", "region"] and (drawn["region"] == "north").all()
    assert np.abs(drawn[["a", "b", "c"]].mean().to_numpy() - centers["north"]).max() < 0.5
    result = run("sample", model, "-n", "5", "-o", str(out))
    assert result.exit_code == 2 and "conditional on region: give --condition VALUE" in result.stderr
    result = run("sample", model, "-n", "5", "-o", str(out), "--condition", "region=east")
    assert result.exit_code == 2 and "label 'east' was not seen in fit" in result.stderr


def test_a_stray_text_cell_in_a_numeric_training_column(workdir, tmp_path):
    # The column stays numeric (the cell is a missing value, said on stderr) and scoring new numbers works.
    train = pd.read_csv(workdir / "train.csv")
    train["b"] = train["b"].astype(object)
    train.loc[3, "b"] = "oops"
    train.to_csv(tmp_path / "train.csv", index=False)
    model = str(tmp_path / "m.h5")
    fitted = run("fit", str(tmp_path / "train.csv"), "-o", model, "--id-column", "key", *FAST)
    assert fitted.exit_code == 0, fitted.output
    assert "column 'b': 1 cell(s) are not numbers (first: row 3, 'oops')" in fitted.stderr
    scored = run("score", model, str(workdir / "test.csv"), "-o", str(tmp_path / "out.csv"), "--id-column", "key")
    assert scored.exit_code == 0, scored.output
    assert np.isfinite(pd.read_csv(tmp_path / "out.csv")["log_likelihood"]).all()


def test_explain_checks_and_scores_a_chunk_once(monkeypatch):
    """A chunk is checked once (row by row, by the input space; not again by the estimator), also with
    --explain, which adds one scoring pass for the rows without each column in turn (log p(x_-j), for the
    column's conditional; the rows without a, b and c scored together) and no more."""
    import vaeguard.estimators as estimators
    from vaeguard import VAEAnomalyDetector
    from vaeguard.batch import score_chunk
    from vaeguard.inputs import InputSpace

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(300, 3)), columns=["a", "b", "c"])
    det = VAEAnomalyDetector(epochs=3, hidden_dims=[16], latent_dim=2, n_importance_samples=8, random_state=0)
    det.fit(frame)
    counts = {"validate": 0, "forward": 0}
    # a scoring pass: one call of the importance-sampling estimate over the chunk's rows (how many
    # network evaluations it makes depends on which rows get a proposal fitted, row by row)
    check_rows, validate, forward = (
        InputSpace.check_rows,
        InputSpace.validate,
        estimators.importance_sampled_log_likelihood,
    )

    def counted(function, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(InputSpace, "check_rows", counted(check_rows, "validate"))
    monkeypatch.setattr(InputSpace, "validate", counted(validate, "validate"))
    monkeypatch.setattr(estimators, "importance_sampled_log_likelihood", counted(forward, "forward"))
    plain, _ = score_chunk(det, frame.iloc[:40])
    without = dict(counts)
    counts.update(validate=0, forward=0)
    explained, _ = score_chunk(det, frame.iloc[:40], explain=True)
    assert without["validate"] == 1 and without["forward"] > 0
    assert counts == {"validate": 1, "forward": 2 * without["forward"]}  # the rows; the rows without a, b, c
    pd.testing.assert_series_equal(explained["log_likelihood"], plain["log_likelihood"])
    # the columns are feature_scores' (the same draws and proposals)
    top = det.feature_scores(frame.iloc[:40]).to_numpy().argsort(axis=1)[:, :3]
    assert explained["top_features"].tolist() == [";".join(np.array(["a", "b", "c"])[t]) for t in top]


def test_score_file_is_a_library_job_that_resumes_where_it_stopped(tmp_path):
    """The resumable chunked scoring lives in the library (the CLI only prints): a run stopped after
    its first chunk continues there and ends with the same file as a run that never stopped."""
    from vaeguard import VAEAnomalyDetector
    from vaeguard.batch import score_file
    from vaeguard.data import Source

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(250, 3)), columns=["a", "b", "c"])
    frame.to_csv(tmp_path / "in.csv", index=False)
    det = VAEAnomalyDetector(epochs=3, hidden_dims=[16], latent_dim=2, n_importance_samples=8, random_state=0)
    det.fit(frame)
    det.save(tmp_path / "m.h5")  # the run's settings name the model by its fingerprint
    source = Source.parse(str(tmp_path / "in.csv"))
    whole = score_file(det, source, str(tmp_path / "whole.parquet"), chunk_rows=100)
    assert (whole.rows, whole.skipped, whole.resumed_from) == (250, 0, 0)

    class Stop(Exception):
        pass

    done = []

    def stop_after_first_chunk(rows):
        done.append(rows)
        if sum(done) >= 100:
            raise Stop

    with pytest.raises(Stop):
        score_file(det, source, str(tmp_path / "out.parquet"), chunk_rows=100, progress=stop_after_first_chunk)
    assert not (tmp_path / "out.parquet").exists()  # nothing under the final name until complete
    messages = []
    again = score_file(det, source, str(tmp_path / "out.parquet"), chunk_rows=100, resume=True, notify=messages.append)
    assert again.resumed_from == 100 and again.rows == 250 and messages == ["resuming after row 100"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "out.parquet"), pd.read_parquet(tmp_path / "whole.parquet")
    )


@pytest.fixture(scope="module")
def small_job(tmp_path_factory):
    from vaeguard import VAEAnomalyDetector

    folder = tmp_path_factory.mktemp("job")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(250, 3)).round(6), columns=["a", "b", "c"])
    frame.to_csv(folder / "in.csv", index=False)
    det = VAEAnomalyDetector(epochs=3, hidden_dims=[16], latent_dim=2, n_importance_samples=8, random_state=0)
    det.fit(frame)
    det.save(folder / "m.h5")
    return det, folder


def test_a_second_writer_of_the_same_output_is_refused(small_job, tmp_path):
    from vaeguard.batch import score_file
    from vaeguard.data import DataError, Source, output_lock

    det, folder = small_job
    source = Source.parse(str(folder / "in.csv"))
    out = tmp_path / "out.csv"
    with output_lock(out):  # another run is writing it
        with pytest.raises(DataError, match="another run is writing .*out.csv"):
            score_file(det, source, str(out), chunk_rows=100)
        assert not out.exists()
    run = score_file(det, source, str(out), chunk_rows=100)  # free again
    assert run.rows == 250 and len(pd.read_csv(out)) == 250
    assert not (tmp_path / "out.csv.lock").exists()


def test_a_resume_refuses_an_input_whose_scored_part_changed(small_job, tmp_path):
    """An edit that keeps the file's size and modification time (cp -p, rsync) is still seen: the partial
    run recorded a digest of the rows it scored."""
    from vaeguard.batch import score_file
    from vaeguard.data import DataError, Source

    det, folder = small_job
    data = tmp_path / "in.csv"
    data.write_bytes((folder / "in.csv").read_bytes())
    source = Source.parse(str(data))

    class Stop(Exception):
        pass

    def stop(rows):
        if rows:
            raise Stop

    with pytest.raises(Stop):
        score_file(det, source, str(tmp_path / "out.csv"), chunk_rows=100, progress=stop)
    stat = data.stat()
    text = data.read_text().splitlines()
    first = text[1].split(",")
    first[0] = first[0].replace(first[0][-1], "7" if first[0][-1] != "7" else "8")  # one digit, same length
    data.write_text("\n".join([text[0], ",".join(first), *text[2:]]) + "\n")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size and data.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(DataError, match="has changed in its first 100 rows"):
        score_file(det, Source.parse(str(data)), str(tmp_path / "out.csv"), chunk_rows=100, resume=True)


@pytest.mark.parametrize("suffix", ["csv", "parquet", "stdout"])
def test_an_input_without_rows_gives_the_result_columns_and_no_rows(small_job, tmp_path, suffix):
    import io

    from vaeguard.batch import score_file
    from vaeguard.data import Source

    det, _ = small_job
    (tmp_path / "empty.csv").write_text("a,b,c\n")
    source = Source.parse(str(tmp_path / "empty.csv"))
    columns = ["id", "log_likelihood", "decision", "is_outlier", "log_likelihood_std", "pareto_k"]
    if suffix == "stdout":
        stream = io.StringIO()
        score_file(det, source, None, stream=stream)
        assert stream.getvalue().strip() == ",".join(columns)
        return
    out = tmp_path / f"out.{suffix}"
    run = score_file(det, source, str(out))
    assert run.rows == 0
    result = pd.read_csv(out) if suffix == "csv" else pd.read_parquet(out)
    assert list(result.columns) == columns and len(result) == 0
