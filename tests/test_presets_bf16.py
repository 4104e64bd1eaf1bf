"""The `sudoku` (mlp_t) and `maze` (attention + 1-D RoPE) presets train in bf16: real jitted train
steps of the presets' block types, dtypes, optimiser, EMA and ACT halting, shrunk in width, batch
and (maze) grid, with finite loss and gradients.

Each preset compiles one step function (one call of 2 optimiser steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqr_jax import config as config_lib
from eqr_jax import optim
from eqr_jax.model import EqRModel
from eqr_jax.metrics import train_scalars
from eqr_jax.training import init_train_state, make_train_step, stack_batches

SHRINK = {
    # the Sudoku block at 81 tokens (mlp_t over tokens, 2 layers, H_cycles 3, L_cycles 6)
    "sudoku": ["model.hidden_size=32", "data.global_batch_size=8"],
    # the Maze block (attention + RoPE over tokens) on a 10x10 grid
    "maze": ["model.hidden_size=32", "model.num_heads=4", "model.seq_len=100",
             "data.global_batch_size=8"],
}


def _batches(cfg, n, seed):
    rng = np.random.default_rng(seed)
    G, N, V = cfg.data.global_batch_size, cfg.model.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        labels = rng.integers(2, V, (G, N)).astype(np.int32)
        inputs = np.where(rng.random((G, N)) < 0.5, 1, labels).astype(np.int32)
        out.append({"inputs": inputs, "labels": labels,
                    "puzzle_identifiers": np.zeros(G, np.int32)})
    return out


def _run(name: str):
    cfg = config_lib.apply_overrides(config_lib.preset(name), SHRINK[name] + [
        "train.steps_per_call=2", "train.lr_warmup_steps=2"])
    assert cfg.model.forward_dtype == "bfloat16"
    model = EqRModel(cfg.model)
    opt, _ = optim.make_optimizer(cfg.train, 100)
    batches = _batches(cfg, 2, 0)
    state = init_train_state(model, cfg, opt, batches[0])
    params0 = jax.device_get(state.params)
    fn = make_train_step(model, cfg, opt, steps_per_call=2)
    state, m = fn(state, {k: jnp.asarray(v) for k, v in stack_batches(batches).items()})
    return cfg, state, params0, jax.device_get(m)


@pytest.mark.parametrize("name", ["sudoku", "maze"])
def test_preset_bf16_train_steps_are_finite(name):
    cfg, state, params0, m = _run(name)
    assert state.carry.latents.z_H.dtype == jnp.bfloat16
    assert int(state.step) == 2 and float(m["num_steps"]) == 2
    assert int(m["nonfinite_step"]) == 0
    assert np.isfinite(m["total_loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    s = train_scalars(m, cfg.data.global_batch_size)
    assert all(np.isfinite(v) for v in s.values()), s
    # the parameters moved and stayed finite (float32 master weights)
    moved = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(params0), jax.tree_util.tree_leaves(state.params)):
        b = np.asarray(b)
        assert b.dtype == np.float32 and np.isfinite(b).all()
        moved = max(moved, float(np.abs(b - np.asarray(a)).max()))
    assert moved > 0
    # step 2 continued the rows of step 1 (halt_max_steps 16): residuals binned at ACT step 2
    assert m["residual_count"][1] == cfg.data.global_batch_size
    assert np.isfinite(s["train/residual/act_step_02"]) and s["train/residual/act_step_02"] > 0
