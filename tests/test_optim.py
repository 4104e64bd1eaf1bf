"""AdamATan2 (a hand check), the learning-rate schedule and the EMA, as docs/training.md
defines them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqr_jax import optim
from eqr_jax.config import TrainConfig


def _reference_adam_atan2(p, grads, lrs, b1=0.9, b2=0.95, wd=1.0):
    """The AdamATan2 rule (docs/training.md) in float64 NumPy, step by step."""
    p = np.asarray(p, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - (lr / bc1) * np.arctan2(m, np.sqrt(v) / math.sqrt(bc2))
    return p


def test_adam_atan2_first_step_hand_value():
    lr, p0 = 0.01, 2.0
    opt = optim.adam_atan2(lr, 0.9, 0.95, weight_decay=1.0)
    params = {"w": jnp.full((3,), p0, jnp.float32)}
    state = opt.init(params)
    upd, state = opt.update({"w": jnp.ones((3,), jnp.float32)}, state, params)
    new = optax.apply_updates(params, upd)
    # Spec hand check: p <- p (1 - lr) - 10 lr atan(0.1) = p (1 - lr) - 0.996687 lr.
    expected = p0 * (1 - lr) - 0.996687 * lr
    np.testing.assert_allclose(np.asarray(new["w"]), expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(10 * math.atan(0.1), 0.996687, atol=1e-6)
    assert int(state.count) == 1


def test_adam_atan2_matches_reference_rule_over_steps():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5,)).astype(np.float32)
    grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4)]
    grads[2][1] = 0.0  # a zero gradient entry on the way
    lrs = [1e-3, 2e-3, 3e-3, 5e-3]
    opt = optim.adam_atan2(lambda c: jnp.asarray(lrs)[c], 0.9, 0.95, weight_decay=1.0)
    params = jnp.asarray(p0)
    state = opt.init(params)
    for g in grads:
        upd, state = opt.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, upd)
    np.testing.assert_allclose(np.asarray(params), _reference_adam_atan2(p0, grads, lrs),
                               rtol=1e-6, atol=1e-7)


def test_adam_atan2_zero_grad_zero_moments_is_finite():
    opt = optim.adam_atan2(0.1, weight_decay=0.0)
    p = jnp.ones((2,))
    upd, _ = opt.update(jnp.zeros((2,)), opt.init(p), p)
    np.testing.assert_array_equal(np.asarray(upd), 0.0)  # atan2(0, 0) = 0, no NaN


def test_step_bounded_by_pi_over_2():
    opt = optim.adam_atan2(1.0, weight_decay=0.0)
    p = jnp.zeros((4,))
    upd, _ = opt.update(jnp.asarray([1e9, -1e9, 1e-9, 3.0]), opt.init(p), p)
    bc1 = 1 - 0.9
    assert np.all(np.abs(np.asarray(upd)) <= (math.pi / 2) / bc1 + 1e-5)


def test_schedule_values():
    tc = TrainConfig(lr=1e-3, lr_warmup_steps=10, lr_min_ratio=0.1)
    sched = optim.make_schedule(tc, total_steps=110)
    np.testing.assert_allclose(float(sched(1)), 1e-4, rtol=1e-6)  # base * 1 / W
    np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)  # s = W: cosine start
    np.testing.assert_allclose(float(sched(60)), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(float(sched(110)), 1e-4, rtol=1e-5)  # s = T: base * r
    # Reference presets: first step 5e-8, flat 1e-4 after warm-up (r = 1).
    ref = optim.make_schedule(TrainConfig(), total_steps=50_000)
    np.testing.assert_allclose(float(ref(1)), 5e-8, rtol=1e-6)
    np.testing.assert_allclose(float(ref(2000)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(ref(50_000)), 1e-4, rtol=1e-6)


def test_optimizer_uses_one_based_schedule():
    tc = TrainConfig(lr=1.0, lr_warmup_steps=4, lr_min_ratio=1.0, weight_decay=1.0)
    opt, sched = optim.make_optimizer(tc, total_steps=10)
    p = jnp.zeros((1,))
    upd, _ = opt.update(jnp.ones((1,)), opt.init(p), p)
    # lr = sched(1) = 0.25; step = lr / bc1 * atan2(0.1, 1) = 0.25 * 0.996687.
    np.testing.assert_allclose(float(upd[0]), -0.25 * 0.9966865, rtol=1e-5)


@pytest.mark.parametrize("name,clip", [("adamw", 0.0), ("adam_atan2", 0.5)])
def test_alternatives_run(name, clip):
    tc = TrainConfig(optimizer=name, grad_clip_norm=clip, lr=1e-2, lr_warmup_steps=0)
    opt, _ = optim.make_optimizer(tc, total_steps=5)
    p = {"a": jnp.ones((3,)), "b": jnp.zeros((2, 2))}
    upd, _ = opt.update(jax.tree_util.tree_map(lambda x: 10 * jnp.ones_like(x), p), opt.init(p), p)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree_util.tree_leaves(upd))


def test_ema():
    p0 = {"w": jnp.asarray([1.0, 2.0])}
    ema = optim.ema_init(p0)
    ema = optim.ema_update(ema, {"w": jnp.asarray([3.0, 2.0])}, 0.9)
    np.testing.assert_allclose(np.asarray(ema["w"]), [0.1 * 3 + 0.9 * 1, 2.0], rtol=1e-6)
    ema = optim.ema_update(ema, {"w": jnp.asarray([0.0, 0.0])}, 0.9)
    np.testing.assert_allclose(np.asarray(ema["w"]), [0.9 * 1.2, 1.8], rtol=1e-6)
