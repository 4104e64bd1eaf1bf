"""The model: the step map's truncation rule, noise, dtypes, 2-D RoPE, the TRM and feedforward
variants, and the EqR update's float32 coefficients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import STEP_BATCH as B, STEP_CFG as TINY, micro_model, tree_flat as _flat
from eqr_jax import losses
from eqr_jax.model import EqRModel, apply_rope, num_params, rope_tables, update


def test_truncated_step_matches_reference_rule(step_setup):
    """Inside one step, `truncate` gives gradient only through the last latent recursion."""
    model, params, inputs, labels = step_setup
    z0 = model.init_latents(jax.random.PRNGKey(4), B)

    def by_hand(p):  # H_cycles - 1 recursions without gradient, then one with (docs/model.md)
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


def test_noise_is_fresh_per_key_and_absent_without_key(step_setup):
    model, params, inputs, _ = step_setup
    x = model.embed(params, inputs)
    z0 = model.init_latents(jax.random.PRNGKey(3), B)
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
    z = model.init_latents(jax.random.PRNGKey(1), B)
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
    cfg = micro_model(mlp_t=False, pos_encodings="rope2d", board_height=4, board_width=4)
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
    a, b = trm.init_latents(jax.random.PRNGKey(0), 2), trm.init_latents(jax.random.PRNGKey(1), 2)
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
    z1, z2 = ff.init_latents(jax.random.PRNGKey(0), 2), ff.init_latents(jax.random.PRNGKey(9), 2)
    np.testing.assert_array_equal(ff.step(pf, z1, xf).z_H, ff.step(pf, z2, xf).z_H)


def test_update_uses_float32_coefficients_rounded_once():
    """A bf16 EqR update is the float32 computation (1-lam) h + lam f + sigma eps with float32
    coefficients, rounded to bf16 once; quantised coefficients (bf16 lambda = 0.94921875) or
    bf16 arithmetic would miss on many elements."""
    cfg = micro_model(seq_len=8, vocab_size=5, hidden_size=16, expansion=1.0,
                      forward_dtype="bfloat16", lambda_=0.95, noise_scale=0.01)
    from eqr_jax.model import apply_blocks, init_params
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.PRNGKey(0))
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    h = jax.random.normal(k1, (4, 8, 16), jnp.float32).astype(jnp.bfloat16)
    u = jax.random.normal(k2, (4, 8, 16), jnp.float32).astype(jnp.bfloat16)
    # jitted: eager Flax ops are slow to dispatch one by one
    upd = jax.jit(lambda p, a, b, k: update(cfg, p, a, b, k))
    got = np.asarray(upd(params, h, u, k3).astype(jnp.float32))
    f = np.asarray(jax.jit(lambda p, a: apply_blocks(cfg, p, a))(params, h + u)
                   .astype(jnp.float32))
    eps = np.asarray(jax.random.normal(k3, h.shape, jnp.float32).astype(jnp.bfloat16)
                     .astype(jnp.float32))
    hf = np.asarray(h.astype(jnp.float32))
    # The coefficients are the Python doubles 1 - 0.95, 0.95, 0.01 rounded to float32 (as torch
    # does with a Python scalar times a bf16 tensor); the arithmetic is float32.
    one_m, lam, sig = np.float32(1 - 0.95), np.float32(0.95), np.float32(0.01)
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16)
                              .astype(jnp.float32))
    want = bf((one_m * hf + lam * f) + sig * eps)

    def mismatch(a, b):
        """Share of differing elements; a difference may be at most one bf16 ulp."""
        return float((a != b).mean())

    def within_one_ulp(a, b):
        ulp = np.spacing(np.abs(b).astype(np.float32)) * 2.0 ** 16  # bf16 has 16 fewer bits
        return bool((np.abs(a - b) <= ulp).all())

    # XLA may contract a*b + c into one fused multiply-add (one float32 rounding fewer), which
    # moves a rare element across a bf16 rounding boundary: allow 1% of elements, by one ulp.
    assert mismatch(got, want) <= 0.01 and within_one_ulp(got, want)
    # The alternatives differ on many elements, so the check above tells them apart:
    # bf16-stored coefficients (lambda 0.94921875, sigma 0.0100098) ...
    lam_b, sig_b = (np.float32(jnp.asarray(v, jnp.bfloat16)) for v in (0.95, 0.01))
    one_b = np.float32(jnp.asarray(1 - lam_b, jnp.bfloat16))
    assert mismatch(got, bf((one_b * hf + lam_b * f) + sig_b * eps)) > 0.05
    # ... and bf16 arithmetic, rounding after every operation.
    assert mismatch(got, bf(bf(bf(one_m * hf) + bf(lam * f)) + bf(sig * eps))) > 0.05
    # Without a key the update is noise-free and still rounded once.
    got0 = np.asarray(jax.jit(lambda p, a, b: update(cfg, p, a, b, None))(params, h, u)
                      .astype(jnp.float32))
    want0 = bf(one_m * hf + lam * f)
    assert mismatch(got0, want0) <= 0.01 and within_one_ulp(got0, want0)
