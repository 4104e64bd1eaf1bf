"""Dynamics: the gradient adjoints of the unrolled step map, implicit differentiation through
the fixed point, the fixed-point solvers, and the adjoint registry."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (STEP_BATCH as B, STEP_CFG as TINY, micro_model, tree_cosine as _cos,
                      tree_flat as _flat)
from eqr_jax import dynamics, losses, modes
from eqr_jax.model import EqRModel


def _loss_fn(model, inputs, labels, num_steps, adjoint):
    def loss(params, z0):
        x = model.embed(params, inputs)
        z, _ = dynamics.unroll(model.step, params, z0, x, jax.random.PRNGKey(7), num_steps,
                               adjoint=adjoint)
        return losses.stablemax_cross_entropy(model.readout(params, z).logits, labels).mean()
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def test_gradient_modes(step_setup):
    model, params, inputs, labels = step_setup
    z0 = model.init_latents(jax.random.PRNGKey(3), B)
    grads = {m: _loss_fn(model, inputs, labels, 2, dynamics.adjoint(m))(params, z0)
             for m in ("truncated", "one_step", "full")}
    remat = _loss_fn(model, inputs, labels, 2, dynamics.Full(remat=True))(params, z0)
    # Truncated and one-step cut the graph before the last step: nothing reaches z0.
    for mode in ("truncated", "one_step"):
        assert float(jnp.abs(_flat(grads[mode][1])).max()) == 0.0, mode
    assert float(jnp.abs(_flat(grads["full"][1])).max()) > 0.0
    # Remat changes memory, not values.
    np.testing.assert_allclose(_flat(remat[0]), _flat(grads["full"][0]), rtol=1e-4, atol=1e-5)
    # The three modes are different gradients of the same loss, but all descend it.
    assert _cos(grads["truncated"][0], grads["one_step"][0]) < 0.9999
    assert _cos(grads["truncated"][0], grads["full"][0]) > 0.0


def _contractive():
    """A contractive configuration: small block weights and strong damping make the step map a
    contraction, so the fixed point exists and the long unroll converges to it."""
    cfg = dataclasses.replace(TINY, lambda_=0.95, noise_scale=0.0)
    model = EqRModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    params = dict(params, L_level=jax.tree_util.tree_map(lambda a: 0.1 * a, params["L_level"]))
    inputs = jax.random.randint(jax.random.PRNGKey(1), (B, cfg.seq_len), 1, cfg.vocab_size)
    labels = jax.random.randint(jax.random.PRNGKey(2), (B, cfg.seq_len), 2, cfg.vocab_size)
    z0 = model.init_latents(jax.random.PRNGKey(3), B)
    return model, params, inputs, labels, z0


def test_implicit_gradient_matches_long_unroll():
    model, params, inputs, labels, z0 = _contractive()

    def unrolled(p):
        z, _ = dynamics.unroll(model.step, p, z0, model.embed(p, inputs), None, 100,
                               adjoint=dynamics.Full())
        return losses.stablemax_cross_entropy(model.readout(p, z).logits, labels).mean()

    def implicit(p, backward):
        res = dynamics.fixed_point(model.step, p, z0, model.embed(p, inputs), method="anderson",
                                   tol=1e-5, maxiter=60, backward=backward)
        loss = losses.stablemax_cross_entropy(model.readout(p, res.state).logits, labels).mean()
        return loss, res

    g_unroll = jax.jit(jax.grad(unrolled))(params)
    for backward in dynamics.BACKWARD_METHODS:
        grad = jax.jit(jax.value_and_grad(functools.partial(implicit, backward=backward),
                                          has_aux=True))
        (loss, res), g_imp = grad(params)
        assert res.converged.shape == (B,) and bool(jnp.all(res.converged)), res.residual
        assert np.all((res.iterations > 1) & (res.iterations <= 60))
        assert _cos(g_unroll, g_imp) >= 0.9999, backward
    # The solution is a fixed point of the noise-free step map, row by row.
    x = model.embed(params, inputs)
    again = model.step(params, res.state, x, None)
    rel = (jnp.linalg.norm((again.z_H - res.state.z_H).reshape(B, -1), axis=1)
           / jnp.linalg.norm(res.state.z_H.reshape(B, -1), axis=1))
    assert float(rel.max()) <= 1e-4


def test_fixed_point_per_row_equals_each_row_alone_and_warm_start():
    model, params, inputs, _, z0 = _contractive()
    x = model.embed(params, inputs)
    solve = jax.jit(lambda z, xx, method: dynamics.fixed_point(
        model.step, params, z, xx, method=method, tol=1e-5, maxiter=200), static_argnums=2)
    for method in dynamics.FIXED_POINT_METHODS:
        batch = solve(z0, x, method)
        assert bool(jnp.all(batch.converged)), method
        for r in range(B):
            alone = solve(jax.tree_util.tree_map(lambda a: a[r:r + 1], z0), x[r:r + 1], method)
            # Same per-row mixing, stopping point and count whether the row is alone or not.
            assert int(alone.iterations[0]) == int(batch.iterations[r]), (method, r)
            np.testing.assert_allclose(alone.state.z_H[0], batch.state.z_H[r], atol=2e-5)
            np.testing.assert_allclose(alone.residual[0], batch.residual[r], rtol=2e-2)
    # Warm start: a row that starts at its fixed point takes one evaluation and stays there;
    # the others are unaffected by it (a converged row stops changing, alone or in a batch).
    warm = jax.tree_util.tree_map(lambda s, c: c.at[0].set(s[0]), batch.state, z0)
    again = solve(warm, x, "iteration")
    assert int(again.iterations[0]) == 1 and bool(again.converged[0])
    np.testing.assert_array_equal(again.state.z_H[0], batch.state.z_H[0])
    np.testing.assert_array_equal(again.iterations[1:], batch.iterations[1:])
    assert int(jnp.max(again.iterations)) > 1
    with pytest.raises(ValueError, match="unknown fixed-point method"):
        dynamics.fixed_point(model.step, params, z0, x, method="newton")
    with pytest.raises(ValueError, match="unknown backward solve"):
        dynamics.fixed_point(model.step, params, z0, x, backward="cg")


def _near_critical():
    """A micro model whose step map has spectral radius ~0.99 at its fixed points (the L level's
    weights x 0.43; 0.985-0.988 on these rows), where a short backward solve is inaccurate."""
    cfg = micro_model(H_cycles=1, L_cycles=2, noise_scale=0.0)
    model = EqRModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    params = dict(params, L_level=jax.tree_util.tree_map(lambda a: 0.43 * a, params["L_level"]))
    rows = 2
    inputs = jax.random.randint(jax.random.PRNGKey(1), (rows, cfg.seq_len), 1, cfg.vocab_size)
    labels = jax.random.randint(jax.random.PRNGKey(2), (rows, cfg.seq_len), 2, cfg.vocab_size)
    return model, params, inputs, labels, model.init_latents(jax.random.PRNGKey(3), rows)


def test_implicit_gradient_equals_dense_ift_and_vmapped_jaxopt():
    jaxopt = pytest.importorskip("jaxopt")
    from eqr_jax.dynamics.solve import _flatten_rows, _unflatten_rows

    model, params, inputs, labels, z0 = _near_critical()
    rows = inputs.shape[0]
    one = jax.tree_util.tree_map(lambda a: a[:1], z0)

    def f(p, z_row, x_row):  # the step map of one flattened row
        out = model.step(p, _unflatten_rows(z_row[None], one), x_row[None], None, truncate=False)
        return _flatten_rows(out)[0]

    def loss_at(p, state):
        return losses.stablemax_cross_entropy(model.readout(p, state).logits, labels).mean()

    def ours(p, probe):
        # Forward solved tightly (the comparison is about the gradient); backward at defaults.
        res = dynamics.fixed_point(model.step, p, z0, model.embed(p, inputs), tol=1e-6,
                                   maxiter=400, probe=probe)
        return loss_at(p, res.state), res

    def theirs(p):
        # Plain iteration: jaxopt's Anderson, with its fixed absolute ridge, needs over 1,000
        # iterations here. jaxopt's tol bounds the absolute ||f(z) - z||.
        solver = jaxopt.FixedPointIteration(fixed_point_fun=lambda z, p, xr: f(p, z, xr),
                                            maxiter=1000, tol=1e-5)
        x = model.embed(p, inputs)
        sol = jax.vmap(lambda z, xr: solver.run(z, p, xr).params)(_flatten_rows(z0), x)
        return loss_at(p, _unflatten_rows(sol, z0)), sol

    (_, res), (g_ours, stats) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(
        params, dynamics.backward_probe(rows))
    (_, sol_jaxopt), g_jaxopt = jax.jit(jax.value_and_grad(theirs, has_aux=True))(params)
    assert bool(jnp.all(res.converged)), res.residual
    # The backward solve reports what it achieved through the probe: the default tolerance.
    assert float(stats[:, 0].max()) <= dynamics.Implicit().backward_tol
    assert np.all((stats[:, 1] >= 20) & (stats[:, 1] <= dynamics.Implicit().backward_iters))

    # Exact reference: a dense (I - J)^T u = g solve per row in float64 at our fixed point.
    exact, radius = dynamics.dense_implicit_gradient(model, params, res.state, inputs, loss_at)
    assert np.all((radius > 0.98) & (radius < 1.0)), radius
    assert _cos(g_ours, exact) >= 0.9999
    rel = float(jnp.linalg.norm(_flat(g_ours) - _flat(exact)) / jnp.linalg.norm(_flat(exact)))
    assert rel < 2e-3, rel
    # Vmapped jaxopt (per-row stopping, implicit differentiation): same point, same gradient.
    np.testing.assert_allclose(sol_jaxopt, _flatten_rows(res.state), atol=2e-3)
    assert _cos(g_ours, g_jaxopt) >= 0.9999


def test_backward_solve_stops_at_its_tolerance_or_cap():
    model, params, inputs, labels, z0 = _near_critical()

    def grad(**kw):
        def loss(p, probe):
            res = dynamics.fixed_point(model.step, p, z0, model.embed(p, inputs), tol=1e-4,
                                       maxiter=300, probe=probe, **kw)
            return losses.stablemax_cross_entropy(model.readout(p, res.state).logits,
                                                  labels).mean()
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, dynamics.backward_probe(2))

    g_ref, stats_ref = grad()
    g_cap, stats = grad(backward_iters=20)  # the pre-tolerance default: one GMRES(20) cycle
    assert float(stats_ref[:, 0].max()) <= 1e-4 and float(stats_ref[:, 1].min()) > 20
    # Capped: the budget is spent and the residual left is reported, above the tolerance.
    np.testing.assert_array_equal(stats[:, 1], 20.0)
    assert float(stats[:, 0].min()) > 1e-3
    assert _cos(g_cap, g_ref) < 0.9999
    # A row whose forward solve did not converge can take the one-step gradient instead.
    def unconverged(rule):
        def loss(p):
            res = dynamics.fixed_point(model.step, p, z0, model.embed(p, inputs), maxiter=2,
                                       unconverged=rule)
            return losses.stablemax_cross_entropy(model.readout(p, res.state).logits,
                                                  labels).mean()
        return jax.jit(jax.grad(loss))(params)

    def one_step(p):
        res = dynamics.fixed_point(model.step, p, z0, model.embed(p, inputs), maxiter=2,
                                   implicit_diff=False)
        z = model.step(p, res.state, model.embed(p, inputs), None, truncate=False)
        # f(z*) with the gradient of one step equals z* with u = g in value and gradient.
        z = jax.tree_util.tree_map(lambda a, b: b + a - jax.lax.stop_gradient(a), z, res.state)
        return losses.stablemax_cross_entropy(model.readout(p, z).logits, labels).mean()
    np.testing.assert_allclose(_flat(unconverged("one_step")), _flat(jax.grad(one_step)(params)),
                               rtol=1e-4, atol=1e-6)
    assert _cos(unconverged("implicit"), unconverged("one_step")) < 0.9999
    # A mixed batch: row 0 starts at its fixed point, row 1 from noise with a 2-evaluation cap.
    # The one-step row's discarded solve is skipped (0 VJPs, residual 0), so the loop runs only
    # as long as row 0 needs; row 0 is solved to the tolerance as before.
    z_star = dynamics.fixed_point(model.step, params, z0, model.embed(params, inputs), tol=1e-6,
                                  maxiter=400, implicit_diff=False).state
    mixed = jax.tree_util.tree_map(lambda a, b: a.at[1].set(b[1]), z_star, z0)
    for method in dynamics.BACKWARD_METHODS:
        def loss(p, probe):
            res = dynamics.fixed_point(model.step, p, mixed, model.embed(p, inputs), maxiter=2,
                                       probe=probe, backward=method, backward_iters=2000)
            return losses.stablemax_cross_entropy(model.readout(p, res.state).logits,
                                                  labels).mean(), res.converged
        (_, conv), (_, mixed_stats) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                                 has_aux=True))(
            params, dynamics.backward_probe(2))
        np.testing.assert_array_equal(conv, [True, False])
        np.testing.assert_array_equal(mixed_stats[1], [0.0, 0.0, 0.0])
        assert float(mixed_stats[0, 0]) <= 1e-4 and float(mixed_stats[0, 1]) > 20, mixed_stats
    with pytest.raises(ValueError, match="unknown rule for unconverged rows"):
        dynamics.fixed_point(model.step, params, z0, model.embed(params, inputs),
                             unconverged="skip")


def test_non_finite_backward_row_takes_the_one_step_gradient():
    """A row whose backward solve returns a non-finite solution (here its map's Jacobian is NaN)
    gets u = g and is counted in the probe's fallback column; the other row is untouched and no
    NaN reaches the parameters' gradient."""
    from eqr_jax.dynamics.implicit import Backward, _implicit_rows

    def f(p, z, x):  # rows of 3; J = (p + x) I per row, df/dp = z
        return p * z + x * z

    x = jnp.array([[0.5] * 3, [jnp.nan] * 3])
    z_star = jnp.ones((2, 3))

    def loss(p, probe):
        z = _implicit_rows(f, p, x, z_star, jnp.ones((2,)), probe, Backward())
        return jnp.sum(z)

    g_p, stats = jax.grad(loss, argnums=(0, 1))(jnp.float32(0.25), dynamics.backward_probe(2))
    np.testing.assert_array_equal(stats[:, 2], [0.0, 1.0])
    # Row 0: (1 - 0.75) u = 1, u = 4, du/dp contribution u . z = 12; row 1: u = g, g . z = 3.
    np.testing.assert_allclose(float(g_p), 12.0 + 3.0, rtol=1e-5)
    assert float(stats[0, 0]) <= 1e-4 and float(stats[1, 0]) == 0.0


def test_phantom_matches_hand_unrolled_reference(step_setup):
    model, params, inputs, labels = step_setup
    z0 = model.init_latents(jax.random.PRNGKey(3), B)
    key = jax.random.PRNGKey(7)
    ce = lambda p, z: losses.stablemax_cross_entropy(model.readout(p, z).logits, labels).mean()

    def reference(p, num_steps, k, d):
        # Written out step by step: the prefix is cut from the graph, the k damped steps are not.
        x = model.embed(p, inputs)
        z = z0
        prefix = max(num_steps - k, 0)
        for i in range(prefix):
            z = model.step(jax.lax.stop_gradient(p), z, jax.lax.stop_gradient(x),
                           jax.random.fold_in(key, i))
        z = jax.lax.stop_gradient(z)
        for i in range(prefix, prefix + k):
            f = model.step(p, z, x, jax.random.fold_in(key, i), truncate=False)
            z = jax.tree_util.tree_map(lambda a, b: (1 - d) * a + d * b, z, f)
        return ce(p, z)

    def phantom(p, num_steps, adjoint):
        z, _ = dynamics.unroll(model.step, p, z0, model.embed(p, inputs), key, num_steps,
                               adjoint=adjoint)
        return ce(p, z)

    for num_steps, k, d in ((3, 2, 0.5), (1, 2, 0.7)):  # k < steps, and k > steps: k steps
        want = jax.jit(jax.value_and_grad(reference), static_argnums=(1, 2, 3))(
            params, num_steps, k, d)
        got = jax.jit(jax.value_and_grad(phantom), static_argnums=(1, 2))(
            params, num_steps, dynamics.Phantom(k=k, damping=d))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        # Scan and Python loop fuse differently: float32 rounding, nothing more (a step missing
        # from the graph, or an undamped one, moves the gradient by orders more).
        np.testing.assert_allclose(_flat(got[1]), _flat(want[1]), rtol=1e-3, atol=2e-5)
        assert _cos(got[1], want[1]) > 0.99999
    # one_step is the k = 1, undamped case, exactly: the same traced computation.
    one = lambda adjoint: str(jax.make_jaxpr(jax.grad(phantom), static_argnums=(1, 2))(
        params, 2, adjoint))
    assert one(dynamics.OneStep()) == one(dynamics.Phantom(k=1, damping=1.0))
    assert one(dynamics.OneStep()) != one(dynamics.Phantom(k=1, damping=0.5))
    with pytest.raises(ValueError, match="damping in"):
        dynamics.Phantom(k=2, damping=0.0)


def test_jacobian_frobenius_matches_dense_jacobian(step_setup):
    model, params, inputs, _ = step_setup
    rows = 2
    z = model.init_latents(jax.random.PRNGKey(4), rows)
    x = model.embed(params, inputs[:rows])
    flat = lambda s: jnp.concatenate([a.reshape(rows, -1) for a in s], axis=1)
    n = z.z_H[0].size

    def f_flat(v):
        v = v.reshape(rows, 2 * n)
        s = type(z)(v[:, :n].reshape(z.z_H.shape), v[:, n:].reshape(z.z_L.shape))
        return flat(model.step(params, s, x, None, truncate=False)).ravel()

    jac = np.asarray(jax.jit(jax.jacfwd(f_flat))(flat(z).ravel()))  # (rows*2n, rows*2n)
    blocks = jac.reshape(rows, 2 * n, rows, 2 * n)
    exact = np.array([np.sum(blocks[r, :, r, :] ** 2) for r in range(rows)])
    # Rows do not interact: the off-diagonal blocks are zero.
    assert np.abs(blocks[0, :, 1, :]).max() == 0 and np.abs(blocks[1, :, 0, :]).max() == 0
    samples = 256
    est_fn = jax.jit(lambda p: dynamics.jacobian_frobenius_sq(
        model, p, z, x, key=jax.random.PRNGKey(5), samples=samples))
    est = np.asarray(est_fn(params))
    assert est.shape == (rows,)
    # Var ||J^T v||^2 = 2 ||J J^T||_F^2 for v ~ N(0, I): within 4 standard errors.
    se = np.array([np.sqrt(2 * np.sum((blocks[r, :, r, :] @ blocks[r, :, r, :].T) ** 2)
                           / samples) for r in range(rows)])
    assert np.all(np.abs(est - exact) <= 4 * se), (est, exact, se)
    assert np.all(se < 0.2 * exact)  # the check is sharp enough to mean something
    # Its gradient reaches the parameters (Jacobian regularisation trains the map).
    g = jax.jit(jax.grad(lambda p: jnp.sum(est_fn(p))))(params)
    norms = [float(jnp.linalg.norm(a)) for a in jax.tree_util.tree_leaves(g["L_level"])]
    assert all(np.isfinite(norms)) and max(norms) > 0
    with pytest.raises(ValueError, match="samples must be >= 1"):
        dynamics.jacobian_frobenius_sq(model, params, z, x, key=jax.random.PRNGKey(0), samples=0)


def test_adjoint_registry_covers_the_gradient_modes():
    assert set(dynamics.ADJOINTS) == set(modes.GRAD_MODES) | {modes.NO_GRAD}
    assert dynamics.adjoint("full", remat=True) == dynamics.Full(remat=True)
    assert dynamics.adjoint("implicit", implicit_maxiter=7) == dynamics.Implicit(maxiter=7)
    assert dynamics.adjoint("phantom", phantom_k=3) == dynamics.Phantom(k=3)
    assert {dynamics.adjoint(m).name for m in modes.GRAD_MODES} == set(modes.GRAD_MODES)
    with pytest.raises(ValueError, match="unknown gradient mode 'backprop'"):
        dynamics.adjoint("backprop")
    with pytest.raises(ValueError, match="`advance` runs the implicit one"):
        dynamics.unroll(None, None, None, None, None, 1, adjoint=dynamics.Implicit())
