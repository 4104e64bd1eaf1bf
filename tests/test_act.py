"""ACT carry: row replacement on reset, halting rules, and the step's gradient paths."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_model
from eqr_jax import dynamics
from eqr_jax.act import ACTCarry, act_step, halting, init_carry, reset_carry
from eqr_jax.model import EqRModel, LatentState

CFG = micro_model(H_cycles=2, expansion=1.0, halt_max_steps=3, halt_exploration_prob=0.1)
B = 4


@pytest.fixture(scope="module")
def model_params():
    model = EqRModel(CFG)
    return model, model.init(jax.random.PRNGKey(0))


def _batch(seed):
    rng = np.random.default_rng(seed)
    return {"inputs": jnp.asarray(rng.integers(1, 6, (B, 16)), jnp.int32),
            "labels": jnp.asarray(rng.integers(2, 6, (B, 16)), jnp.int32),
            "puzzle_identifiers": jnp.arange(B, dtype=jnp.int32) + 100 * seed}


def test_initial_carry_resets_every_row(model_params):
    model, _ = model_params
    carry = init_carry(model, _batch(0))
    assert bool(jnp.all(carry.halted)) and int(jnp.sum(carry.steps)) == 0
    new = reset_carry(model, carry, _batch(1), jax.random.PRNGKey(1))
    np.testing.assert_array_equal(new.batch["inputs"], _batch(1)["inputs"])
    assert not bool(jnp.any(new.halted))
    # Fresh latents: std ~ 1 and different per row.
    z = np.asarray(new.latents.z_H)
    assert 0.8 < z.std() < 1.2 and not np.allclose(z[0], z[1])


def test_only_halted_rows_are_replaced(model_params):
    model, _ = model_params
    old_b, new_b = _batch(1), _batch(2)
    z = jnp.full((B, 16, 32), 7.0)
    carry = ACTCarry(LatentState(z, -z), jnp.asarray([3, 1, 2, 2], jnp.int32),
                     jnp.asarray([True, False, True, False]), dict(old_b))
    new = reset_carry(model, carry, new_b, jax.random.PRNGKey(3))
    reset = np.array([True, False, True, False])
    for k in ("inputs", "labels", "puzzle_identifiers"):
        np.testing.assert_array_equal(np.asarray(new.batch[k])[reset], np.asarray(new_b[k])[reset])
        np.testing.assert_array_equal(np.asarray(new.batch[k])[~reset],
                                      np.asarray(old_b[k])[~reset])
    np.testing.assert_array_equal(new.steps, [0, 1, 0, 2])
    zh, zl = np.asarray(new.latents.z_H), np.asarray(new.latents.z_L)
    assert np.all(zh[~reset] == 7.0) and np.all(zl[~reset] == -7.0)
    assert not np.any(zh[reset] == 7.0) and abs(zh[reset].mean()) < 0.2
    assert not np.allclose(zh[0], zh[2])  # independent per row


def test_halting_rules():
    key = jax.random.PRNGKey(0)
    steps = jnp.asarray([1, 2, 3, 4, 4])
    q_pos = jnp.full((5,), 1.0)
    q_neg = jnp.full((5,), -1.0)
    kw = dict(halt_max_steps=4)
    # Evaluation: only at halt_max_steps, whatever q says.
    ev = halting(steps, q_pos, None, exploration_prob=0.1, training=False, **kw)
    np.testing.assert_array_equal(ev, [False, False, False, True, True])
    # Training without exploration: q_halt > 0 halts at once, otherwise at the max.
    np.testing.assert_array_equal(
        halting(steps, q_pos, key, exploration_prob=0.0, training=True, **kw), [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(
        halting(steps, q_neg, key, exploration_prob=0.0, training=True, **kw), [0, 0, 0, 1, 1])
    # Exploration always on: min steps ~ U{2..4}, so step 1 never halts; the max always halts.
    many = jnp.tile(jnp.asarray([1, 2, 3, 4]), 500)
    h = np.asarray(halting(many, jnp.ones(many.shape), key, exploration_prob=1.0, training=True,
                           **kw)).reshape(500, 4)
    assert not h[:, 0].any() and h[:, 3].all()
    assert 0.2 < h[:, 1].mean() < 0.47 and 0.55 < h[:, 2].mean() < 0.8  # P = 1/3, 2/3
    # Exploration never halts a row early: with q < 0 nothing halts before the max.
    h = halting(many, -jnp.ones(many.shape), key, exploration_prob=1.0, training=True, **kw)
    np.testing.assert_array_equal(np.asarray(h).reshape(500, 4)[:, :3], False)
    # Exploration probability ~ 0.1: about 10% of q-halting rows at step 1 are held back.
    ones = jnp.ones((4000,), jnp.int32)
    held = 1 - np.asarray(halting(ones, jnp.ones((4000,)), key, exploration_prob=0.1,
                                  training=True, **kw)).mean()
    assert 0.07 < held < 0.13


def test_eval_rows_run_exactly_max_steps_then_restart(model_params):
    model, params = model_params
    step = jax.jit(lambda c, b, k: act_step(model, params, c, b, k, training=False))
    carry = init_carry(model, _batch(0))
    for i in range(3):
        carry, out = step(carry, _batch(i), jax.random.PRNGKey(i))
        assert out.logits.shape == (B, 16, 6) and out.q_halt.shape == (B,)
        np.testing.assert_array_equal(carry.steps, i + 1)
        np.testing.assert_array_equal(carry.halted, i == 2)
        np.testing.assert_array_equal(carry.batch["inputs"], _batch(0)["inputs"])
    carry, _ = step(carry, _batch(5), jax.random.PRNGKey(5))
    np.testing.assert_array_equal(carry.steps, 1)
    np.testing.assert_array_equal(carry.batch["inputs"], _batch(5)["inputs"])


_SLOW = os.environ.get("EQR_SLOW_TESTS") == "1"
_slow = pytest.mark.skipif(not _SLOW, reason="slow on CPU (compiles each backend); "
                           "set EQR_SLOW_TESTS=1")


@pytest.mark.parametrize("mode", ["truncated", pytest.param("full", marks=_slow),
                                  pytest.param("one_step", marks=_slow),
                                  pytest.param("implicit", marks=_slow)])
def test_gradient_modes_and_q_halt_gradient(model_params, mode):
    model, params = model_params
    # A non-zero q-head kernel so that the halting logit depends on the network.
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["q_head"]["kernel"] = 0.1 * jnp.ones_like(params["q_head"]["kernel"])
    carry = init_carry(model, _batch(0))

    def q_loss(p):
        new, out = act_step(model, p, carry, _batch(0), jax.random.PRNGKey(0), training=True,
                            adjoint=dynamics.adjoint(mode, implicit_maxiter=5), unroll_steps=2)
        return jnp.sum(out.q_halt), new

    g, new = jax.jit(jax.grad(q_loss, has_aux=True))(params)
    norm = lambda t: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(t)))
    assert norm(g["L_level"]) > 0 and norm(g["embed_tokens"]) > 0  # q-halt grad reaches the net
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g))
    # The returned carry is detached.
    if mode == "truncated":
        dz = jax.jit(jax.grad(lambda p: jnp.sum(q_loss(p)[1].latents.z_H)))(params)
        assert norm(dz) == 0.0


def test_implicit_step_warm_starts_from_the_carry(model_params):
    """The implicit solve starts from the carried latents: a row continuing into the next ACT
    step starts at its fixed point and stops after one evaluation; reset rows start cold."""
    model, params = model_params
    # Small block weights make the step map a contraction, so every row converges.
    params = dict(params, L_level=jax.tree_util.tree_map(lambda a: 0.1 * a, params["L_level"]))
    adjoint = dynamics.Implicit(maxiter=50, tol=1e-4)
    step = jax.jit(lambda c, k: act_step(model, params, c, _batch(0), k, training=False,
                                         adjoint=adjoint, with_stats=True))
    carry, _, first = step(init_carry(model, _batch(0)), jax.random.PRNGKey(0))
    assert bool(jnp.all(first.converged)) and int(jnp.min(first.iterations)) > 1
    assert not bool(jnp.any(carry.halted))  # evaluation halts only at halt_max_steps = 3
    _, _, second = step(carry, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(second.iterations, np.ones(B))
    assert bool(jnp.all(second.converged))
