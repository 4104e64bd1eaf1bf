"""Dynamics backends: how the step map is iterated, and how gradient flows through it.

Every backend takes the model's step map as it is,

    step(params, state, x, key, *, truncate=True) -> state

(`eqr_jax.model.EqRModel.step`), with ``state`` a pytree of (batch, seq, hidden) latents and ``x``
the input injection. Two iterations:

* `unroll`: ``lax.scan`` over ``num_steps`` noisy steps;
* `fixed_point`: jaxopt ``FixedPointIteration`` or ``AndersonAcceleration`` on the noise-free map
  ``z -> step(params, z, x, None)``, differentiated implicitly (implicit function theorem). The
  solve runs in float32 whatever the compute dtype.

How gradient flows is a separate object, the *adjoint* (as in optimistix), one class per name of
`eqr_jax.modes.GRAD_MODES` plus `NoGrad` for inference (`ADJOINTS`; docs/training.md):

* `Truncated` (the reference): no graph through the first ``num_steps - 1`` steps, and inside
  the last step only through its last latent recursion;
* `Full`: backprop through every step and recursion (``remat=True`` recomputes each step in the
  backward pass: memory O(1) steps of activations instead of O(num_steps));
* `OneStep` (phantom gradient): no graph through the first ``num_steps - 1`` steps, the full
  graph through every recursion of the last one;
* `Implicit`: the fixed point of the noise-free map, gradient by the implicit function theorem;
* `NoGrad`: no gradient at all.

`advance` runs one supervision segment under any adjoint; `unroll` is the scan itself.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, NamedTuple, Union

import jax
import jax.numpy as jnp
import jaxopt

from eqr_jax import modes
from eqr_jax.model import LatentState

StepFn = Callable[..., LatentState]


@dataclasses.dataclass(frozen=True)
class Truncated:
    """The reference's gradient: only the last latent recursion of the last step."""

    name: ClassVar[str] = "truncated"


@dataclasses.dataclass(frozen=True)
class Full:
    """Backprop through every step; ``remat`` recomputes each step in the backward pass."""

    remat: bool = False
    name: ClassVar[str] = "full"


@dataclasses.dataclass(frozen=True)
class OneStep:
    """Phantom gradient: every recursion of the last step, nothing before it."""

    name: ClassVar[str] = "one_step"


@dataclasses.dataclass(frozen=True)
class NoGrad:
    """Inference: no gradient reaches the parameters, the input or the initial state."""

    name: ClassVar[str] = "none"


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Fixed point of the noise-free map (jaxopt ``method``), implicit-function-theorem gradient.

    ``maxiter`` caps the forward solve; ``tol`` is the l2 norm of ``f(z) - z`` over the batch
    at which it stops (see `fixed_point`).
    """

    maxiter: int = 30
    tol: float = 1e-4
    method: str = "anderson"
    name: ClassVar[str] = "implicit"


Adjoint = Union[Truncated, Full, OneStep, NoGrad, Implicit]
UNROLLED = (Truncated, Full, OneStep, NoGrad)
# Name (`modes.GRAD_MODES` and `modes.NO_GRAD`) -> adjoint class.
ADJOINTS: dict[str, type] = {c.name: c for c in (Truncated, Full, OneStep, Implicit, NoGrad)}


def adjoint(name: str, *, remat: bool = False, implicit_maxiter: int = 30,
            implicit_tol: float = 1e-4) -> Adjoint:
    """The adjoint object of a registry name (``remat`` applies to ``full``, the ``implicit_*``
    settings to ``implicit``)."""
    modes.check("gradient mode", name, modes.GRAD_MODES + (modes.NO_GRAD,))
    if name == "full":
        return Full(remat=remat)
    if name == "implicit":
        return Implicit(maxiter=implicit_maxiter, tol=implicit_tol)
    return ADJOINTS[name]()


def adjoint_for(train_cfg) -> Adjoint:
    """The adjoint a `TrainConfig` asks for (``grad_mode``, ``remat``, ``implicit_*``)."""
    return adjoint(train_cfg.grad_mode, remat=train_cfg.remat,
                   implicit_maxiter=train_cfg.implicit_maxiter,
                   implicit_tol=train_cfg.implicit_tol)


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
           num_steps: int, *, adjoint: Adjoint = Truncated(),
           trace: Callable[[LatentState], Any] | None = None):
    """Iterate the step map ``num_steps`` times with `lax.scan`.

    Args:
      step: the step map (see module docstring).
      params: model parameters (the differentiable argument, together with ``x``).
      state: initial latents, leaves (batch, seq, hidden).
      x: input injection (batch, seq, hidden).
      key: PRNG key; step ``i`` uses ``fold_in(key, i)``. None: noise-free.
      num_steps: number of step-map applications (>= 1; static).
      adjoint: `Truncated`, `Full`, `OneStep` or `NoGrad` (see module docstring).
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
    if isinstance(adjoint, Full):
        return _scan_steps(step, params, state, x, key, 0, num_steps, truncate=False,
                           remat=adjoint.remat, trace=trace)
    # Gradient-free prefix: params and x enter as constants, so autodiff keeps no residuals.
    z, head = _scan_steps(step, _stop(params), _stop(state), _stop(x), key, 0, num_steps - 1,
                          truncate=True, trace=trace)
    z = _stop(z)
    if isinstance(adjoint, NoGrad):
        last = step(_stop(params), z, _stop(x), _step_key(key, num_steps - 1))
    else:
        last = step(params, z, x, _step_key(key, num_steps - 1),
                    truncate=isinstance(adjoint, Truncated))
    if trace is None:
        return last, None
    tail = jax.tree_util.tree_map(lambda a: a[None], trace(last))
    return last, jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), head, tail)


def advance(step: StepFn, params, state: LatentState, x: jax.Array, key: jax.Array | None,
            num_steps: int, adjoint: Adjoint) -> LatentState:
    """One supervision segment: ``num_steps`` noisy steps (`unroll`) or, for `Implicit`, the
    noise-free fixed point (`fixed_point`, at most ``adjoint.maxiter`` iterations)."""
    if isinstance(adjoint, Implicit):
        return fixed_point(step, params, state, x, method=adjoint.method,
                           maxiter=adjoint.maxiter, tol=adjoint.tol).state
    return unroll(step, params, state, x, key, num_steps, adjoint=adjoint)[0]


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
