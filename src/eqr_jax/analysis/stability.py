"""Local stability of the step map: the spectral radius of its Jacobian, matrix-free.

A state ``z*`` with ``f(z*) = z*`` is a *stable* fixed point of the noise-free step map ``f`` when
every eigenvalue of the Jacobian ``J = df/dz`` at ``z*`` lies inside the unit circle; the spectral
radius ``rho(J) = max |eigenvalue|`` is then the asymptotic contraction factor per step (small
perturbations shrink like ``rho^t``). ``rho > 1`` means some direction is pushed away.

``J`` acts on the whole latent state ``(z_H, z_L)`` of one puzzle: ``2 * seq * hidden`` numbers
(2 * 81 * 512 = 82,944 for the Sudoku preset), far too many to form. Only Jacobian-vector
products are needed (`jax.linearize` of the step map, one linearisation, then one JVP per Krylov
vector). Rows of a batch never interact in the step map (the token mixer mixes tokens within a
row, never rows), so one batched JVP gives the product of every row's own Jacobian with that
row's vector, and all rows run side by side.

Method: Arnoldi (Gram-Schmidt applied twice) builds an ``iters``-dimensional Krylov space per
row; the eigenvalues of the small Hessenberg matrix (Ritz values) approximate the outermost
eigenvalues of ``J``, the largest modulus first. Restarts begin the next Krylov space from the
real plus imaginary part of the leading Ritz vector: for a complex-conjugate pair both parts lie
in the pair's real two-dimensional invariant subspace, so pairs are handled as well as real
eigenvalues. The Krylov part is jitted; the ``krylov x krylov`` eigenproblems run on the host
(NumPy), because a non-symmetric ``eig`` is not available on every accelerator backend. Two more
JVPs measure the eigen-residual of the answer, so every estimate says how far it has converged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax.model import EqRModel, LatentState


class SpectralEstimate(NamedTuple):
    """Per row: ``radius`` (B,) float64 = |eigenvalue|, ``eigenvalue`` (B,) complex128 (the
    leading Ritz value) and ``residual`` (B,) float64, the relative eigen-residual
    ``||J u - lambda u|| / (|lambda| ||u||)`` of its Ritz vector ``u`` measured with two extra
    JVPs (small = converged; it bounds the distance to an exact eigenvalue of a normal matrix)."""

    radius: np.ndarray
    eigenvalue: np.ndarray
    residual: np.ndarray


# ----------------------------------------------------------------------------------------------
# Row-wise flattening of a latent pytree: leaves (B, ...) <-> (B, n)


def _flatten_rows(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    b = leaves[0].shape[0]
    return jnp.concatenate([a.reshape(b, -1).astype(jnp.float32) for a in leaves], axis=1)


def _unflatten_rows(flat: jax.Array, like):
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, start = [], 0
    for a in leaves:
        size = int(np.prod(a.shape[1:]))
        out.append(flat[:, start:start + size].reshape(a.shape).astype(a.dtype))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------
# Arnoldi, batched over rows


def _arnoldi(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, m: int):
    """``m`` Arnoldi steps for every row at once.

    Args:
      matvec: (B, n) -> (B, n), row b multiplied by row b's matrix.
      v0: (B, n) start vectors (normalised here).
      m: Krylov dimension.
    Returns:
      (V (m + 1, B, n) orthonormal bases, H (B, m + 1, m) Hessenberg matrices).
    """
    b, n = v0.shape
    v0 = v0 / jnp.maximum(jnp.linalg.norm(v0, axis=1, keepdims=True), 1e-30)
    V = jnp.zeros((m + 1, b, n), jnp.float32).at[0].set(v0)
    H = jnp.zeros((b, m + 1, m), jnp.float32)

    def body(j, carry):
        V, H = carry
        w = matvec(V[j])
        live = (jnp.arange(m + 1) <= j).astype(jnp.float32)[None, :]  # (1, m+1)
        # Classical Gram-Schmidt twice ("twice is enough") keeps the basis orthogonal to
        # float32 precision even when the Krylov space becomes nearly degenerate.
        h1 = jnp.einsum("kbn,bn->bk", V, w) * live
        w = w - jnp.einsum("bk,kbn->bn", h1, V)
        h2 = jnp.einsum("kbn,bn->bk", V, w) * live
        w = w - jnp.einsum("bk,kbn->bn", h2, V)
        beta = jnp.linalg.norm(w, axis=1)
        # Breakdown (an invariant subspace was found): continue with a zero vector, which only
        # adds zero eigenvalues to the Hessenberg matrix and leaves the found ones exact.
        safe = beta > 1e-6 * jnp.maximum(jnp.max(jnp.abs(h1 + h2), axis=1), 1e-30)
        v_next = jnp.where(safe[:, None], w / jnp.where(safe, beta, 1.0)[:, None], 0.0)
        col = (h1 + h2).at[:, j + 1].set(jnp.where(safe, beta, 0.0))
        H = H.at[:, :, j].set(col)
        V = V.at[j + 1].set(v_next)
        return V, H

    return jax.lax.fori_loop(0, m, body, (V, H))


def _ritz(H: np.ndarray):
    """Leading Ritz pair of each row's Hessenberg matrix (host, float64).

    Returns (eigenvalue (B,) complex, coefficients y (B, m) complex, unit norm).
    """
    H = np.asarray(H, np.float64)
    m = H.shape[2]
    evals, evecs = np.linalg.eig(H[:, :m, :m])
    idx = np.argmax(np.abs(evals), axis=1)
    rows = np.arange(H.shape[0])
    return evals[rows, idx], evecs[rows, :, idx]


@functools.partial(jax.jit, static_argnames=("m",))
def _combine(V, y, m: int):
    """V y per row: (B, n) from V (m + 1, B, n) and y (B, m)."""
    return jnp.einsum("bk,kbn->bn", y, V[:m])


def leading_eigenvalue(arnoldi_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                       matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, *, iters: int,
                       restarts: int) -> SpectralEstimate:
    """Restarted Arnoldi driver shared by the model and generic entry points.

    Args:
      arnoldi_fn: (B, n) start vectors -> (V, H) of `_arnoldi` (jitted by the caller).
      matvec: (B, n) -> (B, n), the row-wise matrix product (for the final residual).
      v0: (B, n) first start vectors.
      iters: Krylov dimension per restart cycle.
      restarts: extra cycles, each started from the previous leading Ritz vector.
    """
    start = v0
    for cycle in range(restarts + 1):
        V, H = arnoldi_fn(start)
        lam, y = _ritz(jax.device_get(H))
        re = _combine(V, jnp.asarray(y.real, jnp.float32), m=iters)
        im = _combine(V, jnp.asarray(y.imag, jnp.float32), m=iters)
        # Re + Im of the Ritz vector: for a complex pair both lie in its invariant plane, and
        # the sum cannot vanish the way Re alone can for an unlucky complex phase.
        start = re + im
    u = np.asarray(re, np.float64) + 1j * np.asarray(im, np.float64)
    Ju = np.asarray(matvec(re), np.float64) + 1j * np.asarray(matvec(im), np.float64)
    radius = np.abs(lam)
    res = np.linalg.norm(Ju - lam[:, None] * u, axis=1) / np.maximum(
        radius * np.linalg.norm(u, axis=1), 1e-30)
    return SpectralEstimate(radius, lam, res)


def _check_iters(iters: int, restarts: int) -> None:
    if iters < 2:
        raise ValueError(f"iters (Krylov dimension) must be >= 2, got {iters}")
    if restarts < 0:
        raise ValueError(f"restarts must be >= 0, got {restarts}")


def map_spectral_radius(fn: Callable[[Any], Any], z, *, iters: int = 32, restarts: int = 3,
                        key: jax.Array | None = None) -> SpectralEstimate:
    """Leading eigenvalue of ``d fn / dz`` at ``z`` per row, for any row-separable map.

    Args:
      fn: pytree -> pytree of the same structure, leaves (B, ...); row b of the output may
        depend only on row b of the input (true of the EqR step map).
      z: the linearisation point, leaves (B, ...).
      iters, restarts, key: as in `jacobian_spectral_radius`.
    Returns:
      `SpectralEstimate` with arrays of shape (B,).
    """
    _check_iters(iters, restarts)
    z = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), z)
    flat = _flatten_rows(z)
    n = flat.shape[1]
    m = min(iters, n)
    _, lin = jax.linearize(fn, z)
    matvec = jax.jit(lambda v: _flatten_rows(lin(_unflatten_rows(v, z))))
    run = jax.jit(lambda v0: _arnoldi(matvec, v0, m))
    key = jax.random.PRNGKey(0) if key is None else key
    v0 = jax.random.normal(key, flat.shape, jnp.float32)
    return leading_eigenvalue(run, matvec, v0, iters=m, restarts=restarts)


def float32_model(model: EqRModel) -> EqRModel:
    """The same model computing in float32 (parameters are float32 already)."""
    if model.cfg.forward_dtype == "float32":
        return model
    return EqRModel(dataclasses.replace(model.cfg, forward_dtype="float32"))


def _model_linear(model: EqRModel, params, state: LatentState, x: jax.Array):
    """The row-wise JVP of the noise-free step map at ``state``, on flat (B, n) vectors."""
    f = lambda z: model.step(params, z, x, None, truncate=False)
    _, lin = jax.linearize(f, state)
    return lambda v: _flatten_rows(lin(_unflatten_rows(v, state)))


@functools.partial(jax.jit, static_argnames=("model", "m"))
def _model_arnoldi(model: EqRModel, params, state: LatentState, x: jax.Array, v0, m: int):
    return _arnoldi(_model_linear(model, params, state, x), v0, m)


@functools.partial(jax.jit, static_argnames=("model",))
def _model_matvec(model: EqRModel, params, state: LatentState, x: jax.Array, v):
    return _model_linear(model, params, state, x)(v)


def jacobian_spectral_radius(model: EqRModel, params, state: LatentState, x: jax.Array, *,
                             iters: int = 32, restarts: int = 3, key: jax.Array | None = None,
                             float32: bool = True, return_estimate: bool = False):
    """Spectral radius of the Jacobian of the noise-free step map w.r.t. ``(z_H, z_L)``, per row.

    Args:
      model: `EqRModel` (its ``step`` with ``key=None`` and ``truncate=False``: the
        gradient-truncation rule of training would zero the Jacobian of early recursions).
      params: model parameters.
      state: linearisation point, leaves (B, seq, hidden) (e.g. the end states of trajectories).
      x: input injection (B, seq, hidden) from ``model.embed``.
      iters: Krylov dimension per cycle (one JVP each); cost = ``(restarts + 1) * iters`` JVPs
        of the whole batch, memory ``iters + 1`` vectors of the state's size.
      restarts: restart cycles after the first.
      key: PRNG key of the random start vectors (default: PRNGKey(0)).
      float32: linearise the float32 version of the model (bf16 JVPs carry ~1e-2 relative
        error, which blurs the eigenvalues).
      return_estimate: also return the `SpectralEstimate` (leading eigenvalue and its residual).
    Returns:
      (B,) float64 NumPy array of radii (and the estimate when ``return_estimate``).
    """
    chex.assert_equal_shape([state.z_H, state.z_L, x])
    _check_iters(iters, restarts)
    if float32:
        model = float32_model(model)
    dt = jnp.float32 if float32 else state.z_H.dtype
    state = LatentState(*(jnp.asarray(a, dt) for a in state))
    x = jnp.asarray(x, dt)
    n = 2 * state.z_H.shape[1] * state.z_H.shape[2]
    m = min(iters, n)
    key = jax.random.PRNGKey(0) if key is None else key
    v0 = jax.random.normal(key, (state.z_H.shape[0], n), jnp.float32)
    est = leading_eigenvalue(lambda v: _model_arnoldi(model, params, state, x, v, m),
                             lambda v: _model_matvec(model, params, state, x, v), v0,
                             iters=m, restarts=restarts)
    return (est.radius, est) if return_estimate else est.radius


def exact_jacobian_eigenvalues(model: EqRModel, params, state: LatentState, x: jax.Array,
                               float32: bool = True) -> list[np.ndarray]:
    """All eigenvalues of each row's Jacobian, from the dense matrix (`jax.jacfwd`).

    For checking `jacobian_spectral_radius` on small models only: the matrix has
    ``(2 * seq * hidden)^2`` entries. Returns one complex128 array per row.
    """
    if float32:
        model = float32_model(model)
    state = LatentState(*(jnp.asarray(a, jnp.float32) for a in state))
    J = _dense_jacobians(model, params, state, jnp.asarray(x, jnp.float32))
    return [np.linalg.eigvals(m) for m in np.asarray(J, np.float64)]


@functools.partial(jax.jit, static_argnames=("model",))
def _dense_jacobians(model: EqRModel, params, state: LatentState, x: jax.Array) -> jax.Array:
    """(B, n, n) Jacobian of each row's step map, rows handled one at a time under vmap."""
    def one(z_row, x_row):
        like = LatentState(*(a[:1] for a in state))
        f = lambda v: _flatten_rows(model.step(params, _unflatten_rows(v[None], like),
                                               x_row[None], None, truncate=False))[0]
        return jax.jacfwd(f)(z_row)

    return jax.vmap(one)(_flatten_rows(state), x)
