"""The benchmark scripts run (smallest form, in-process, so they cannot rot) and their numbers are
well-formed.

Nothing here asserts on speed: only that every script still runs and writes what it promises, that
the analytic FLOP formula matches the known Sudoku figure, and that the gradient-memory benchmark
shows the expected *shape* (full backprop grows with the unrolled steps, truncated stays flat).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqr_jax import flops
from eqr_jax.config import preset

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the scripts import their sibling `common`, as when run
import common as bm  # noqa: E402


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flop_formula_matches_sudoku_figure():
    cfg = preset("sudoku").model
    assert cfg.blocks_per_step == 42
    per_step = flops.step_flops(cfg)
    assert abs(per_step - 18.7e9) <= 0.1e9, per_step
    assert per_step == 18_728_091_648
    blk = flops.block_flops(cfg)
    assert blk.token_mixing == 2 * 512 * 81 * 2 * 256 + 2 * 512 * 256 * 81
    assert blk.channel_mlp == 2 * 81 * 512 * 2 * 1536 + 2 * 81 * 1536 * 512
    maze = preset("maze").model
    assert flops.block_flops(maze).token_mixing == (2 * 900 * 128 * 384 + 4 * 900 ** 2 * 128
                                                    + 2 * 900 * 128 ** 2)
    assert flops.step_flops(maze) == 15 * flops.block_flops(maze).total
    assert flops.forward_flops(cfg, 3, batch=2, breadth=4) == 8 * (3 * per_step
                                                                   + flops.readout_flops(cfg))


def test_benchmarking_helpers(tmp_path):
    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    a = jnp.ones((32, 32))
    t = bm.time_fn(f, a, warmup=1, repeats=3)
    assert t.repeats == 3 and 0 < t.min_s <= t.median_s
    mem = bm.compiled_memory(f, a)
    assert mem["argument_bytes"] == 32 * 32 * 4 and mem["peak_bytes"] >= mem["argument_bytes"]
    peak = bm.peak_matmul_tflops("float32", 64, repeats=2)
    assert peak["tflops"] > 0 and peak["n"] == 64
    rows = [{"a": 1, "b": 0.5}, {"a": 2, "c": None}]
    text = bm.format_table(rows)
    assert "a" in text.splitlines()[0] and "-" in text
    assert bm.format_table(rows, markdown=True).startswith("| a | b | c |")
    out = bm.write_json(tmp_path / "x.json", {"rows": rows, "nan": float("nan")})
    data = json.loads(out.read_text())
    assert data["machine"]["jax_version"] == jax.__version__ and data["nan"] is None
    assert bm.model_preset("micro").blocks_per_step == 2


def test_iteration_scaling_quick(tmp_path):
    res = _script("iteration_scaling").main([
        "--quick", "--presets", "micro", "--dtypes", "float32", "--depths", "1", "3",
        "--batches", "1", "--breadths", "1", "2", "--matmul-n", "128",
        "--profile", str(tmp_path / "prof"), "--profile-point", "depth:3",
        "--out", str(tmp_path / "is.json"), "--plot", str(tmp_path / "is.png")])
    data = json.loads(Path(res["out"]).read_text())
    assert data["peak_matmul"]["float32"]["tflops"] > 0
    # On a CPU (no datasheet peak) MFU is against the measured matmul, and the JSON says so.
    assert data["device_kind"] == jax.devices()[0].device_kind
    assert data["mfu_peak"]["float32"]["tflops"] == data["peak_matmul"]["float32"]["tflops"]
    assert data["mfu_peak"]["float32"]["source"].startswith("measured float32 square matmul")
    assert (data["profile"]["point"]["sweep"], data["profile"]["point"]["depth"]) == ("depth", 3)
    assert len(list((tmp_path / "prof").glob("plugins/profile/*/*.xplane.pb"))) == 1
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["sweep"] for r in rows} == {"depth", "batch", "breadth"}
    for r in rows:
        for key in ("puzzle_steps_per_s", "layer_equiv_per_s", "tflops", "mfu",
                    "latency_ms_per_step", "compiled_peak_MiB"):
            assert r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert r["layer_equiv_per_s"] == pytest.approx(2 * r["puzzle_steps_per_s"])
    assert Path(res["plot"]).stat().st_size > 0


def test_gradient_memory_quick(tmp_path):
    res = _script("gradient_memory").main([
        "--preset", "micro", "--batch", "4", "--ns", "1", "4", "--repeats", "1",
        "--modes", "full", "full+remat", "truncated", "implicit", "--implicit-method", "iteration",
        "--out", str(tmp_path / "gm.json"), "--plot", str(tmp_path / "gm.png")])
    data = json.loads(Path(res["out"]).read_text())
    temp = {(r["mode"], r["n"]): r["temp_MiB"] for r in data["rows"]}
    assert all(r["status"] == "ok" and r["time_ms"] > 0 for r in data["rows"])
    assert temp[("full", 4)] > 2.0 * temp[("full", 1)]          # grows ~linearly with n
    assert temp[("truncated", 4)] <= 1.1 * temp[("truncated", 1)]  # flat
    assert temp[("implicit", 4)] <= 1.1 * temp[("implicit", 1)]    # flat
    assert temp[("full+remat", 4)] < temp[("full", 4)]
    assert Path(res["plot"]).stat().st_size < 200_000


def test_tuning_quick(tmp_path):
    res = _script("tuning").main([
        "--quick", "--preset", "micro", "--batch", "2", "--steps-per-call", "2",
        "--repeats", "1", "--out", str(tmp_path / "tu.json")])
    sections = json.loads(Path(res["out"]).read_text())["sections"]
    assert set(sections) == {"mlp_t", "attention", "remat", "host", "donation", "flags"}
    for name in ("mlp_t", "attention", "remat", "host", "donation"):
        rows = sections[name]["rows"]
        assert rows and all(r["time_ms"] > 0 for r in rows if "time_ms" in r), name
    # Options are semantics-preserving: float32 rows agree with the baseline to rounding.
    for r in sections["mlp_t"]["rows"]:
        assert r["max_abs_diff"] < (1e-4 if r["dtype"] == "float32" else 0.1), r
    for r in sections["host"]["rows"]:
        assert r["max_abs_diff"] < 1e-4, r
    for r in sections["remat"]["rows"]:
        assert r["loss_diff"] < 1e-5, r


def test_train_throughput_quick(capsys):
    assert _script("train_throughput").main(["--quick", "--modes", "truncated", "--calls", "1"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"\| truncated\s+\|\s+([\d.]+) \|\s+([\d.]+) \|", out)
    assert row, out
    steps_per_s, puzzles_per_s = float(row.group(1)), float(row.group(2))
    assert steps_per_s > 0 and puzzles_per_s == _approx(32 * steps_per_s)


def _approx(v):
    return pytest.approx(v, rel=0.1)


def test_eval_depth_memory_is_flat(capsys):
    assert _script("eval_depth_memory").main(["--batch", "2", "--breadth", "1",
                                              "--depths", "4,256", "--no-baseline"]) == 0
    out = capsys.readouterr().out
    ratio = float(re.search(r"peak ratio D=256 / D=4: ([\d.]+)", out).group(1))
    assert ratio == _approx(1.0)


def test_official_speed_jax_half(tmp_path, capsys):
    """Without --official the speed benchmark times eqr-jax's train step both ways (a step per
    call with a sync, several steps per call) on the loader's batches and writes its JSON."""
    from eqr_jax.data.format import write_split

    rng = np.random.default_rng(0)
    y = rng.integers(2, 11, (24, 81)).astype(np.uint8)
    x = np.where(rng.random((24, 81)) < 0.5, 1, y).astype(np.uint8)
    write_split(tmp_path / "d", "train", x, y, group_sizes=[2] * 12, vocab_size=11)
    write_split(tmp_path / "d", "test", x[:4], y[:4], vocab_size=11)
    out = tmp_path / "speed.json"
    rc = _script("official_speed").main([
        "--data", str(tmp_path / "d"), "--steps", "2", "--warmup-steps", "1",
        "--steps-per-call", "2", "--dtypes", "bfloat16", "--batch", "4", "--hidden", "16",
        "--heads", "2", "--layers", "1", "--halt-max-steps", "2", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["framework"], r["setting"]) for r in rows] == [
        ("eqr-jax", "sync every step"), ("eqr-jax", "2 steps per call")]
    assert all(r["s_per_step"] > 0 and r["vs_official"] is None for r in rows)
    assert "| bfloat16 | eqr-jax | 2 steps per call |" in capsys.readouterr().out


def test_official_learning_curves_jax_half(tmp_path, capsys):
    """Without --official the learning-curve benchmark runs its JAX half (make_train_step on the
    loader's batches) and writes its JSON and plot."""
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


def test_streaming_eval_smallest(tmp_path, capsys):
    """The streaming benchmark on the tests' trained model: every mode gives the batched
    per-job results, and the numbers it prints are consistent."""
    from conftest import trained_checkpoint, write_array_dataset
    from eqr_jax.data.arrays import make_puzzles

    data = write_array_dataset(tmp_path / "d", make_puzzles(4, 0),
                               make_puzzles(6, 1, blanks=(6, 10)))
    res = _script("streaming_eval").main([
        "--checkpoint", trained_checkpoint(), "--data", str(data), "--puzzles", "6",
        "--batch", "4", "--breadth", "2", "--depth", "12", "--tol", "0.2",
        "--host-refill", "3", "--repeats", "1", "--out", str(tmp_path / "se.json")])
    rows = {r["mode"]: r for r in res["rows"]}
    assert set(rows) == {"batched", "stream", "host-refill-3"}
    useful = rows["batched"]["useful_puzzle_steps"]
    for r in rows.values():
        assert r["same_per_job_results"] and r["useful_puzzle_steps"] == useful
        assert r["exact_accuracy"] == rows["batched"]["exact_accuracy"]
        assert useful <= r["executed_puzzle_steps"] and r["wall_s"] > 0
        assert r["puzzle_steps_ratio"] == pytest.approx(
            rows["batched"]["executed_puzzle_steps"] / r["executed_puzzle_steps"])
    assert rows["stream"]["executed_puzzle_steps"] < rows["batched"]["executed_puzzle_steps"]
    out = capsys.readouterr().out
    assert "streaming saves" in out and json.loads(Path(res["out"]).read_text())["rows"]


def test_accelerator_plan_table_is_the_docs_table(capsys):
    """`accelerator_plan.py --table` derives docs/accelerators.md's tables from the kept JSON of
    the TPU compilations (compiling them again takes hours on a CPU); the docs show exactly
    what the script derives."""
    assert _script("accelerator_plan").main(["--table"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    docs = (BENCH.parent / "docs" / "accelerators.md").read_text()
    assert len(lines) >= 20 and [line for line in lines if line not in docs] == []
    assert any(line.startswith("| sudoku | v5e-8 (8, 1) | yes |") for line in lines)
    assert any(line.startswith("| maze | v5e-8 (8, 1) | **no** |") for line in lines)


def test_compile_cache_restart_smallest(tmp_path, capsys):
    """Three fresh `eqr train` processes of the micro run (2 steps): cache off, writing an
    empty cache, restarting on the filled one (the numbers are printed, not asserted)."""
    res = _script("compile_cache_restart").main(["--runs", "micro",
                                                  "--out", str(tmp_path / "cc.json")])
    run = json.loads((tmp_path / "cc.json").read_text())["runs"]["micro"]
    assert run == res["runs"]["micro"] and run["cache_files"] > 0 and run["cache_bytes"] > 0
    for key in ("off", "empty cache (written)", "filled cache (restart)", "restart_speedup"):
        assert run[key] > 0, key
    assert "micro: fresh process without cache" in capsys.readouterr().out


def test_implicit_backward_accuracy_table(capsys):
    """`implicit_solve.py --near-critical`'s table (docs/implicit-gradients.md) on two of its
    rows: the default backward matches the dense IFT gradient, one GMRES(20) cycle does not."""
    mod = _script("implicit_solve")
    rows = mod.near_critical_table([mod.BACKWARDS[0], mod.BACKWARDS[2]])
    assert rows[0]["rel_err"] > 1e-2 and rows[1]["rel_err"] < 2e-3
    assert rows[1]["cosine"] >= 0.9999 and rows[1]["residual"] <= 1e-4
    assert "defaults: GMRES(30) to 1e-4" in capsys.readouterr().out
