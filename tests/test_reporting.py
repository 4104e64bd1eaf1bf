"""Reporting: the one table printer (plain and markdown), the depth x breadth tables of an
evaluation, and the results files with their machine record."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from conftest import read_tensorboard
from eqr_jax import reporting


def _results():
    s = lambda d, n, acc, mv=None: {"depth": d, "breadth": n, "halt": "fixed", "solver": "unroll",
                                     "noise_scale": 0.01, "metrics": dict(
                                         {"all/exact_accuracy": acc, "num_puzzles": 4},
                                         **({} if mv is None else {"majority_vote/exact_accuracy": mv})),
                                     "steps_histogram": {"steps": [d], "count": [4 * n]},
                                     "residual_trace": {"steps": [1], "mean": [0.5], "rows": [4]}}
    return {"settings": [s(4, 1, 0.25), s(16, 1, 0.5), s(4, 8, 0.5, 0.75), s(16, 8, 0.75, 1.0)]}


def test_format_table_plain_and_markdown():
    rows = [{"mode": "truncated", "ms": 1.23456, "ok": True}, {"mode": "full", "big": 2.5e7}]
    plain = reporting.format_table(rows).splitlines()
    assert plain[0].split() == ["mode", "ms", "ok", "big"] and set(plain[1]) <= {"-", " "}
    assert plain[2].split() == ["truncated", "1.235", "yes", "-"]
    assert plain[3].split() == ["full", "-", "-", "2.5e+07"]
    md = reporting.format_table(rows, ["mode", "ms"], markdown=True).splitlines()
    assert md == ["| mode | ms |", "|---|---|", "| truncated | 1.235 |", "| full | - |"]
    assert reporting.format_table([]) == "(no rows)"


def test_depth_breadth_tables():
    res = _results()
    t = reporting.depth_breadth_table(res).splitlines()
    assert t[0] == "all/exact_accuracy:"
    assert t[1].split() == ["depth", "\\", "breadth", "1", "8"]
    assert t[3].split() == ["4", "0.2500", "0.5000"] and t[4].split() == ["16", "0.5000", "0.7500"]
    mv = reporting.depth_breadth_table(res, "majority_vote/exact_accuracy", markdown=True)
    assert mv.splitlines()[2] == "| 4 | - | 0.7500 |"
    report = reporting.eval_report(res)
    assert "all/exact_accuracy:" in report and "majority_vote/exact_accuracy:" in report
    assert "halting/mean_steps" not in report  # no setting reports it


def test_write_results_records_the_machine(tmp_path):
    paths = reporting.write_results(_results(), str(tmp_path), plots=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["settings"]) == 4 and saved["machine"]["backend"] == "cpu"
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert csv[0].startswith("depth,breadth,halt,solver,noise_scale,all/exact_accuracy")
    assert len(csv) == 5 and paths == [str(tmp_path / "results.json"),
                                       str(tmp_path / "results.csv")]


def test_write_results_to_a_bucket(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = gcs_bucket.url("eval")
    results = _results()
    for s in results["settings"]:
        s["metrics"]["halting/mean_steps"] = float(s["depth"])  # for the steps histogram
    paths = reporting.write_results(results, url, plots=True)
    assert paths == [f"{url}/{n}" for n in ("results.json", "results.csv", "accuracy_vs_depth.png",
                                             "residual_vs_step.png", "steps_histogram.png")]
    assert gcs_bucket.objects(url) == sorted(p.rsplit("/", 1)[1] for p in paths)
    saved = json.loads(gcs_bucket.fs.cat(url + "/results.json"))
    assert len(saved["settings"]) == 4 and saved["machine"]["backend"] == "cpu"
    local = reporting.write_results(results, str(tmp_path / "local"), plots=False)
    assert gcs_bucket.fs.cat(url + "/results.csv") == Path(local[1]).read_bytes()
    assert gcs_bucket.fs.cat(url + "/steps_histogram.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert not Path("gs:").exists()


def test_train_log_in_a_bucket_uploads_changed_event_files(gcs_bucket, tmp_path, monkeypatch):
    """TensorBoard events of a gs:// run directory reach <run>/tb/ at every flush, only the
    files that changed; a second (resumed) log adds its own event file."""
    monkeypatch.chdir(tmp_path)
    url = gcs_bucket.url("run")
    log = reporting.TrainLog(None, url, total=4, step=0, progress=False, verbose=False)
    staging = log.staging
    assert staging.is_dir() and staging != tmp_path
    log.write({"train/loss": 1.5}, 1, {"train/steps_hist": np.array([0, 2, 1])})
    (first,) = gcs_bucket.objects(url + "/tb")
    assert read_tensorboard(url) == {"train/loss": [(1, 1.5)],
                                     "train/steps_hist": [(1, [0.0, 2.0, 1.0])]}
    assert log.flush() == []  # nothing new: nothing uploaded
    log.write({"train/loss": 0.5}, 2)
    assert read_tensorboard(url)["train/loss"] == [(1, 1.5), (2, 0.5)]
    log.close()
    assert not staging.exists()
    generation = gcs_bucket.fs.info(f"{url}/tb/{first}")["generation"]
    time.sleep(1.1)  # tensorboardX names event files by the second
    resumed = reporting.TrainLog(None, url, total=4, step=2, progress=False, verbose=False)
    (second,) = resumed.flush()  # its own new event file only
    assert second != first and resumed.flush() == []
    resumed.write({"train/loss": 0.25}, 3)
    assert gcs_bucket.objects(url + "/tb") == sorted([first, second])
    assert gcs_bucket.fs.info(f"{url}/tb/{first}")["generation"] == generation  # not rewritten
    resumed.close()
    assert read_tensorboard(url)["train/loss"] == [(1, 1.5), (2, 0.5), (3, 0.25)]
    assert not Path("gs:").exists()


def test_train_log_local_writes_tb_directly(tmp_path):
    log = reporting.TrainLog(None, tmp_path / "run", total=4, step=0, progress=False,
                             verbose=False)
    assert log.staging is None
    log.write({"train/loss": 1.0}, 1)
    assert log.flush() == []
    log.close()
    assert read_tensorboard(tmp_path / "run") == {"train/loss": [(1, 1.0)]}


def test_train_log_upload_failure_is_a_warning_then_retried(gcs_bucket, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.chdir(tmp_path)
    url = gcs_bucket.url("flaky")
    real, calls = reporting.storage.upload_tree, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("503 Service Unavailable\nretry later")
        return real(*args, **kw)

    monkeypatch.setattr(reporting.storage, "upload_tree", flaky)
    log = reporting.TrainLog(None, url, total=4, step=0, progress=False, verbose=False)
    log.write({"train/loss": 1.0}, 1)  # the upload fails: training goes on
    err = capsys.readouterr().err.strip()
    assert err == (f"[eqr] warning: uploading TensorBoard events to {url}/tb failed (OSError: "
                   "503 Service Unavailable); trying again at the next flush")
    assert gcs_bucket.objects(url) == []
    log.write({"train/loss": 0.5}, 2)
    assert read_tensorboard(url) == {"train/loss": [(1, 1.0), (2, 0.5)]}
    log.close()
