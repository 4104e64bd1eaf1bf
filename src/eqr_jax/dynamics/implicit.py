"""The implicit layer: `fixed_point` solves z* = f(z*) per row (`eqr_jax.dynamics.solve`) and
differentiates the solution with the implicit function theorem, a per-row backward linear solve
to a relative residual (docs/implicit-gradients.md).

A custom VJP cannot return auxiliary values, so the backward solve reports its per-row residual
and iteration count through the cotangent of a dummy input, the *probe* (`backward_probe`):
differentiating the loss with respect to a zero probe as well as the parameters yields, as the
probe's "gradient", exactly the statistics of the solve that produced the parameters' gradient,
at no extra cost (`eqr_jax.losses.loss_and_grad` does this for training).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax import modes
from eqr_jax.config import TrainConfig as _Defaults
from eqr_jax.dynamics.adjoints import StepFn
from eqr_jax.dynamics.solve import _flatten_rows, _like_rows, _unflatten_rows, solve_rows
from eqr_jax.model import LatentState

BACKWARD_METHODS = modes.IMPLICIT_BACKWARDS
# What a non-converged row's backward does: ``implicit`` treats its returned (lowest-residual)
# iterate as the fixed point; ``one_step`` uses u = g, the one-step (Jacobian-free) gradient.
UNCONVERGED_RULES = modes.IMPLICIT_UNCONVERGED
# Columns of the probe's cotangent: per row, the achieved relative residual of the backward
# system, the backward iterations spent, and 1 where the solve returned a non-finite result
# and the row took the one-step gradient instead (`_implicit_rows_bwd`).
BACKWARD_STATS = ("residual", "iterations", "fallback")


class FixedPointResult(NamedTuple):
    """Solution of a per-row fixed-point solve: state in the compute dtype, and per row (batch,)
    the residual at the returned state (float32; relative or RMS, as the solve's criterion),
    the step-map evaluations used (int32) and whether the tolerance was reached (bool)."""

    state: LatentState
    residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


class Backward(NamedTuple):
    """The backward linear solve's settings (hashable: a static argument of the custom VJP);
    the defaults are `TrainConfig`'s."""

    method: str = _Defaults.implicit_backward
    tol: float = _Defaults.implicit_backward_tol
    max_iters: int = _Defaults.implicit_backward_iters
    restart: int = _Defaults.implicit_backward_restart
    unconverged: str = _Defaults.implicit_unconverged


def backward_probe(batch: int) -> jax.Array:
    """The zero probe (batch, len(BACKWARD_STATS)) float32 whose cotangent carries the backward
    solve's per-row statistics (module docstring); its value never changes the result."""
    return jnp.zeros((batch, len(BACKWARD_STATS)), jnp.float32)


def _iterate_rows(vjp_z, g: jax.Array, tol: float, max_iters: int):
    """u <- g + J^T u per row until ||g + J^T u - u|| / ||g|| <= tol (the change of an update is
    the residual of the iterate it updates) or ``max_iters`` VJPs; converges when J's spectral
    radius is below 1. Returns (u, residual, iterations) per row."""
    gn = jnp.maximum(jnp.linalg.norm(g, axis=1), 1e-30)
    b = g.shape[0]

    def cond(s):
        k, _, res, _ = s
        return (k < max_iters) & jnp.any(res > tol)

    def body(s):
        k, u, res, its = s
        active = res > tol
        new = g + vjp_z(u)[0]
        r = jnp.linalg.norm(new - u, axis=1) / gn
        return (k + 1, jnp.where(active[:, None], new, u), jnp.where(active, r, res),
                its + active.astype(jnp.int32))

    # A zero right-hand side is solved by u = 0 before any VJP.
    init = (jnp.int32(0), g, jnp.where(gn > 1e-30, jnp.inf, 0.0).astype(jnp.float32),
            jnp.zeros((b,), jnp.int32))
    _, u, res, its = jax.lax.while_loop(cond, body, init)
    return u, res, its


def _gmres_row(matvec, g: jax.Array, tol: float, max_iters: int, restart: int):
    """Restarted GMRES for one row's system A u = g from u = g: cycles of ``restart`` Krylov
    vectors (`jax.scipy.sparse.linalg.gmres`, ``incremental``: Givens rotations, stopping a
    cycle once its own residual estimate reaches the tolerance) until the true relative
    residual ||g - A u|| / ||g||, recomputed after every cycle, is at most ``tol``, or
    ``max_iters`` Krylov vectors (rounded up to whole cycles). Returns (u, residual, Krylov
    vectors budgeted: cycles x restart, an upper bound on those used)."""
    restart = min(restart, max_iters)
    cycles = -(-max_iters // restart)
    gn = jnp.maximum(jnp.linalg.norm(g), 1e-30)
    rel = lambda u: jnp.linalg.norm(g - matvec(u)) / gn

    def body(s):
        c, u, _ = s
        u, _ = jax.scipy.sparse.linalg.gmres(matvec, g, x0=u, tol=tol, atol=0.0,
                                             restart=restart, maxiter=1,
                                             # Not "batched": its least squares goes through
                                             # the normal equations (Cholesky of H^T H), which
                                             # squares H's condition number; in float32 that
                                             # returned NaN on a trained sudoku6 model.
                                             solve_method="incremental")
        return c + 1, u, rel(u)

    c, u, res = jax.lax.while_loop(lambda s: (s[0] < cycles) & (s[2] > tol), body,
                                   (jnp.int32(0), g, rel(g)))
    return u, res, c * restart


def _backward_rows(f: Callable[[jax.Array, jax.Array], jax.Array], z: jax.Array, x: jax.Array,
                   g: jax.Array, cfg: Backward):
    """u = g + J^T u for every row, J = df/dz at the fixed point ``z`` (batch, dim).

    ``f(z, x)`` maps rows to rows (row b depends on row b only); ``x`` (batch, ...) is its
    per-row input. Each row solves its own system to its own tolerance (``gmres``: `_gmres_row`
    vmapped, so no row's Krylov space or stopping depends on another's; ``iteration``:
    `_iterate_rows`). Returns (u (batch, dim), residual (batch,), iterations (batch,) int32).
    """
    if cfg.method == "iteration":
        _, vjp_z = jax.vjp(lambda zz: f(zz, x), z)
        return _iterate_rows(vjp_z, g, cfg.tol, cfg.max_iters)

    def row(z_r, x_r, g_r):
        _, vjp_r = jax.vjp(lambda zz: f(zz[None], x_r[None])[0], z_r)
        return _gmres_row(lambda v: v - vjp_r(v)[0], g_r, cfg.tol, cfg.max_iters, cfg.restart)
    return jax.vmap(row)(z, x, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _implicit_rows(f, params, x, z_star, converged, probe, cfg: Backward):
    """``z_star`` (a fixed point of ``f(params, ., x)``) with the implicit-function-theorem VJP:
    dL/d(params, x) = u^T d f / d(params, x) with u = g + (df/dz)^T u. ``converged`` (batch,)
    float32 selects the rows `Backward.unconverged` applies to; ``probe``'s cotangent is the
    solve's statistics (`BACKWARD_STATS`)."""
    del f, params, x, converged, probe, cfg
    return z_star


def _implicit_rows_fwd(f, params, x, z_star, converged, probe, cfg):
    del probe
    return z_star, (params, x, z_star, converged)


def _implicit_rows_bwd(f, cfg, res, g):
    params, x, z_star, converged = res
    one_step = ((converged <= 0) if cfg.unconverged == "one_step"
                else jnp.zeros(converged.shape, bool))[:, None]
    # A one-step row's solve would be thrown away. With a zero right-hand side it is done before
    # its first VJP (reporting residual 0 and 0 iterations), so it no longer holds the vmapped
    # loop: such rows sit where the map need not contract, and their solves ran to the cap.
    u, residual, iters = _backward_rows(lambda zz, xx: f(params, zz, xx), z_star, x,
                                        jnp.where(one_step, 0.0, g), cfg)
    # A solve that returned a non-finite solution or residual (a near-singular I - J^T, a
    # non-finite Jacobian) would end the run through the non-finite guard; the row takes the
    # one-step gradient instead and is counted.
    fallback = ~(jnp.all(jnp.isfinite(u), axis=1) & jnp.isfinite(residual)) & ~one_step[:, 0]
    u = jnp.where(one_step | fallback[:, None], g, u)
    residual = jnp.where(fallback, 0.0, residual)
    _, vjp_px = jax.vjp(lambda p, xx: f(p, z_star, xx), params, x)
    gp, gx = vjp_px(u)
    stats = jnp.stack([residual.astype(jnp.float32), iters.astype(jnp.float32),
                       fallback.astype(jnp.float32)], axis=1)
    # The solution does not depend on the initial guess.
    return gp, gx, jnp.zeros_like(z_star), jnp.zeros_like(converged), stats


_implicit_rows.defvjp(_implicit_rows_fwd, _implicit_rows_bwd)


def _check_backward(cfg: Backward) -> None:
    if cfg.method not in BACKWARD_METHODS:
        raise ValueError(f"unknown backward solve {cfg.method!r}; use one of "
                         f"{list(BACKWARD_METHODS)}")
    if cfg.unconverged not in UNCONVERGED_RULES:
        raise ValueError(f"unknown rule for unconverged rows {cfg.unconverged!r}; use one of "
                         f"{list(UNCONVERGED_RULES)}")
    if cfg.max_iters < 1 or cfg.restart < 1 or not cfg.tol > 0:
        raise ValueError(f"the backward solve needs backward_iters >= 1, backward_restart >= 1 "
                         f"and backward_tol > 0, got {cfg}")


def fixed_point(step: StepFn, params, state: LatentState, x: jax.Array, *,
                method: str = _Defaults.implicit_method, tol: float = _Defaults.implicit_tol,
                criterion: str = "relative", maxiter: int = _Defaults.implicit_maxiter,
                implicit_diff: bool = True, history_size: int = _Defaults.implicit_history,
                ridge: float = 1e-4, beta: float = 1.0,
                backward: str = _Defaults.implicit_backward,
                backward_iters: int = _Defaults.implicit_backward_iters,
                backward_tol: float = _Defaults.implicit_backward_tol,
                backward_restart: int = _Defaults.implicit_backward_restart,
                unconverged: str = _Defaults.implicit_unconverged,
                probe: jax.Array | None = None) -> FixedPointResult:
    """Solve z* = step(params, z*, x) (noise off) per row; gradient by implicit differentiation.

    Args:
      step, params, x: as in `unroll`; ``x`` is (batch, seq, hidden).
      state: the initial guess, leaves (batch, seq, hidden) (a warm start when it is the carry).
      method, tol, criterion, maxiter, history_size, ridge, beta: the forward solve
        (`solve_rows`: each row converges, stops and mixes on its own; ``maxiter`` evaluations
        of the step map at most).
      implicit_diff: differentiate the solution with the implicit function theorem (memory
        independent of the iterations); False returns it without gradient.
      backward, backward_iters, backward_tol, backward_restart: the backward linear system
        (I - df/dz)^T u = g per row (`_backward_rows`), solved until its relative residual is at
        most ``backward_tol`` or ``backward_iters`` VJPs (Krylov vectors for ``gmres``, which
        restarts every ``backward_restart``). The cap matters: on a map that is not a
        contraction an uncapped solve runs up to the system size.
      unconverged: the backward of a row whose forward solve did not converge (`UNCONVERGED_RULES`).
      probe: optional zeros (`backward_probe`) whose cotangent is the backward solve's per-row
        statistics (`BACKWARD_STATS`).
    Returns:
      `FixedPointResult` with per-row (batch,) residual, iterations and converged.
    """
    chex.assert_equal_shape([state.z_H, state.z_L, x])
    cfg = Backward(backward, float(backward_tol), int(backward_iters), int(backward_restart),
                   unconverged)
    _check_backward(cfg)
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
        if probe is None:
            probe = backward_probe(sol.shape[0])
        chex.assert_shape(probe, (sol.shape[0], len(BACKWARD_STATS)))
        sol = _implicit_rows(f_rows, params, x, sol, converged.astype(jnp.float32), probe, cfg)
    return FixedPointResult(_unflatten_rows(sol, like), residual, iters, converged)


def dense_implicit_gradient(model, params, state: LatentState, inputs: jax.Array,
                            loss_at: Callable) -> tuple[dict, np.ndarray]:
    """The exact implicit gradient, for models small enough for a dense Jacobian per row.

    At a fixed point ``state`` (leaves (batch, seq, hidden)) of the noise-free step map
    ``f = model.step(params, ., model.embed(params, inputs))``, the gradient of
    ``loss_at(params, state)`` through z* is dL/dθ = ∂L/∂θ + u^T ∂f/∂θ (the embedding
    included) with (I - J)^T u = ∂L/∂z*, solved per row in float64 with J = ∂f/∂z (jacfwd,
    (dim, dim) per row). The reference the iterative backward (`fixed_point`) is checked
    against. Returns (gradient, the spectral radius of J per row (batch,)).
    """
    one = jax.tree_util.tree_map(lambda a: a[:1], state)

    def f(p, z_row, x_row):  # the step map of one flattened row
        out = model.step(p, _unflatten_rows(z_row[None], one), x_row[None], None, truncate=False)
        return _flatten_rows(out)[0]

    z_star = _flatten_rows(state)
    jac = np.asarray(jax.jit(jax.vmap(jax.jacfwd(f, argnums=1), in_axes=(None, 0, 0)))(
        params, z_star, model.embed(params, inputs)), np.float64)
    g_z = np.asarray(jax.grad(lambda z: loss_at(params, _unflatten_rows(z, state)))(z_star),
                     np.float64)
    eye = np.eye(jac.shape[1])
    u = np.stack([np.linalg.solve(eye - j.T, g) for j, g in zip(jac, g_z)])
    _, vjp = jax.vjp(lambda p: jax.vmap(f, in_axes=(None, 0, 0))(p, z_star,
                                                                  model.embed(p, inputs)), params)
    grad = jax.tree_util.tree_map(jnp.add, jax.grad(loss_at)(params, state),
                                  vjp(jnp.asarray(u, jnp.float32))[0])
    return grad, np.abs(np.linalg.eigvals(jac)).max(axis=1)
