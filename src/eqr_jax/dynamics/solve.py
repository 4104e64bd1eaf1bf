"""The per-row fixed-point solve (no gradient): every row of a batch has its own residual,
Anderson mixing weights, stopping point and iteration count (`solve_rows`), and the conversion
between latents and float32 rows."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from eqr_jax.model import LatentState

FIXED_POINT_METHODS = ("anderson", "iteration")
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



def _like_rows(like: LatentState, batch: int) -> LatentState:
    """Shape/dtype template of ``batch`` rows of ``like`` (the GMRES solve sees one row)."""
    return LatentState(*(jax.ShapeDtypeStruct((batch,) + a.shape[1:], a.dtype) for a in like))

