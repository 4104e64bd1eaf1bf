"""The step map under the dynamics backends: gradient modes, implicit diff, breadth, variants."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqr_jax import dynamics, losses
from eqr_jax.config import ModelConfig
from eqr_jax.model import EqRModel, LatentState, num_params, rope_tables, apply_rope

B = 3
TINY = ModelConfig(seq_len=16, vocab_size=6, H_cycles=2, L_cycles=2, L_layers=1, hidden_size=32,
                   num_heads=2, expansion=2.0, mlp_t=True, pos_encodings="none",
                   forward_dtype="float32", noise_scale=0.01)


def _flat(tree):
    return jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(tree)])


def _cos(a, b):
    a, b = _flat(a), _flat(b)
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


@pytest.fixture(scope="module")
def setup():
    model = EqRModel(TINY)
    params = model.init(jax.random.PRNGKey(0))
    inputs = jax.random.randint(jax.random.PRNGKey(1), (B, TINY.seq_len), 1, TINY.vocab_size)
    labels = jax.random.randint(jax.random.PRNGKey(2), (B, TINY.seq_len), 2, TINY.vocab_size)
    return model, params, inputs, labels


def _loss_fn(model, inputs, labels, num_steps, grad, remat=False):
    def loss(params, z0):
        x = model.embed(params, inputs)
        z, _ = dynamics.unroll(model.step, params, z0, x, jax.random.PRNGKey(7), num_steps,
                               grad=grad, remat=remat)
        return losses.stablemax_cross_entropy(model.readout(params, z).logits, labels).mean()
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def test_gradient_modes(setup):
    model, params, inputs, labels = setup
    z0 = model.init_state(jax.random.PRNGKey(3), B)
    grads = {m: _loss_fn(model, inputs, labels, 2, m)(params, z0)
             for m in ("truncated", "one_step", "full")}
    remat = _loss_fn(model, inputs, labels, 2, "full", remat=True)(params, z0)
    # Truncated and one-step cut the graph before the last step: nothing reaches z0.
    for mode in ("truncated", "one_step"):
        assert float(jnp.abs(_flat(grads[mode][1])).max()) == 0.0, mode
    assert float(jnp.abs(_flat(grads["full"][1])).max()) > 0.0
    # Remat changes memory, not values.
    np.testing.assert_allclose(_flat(remat[0]), _flat(grads["full"][0]), rtol=1e-4, atol=1e-5)
    # The three modes are different gradients of the same loss, but all descend it.
    assert _cos(grads["truncated"][0], grads["one_step"][0]) < 0.9999
    assert _cos(grads["truncated"][0], grads["full"][0]) > 0.0


def test_truncated_step_matches_reference_rule(setup):
    """Inside one step, `truncate` gives gradient only through the last latent recursion."""
    model, params, inputs, labels = setup
    z0 = model.init_state(jax.random.PRNGKey(4), B)

    def by_hand(p):  # H_cycles - 1 recursions without gradient, then one with (spec §2.9)
        x = model.embed(p, inputs)
        cfg1 = dataclasses.replace(TINY, H_cycles=1)
        z = EqRModel(cfg1).step(jax.lax.stop_gradient(p), z0, jax.lax.stop_gradient(x), None)
        z = EqRModel(cfg1).step(p, jax.lax.stop_gradient(z), x, None)
        return losses.stablemax_cross_entropy(model.readout(p, z).logits, labels).mean()

    def ours(p):
        z = model.step(p, z0, model.embed(p, inputs), None, truncate=True)
        return losses.stablemax_cross_entropy(model.readout(p, z).logits, labels).mean()

    g1, g2 = jax.jit(jax.grad(by_hand))(params), jax.jit(jax.grad(ours))(params)
    np.testing.assert_allclose(_flat(g1), _flat(g2), rtol=1e-5, atol=1e-7)


def test_implicit_gradient_matches_long_unroll():
    # A contractive configuration: small block weights and strong damping make the step map a
    # contraction, so the fixed point exists and the long unroll converges to it.
    cfg = dataclasses.replace(TINY, lambda_=0.95, noise_scale=0.0)
    model = EqRModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    params = dict(params, L_level=jax.tree_util.tree_map(lambda a: 0.1 * a, params["L_level"]))
    inputs = jax.random.randint(jax.random.PRNGKey(1), (B, cfg.seq_len), 1, cfg.vocab_size)
    labels = jax.random.randint(jax.random.PRNGKey(2), (B, cfg.seq_len), 2, cfg.vocab_size)
    z0 = model.init_state(jax.random.PRNGKey(3), B)

    def unrolled(p):
        z, _ = dynamics.unroll(model.step, p, z0, model.embed(p, inputs), None, 100, grad="full")
        return losses.stablemax_cross_entropy(model.readout(p, z).logits, labels).mean()

    def implicit(p):
        res = dynamics.fixed_point(model.step, p, z0, model.embed(p, inputs), method="anderson",
                                   tol=1e-3, maxiter=60)
        loss = losses.stablemax_cross_entropy(model.readout(p, res.state).logits, labels).mean()
        return loss, res

    g_unroll = jax.jit(jax.grad(unrolled))(params)
    (loss, res), g_imp = jax.jit(jax.value_and_grad(implicit, has_aux=True))(params)
    assert bool(res.converged), f"Anderson did not converge: residual {res.residual}"
    assert 0 < int(res.iterations) <= 60
    assert _cos(g_unroll, g_imp) >= 0.999
    # The solution is a fixed point of the noise-free step map.
    x = model.embed(params, inputs)
    again = model.step(params, res.state, x, None)
    assert float(jnp.linalg.norm(_flat(again) - _flat(res.state))) <= 2e-3


def test_fixed_point_iteration_solver(setup):
    cfg = dataclasses.replace(TINY, lambda_=0.95, noise_scale=0.0)
    model = EqRModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    params = dict(params, L_level=jax.tree_util.tree_map(lambda a: 0.1 * a, params["L_level"]))
    z0 = model.init_state(jax.random.PRNGKey(3), B)
    x = model.embed(params, setup[2])
    res = jax.jit(lambda p, z: dynamics.fixed_point(model.step, p, z, x, method="iteration",
                                                   tol=1e-3, maxiter=200))(params, z0)
    assert bool(res.converged) and int(res.iterations) > 1
    with pytest.raises(ValueError, match="unknown fixed-point method"):
        dynamics.fixed_point(model.step, params, z0, x, method="newton")


def test_breadth_vmap_independent_and_reproducible(setup):
    model, params, inputs, _ = setup
    x = model.embed(params, inputs)
    run = jax.jit(lambda key: dynamics.breadth_unroll(
        model.step, params, dynamics.breadth_init(model.init_state, key, 4, B), x, key, 3,
        trace=lambda z: z.z_H))
    states0 = dynamics.breadth_init(model.init_state, jax.random.PRNGKey(5), 4, B)
    assert states0.z_H.shape == (4, B, TINY.seq_len, TINY.hidden_size)
    # Distinct initial latents per copy, and std close to H_init_std.
    assert not np.allclose(states0.z_H[0], states0.z_H[1])
    assert abs(float(states0.z_H.std()) - TINY.H_init_std) < 0.05
    (final, traj) = run(jax.random.PRNGKey(5))
    assert traj.shape == (4, 3, B, TINY.seq_len, TINY.hidden_size)
    assert not np.allclose(final.z_H[0], final.z_H[1])
    # Same key, same result; each copy equals its own single-trajectory run.
    final2, _ = run(jax.random.PRNGKey(5))
    np.testing.assert_array_equal(final.z_H, final2.z_H)
    copy = LatentState(states0.z_H[2], states0.z_L[2])
    single, _ = dynamics.unroll(model.step, params, copy, x,
                                jax.random.fold_in(jax.random.PRNGKey(5), 2), 3, grad="none")
    np.testing.assert_allclose(final.z_H[2], single.z_H, rtol=1e-3, atol=1e-3)


def test_noise_is_fresh_per_key_and_absent_without_key(setup):
    model, params, inputs, _ = setup
    x = model.embed(params, inputs)
    z0 = model.init_state(jax.random.PRNGKey(3), B)
    step = jax.jit(model.step)
    a, b = step(params, z0, x, jax.random.PRNGKey(1)), step(params, z0, x, jax.random.PRNGKey(2))
    c, d = step(params, z0, x, None), step(params, z0, x, None)
    assert not np.allclose(a.z_H, b.z_H)
    np.testing.assert_array_equal(c.z_H, d.z_H)
    # The noise is small (sigma = 0.01 per update): noisy and clean steps stay close.
    assert float(jnp.abs(a.z_H - c.z_H).max()) < 0.5


def test_bf16_shapes_and_dtypes():
    cfg = dataclasses.replace(TINY, forward_dtype="bfloat16", mlp_t=False, pos_encodings="rope")
    model = EqRModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
    inputs = jnp.ones((B, cfg.seq_len), jnp.int32)
    x = model.embed(params, inputs)
    z = model.init_state(jax.random.PRNGKey(1), B)
    assert x.dtype == z.z_H.dtype == z.z_L.dtype == jnp.bfloat16
    z = jax.jit(model.step)(params, z, x, jax.random.PRNGKey(2))
    out = model.readout(params, z)
    assert z.z_H.shape == (B, cfg.seq_len, cfg.hidden_size) and z.z_H.dtype == jnp.bfloat16
    assert out.logits.shape == (B, cfg.seq_len, cfg.vocab_size)
    assert out.logits.dtype == jnp.bfloat16
    assert out.q_halt.shape == (B,) and out.q_halt.dtype == jnp.float32
    np.testing.assert_allclose(out.q_halt, -5.0)  # zero q-head weights, bias -5 at init
    assert bool(jnp.isfinite(z.z_H.astype(jnp.float32)).all())


def test_rope2d_encodes_relative_board_offsets():
    cfg = ModelConfig(seq_len=16, vocab_size=6, hidden_size=32, num_heads=2, mlp_t=False,
                      pos_encodings="rope2d", board_height=4, board_width=4)
    cos, sin = rope_tables(cfg)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, cfg.head_dim))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, cfg.head_dim))
    rq = apply_rope(jnp.broadcast_to(q, (1, 16, 1, cfg.head_dim)), cos, sin, True)[0, :, 0]
    rk = apply_rope(jnp.broadcast_to(k, (1, 16, 1, cfg.head_dim)), cos, sin, True)[0, :, 0]
    # Rotation keeps norms; the score depends only on the (row, col) offset between tokens.
    np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q), rtol=1e-5)
    score = lambda a, b: float(rq[a] @ rk[b])
    assert score(0, 5) == pytest.approx(score(10, 15), rel=1e-4)   # offset (+1, +1)
    assert score(0, 4) == pytest.approx(score(6, 10), rel=1e-4)    # offset (+1, 0)
    assert score(0, 5) != pytest.approx(score(0, 4), rel=1e-3)


def test_variants():
    trm = EqRModel(dataclasses.replace(TINY, variant="trm", pos_encodings="learned"))
    a, b = trm.init_state(jax.random.PRNGKey(0), 2), trm.init_state(jax.random.PRNGKey(1), 2)
    # TRM starts every trajectory from the same fixed vectors, broadcast over rows and tokens.
    np.testing.assert_array_equal(a.z_H, b.z_H)
    np.testing.assert_array_equal(a.z_H[0, 0], a.z_H[1, 5])
    p = trm.init(jax.random.PRNGKey(0))
    assert "embed_pos" in p
    x = trm.embed(p, jnp.ones((2, 16), jnp.int32))
    s1 = trm.step(p, a, x, jax.random.PRNGKey(1))
    s2 = trm.step(p, a, x, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(s1.z_H, s2.z_H)  # no noise in TRM dynamics

    ff_cfg = dataclasses.replace(TINY, variant="feedforward", ff_layers=3)
    ff = EqRModel(ff_cfg)
    pf = ff.init(jax.random.PRNGKey(0))
    assert sorted(pf["L_level"]) == ["layers_0", "layers_1", "layers_2"]
    assert ff_cfg.blocks_per_step == 3
    one_block = num_params(EqRModel(TINY).init(jax.random.PRNGKey(0))["L_level"])
    assert num_params(pf["L_level"]) == 3 * one_block
    xf = ff.embed(pf, jnp.ones((2, 16), jnp.int32))
    z1, z2 = ff.init_state(jax.random.PRNGKey(0), 2), ff.init_state(jax.random.PRNGKey(9), 2)
    np.testing.assert_array_equal(ff.step(pf, z1, xf).z_H, ff.step(pf, z2, xf).z_H)
