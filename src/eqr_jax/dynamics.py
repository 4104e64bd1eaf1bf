"""Dynamics backends: how the step map is iterated, and how gradient flows through it.

Every backend takes the model's step map as it is,

    step(params, state, x, key, *, truncate=True) -> state

(`eqr_jax.model.EqRModel.step`), with ``state`` a pytree of (batch, seq, hidden) latents and ``x``
the input injection. Two solvers:

* `unroll`: ``lax.scan`` over ``num_steps`` noisy steps. The gradient mode is a separate choice
  (the ``adjoint`` of optimistix):
    - ``truncated`` (the reference): no graph through the first ``num_steps - 1`` steps, and inside
      the last step only through its last latent recursion;
    - ``full``: backprop through every step and recursion (``remat=True`` recomputes each step
      in the backward pass: memory O(1) steps of activations instead of O(num_steps));
    - ``one_step`` (phantom gradient): no graph through the first ``num_steps - 1`` steps, full
      graph through all recursions of the last one;
    - ``none``: no gradient at all (inference).
* `fixed_point`: jaxopt ``FixedPointIteration`` or ``AndersonAcceleration`` on the noise-free map
  ``z -> step(params, z, x, None)``, differentiated implicitly (implicit function theorem) when
  ``implicit_diff=True``. The solve runs in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import jaxopt

from eqr_jax.model import LatentState

StepFn = Callable[..., LatentState]
UNROLL_MODES = ("truncated", "full", "one_step", "none")


def _stop(tree):
    return jax.tree_util.tree_map(jax.lax.stop_gradient, tree)


def _step_key(key: jax.Array | None, i) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def _scan_steps(step: StepFn, params, state, x, key, start, num, *, truncate: bool,
                remat: bool = False, trace: Callable | None = None):
    """Apply ``num`` steps (indices start..start+num-1); optionally collect ``trace(state)``."""
    fn = functools.partial(step, truncate=truncate)
    if remat:
        fn = jax.checkpoint(fn)

    def body(z, i):
        z = fn(params, z, x, _step_key(key, i))
        return z, (None if trace is None else trace(z))

    return jax.lax.scan(body, state, start + jnp.arange(num))


def unroll(step: StepFn, params, state: LatentState, x: jax.Array, key: jax.Array | None,
           num_steps: int, *, grad: str = "truncated", remat: bool = False,
           trace: Callable[[LatentState], Any] | None = None):
    """Iterate the step map ``num_steps`` times with `lax.scan`.

    Args:
      step: the step map (see module docstring).
      params: model parameters (the differentiable argument, together with ``x``).
      state: initial latents, leaves (batch, seq, hidden).
      x: input injection (batch, seq, hidden).
      key: PRNG key; step ``i`` uses ``fold_in(key, i)``. None: noise-free.
      num_steps: number of step-map applications (>= 1; static).
      grad: ``truncated`` | ``full`` | ``one_step`` | ``none`` (see module docstring).
      remat: with ``full``, rematerialise each step in the backward pass.
      trace: optional function of the state, evaluated after every step and stacked along a new
        leading axis (num_steps, ...); e.g. residuals or logits for analysis.
    Returns:
      (final state, traces or None).
    """
    if grad not in UNROLL_MODES:
        raise ValueError(f"unknown gradient mode {grad!r}; choose from {UNROLL_MODES}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if grad == "full":
        return _scan_steps(step, params, state, x, key, 0, num_steps, truncate=False,
                           remat=remat, trace=trace)
    # Gradient-free prefix: params and x enter as constants, so autodiff keeps no residuals.
    z, head = _scan_steps(step, _stop(params), _stop(state), _stop(x), key, 0, num_steps - 1,
                          truncate=True, trace=trace)
    z = _stop(z)
    if grad == "none":
        last = step(_stop(params), z, _stop(x), _step_key(key, num_steps - 1))
    else:
        last = step(params, z, x, _step_key(key, num_steps - 1), truncate=(grad == "truncated"))
    if trace is None:
        return last, None
    tail = jax.tree_util.tree_map(lambda a: a[None], trace(last))
    return last, jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), head, tail)


class FixedPointResult(NamedTuple):
    """Solution of a fixed-point solve: state in the compute dtype, residual ‖f(z) - z‖ (f32),
    iterations used (int32) and whether the tolerance was reached (bool)."""

    state: LatentState
    residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


def fixed_point(step: StepFn, params, state: LatentState, x: jax.Array, *,
                method: str = "anderson", tol: float = 1e-4, maxiter: int = 50,
                implicit_diff: bool = True, history_size: int = 5, ridge: float = 1e-5,
                beta: float = 1.0, linear_solve_iters: int = 20) -> FixedPointResult:
    """Solve z* = step(params, z*, x) (noise off) with jaxopt; gradient by implicit differentiation.

    Args:
      step, params, state, x: as in `unroll`; ``state`` is the initial guess.
      method: ``anderson`` (AndersonAcceleration) or ``iteration`` (FixedPointIteration).
      tol: stop when the l2 norm of ``f(z) - z`` over the whole batch pytree is below ``tol``.
      maxiter: iteration cap.
      implicit_diff: differentiate the solution with the implicit function theorem (memory
        independent of the iterations); False unrolls the solver's loop for autodiff.
      linear_solve_iters: Krylov iterations (GMRES, one restart cycle) for the backward linear
        system (I - df/dz)^T u = g. Bounded on purpose: jaxopt's default normal-CG has no cap
        and, on a map that is not a contraction, runs up to the system size (minutes a step).
    Returns:
      `FixedPointResult`.
    """
    dtype = state.z_H.dtype

    def f32_map(z, p, xx):
        z_in = jax.tree_util.tree_map(lambda a: a.astype(dtype), z)
        out = step(p, z_in, xx, None, truncate=False)
        return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), out)

    backward = functools.partial(jaxopt.linear_solve.solve_gmres, tol=1e-6,
                                 restart=int(linear_solve_iters), maxiter=1)
    if method == "anderson":
        solver = jaxopt.AndersonAcceleration(f32_map, history_size=history_size, maxiter=maxiter,
                                             tol=tol, ridge=ridge, beta=beta,
                                             implicit_diff=implicit_diff,
                                             implicit_diff_solve=backward, jit=True)
    elif method == "iteration":
        solver = jaxopt.FixedPointIteration(f32_map, maxiter=maxiter, tol=tol,
                                            implicit_diff=implicit_diff,
                                            implicit_diff_solve=backward, jit=True)
    else:
        raise ValueError(f"unknown fixed-point method {method!r}; use 'anderson' or 'iteration'")
    z0 = jax.tree_util.tree_map(lambda a: jax.lax.stop_gradient(a).astype(jnp.float32), state)
    sol, info = solver.run(z0, params, x)
    residual = info.error.astype(jnp.float32)
    out = LatentState(*(a.astype(dtype) for a in sol))
    return FixedPointResult(out, residual, info.iter_num.astype(jnp.int32), residual <= tol)


def breadth_init(init_state: Callable[[jax.Array, int], LatentState], key: jax.Array,
                 breadth: int, batch: int) -> LatentState:
    """``breadth`` independent initial states: leaves (breadth, batch, seq, hidden).

    ``init_state(key, batch)`` is e.g. `EqRModel.init_state`; copy ``i`` uses ``fold_in(key, i)``,
    so copies are independent and a given key always gives the same latents.
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(breadth))
    return jax.vmap(lambda k: init_state(k, batch))(keys)


def breadth_unroll(step: StepFn, params, states: LatentState, x: jax.Array, key: jax.Array,
                   num_steps: int, trace: Callable | None = None):
    """Run ``breadth`` trajectories in parallel with `vmap` (inference, no gradient).

    Args:
      states: leaves (breadth, batch, seq, hidden), e.g. from `breadth_init`.
      x: (batch, seq, hidden), shared by all copies.
      key: noise key; copy ``i`` draws its noise from ``fold_in(key, i)``.
    Returns:
      (final states with a leading breadth axis, traces with axes (breadth, num_steps, ...)).
    """
    n = jax.tree_util.tree_leaves(states)[0].shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
    run = lambda s, k: unroll(step, params, s, x, k, num_steps, grad="none", trace=trace)
    return jax.vmap(run)(states, keys)
