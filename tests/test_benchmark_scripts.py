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


def test_official_learning_curves_jax_half(tmp_path, capsys):
    """Without --official the learning-curve benchmark runs its JAX half (make_train_step on the
    loader's batches) and writes its JSON and plot."""
    import json

    import numpy as np

    from eqr_jax.data.format import write_split

    rng = np.random.default_rng(0)
    y = rng.integers(2, 11, (24, 81)).astype(np.uint8)
    x = np.where(rng.random((24, 81)) < 0.5, 1, y).astype(np.uint8)
    write_split(tmp_path / "d", "train", x, y, group_sizes=[2] * 12, vocab_size=11)
    write_split(tmp_path / "d", "test", x[:4], y[:4], vocab_size=11)
    out, png = tmp_path / "curves.json", tmp_path / "curves.png"
    rc = _script("official_learning_curves").main([
        "--data", str(tmp_path / "d"), "--steps", "3", "--log-every", "1", "--seeds", "0",
        "--dtypes", "bfloat16", "--modes", "preset", "--batch", "4", "--hidden", "16",
        "--heads", "2", "--layers", "1", "--halt-max-steps", "2", "--json", str(out),
        "--plot", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    assert run["framework"] == "eqr-jax" and run["finite"] and res["summary"]["all_finite"]
    assert run["windows"]["step"] == [1, 2, 3] and len(run["loss_per_step"]) == 3
    # Rows halt at the step limit 2, so step 2 has halted rows to score and step 1 has none.
    assert run["windows"]["accuracy"][0] is None and 0 <= run["windows"]["accuracy"][1] <= 1
    assert png.stat().st_size > 10_000
    assert "final window loss" in capsys.readouterr().out
