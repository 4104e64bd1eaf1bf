"""Numerics of the training path: stablemax cross-entropy values and gradients at the points where
a `where` with a singular unused branch used to give NaN, and the EqR update's float32
coefficients (rounded to the compute dtype once)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqr_jax import losses
from eqr_jax.config import ModelConfig
from eqr_jax.model import update


def _stablemax_logp_f64(x: np.ndarray) -> np.ndarray:
    """The reference formula in float64: s(x) = 1/(1 - x + 1e-30) for x < 0 else x + 1."""
    x = x.astype(np.float64)
    s = np.empty_like(x)
    neg = x < 0
    s[neg] = 1.0 / (1.0 - x[neg] + 1e-30)
    s[~neg] = x[~neg] + 1.0
    return np.log(s / s.sum(-1, keepdims=True))


# Exactly representable in bf16 and float32: the singular points of the old formula and values
# on both sides of them.
_SPECIAL = np.array([1.0, 0.0, -1.0, 0.5, -0.5, 2.0, -2.0, 3.25, -7.0, 1.0078125], np.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stablemax_values_match_float64_formula(dtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([_SPECIAL, rng.normal(0, 3, 54).astype(np.float32)]).reshape(8, 8)
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # the values the dtype can hold
    got = np.asarray(losses.stablemax_log_probs(jnp.asarray(x, dtype)), np.float64)
    np.testing.assert_allclose(got, _stablemax_logp_f64(x), rtol=2e-6, atol=2e-7)
    labels = rng.integers(0, 8, 8)
    labels[3] = losses.IGNORE_LABEL
    ce = np.asarray(losses.stablemax_cross_entropy(jnp.asarray(x, dtype)[None],
                                                   jnp.asarray(labels)[None]))[0]
    ref = -_stablemax_logp_f64(x)[np.arange(8), np.maximum(labels, 0)]
    ref[3] = 0.0
    np.testing.assert_allclose(ce, ref, rtol=2e-6, atol=2e-7)
    assert ce[3] == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("point", [1.0, 0.0, -1.0])
def test_stablemax_gradient_finite_at_branch_points(dtype, point):
    # Every logit of a row at the point (the label's and the others'), and mixed rows.
    rows = np.array([[point] * 4, [point, 0.3, -0.2, 2.0], [1.5, point, -3.0, point]], np.float32)
    labels = jnp.array([[0, 1, 2]])
    x = jnp.asarray(rows, dtype)[None]

    def loss(z):
        return jnp.sum(losses.stablemax_cross_entropy(z, labels))

    g = np.asarray(jax.grad(loss)(x).astype(jnp.float32), np.float64)
    assert np.isfinite(g).all(), g
    # Against central differences of the float64 formula (the gradient is not merely finite).
    def f64(z):
        lp = _stablemax_logp_f64(z)
        return -sum(lp[i, l] for i, l in enumerate([0, 1, 2]))
    base = np.asarray(x[0].astype(jnp.float32), np.float64)
    num = np.zeros_like(base)
    h = 1e-6
    for idx in np.ndindex(base.shape):
        # (central differences are fine at x = 0: both branches have slope 1 there)
        up = base.copy(); up[idx] += h
        dn = base.copy(); dn[idx] -= h
        num[idx] = (f64(up) - f64(dn)) / (2 * h)
    # bf16 gradients are rounded to bf16 (8 significant bits)
    tol = 8e-3 if dtype == jnp.bfloat16 else 1e-4
    np.testing.assert_allclose(g[0], num, rtol=tol, atol=1e-4)


def test_update_uses_float32_coefficients_rounded_once():
    """A bf16 EqR update is the float32 computation (1-lam) h + lam f + sigma eps with float32
    coefficients, rounded to bf16 once; quantised coefficients (bf16 lambda = 0.94921875) or
    bf16 arithmetic would miss on many elements."""
    cfg = ModelConfig(seq_len=8, vocab_size=5, H_cycles=1, L_cycles=1, L_layers=1, hidden_size=16,
                      num_heads=2, expansion=1.0, mlp_t=True, pos_encodings="none",
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
