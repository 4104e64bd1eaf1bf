"""The unrolled iteration: `lax.scan` over the step map under an unrolled adjoint (`Truncated`,
`Full`, `OneStep`, `Phantom`, `NoGrad`; `eqr_jax.dynamics.adjoints`)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from eqr_jax.dynamics.adjoints import (UNROLLED, Adjoint, Full, NoGrad, OneStep, Phantom,
                                       StepFn, Truncated)
from eqr_jax.model import LatentState


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


def _damped(step: StepFn, damping: float) -> StepFn:
    """``step`` relaxed towards the current state: ``(1 - d) z + d step(z)``."""
    if damping == 1.0:
        return step  # exactly the step map: one_step and phantom k=1, d=1 share one graph

    def fn(params, z, x, key, *, truncate=True):
        new = step(params, z, x, key, truncate=truncate)
        # Mixed in float32 and rounded once, as the model's own damped update is.
        return jax.tree_util.tree_map(
            lambda a, b: ((1.0 - damping) * a.astype(jnp.float32)
                          + damping * b.astype(jnp.float32)).astype(a.dtype), z, new)
    return fn


def unroll(step: StepFn, params, state: LatentState, x: jax.Array, key: jax.Array | None,
           num_steps: int, *, adjoint: Adjoint = Truncated(),
           trace: Callable[[LatentState], Any] | None = None):
    """Iterate the step map ``num_steps`` times with `lax.scan`.

    Args:
      step: the step map (see module docstring).
      params: model parameters (the differentiable argument, together with ``x``).
      state: initial latents, leaves (batch, seq, hidden).
      x: input injection (batch, seq, hidden).
      key: PRNG key; step ``i`` uses ``fold_in(key, i)``. None: noise-free.
      num_steps: number of step-map applications (>= 1; static). `Phantom` with ``k >
        num_steps`` runs ``k``.
      adjoint: `Truncated`, `Full`, `OneStep`, `Phantom` or `NoGrad` (module docstring).
      trace: optional function of the state, evaluated after every step and stacked along a new
        leading axis (num_steps, ...); e.g. residuals or logits for analysis.
    Returns:
      (final state, traces or None).
    """
    if not isinstance(adjoint, UNROLLED):
        raise ValueError(f"unroll takes an unrolled adjoint ({[c.name for c in UNROLLED]}), got "
                         f"{adjoint!r}; `advance` runs the implicit one")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    chex.assert_equal_shape([state.z_H, state.z_L, x])
    if isinstance(adjoint, Full):
        return _scan_steps(step, params, state, x, key, 0, num_steps, truncate=False,
                           remat=adjoint.remat, trace=trace)
    if isinstance(adjoint, OneStep):
        adjoint = Phantom(k=1, damping=1.0)
    tail = adjoint.k if isinstance(adjoint, Phantom) else 1
    prefix = max(num_steps - tail, 0)
    # Gradient-free prefix: params and x enter as constants, so autodiff keeps no residuals.
    z, head = _scan_steps(step, _stop(params), _stop(state), _stop(x), key, 0, prefix,
                          truncate=True, trace=trace)
    z = _stop(z)
    if isinstance(adjoint, Phantom):
        last, tail_trace = _scan_steps(_damped(step, adjoint.damping), params, z, x, key, prefix,
                                       tail, truncate=False, trace=trace)
        if trace is None:
            return last, None
        return last, jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), head,
                                            tail_trace)
    if isinstance(adjoint, NoGrad):
        last = step(_stop(params), z, _stop(x), _step_key(key, num_steps - 1))
    else:
        last = step(params, z, x, _step_key(key, num_steps - 1), truncate=True)
    if trace is None:
        return last, None
    tail_trace = jax.tree_util.tree_map(lambda a: a[None], trace(last))
    return last, jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), head, tail_trace)
