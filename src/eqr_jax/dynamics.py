"""Dynamics backends: how the step map is iterated, and how gradient flows through it.

Every backend takes the model's step map as it is,

    step(params, state, x, key, *, truncate=True) -> state

(`eqr_jax.model.EqRModel.step`), with ``state`` a pytree of (batch, seq, hidden) latents and ``x``
the input injection. Two iterations:

* `unroll`: ``lax.scan`` over ``num_steps`` noisy steps;
* `fixed_point`: Anderson acceleration or plain iteration of the noise-free map
  ``z -> step(params, z, x, None)`` *per row* (each row has its own residual, mixing weights,
  stopping point and iteration count; a converged row stops changing), differentiated implicitly
  (implicit function theorem, a per-row backward linear solve). The solve runs in float32
  whatever the compute dtype.

How gradient flows is a separate object, the *adjoint* (as in optimistix), one class per name of
`eqr_jax.modes.GRAD_MODES` plus `NoGrad` for inference (`ADJOINTS`; docs/training.md):

* `Truncated` (the reference): no graph through the first ``num_steps - 1`` steps, and inside
  the last step only through its last latent recursion;
* `Full`: backprop through every step and recursion (``remat=True`` recomputes each step in the
  backward pass: memory O(1) steps of activations instead of O(num_steps));
* `OneStep` (phantom gradient, k = 1): no graph through the first ``num_steps - 1`` steps, the
  full graph through every recursion of the last one;
* `Phantom` (Geng et al. 2021): no graph through the first ``num_steps - k`` steps, then ``k``
  damped steps ``z <- (1 - d) z + d step(z)`` with the full graph (`OneStep` is k = 1, d = 1);
* `Implicit`: the fixed point of the noise-free map, gradient by the implicit function theorem;
* `NoGrad`: no gradient at all.

`advance` runs one supervision segment under any adjoint (`segment` also returns the implicit
solve's per-row statistics); `unroll` is the scan itself. `jacobian_frobenius_sq` is the
Hutchinson estimate of ||d step / d state||_F^2 that Jacobian regularisation (``train.jac_reg``,
Bai, Koltun & Kolter 2021) adds to the loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, NamedTuple, Union

import math

import chex
import jax
import jax.numpy as jnp

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
class Phantom:
    """Phantom gradient with ``k`` damped steps: after ``max(num_steps - k, 0)`` gradient-free
    steps, ``k`` steps ``z <- (1 - damping) z + damping step(z)`` carry the full graph (so a
    segment runs ``max(num_steps, k)`` steps). ``Phantom(1, 1.0)`` is `OneStep`."""

    k: int = 2
    damping: float = 0.5
    name: ClassVar[str] = "phantom"

    def __post_init__(self):
        if self.k < 1 or not 0.0 < self.damping <= 1.0:
            raise ValueError(f"Phantom needs k >= 1 and damping in (0, 1], got {self!r}")


@dataclasses.dataclass(frozen=True)
class NoGrad:
    """Inference: no gradient reaches the parameters, the input or the initial state."""

    name: ClassVar[str] = "none"


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Fixed point of the noise-free map, implicit-function-theorem gradient (see `fixed_point`).

    ``maxiter`` caps the forward solve (``method``: ``anderson`` with ``history`` past iterates,
    or ``iteration``); a row stops once its relative residual ||f(z) - z|| / ||z|| is at most
    ``tol``. The backward linear system (I - df/dz)^T u = g is solved per row by ``backward``
    (``gmres`` or ``iteration``) with ``backward_iters`` Jacobian-vector products.
    """

    maxiter: int = 30
    tol: float = 1e-3
    method: str = "anderson"
    history: int = 5
    backward: str = "gmres"
    backward_iters: int = 20
    name: ClassVar[str] = "implicit"


Adjoint = Union[Truncated, Full, OneStep, Phantom, NoGrad, Implicit]
UNROLLED = (Truncated, Full, OneStep, Phantom, NoGrad)
# Name (`modes.GRAD_MODES` and `modes.NO_GRAD`) -> adjoint class.
ADJOINTS: dict[str, type] = {c.name: c for c in (Truncated, Full, OneStep, Phantom, Implicit,
                                                 NoGrad)}


def adjoint(name: str, *, remat: bool = False, implicit_maxiter: int = 30,
            implicit_tol: float = 1e-3, implicit_method: str = "anderson",
            implicit_history: int = 5, implicit_backward: str = "gmres",
            implicit_backward_iters: int = 20, phantom_k: int = 2,
            phantom_damping: float = 0.5) -> Adjoint:
    """The adjoint object of a registry name (``remat`` applies to ``full``, the ``implicit_*``
    settings to ``implicit``, the ``phantom_*`` ones to ``phantom``)."""
    modes.check("gradient mode", name, modes.GRAD_MODES + (modes.NO_GRAD,))
    if name == "full":
        return Full(remat=remat)
    if name == "phantom":
        return Phantom(k=phantom_k, damping=phantom_damping)
    if name == "implicit":
        return Implicit(maxiter=implicit_maxiter, tol=implicit_tol, method=implicit_method,
                        history=implicit_history, backward=implicit_backward,
                        backward_iters=implicit_backward_iters)
    return ADJOINTS[name]()


def adjoint_for(train_cfg) -> Adjoint:
    """The adjoint a `TrainConfig` asks for (``grad_mode``, ``remat``, ``implicit_*``,
    ``phantom_*``)."""
    keys = ("implicit_maxiter", "implicit_tol", "implicit_method", "implicit_history",
            "implicit_backward", "implicit_backward_iters", "phantom_k", "phantom_damping")
    return adjoint(train_cfg.grad_mode, remat=train_cfg.remat,
                   **{k: getattr(train_cfg, k) for k in keys})


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


class FixedPointResult(NamedTuple):
    """Solution of a per-row fixed-point solve: state in the compute dtype, and per row (batch,)
    the residual at the returned state (float32; relative or RMS, as the solve's criterion),
    the step-map evaluations used (int32) and whether the tolerance was reached (bool)."""

    state: LatentState
    residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


def advance(step: StepFn, params, state: LatentState, x: jax.Array, key: jax.Array | None,
            num_steps: int, adjoint: Adjoint) -> LatentState:
    """One supervision segment: ``num_steps`` noisy steps (`unroll`) or, for `Implicit`, the
    noise-free fixed point (`fixed_point`, at most ``adjoint.maxiter`` iterations)."""
    return segment(step, params, state, x, key, num_steps, adjoint)[0]


def segment(step: StepFn, params, state: LatentState, x: jax.Array, key: jax.Array | None,
            num_steps: int, adjoint: Adjoint) -> tuple[LatentState, FixedPointResult | None]:
    """`advance`, also returning the implicit solve's `FixedPointResult` (None when unrolled).

    The implicit solve starts from ``state``: in training that is the carried latents, so a row
    that continues from the previous ACT step starts at (near) its previous fixed point (a warm
    start); rows that were reset start from their fresh draw.
    """
    if isinstance(adjoint, Implicit):
        res = fixed_point(step, params, state, x, method=adjoint.method, maxiter=adjoint.maxiter,
                          tol=adjoint.tol, history_size=adjoint.history,
                          backward=adjoint.backward, backward_iters=adjoint.backward_iters)
        return res.state, res
    return unroll(step, params, state, x, key, num_steps, adjoint=adjoint)[0], None


# ----------------------------------------------------------------------------------------------
# The per-row fixed-point solve and its implicit gradient

FIXED_POINT_METHODS = ("anderson", "iteration")
BACKWARD_METHODS = ("gmres", "iteration")
CRITERIA = ("relative", "rms")


def _flatten_rows(state: LatentState) -> jax.Array:
    """Latents (batch, seq, hidden) x 2 -> float32 rows (batch, 2 * seq * hidden)."""
    b = state.z_H.shape[0]
    return jnp.concatenate([a.reshape(b, -1).astype(jnp.float32) for a in state], axis=1)


def _unflatten_rows(rows: jax.Array, like) -> LatentState:
    """Inverse of `_flatten_rows`; ``like``'s leaves (arrays or ShapeDtypeStructs) give shapes."""
    n = math.prod(like.z_H.shape[1:])
    return LatentState(*(rows[:, i * n:(i + 1) * n].reshape(a.shape).astype(a.dtype)
                         for i, a in enumerate(like)))


def _row_residual(z: jax.Array, fz: jax.Array, criterion: str) -> jax.Array:
    """Per-row residual of rows (batch, dim): ||f(z) - z|| / ||z|| or its RMS per element."""
    r = jnp.linalg.norm(fz - z, axis=1)
    if criterion == "relative":
        return r / jnp.maximum(jnp.linalg.norm(z, axis=1), 1e-12)
    return r / math.sqrt(z.shape[1])


def _anderson_mix(xs: jax.Array, fs: jax.Array, filled: jax.Array, ridge: float,
                  beta: float) -> jax.Array:
    """Anderson (type II) update of every row from its own history.

    xs, fs: (batch, m, dim) past iterates and their images; filled: (m,) bool slots in use.
    Each row solves its own min ||sum_i a_i (f_i - x_i)|| s.t. sum_i a_i = 1 (an m x m system),
    so unrelated puzzles never share mixing weights. Returns (batch, dim).
    """
    g = fs - xs
    gram = jnp.einsum("bid,bjd->bij", g, g)
    both = filled[:, None] & filled[None, :]
    eye = jnp.eye(filled.shape[0], dtype=gram.dtype)
    # Scale-free ridge: the residuals shrink by orders of magnitude during a solve.
    scale = jnp.max(jnp.where(filled, jnp.diagonal(gram, axis1=1, axis2=2), 0.0), axis=1)
    h = gram / jnp.maximum(scale, 1e-30)[:, None, None] + ridge * eye
    h = jnp.where(both, h, eye)  # unused slots: identity rows with a zero right-hand side
    rhs = jnp.broadcast_to(filled.astype(gram.dtype), gram.shape[:2])
    a = jnp.linalg.solve(h, rhs[..., None])[..., 0]
    alpha = a / jnp.sum(a, axis=1, keepdims=True)
    mixed_f = jnp.einsum("bi,bid->bd", alpha, fs)
    if beta == 1.0:
        return mixed_f
    return beta * mixed_f + (1.0 - beta) * jnp.einsum("bi,bid->bd", alpha, xs)


class _SolveState(NamedTuple):
    k: jax.Array  # int32: loop iterations done
    z: jax.Array  # (batch, dim) current iterate
    xs: jax.Array  # (batch, m, dim) Anderson history of iterates
    fs: jax.Array  # (batch, m, dim) and of their images
    best: jax.Array  # (batch, dim) lowest-residual iterate so far
    best_res: jax.Array  # (batch,)
    iters: jax.Array  # (batch,) int32 map evaluations while the row was active
    done: jax.Array  # (batch,) bool


def solve_rows(f: Callable[[jax.Array], jax.Array], z0: jax.Array, *, method: str = "anderson",
               tol: float = 1e-3, criterion: str = "relative", maxiter: int = 30,
               history_size: int = 5, ridge: float = 1e-4, beta: float = 1.0
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Solve z = f(z) for every row independently (no gradient).

    Args:
      f: a map of rows (batch, dim) -> (batch, dim) whose row b depends only on row b.
      z0: initial rows (batch, dim) float32.
      method: ``anderson`` (per-row mixing of the last ``history_size`` iterates) or
        ``iteration`` (z <- f(z)).
      tol, criterion: a row is done once its residual (`_row_residual`: ``relative``
        ||f(z) - z|| / ||z||, or ``rms`` per element) is at most ``tol``; from then on it keeps
        its state and its count. The loop ends when every row is done or after ``maxiter``
        evaluations of ``f``.
    Returns:
      (solution (batch, dim): the converged iterate, or the lowest-residual one; its residual
      (batch,); evaluations of f while the row was active (batch,) int32; converged (batch,)).
    """
    if method not in FIXED_POINT_METHODS:
        raise ValueError(f"unknown fixed-point method {method!r}; use one of "
                         f"{list(FIXED_POINT_METHODS)}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown convergence criterion {criterion!r}; use one of "
                         f"{list(CRITERIA)}")
    chex.assert_rank(z0, 2)
    b, d = z0.shape
    m = max(int(history_size), 1) if method == "anderson" else 1
    slots = jnp.arange(m)
    zeros = jnp.zeros((b, m, d), jnp.float32)
    init = _SolveState(jnp.int32(0), z0, zeros, zeros, z0, jnp.full((b,), jnp.inf, jnp.float32),
                       jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))

    def cond(s: _SolveState):
        return (s.k < maxiter) & ~jnp.all(s.done)

    def body(s: _SolveState) -> _SolveState:
        fz = f(s.z)
        res = _row_residual(s.z, fz, criterion)
        active = ~s.done
        better = active & (res < s.best_res)
        best = jnp.where(better[:, None], s.z, s.best)
        best_res = jnp.where(better, res, s.best_res)
        done = s.done | (active & (res <= tol))
        if method == "anderson":
            slot = (slots == s.k % m)[None, :, None]
            xs = jnp.where(slot, s.z[:, None], s.xs)
            fs = jnp.where(slot, fz[:, None], s.fs)
            nxt = _anderson_mix(xs, fs, slots <= s.k, ridge, beta)
        else:
            xs, fs, nxt = s.xs, s.fs, fz
        z = jnp.where(done[:, None], s.z, nxt)
        return _SolveState(s.k + 1, z, xs, fs, best, best_res,
                           s.iters + active.astype(jnp.int32), done)

    s = jax.lax.while_loop(cond, body, init)
    return s.best, s.best_res, s.iters, s.best_res <= tol


def _backward_rows(f: Callable[[jax.Array, jax.Array], jax.Array], z: jax.Array, x: jax.Array,
                   g: jax.Array, method: str, iters: int) -> jax.Array:
    """u with u = g + J^T u for every row, J = df/dz at the fixed point ``z`` (batch, dim).

    ``f(z, x)`` maps rows to rows (row b depends on row b only); ``x`` (batch, ...) is its
    per-row input. ``iteration`` runs u <- g + J^T u ``iters`` times (converges when J's spectral
    radius is below 1); ``gmres`` runs GMRES on each row's own system (an ``iters``-dimensional
    Krylov space, one restart cycle), so no row's solve depends on another's. Both cost
    ``iters`` vector-Jacobian products of the batch.
    """
    if method == "iteration":
        _, vjp_z = jax.vjp(lambda zz: f(zz, x), z)
        return jax.lax.fori_loop(0, iters, lambda _, u: g + vjp_z(u)[0], g)

    def row(z_r, x_r, g_r):
        _, vjp_r = jax.vjp(lambda zz: f(zz[None], x_r[None])[0], z_r)
        u, _ = jax.scipy.sparse.linalg.gmres(lambda v: v - vjp_r(v)[0], g_r, x0=g_r, tol=1e-6,
                                             restart=iters, maxiter=1)
        return u
    return jax.vmap(row)(z, x, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def _implicit_rows(f, params, x, z_star, backward: str, iters: int):
    """``z_star`` (a fixed point of ``f(params, ., x)``) with the implicit-function-theorem VJP:
    dL/d(params, x) = u^T d f / d(params, x) with u = g + (df/dz)^T u."""
    del f, params, x, backward, iters
    return z_star


def _implicit_rows_fwd(f, params, x, z_star, backward, iters):
    return z_star, (params, x, z_star)


def _implicit_rows_bwd(f, backward, iters, res, g):
    params, x, z_star = res
    u = _backward_rows(lambda zz, xx: f(params, zz, xx), z_star, x, g, backward, iters)
    _, vjp_px = jax.vjp(lambda p, xx: f(p, z_star, xx), params, x)
    gp, gx = vjp_px(u)
    # The solution does not depend on the initial guess.
    return gp, gx, jnp.zeros_like(z_star)


_implicit_rows.defvjp(_implicit_rows_fwd, _implicit_rows_bwd)


def fixed_point(step: StepFn, params, state: LatentState, x: jax.Array, *,
                method: str = "anderson", tol: float = 1e-3, criterion: str = "relative",
                maxiter: int = 30, implicit_diff: bool = True, history_size: int = 5,
                ridge: float = 1e-4, beta: float = 1.0, backward: str = "gmres",
                backward_iters: int = 20) -> FixedPointResult:
    """Solve z* = step(params, z*, x) (noise off) per row; gradient by implicit differentiation.

    Args:
      step, params, x: as in `unroll`; ``x`` is (batch, seq, hidden).
      state: the initial guess, leaves (batch, seq, hidden) (a warm start when it is the carry).
      method, tol, criterion, maxiter, history_size, ridge, beta: the forward solve
        (`solve_rows`: each row converges, stops and mixes on its own; ``maxiter`` evaluations
        of the step map at most).
      implicit_diff: differentiate the solution with the implicit function theorem (memory
        independent of the iterations); False returns it without gradient.
      backward, backward_iters: the backward linear system (I - df/dz)^T u = g per row
        (`_backward_rows`: ``gmres`` or ``iteration``, ``backward_iters`` VJPs of the step map).
        Bounded on purpose: on a map that is not a contraction an uncapped solve runs up to the
        system size.
    Returns:
      `FixedPointResult` with per-row (batch,) residual, iterations and converged.
    """
    chex.assert_equal_shape([state.z_H, state.z_L, x])
    if backward not in BACKWARD_METHODS:
        raise ValueError(f"unknown backward solve {backward!r}; use one of "
                         f"{list(BACKWARD_METHODS)}")
    # Shapes only: the maps below must not close over the (traced) initial guess.
    like = _like_rows(state, state.z_H.shape[0])

    def f_rows(p, rows, xx):
        out = step(p, _unflatten_rows(rows, _like_rows(like, rows.shape[0])), xx, None,
                   truncate=False)
        return _flatten_rows(out)

    z0 = jax.lax.stop_gradient(_flatten_rows(state))
    sol, residual, iters, converged = solve_rows(
        lambda z: f_rows(jax.lax.stop_gradient(params), z, jax.lax.stop_gradient(x)), z0,
        method=method, tol=tol, criterion=criterion, maxiter=maxiter,
        history_size=history_size, ridge=ridge, beta=beta)
    sol = jax.lax.stop_gradient(sol)
    if implicit_diff:
        sol = _implicit_rows(f_rows, params, x, sol, backward, int(backward_iters))
    return FixedPointResult(_unflatten_rows(sol, like), residual, iters, converged)


def _like_rows(like: LatentState, batch: int) -> LatentState:
    """Shape/dtype template of ``batch`` rows of ``like`` (the GMRES solve sees one row)."""
    return LatentState(*(jax.ShapeDtypeStruct((batch,) + a.shape[1:], a.dtype) for a in like))


# ----------------------------------------------------------------------------------------------
# Jacobian regularisation


def jacobian_frobenius_sq(model, params, state: LatentState, x: jax.Array, *, key: jax.Array,
                          samples: int = 1) -> jax.Array:
    """Hutchinson estimate of ||d step / d state||_F^2 per row: (batch,) float32.

    The map is the noise-free ``model.step(params, state, x, None, truncate=False)`` with both
    latents as the state; for v ~ N(0, I), E ||v^T J||^2 = ||J||_F^2, averaged over ``samples``
    draws (one forward linearisation, ``samples`` vector-Jacobian products). ``state`` enters
    without gradient (the point where the Jacobian is measured); the estimate is differentiable
    in ``params`` and ``x``, so adding it to the loss (``train.jac_reg``, Bai, Koltun & Kolter
    2021) pushes the map towards a contraction there.

    Args:
      model: an `EqRModel`; params: its parameters.
      state: latents, leaves (batch, seq, hidden); x: input injection (batch, seq, hidden).
      key: PRNG key of the probe vectors; samples: probes per row (>= 1, static).
    """
    chex.assert_equal_shape([state.z_H, state.z_L, x])
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    z = _stop(state)
    _, vjp = jax.vjp(lambda s: model.step(params, s, x, None, truncate=False), z)

    def one(k):
        ks = jax.random.split(k, len(z))
        v = LatentState(*(jax.random.normal(kk, a.shape, jnp.float32).astype(a.dtype)
                          for kk, a in zip(ks, z)))
        (jtv,) = vjp(v)
        return sum(jnp.sum(jnp.square(a.astype(jnp.float32)), axis=(1, 2)) for a in jtv)

    return jnp.mean(jax.vmap(one)(jax.random.split(key, samples)), axis=0)
