"""The remaining benchmark entry points run in their smallest form (so they cannot rot)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_quick(capsys):
    assert _script("train_throughput").main(["--quick", "--modes", "truncated", "--calls", "1"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"\| truncated\s+\|\s+([\d.]+) \|\s+([\d.]+) \|", out)
    assert row, out
    steps_per_s, puzzles_per_s = float(row.group(1)), float(row.group(2))
    assert steps_per_s > 0 and puzzles_per_s == pytest_approx(32 * steps_per_s)


def pytest_approx(v):
    import pytest
    return pytest.approx(v, rel=0.1)


def test_eval_depth_memory_is_flat(capsys):
    assert _script("eval_depth_memory").main(["--batch", "2", "--breadth", "1",
                                              "--depths", "4,256", "--no-baseline"]) == 0
    out = capsys.readouterr().out
    ratio = float(re.search(r"peak ratio D=256 / D=4: ([\d.]+)", out).group(1))
    assert ratio == pytest_approx(1.0)
