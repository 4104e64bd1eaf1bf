"""Reporting: the one table printer (plain and markdown), the depth x breadth tables of an
evaluation, and the results files with their machine record."""

from __future__ import annotations

import json

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
