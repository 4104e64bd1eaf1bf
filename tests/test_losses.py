"""Losses: stablemax cross-entropy (values and gradients at the branch points, against a float64
NumPy formula), the ACT loss against the reference fixture, and the per-step training metrics
against their definitions written out in NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from eqr_jax import losses
from eqr_jax.act import ACTCarry
from eqr_jax.metrics import train_scalars
from eqr_jax.model import LatentState


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



@pytest.mark.parametrize("name", ["parity_sudoku_mlpt.npz", "parity_maze_attn_rope.npz"])
def test_loss_matches_reference_stablemax(name):
    f = np.load(fixture_path(name))
    logits, labels = jnp.asarray(f["step1/logits"]), jnp.asarray(f["labels_for_loss"])
    ref = f["stablemax_ce_tokenwise"]
    ce = np.asarray(losses.stablemax_cross_entropy(logits, labels))
    np.testing.assert_allclose(ce, ref, rtol=1e-5, atol=1e-6)
    # The ACT loss: per-row mean CE over valid tokens + 0.5 BCE(q_halt, exact), / global batch.
    q = jnp.asarray(f["step1/q_halt"])
    G = 7
    loss, parts = losses.act_loss(logits, q, labels, G)
    lab = f["labels_for_loss"]
    valid = lab != -100
    lm = ref.sum(-1) / np.maximum(valid.sum(-1), 1)
    exact = ((np.argmax(f["step1/logits"], -1) == lab) | ~valid).all(-1) & valid.any(-1)
    qf = f["step1/q_halt"].astype(np.float64)
    bce = np.maximum(qf, 0) - qf * exact + np.log1p(np.exp(-np.abs(qf)))
    np.testing.assert_allclose(np.asarray(parts["lm"]), lm, rtol=1e-5)
    np.testing.assert_allclose(float(loss), (lm + 0.5 * bce).sum() / G, rtol=1e-5)


def test_step_metrics_definitions():
    """q-halt precision/recall, steps extrema/histogram, latent RMS and residual binning on a
    hand-made step, against the definitions written out in NumPy."""
    rng = np.random.default_rng(0)
    B, N, H = 6, 3, 4
    old = LatentState(*(jnp.asarray(rng.normal(size=(B, N, H)), jnp.float32) for _ in range(2)))
    new = LatentState(*(jnp.asarray(rng.normal(size=(B, N, H)), jnp.float32) for _ in range(2)))
    prev_halted = np.array([1, 0, 0, 1, 0, 0], bool)         # rows 0, 3 were reset this step
    steps = np.array([1, 2, 3, 1, 4, 2], np.int32)
    halted = np.array([1, 1, 0, 0, 1, 1], bool)
    n_valid = np.array([3, 3, 3, 3, 0, 3], np.int32)          # row 4: no labels
    n_correct = np.array([3, 1, 3, 2, 0, 3], np.int32)
    exact = (n_correct == n_valid) & (n_valid > 0)
    q = np.array([0.5, -1.0, 2.0, 0.0, 1.0, -0.5], np.float32)
    data = {"inputs": jnp.zeros((B, N), jnp.int32)}
    c_old = ACTCarry(old, jnp.zeros(B, jnp.int32), jnp.asarray(prev_halted), data)
    c_new = ACTCarry(new, jnp.asarray(steps), jnp.asarray(halted), data)
    parts = {"n_correct": jnp.asarray(n_correct), "n_valid": jnp.asarray(n_valid),
             "exact": jnp.asarray(exact), "lm": jnp.ones(B), "bce": jnp.ones(B),
             "total": jnp.float32(9.0)}
    m = {k: np.asarray(v) for k, v in losses.act_metrics(4, c_old, c_new, jnp.asarray(q), parts).items()}
    valid = halted & (n_valid > 0)                           # rows 0, 1, 5
    count = valid.sum()
    assert m["count"] == count == 3
    hit = ((q > 0) & exact).sum()                            # rows 0, 2
    np.testing.assert_allclose(m["q_halt_precision"], count * hit / max((q >= 0).sum(), 1))
    np.testing.assert_allclose(m["q_halt_recall"], count * hit / max(exact.sum(), 1))
    assert m["q_halt_accuracy"] == ((q > 0) == exact)[valid].sum()
    assert (m["min_steps"], m["max_steps"], m["steps"]) == (1, 2, 5)
    np.testing.assert_array_equal(m["steps_hist"], [1, 2, 0, 0])
    on = lambda z: np.asarray(z, np.float64)
    rms = np.sqrt((on(new.z_H) ** 2).mean(axis=(1, 2)))
    np.testing.assert_allclose(m["zH_rms"], rms.sum(), rtol=1e-5)
    res = np.sqrt(((on(new.z_H) - on(old.z_H)) ** 2).sum((1, 2))
                  + ((on(new.z_L) - on(old.z_L)) ** 2).sum((1, 2)))
    cont = ~prev_halted                                       # rows 1, 2, 4, 5 at steps 2, 3, 4, 2
    np.testing.assert_array_equal(m["residual_count"], [0, 2, 1, 1])
    np.testing.assert_allclose(m["residual_sum"], [0, res[1] + res[5], res[2], res[4]], rtol=1e-5)
    assert cont.sum() == m["residual_count"].sum()
    out = train_scalars(dict(m, num_steps=1.0, grad_norm=2.0), B)
    assert out["train/q_halt_precision"] == pytest.approx(hit / max((q >= 0).sum(), 1))
    assert out["train/residual/act_step_02"] == pytest.approx((res[1] + res[5]) / 2, rel=1e-5)
    assert "train/residual/act_step_01" not in out
    assert out["train/zH_rms"] == pytest.approx(rms.sum() / B, rel=1e-5)
    # no halted row: the per-halted-row keys are dropped, not divided by zero
    out0 = train_scalars(dict(m, count=0.0, num_steps=1.0), B)
    assert "train/min_steps" not in out0 and "train/q_halt_recall" not in out0


def test_loss_and_grad_reports_the_implicit_backward(step_setup):
    """`loss_and_grad` is value_and_grad of `loss_and_metrics` (same loss and gradient) and,
    under the implicit adjoint, adds the backward solve's statistics read from the probe: here
    the one-cycle cap of 3 Krylov vectors binds, so every row reports 3 and a residual left."""
    from eqr_jax import dynamics
    from eqr_jax.act import init_carry

    model, params, inputs, labels = step_setup
    batch = {"inputs": inputs, "labels": labels,
             "puzzle_identifiers": jnp.zeros((inputs.shape[0],), jnp.int32)}
    carry, key = init_carry(model, batch), jax.random.PRNGKey(0)
    # Every row's IFT backward (rows rarely converge in 3 iterations; the default gives such
    # rows u = g, with no backward to report).
    adjoint = dynamics.Implicit(maxiter=3, backward_iters=3, unconverged="implicit")
    kw = dict(adjoint=adjoint, global_batch_size=inputs.shape[0])
    (loss, (_, m)), grads = jax.jit(losses.loss_and_grad(model, **kw))(params, carry, batch, key)
    (loss_ref, _), grads_ref = jax.jit(jax.value_and_grad(
        lambda p: losses.loss_and_metrics(model, p, carry, batch, key, **kw), has_aux=True))(
        params)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6)
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(t)])
    np.testing.assert_allclose(flat(grads), flat(grads_ref), rtol=1e-4, atol=1e-7)
    rows = inputs.shape[0]
    assert float(m["implicit_backward_iters"]) == 3 * rows
    assert 0 < float(m["implicit_backward_residual"]) <= rows * float(
        m["max_implicit_backward_residual"])
    out = train_scalars(dict({k: np.asarray(v) for k, v in m.items()}, num_steps=1.0), rows)
    assert out["train/implicit_backward_iters"] == 3.0
    assert out["train/max_implicit_backward_residual"] > 0
