"""Checkpoints: exact resume (bit for bit against an uninterrupted run), refusal to resume under
another config, loading for inference (run, checkpoints/ or step directory), the best-checkpoint
retention by the evaluator's metric."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from conftest import train_loaders as _loaders
from eqr_jax.checkpoint import BEST_METRIC, Checkpointer, ConfigMismatchError, load_for_inference
from eqr_jax.training import train


def test_resume_is_bit_exact(resume_runs):
    root, _, (r_full, r_a, r_b) = resume_runs
    assert (r_a["step"], r_a["steps_this_run"]) == (3, 3)
    assert (r_b["step"], r_b["steps_this_run"]) == (6, 3)
    assert r_full["step"] == 6
    for use_ema in (False, True):
        cfg1, p1 = load_for_inference(root / "full", use_ema=use_ema)
        cfg2, p2 = load_for_inference(root / "split" / "checkpoints", use_ema=use_ema)
        assert cfg1.model == cfg2.model
        for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The last-window training metrics agree too (same carry, data and randomness).
    for k in ("train/total_loss", "train/accuracy", "train/grad_norm"):
        assert r_full[k] == r_b[k], k
    # Checkpoints hold the run config beside them.
    assert json.loads((root / "split" / "config.json").read_text())["train"]["max_steps"] == 6



def test_resume_refuses_other_config(resume_runs):
    root, split, _ = resume_runs
    other = dataclasses.replace(split, train=dataclasses.replace(split.train, lr=1e-2))
    with pytest.raises(ConfigMismatchError, match=r"train\.lr"):
        train(other, _loaders(other), progress=False, verbose=False, resume=True)



def test_load_for_inference_step_dir(resume_runs):
    root, _, _ = resume_runs
    cfg, params = load_for_inference(root / "split" / "checkpoints" / "3", use_ema=False)
    assert cfg.train.max_steps == 6 and "embed_tokens" in params




def test_retention_keeps_newest_and_best_by_the_evaluator_metric(tmp_path):
    """keep=2: the two newest checkpoints plus the one with the best ``all/exact_accuracy`` (the
    metric training's evaluation logs and ``eqr eval`` reproduces)."""
    from typing import Any, NamedTuple

    from conftest import micro_run

    class State(NamedTuple):
        params: Any
        opt_state: Any
        ema: Any
        step: Any
        rng: Any
        carry: Any

    assert BEST_METRIC == "all/exact_accuracy"
    ck = Checkpointer(tmp_path / "checkpoints", keep=2)
    cfg = micro_run(str(tmp_path))
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2), (5, None)]:
        state = State({"w": np.full(3, step, np.float32)}, {"m": np.zeros(3, np.float32)}, None,
                      np.int32(step), np.zeros(2, np.uint32), {"z": np.zeros(2, np.float32)})
        ck.save(step, state, loader_state={"epoch": step}, cfg=cfg,
                metrics=None if acc is None else {BEST_METRIC: acc, "all/accuracy": 0.5})
    assert ck.all_steps() == [2, 4, 5] and ck.best_step() == 2
    assert ck.read_json(2, "meta")["metrics"] == {BEST_METRIC: 0.9, "all/accuracy": 0.5}
    ck.close()
