"""The gradient-mode ablation runs end to end in CI size and reports sane numbers."""

from __future__ import annotations

import json

import pytest

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
                 "train.steps_per_call=1", "train.implicit_maxiter=3", "train.unroll_steps=2",
                 "train.implicit_backward_iters=3", "train.remat=true",
                 # Its rows rarely converge in 3 iterations: the IFT backward for every row, so
                 # the backward's statistics are exercised (the default gives them u = g).
                 "train.implicit_unconverged=implicit"]
    out = tmp_path / "ablation"
    # Every gradient mode, implicit only regularised (one compilation covers both), phantom with
    # another seed.
    specs = "truncated,full,one_step,phantom@1,implicit+jac"
    experiment = _experiment()
    # --no-cost: the step-cost compilation of every spec is the same code; checked once below.
    code = experiment.main(["--out", str(out), "--steps", "3", "--modes", specs,
                            "--depths", "1,2", "--curve-every", "2", "--anchors", "2",
                            "--stability-rows", "6", "--plots", str(tmp_path / "plot"),
                            "--no-cost", *overrides])
    assert code == 0
    report = json.loads((out / "ablation.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert list(rows) == specs.split(",")
    for r in rows.values():
        assert 0.0 <= r["exact@D1"] <= 1.0 and 0.0 <= r["exact@D2"] <= 1.0
        assert r["final_train_loss"] > 0 and "step_time_ms" not in r
        assert -1.0 <= r["grad_cos_vs_full"] <= 1.0 + 1e-6 and len(r["grad_cos"]) == 2
        # Curves: a point after 2 steps and at the end (3), wall-clock growing.
        assert [p["step"] for p in r["curve"]] == [2, 3]
        assert r["curve"][1]["train_wall_s"] > r["curve"][0]["train_wall_s"] > 0
        assert 0.0 <= r["implicit_converged_frac"] <= 1.0
        assert r["radius_correct_n"] + r["radius_wrong_n"] == 6
    # The full gradient is its own reference; the truncated one is a partial gradient of the
    # same loss: the same direction, not the same vector (2 unrolled steps).
    assert rows["full"]["grad_cos_vs_full"] > 0.9999
    assert 0.0 < rows["truncated"]["grad_cos_vs_full"] < 0.99999
    # The regularised run logs the Jacobian term and its per-row implicit solve.
    assert rows["implicit+jac"]["jac_fro"] > 0 and "jac_fro" not in rows["truncated"]
    assert 0.0 <= rows["implicit+jac"]["implicit_converged"] <= 1.0
    assert 1.0 <= rows["implicit+jac"]["implicit_iters"] <= 3.0
    # ... and its backward solve (at most 3 Krylov vectors here), and per anchor the cosine of
    # its gradient with one whose backward is solved to 1e-6 (issue 28).
    imp = rows["implicit+jac"]
    assert imp["implicit_backward_residual"] >= 0 and 0 < imp["implicit_backward_iters"] <= 3
    assert len(imp["implicit_check"]) == 2 and "implicit_check" not in rows["truncated"]
    for c in imp["implicit_check"]:
        assert -1.0 <= c["cos_vs_exact"] <= 1.0 + 1e-6
        assert c["exact_residual"] <= max(c["backward_residual"], 1e-6) and c["backward_iters"] <= 3
    assert "cosine vs exact implicit at step 3" in experiment.ablation.study_tables(report)
    assert report["config"]["train"]["unroll_steps"] == 2 and report["grad_cos_steps"] == [2, 3]
    table = (out / "ablation.md").read_text()
    assert table.startswith("| mode |") and "grad_cos_vs_full" in table
    assert "| truncated |" in capsys.readouterr().out
    for name in ("exact_steps", "exact_wallclock", "token_steps", "token_wallclock"):
        assert (tmp_path / f"plot_{name}.png").stat().st_size > 0
    assert 0.0 <= rows["truncated"]["token@D2"] <= 1.0
    # The run's configs are saved per spec beside its checkpoints.
    saved = saved_implicit = config.load(str(out / "implicit+jac" / "config.json"))
    assert (saved.train.grad_mode, saved.train.jac_reg, saved.train.seed) == ("implicit", 1.0, 0)
    saved = config.load(str(out / "phantom@1" / "config.json"))
    assert (saved.train.grad_mode, saved.train.jac_reg, saved.train.seed) == ("phantom", 0.0, 1)

    # The step time and compiled memory of the most involved spec's train step.
    cost = experiment.ablation.step_cost(saved_implicit, repeats=1)
    assert cost["step_time_s"] > 0 and cost["peak_bytes"] >= cost["temp_bytes"] > 0

    # --init-from: every spec continues from the same weights, whose evaluation is step 0 of
    # its curve; here the truncated run's final EMA weights, so step 0 repeats its last point.
    out2 = tmp_path / "from-truncated"
    assert experiment.main(["--out", str(out2), "--steps", "1", "--modes", "truncated@3",
                            "--depths", "1,2", "--curve-every", "1", "--anchors", "0",
                            "--stability-rows", "0", "--no-cost", "--init-from",
                            str(out / "truncated"), *overrides]) == 0
    second = json.loads((out2 / "ablation.json").read_text())
    last = {k: v for k, v in rows["truncated"]["curve"][-1].items() if "@D" in k}
    assert {k: v for k, v in second["start"].items() if "@D" in k} == last
    assert [p["step"] for p in second["rows"][0]["curve"]] == [0, 1]
    assert "grad_cos" not in second["rows"][0] and "grad_cos_steps" not in second
    resumed = config.load(str(out2 / "truncated@3" / "config.json"))
    assert resumed.train.init_from == str((out / "truncated").absolute())


def test_parse_spec():
    ablation = _experiment().ablation
    assert ablation.parse_spec("implicit+jac@2") == ablation.Spec("implicit+jac@2", "implicit",
                                                                    True, 2)
    assert ablation.parse_spec("one_step") == ablation.Spec("one_step", "one_step")
    with pytest.raises(ValueError, match="unknown gradient mode 'backprop'"):
        ablation.parse_spec("backprop+jac")
    with pytest.raises(ValueError, match="must be an integer"):
        ablation.parse_spec("truncated@x")
    weak = ablation.parse_spec("implicit+jac=0.05@1")
    assert weak == ablation.Spec("implicit+jac=0.05@1", "implicit", True, 1, 0.05)
    from eqr_jax import config as C
    cfg = C.preset("tiny")
    assert ablation.spec_config(cfg, weak, "o", 0.5).train.jac_reg == 0.05  # its own weight
    assert ablation.spec_config(cfg, ablation.parse_spec("implicit+jac"), "o",
                                0.5).train.jac_reg == 0.5  # the study's
    for bad in ("implicit+jac=", "implicit+jac=-1", "implicit+jacx"):
        with pytest.raises(ValueError, match="positive weight"):
            ablation.parse_spec(bad)
