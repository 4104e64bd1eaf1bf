"""The gradient-mode ablation runs end to end in CI size and reports sane numbers."""

from __future__ import annotations

import json

from eqr_jax import config

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _experiment():
    spec = importlib.util.spec_from_file_location("ablate_gradients",
                                                  ROOT / "experiments" / "ablate_gradients.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablate_gradients_ci_size(tmp_path, capsys):
    overrides = [f"data.path={tmp_path / 'data'}", "data.build_train=40", "data.build_test=16",
                 "data.build_num_aug=1", "data.global_batch_size=16", "model.hidden_size=32",
                 "model.num_heads=2", "model.H_cycles=1", "model.L_cycles=1",
                 "train.steps_per_call=1", "train.implicit_maxiter=3", "train.unroll_steps=2"]
    out = tmp_path / "ablation"
    code = _experiment().main(["--out", str(out), "--steps", "3", "--modes", "truncated,implicit",
                               "--depths", "1,2", *overrides])
    assert code == 0
    report = json.loads((out / "ablation.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert sorted(rows) == ["implicit", "truncated"]
    for r in rows.values():
        assert 0.0 <= r["exact@D1"] <= 1.0 and 0.0 <= r["exact@D2"] <= 1.0
        assert r["final_train_loss"] > 0 and r["step_time_ms"] > 0 and r["peak_mem_MiB"] > 0
        assert -1.0 <= r["grad_cos_vs_full"] <= 1.0 + 1e-6
    # The truncated gradient is a partial gradient of the same loss: it must point the same way
    # as the full-unroll gradient, but (with 2 unrolled steps) not be identical to it.
    assert 0.0 < rows["truncated"]["grad_cos_vs_full"] < 0.99999
    assert report["config"]["train"]["unroll_steps"] == 2
    table = (out / "ablation.md").read_text()
    assert table.startswith("| mode |") and "grad_cos_vs_full" in table
    assert "| truncated |" in capsys.readouterr().out
    # The run's configs are saved per mode beside its checkpoints.
    saved = config.load(str(out / "truncated" / "config.json"))
    assert saved.train.grad_mode == "truncated"
