"""Three optimiser steps of the official PyTorch EqR, replayed by eqr-jax's real training step.

The fixture (``tests/fixtures/train_step_parity.npz``, made by
``benchmarks/make_train_step_fixture.py`` from the official code) holds, for a 9x9 mlp_t model
and a 16-token attention + RoPE model in float32 with noise 0, exploration 0 and latent init std
0: the initial weights, ACT carry and batches, and after each step the official loss, metric sums,
grad norm, carry bookkeeping and parameters, and the EMA after the last step. Its carry makes rows
reset, halt at the step limit, come back with the next batch's rows; one row is solved and one
has ignored labels. `make_train_step` (ACT step, loss, gradient, AdamATan2 with the
schedule, EMA) must reproduce all of it at atol = rtol = 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqr_jax import interop, optim
from eqr_jax.act import ACTCarry, BATCH_KEYS
from eqr_jax.config import DataConfig, RunConfig, TrainConfig
from eqr_jax.model import EqRModel, LatentState
from eqr_jax.training import TrainState, make_train_step

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "train_step_parity.npz"
TOL = dict(atol=1e-4, rtol=1e-4)
METRICS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss",
           "q_halt_loss", "total_loss", "grad_norm")


def _load(case: str):
    f = np.load(FIXTURE)
    prefix = f"{case}/"
    return {k[len(prefix):]: f[k] for k in f.files if k.startswith(prefix)}


def _group(d: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


@pytest.mark.parametrize("case", ["sudoku_mlpt", "maze_attn_rope"])
def test_three_official_training_steps(case):
    d = _load(case)
    ref, hp = json.loads(str(d["config_json"])), json.loads(str(d["train_json"]))
    mcfg = interop.config_from_reference(ref)
    B = int(ref["batch_size"])
    tc = TrainConfig(lr=hp["lr"], lr_warmup_steps=hp["warmup"], lr_min_ratio=hp["lr_min_ratio"],
                     beta1=hp["beta1"], beta2=hp["beta2"], weight_decay=hp["weight_decay"],
                     ema=True, ema_rate=hp["ema_rate"], steps_per_call=1)
    cfg = RunConfig(model=mcfg, data=DataConfig(global_batch_size=B), train=tc)
    model = EqRModel(mcfg)
    opt, schedule = optim.make_optimizer(tc, hp["total_steps"])
    params = interop.params_from_reference(_group(d, "params0/"), mcfg)
    data0 = _group(d, "carry0/data/")
    carry = ACTCarry(LatentState(jnp.asarray(d["carry0/z_H"]), jnp.asarray(d["carry0/z_L"])),
                     jnp.asarray(d["carry0/steps"]), jnp.asarray(d["carry0/halted"]),
                     {k: jnp.asarray(data0[k]) for k in BATCH_KEYS})
    state = TrainState(params, opt.init(params), optim.ema_init(params), jnp.zeros((), jnp.int32),
                       jax.random.PRNGKey(0), carry)
    step_fn = make_train_step(model, cfg, opt, steps_per_call=1)

    for k in (1, 2, 3):
        # The fixture is only deterministic while no row halts on its q-halt logit.
        assert d[f"step{k}/q_halt"].max() < -1.0
        batch = _group(d, f"batch{k}/")
        state, m = step_fn(state, {n: jnp.asarray(batch[n])[None] for n in BATCH_KEYS})
        m = jax.device_get(m)
        want = _group(d, f"step{k}/metrics/")
        for name in METRICS:
            np.testing.assert_allclose(m[name], want[name], **TOL,
                                       err_msg=f"{case} step {k}: metric {name}")
        np.testing.assert_allclose(schedule(k), want["lr"], rtol=1e-6, err_msg=f"lr at step {k}")
        np.testing.assert_array_equal(state.carry.steps, d[f"step{k}/carry/steps"])
        np.testing.assert_array_equal(state.carry.halted, d[f"step{k}/carry/halted"])
        np.testing.assert_array_equal(state.carry.batch["inputs"],
                                      d[f"step{k}/carry/data/inputs"])
        got = interop.params_to_reference(state.params, mcfg)
        for name, value in _group(d, f"step{k}/params/").items():
            np.testing.assert_allclose(got[name], value, **TOL,
                                       err_msg=f"{case} step {k}: parameter {name}")
    got = interop.params_to_reference(state.ema, mcfg)
    for name, value in _group(d, "step3/ema/").items():
        np.testing.assert_allclose(got[name], value, **TOL, err_msg=f"{case}: EMA {name}")


def test_fixture_exercises_the_act_bookkeeping():
    """The window really has resets, step-limit halts, a solved row and excluded rows."""
    d = _load("sudoku_mlpt")
    counts = [float(d[f"step{k}/metrics/count"]) for k in (1, 2, 3)]
    assert counts == [3.0, 2.0, 3.0]
    assert float(d["step1/metrics/exact_accuracy"]) == 1.0
    assert (d["carry0/data/labels"][4, :10] == -100).all()
    assert d["carry0/halted"][:3].all() and not d["carry0/halted"][3:].any()
    # Reset rows took the new batch's rows.
    np.testing.assert_array_equal(d["step1/carry/data/inputs"][:3], d["batch1/inputs"][:3])
    np.testing.assert_array_equal(d["step2/carry/data/inputs"][3:6], d["batch2/inputs"][3:6])
    np.testing.assert_array_equal(d["step3/carry/data/inputs"][6:], d["batch3/inputs"][6:])


def test_padding_row_halting_target_is_zero():
    """Documented difference (docs/reference-parity.md): a row without supervised tokens is never
    exact, so its halting BCE target is 0; the reference's vacuous comparison makes it 1. Training
    never meets such rows (the loaders drop under-filled batches)."""
    from eqr_jax.losses import act_loss
    logits = jnp.zeros((2, 4, 5)).at[:, :, 2].set(1.0)
    labels = jnp.array([[2, 2, 2, 2], [-100] * 4])
    q = jnp.array([-5.0, -5.0])
    _, parts = act_loss(logits, q, labels, 2)
    assert parts["exact"].tolist() == [True, False]
    np.testing.assert_allclose(parts["bce"], [np.log1p(np.exp(5.0)), np.log1p(np.exp(-5.0))],
                               rtol=1e-6)
    np.testing.assert_allclose(parts["lm"][1], 0.0)
