"""Dynamics: the gradient adjoints of the unrolled step map, implicit differentiation through
the fixed point, the fixed-point solvers, and the adjoint registry."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import STEP_BATCH as B, STEP_CFG as TINY, tree_cosine as _cos, tree_flat as _flat
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


def test_implicit_gradient_matches_long_unroll():
    # A contractive configuration: small block weights and strong damping make the step map a
    # contraction, so the fixed point exists and the long unroll converges to it.
    cfg = dataclasses.replace(TINY, lambda_=0.95, noise_scale=0.0)
    model = EqRModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    params = dict(params, L_level=jax.tree_util.tree_map(lambda a: 0.1 * a, params["L_level"]))
    inputs = jax.random.randint(jax.random.PRNGKey(1), (B, cfg.seq_len), 1, cfg.vocab_size)
    labels = jax.random.randint(jax.random.PRNGKey(2), (B, cfg.seq_len), 2, cfg.vocab_size)
    z0 = model.init_latents(jax.random.PRNGKey(3), B)

    def unrolled(p):
        z, _ = dynamics.unroll(model.step, p, z0, model.embed(p, inputs), None, 100,
                               adjoint=dynamics.Full())
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


def test_fixed_point_iteration_solver(step_setup):
    cfg = dataclasses.replace(TINY, lambda_=0.95, noise_scale=0.0)
    model = EqRModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    params = dict(params, L_level=jax.tree_util.tree_map(lambda a: 0.1 * a, params["L_level"]))
    z0 = model.init_latents(jax.random.PRNGKey(3), B)
    x = model.embed(params, step_setup[2])
    res = jax.jit(lambda p, z: dynamics.fixed_point(model.step, p, z, x, method="iteration",
                                                   tol=1e-3, maxiter=200))(params, z0)
    assert bool(res.converged) and int(res.iterations) > 1
    with pytest.raises(ValueError, match="unknown fixed-point method"):
        dynamics.fixed_point(model.step, params, z0, x, method="newton")


def test_adjoint_registry_covers_the_gradient_modes():
    assert set(dynamics.ADJOINTS) == set(modes.GRAD_MODES) | {modes.NO_GRAD}
    assert dynamics.adjoint("full", remat=True) == dynamics.Full(remat=True)
    assert dynamics.adjoint("implicit", implicit_maxiter=7) == dynamics.Implicit(maxiter=7)
    assert {dynamics.adjoint(m).name for m in modes.GRAD_MODES} == set(modes.GRAD_MODES)
    with pytest.raises(ValueError, match="unknown gradient mode 'backprop'"):
        dynamics.adjoint("backprop")
    with pytest.raises(ValueError, match="`advance` runs the implicit one"):
        dynamics.unroll(None, None, None, None, None, 1, adjoint=dynamics.Implicit())
