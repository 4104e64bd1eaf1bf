"""The attractor landscape of a trained EqR: many initialisations per puzzle, followed step by step.

* `trace_trajectories` -- the one per-step recorder: ``copies`` random initialisations of every
  puzzle in a batch run ``depth`` noisy steps (keys exactly as `eqr_jax.evaluation` draws them, so
  the trajectories are the ones ``eqr eval --halt fixed`` scores), recording per step and row the
  latent residual, the logit change, the halting logit and whether the decoded grid is right, plus
  the full state at a few *snapshot* depths and, for one puzzle, a subsampled latent path. The
  evaluation loop keeps O(1) memory in depth and so cannot give these per-step series.
* attractor census -- `group_attractors` / `attractor_census`: final states of one puzzle are
  grouped into attractors (same decoded grid, then single-linkage on RMS latent distance).
* convergence vs correctness -- `curves_by_outcome`, `selection_vs_threshold`.
* compute vs difficulty -- `first_streak`, `steps_to_halt`, `steps_to_solution`, `rankdata`,
  `spearman`, `bucket_stats`.
* `pca_2d` -- a two-component PCA of latent paths.

Everything after the trace is NumPy on host arrays, so it is tested on arrays with known answers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The evaluation loop's own key derivation, residual, logit change and exactness, so that a trace
# and an `eqr eval` run of the same key are the same trajectories measured the same way.
from eqr_jax.evaluation import _copy_keys, _finish, _latent_residual, _logit_change
from eqr_jax.losses import IGNORE_LABEL
from eqr_jax.model import EqRModel, LatentState


# ----------------------------------------------------------------------------------------------
# The trace


class Trajectories(NamedTuple):
    """Per-step records of ``C`` copies of ``B`` puzzles over ``T`` steps (NumPy).

    Step ``t`` (1-based, index ``t - 1``) compares the state after ``t`` steps with the one before
    (the initial latents for ``t = 1``):

    * ``residual`` (T, C, B): ‖S_t − S_{t−1}‖₂ over [z_H; z_L] (as `evaluation.BatchResult`);
    * ``logit_change`` (T, C, B): mean over tokens of the L2 norm (over the vocabulary) of
      ℓ_t − ℓ_{t−1}; the convergence score of top-k selection averages its last ``window`` values
      from t = 2 on;
    * ``q_halt`` (T, C, B): the halting logit after step t;
    * ``exact`` (T, C, B) bool: the decoded grid after step t is right on every supervised token;
    * ``snapshot_depths`` (M,): depths at which full states were kept; ``states``: latents with
      leaves (M, C, B, seq, hidden) in the compute dtype; ``preds`` (M, C, B, seq) decoded tokens;
    * ``path`` (P, C, 2 * seq * hidden) float32: [z_H; z_L] of puzzle ``path_row`` at
      ``path_steps`` (P,) (0 = the initial latents), or None.
    """

    residual: np.ndarray
    logit_change: np.ndarray
    q_halt: np.ndarray
    exact: np.ndarray
    snapshot_depths: np.ndarray
    states: LatentState
    preds: np.ndarray
    path: np.ndarray | None
    path_steps: np.ndarray | None

    @property
    def state_size(self) -> int:
        """Numbers in one row's latent state (2 * seq * hidden)."""
        return 2 * int(np.prod(self.states.z_H.shape[-2:]))


def _row_flat(state: LatentState, row) -> jax.Array:
    """[z_H; z_L] of batch row ``row`` per copy: (C, 2 * seq * hidden) float32."""
    c = state.z_H.shape[0]
    return jnp.concatenate([a[:, row].reshape(c, -1).astype(jnp.float32) for a in state], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "depth", "snapshots", "path_stride",
                                             "noise"))
def _trace_core(model: EqRModel, params, inputs, labels, key, copy_ids, path_row, *, depth: int,
                snapshots: tuple[int, ...], path_stride: int, noise: bool):
    c, b = copy_ids.shape[0], inputs.shape[0]
    x = model.embed(params, inputs)
    init_keys = _copy_keys(jax.random.fold_in(key, 0), copy_ids)
    noise_keys = _copy_keys(jax.random.fold_in(key, 1), copy_ids)
    state0 = jax.vmap(lambda k: model.init_state(k, b))(init_keys)
    readout = jax.vmap(lambda s: model.readout(params, s))
    logits0 = readout(state0).logits
    snap_at = jnp.asarray(snapshots, jnp.int32)
    m = len(snapshots)
    snaps0 = jax.tree_util.tree_map(lambda a: jnp.zeros((m,) + a.shape, a.dtype), state0)
    spreds0 = jnp.zeros((m, c, b, inputs.shape[1]), jnp.int32)
    if path_stride:
        flat0 = _row_flat(state0, path_row)
        path0 = jnp.zeros((depth // path_stride + 1,) + flat0.shape, jnp.float32).at[0].set(flat0)
    else:
        path0 = jnp.zeros((0,), jnp.float32)

    def body(carry, t):
        state, logits, snaps, spreds, path = carry
        if noise:
            keys = jax.vmap(lambda kk: jax.random.fold_in(kk, t))(noise_keys)
            new = jax.vmap(lambda s, kk: model.step(params, s, x, kk))(state, keys)
        else:
            new = jax.vmap(lambda s: model.step(params, s, x, None))(state)
        ro = readout(new)
        res = _latent_residual(new, state)
        dl = _logit_change(ro.logits, logits)
        preds, _, _, exact = _finish(ro.logits, labels)
        t1 = t + 1
        i = jnp.clip(jnp.searchsorted(snap_at, t1), 0, m - 1)
        hit = snap_at[i] == t1
        snaps = jax.tree_util.tree_map(lambda buf, a: buf.at[i].set(jnp.where(hit, a, buf[i])),
                                       snaps, new)
        spreds = spreds.at[i].set(jnp.where(hit, preds, spreds[i]))
        if path_stride:
            j = t1 // path_stride
            path = path.at[j].set(jnp.where(t1 % path_stride == 0, _row_flat(new, path_row),
                                            path[j]))
        return (new, ro.logits, snaps, spreds, path), (res, dl, ro.q_halt, exact)

    carry0 = (state0, logits0, snaps0, spreds0, path0)
    (_, _, snaps, spreds, path), (res, dl, q, ex) = jax.lax.scan(body, carry0,
                                                                 jnp.arange(depth))
    return dict(residual=res, logit_change=dl, q_halt=q, exact=ex, states=snaps, preds=spreds,
                path=path)


def trace_trajectories(model: EqRModel, params, inputs, labels, key: jax.Array, *, copies: int,
                       depth: int, snapshots: Sequence[int] | None = None, noise: bool = True,
                       path_row: int | None = None, path_points: int = 128) -> Trajectories:
    """Run ``copies`` initialisations of each puzzle for ``depth`` steps, recording every step.

    Args:
      model, params: the model (static) and its parameters.
      inputs, labels: (B, N) token ids; labels use `IGNORE_LABEL` for unsupervised tokens.
      key: the batch key. Copy ``i`` starts from ``init_state(fold_in(fold_in(key, 0), i))`` and
        step ``t`` draws noise from ``fold_in(fold_in(fold_in(key, 1), i), t)``: the draws of
        `eqr_jax.evaluation.evaluate_batch`, so its ``halt="fixed"`` results are these.
      copies: initialisations per puzzle.
      depth: steps (static: one compilation per depth).
      snapshots: increasing depths in [1, depth] at which full states are kept (default: depth).
      noise: False runs the noise-free map (the noise keys are then unused).
      path_row: batch row whose latent path is kept for PCA (None: no path).
      path_points: at most this many path points after the initial state (every
        ``ceil(depth / path_points)`` steps).
    Memory: the per-step records are 4 x (T, C, B) scalars; states (M, C, B, N, H) for M
    snapshots; the path (P, C, 2 N H).
    Returns:
      `Trajectories` (host arrays).
    """
    depth, copies = int(depth), int(copies)
    if depth < 1 or copies < 1:
        raise ValueError(f"depth and copies must be >= 1, got depth={depth}, copies={copies}")
    snaps = (depth,) if snapshots is None else tuple(int(s) for s in snapshots)
    if not snaps or list(snaps) != sorted(set(snaps)) or snaps[0] < 1 or snaps[-1] > depth:
        raise ValueError(f"snapshots must be increasing depths in [1, {depth}], got {snaps}")
    inputs = jnp.asarray(inputs, jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)
    if inputs.ndim != 2 or inputs.shape != labels.shape:
        raise ValueError(f"inputs and labels must both be (batch, seq), got {inputs.shape} and "
                         f"{labels.shape}")
    stride = 0
    if path_row is not None:
        if not 0 <= int(path_row) < inputs.shape[0]:
            raise ValueError(f"path_row {path_row} outside the batch of {inputs.shape[0]}")
        stride = max(1, math.ceil(depth / max(int(path_points), 1)))
    out = jax.device_get(_trace_core(model, params, inputs, labels, key,
                                     jnp.arange(copies, dtype=jnp.int32),
                                     jnp.int32(path_row or 0), depth=depth, snapshots=snaps,
                                     path_stride=stride, noise=bool(noise)))
    path = steps = None
    if stride:
        path = np.asarray(out["path"])
        steps = np.arange(path.shape[0]) * stride
    return Trajectories(residual=np.asarray(out["residual"]),
                        logit_change=np.asarray(out["logit_change"]),
                        q_halt=np.asarray(out["q_halt"]), exact=np.asarray(out["exact"], bool),
                        snapshot_depths=np.asarray(snaps), states=LatentState(*out["states"]),
                        preds=np.asarray(out["preds"]), path=path, path_steps=steps)


def convergence_score(logit_change: np.ndarray, window: int) -> np.ndarray:
    """Top-k convergence score from per-step logit changes (T, ...) -> (...).

    The mean of the last ``window`` changes among steps t >= 2 (all of them when ``window`` is 0
    or larger than T - 1), the definition `eqr_jax.evaluation` uses; 0 when T = 1.
    """
    d = np.asarray(logit_change, np.float64)[1:]
    if d.shape[0] == 0:
        return np.zeros(d.shape[1:])
    if 0 < window < d.shape[0]:
        d = d[-window:]
    return d.mean(axis=0)


# ----------------------------------------------------------------------------------------------
# Attractor census


def _pairwise_rms(states: np.ndarray) -> np.ndarray:
    """RMS-per-element distances between rows of (K, n): (K, K) float64."""
    s = np.asarray(states, np.float64)
    sq = np.sum(s * s, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (s @ s.T), 0.0)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2 / max(s.shape[1], 1))


def group_attractors(states, grids, tol: float) -> np.ndarray:
    """Attractor id of each final state: (K,) int, 0 = the largest group.

    Two final states belong to the same attractor when they decode to the same grid and are
    linked by a chain of states each within ``tol`` RMS distance per latent element of the next
    (single linkage: the connected components of the "closer than tol" graph, which do not
    depend on the order of the states). Ids are ordered by group size (largest first), ties by
    first appearance.

    Args:
      states: (K, n) final latents ([z_H; z_L] flattened).
      grids: (K, N) decoded predictions.
      tol: RMS distance per element (latents after the RMS norm have about unit scale).
    """
    states, grids = np.asarray(states), np.asarray(grids)
    k = states.shape[0]
    if grids.shape[0] != k:
        raise ValueError(f"{k} states but {grids.shape[0]} grids")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    parent = np.arange(k)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if k:
        close = _pairwise_rms(states.reshape(k, -1)) <= tol
        same = np.all(grids.reshape(k, -1)[:, None, :] == grids.reshape(k, -1)[None, :, :],
                      axis=-1)
        for i, j in zip(*np.nonzero(np.triu(close & same, 1))):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(k)], np.int64)
    uniq, first, inverse, counts = np.unique(roots, return_index=True, return_inverse=True,
                                             return_counts=True)
    order = np.lexsort((first, -counts))  # biggest first, then first seen
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)]


def is_solution(grids, labels) -> np.ndarray:
    """(K,) bool: grid right on every supervised token of ``labels`` (N,) (none: False)."""
    grids, labels = np.asarray(grids), np.asarray(labels)
    mask = labels != IGNORE_LABEL
    return np.all((grids == labels) | ~mask, axis=-1) & bool(mask.any())


def attractor_census(states, grids, labels, tol: float,
                     residual: np.ndarray | None = None) -> dict[str, Any]:
    """Attractors reached by the K initialisations of one puzzle.

    Args:
      states: (K, n) final latents; grids: (K, N) decoded predictions; labels: (N,).
      tol: see `group_attractors`.
      residual: optional (K,) RMS residual per element of each final step (reported per
        attractor: a large value means the group is still moving, not a fixed point).
    Returns:
      ``n_attractors``, ``n_grids`` (distinct decoded grids), ``n_solution_attractors``,
      ``solution_basin`` (share of the K initialisations whose attractor decodes to the
      solution), ``largest_basin`` (share of the largest attractor), ``attractors`` (largest
      first: ``size``, ``share``, ``solution``, and ``residual`` (mean) when given) and ``ids``
      (K,) the attractor of each initialisation.
    """
    grids = np.asarray(grids)
    k = grids.shape[0]
    ids = group_attractors(states, grids, tol)
    sol = is_solution(grids, labels)
    n = int(ids.max()) + 1 if k else 0
    atts = []
    for a in range(n):
        members = ids == a
        e = {"size": int(members.sum()), "share": float(members.mean()),
             "solution": bool(sol[members][0])}
        if residual is not None:
            e["residual"] = float(np.mean(np.asarray(residual)[members]))
        atts.append(e)
    return {"n_attractors": n,
            "n_grids": int(len(np.unique(grids.reshape(k, -1), axis=0))) if k else 0,
            "n_solution_attractors": int(sum(e["solution"] for e in atts)),
            "solution_basin": float(sol.mean()) if k else 0.0,
            "largest_basin": float(atts[0]["share"]) if atts else 0.0,
            "attractors": atts, "ids": ids}


# ----------------------------------------------------------------------------------------------
# Convergence vs correctness


def curve_steps(depth: int, max_points: int = 256) -> np.ndarray:
    """Steps 1..depth, or ``max_points`` log-spaced ones (always including 1 and depth)."""
    if depth <= max_points:
        return np.arange(1, depth + 1)
    return np.unique(np.round(np.geomspace(1, depth, max_points)).astype(np.int64))


def curves_by_outcome(values, correct, max_points: int = 256) -> dict[str, Any]:
    """Quartiles per step of a per-step quantity, for trajectories ending right vs wrong.

    Args:
      values: (T, ...) e.g. the residual of every step and row; correct: (...) bool, whether the
        row's final answer is right.
    Returns:
      ``steps`` and, for ``correct`` and ``wrong``, ``n`` (rows) and ``q25``/``median``/``q75``
      per step (None lists when the class is empty).
    """
    v = np.asarray(values, np.float64)
    t = v.shape[0]
    flat = v.reshape(t, -1)
    ok = np.asarray(correct, bool).reshape(-1)
    if ok.shape[0] != flat.shape[1]:
        raise ValueError(f"values {v.shape} and correct {np.shape(correct)} do not match")
    steps = curve_steps(t, max_points)
    out: dict[str, Any] = {"steps": steps.tolist()}
    for name, sel in (("correct", ok), ("wrong", ~ok)):
        if not sel.any():
            out[name] = {"n": 0, "q25": None, "median": None, "q75": None}
            continue
        q = np.percentile(flat[steps - 1][:, sel], [25, 50, 75], axis=1)
        out[name] = {"n": int(sel.sum()), "q25": q[0].tolist(), "median": q[1].tolist(),
                     "q75": q[2].tolist()}
    return out


def selection_vs_threshold(scores, exact, thresholds=None, num: int = 24) -> dict[str, Any]:
    """How well "converged below a threshold" predicts "correct".

    Args:
      scores: (P, K) per puzzle and copy (lower = more converged), e.g. the final residual.
      exact: (P, K) bool.
      thresholds: values of tau (default: ``num`` quantiles of the finite scores).
    Returns, per tau (lists):
      ``kept`` fraction of copies with score <= tau; ``precision`` correct among them (NaN if
      none); ``coverage`` fraction of puzzles whose most converged copy is <= tau;
      ``top1_answered`` accuracy of that copy on those puzzles (NaN if none); ``top1_all``
      accuracy when a puzzle with no copy below tau counts as wrong. Plus ``baseline``
      (mean exact accuracy), ``top1`` (most converged copy, no threshold) and ``oracle``
      (any copy right).
    """
    s = np.asarray(scores, np.float64)
    ex = np.asarray(exact, bool)
    if s.shape != ex.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and exact {ex.shape} must be the same (P, K)")
    finite = s[np.isfinite(s)]
    if thresholds is None:
        thresholds = np.unique(np.quantile(finite, np.linspace(0, 1, num))) if finite.size \
            else np.zeros(0)
    taus = np.asarray(thresholds, np.float64)
    best = np.argmin(np.where(np.isfinite(s), s, np.inf), axis=1)  # ties: first copy
    rows = np.arange(s.shape[0])
    best_s, best_ok = s[rows, best], ex[rows, best]
    out: dict[str, list] = {k: [] for k in ("threshold", "kept", "precision", "coverage",
                                           "top1_answered", "top1_all")}
    for tau in taus:
        keep = s <= tau
        ans = best_s <= tau
        out["threshold"].append(float(tau))
        out["kept"].append(float(keep.mean()))
        out["precision"].append(float(ex[keep].mean()) if keep.any() else float("nan"))
        out["coverage"].append(float(ans.mean()))
        out["top1_answered"].append(float(best_ok[ans].mean()) if ans.any() else float("nan"))
        out["top1_all"].append(float((best_ok & ans).mean()))
    return {**out, "baseline": float(ex.mean()), "top1": float(best_ok.mean()),
            "oracle": float(ex.any(axis=1).mean())}


# ----------------------------------------------------------------------------------------------
# Compute vs difficulty


def first_streak(below, window: int) -> tuple[np.ndarray, np.ndarray]:
    """First step at which ``below`` held for ``window`` consecutive steps.

    Args:
      below: (T, ...) bool per step (index t - 1 = step t).
      window: consecutive steps required (>= 1).
    Returns:
      (steps (...) int64: that step, or T when never; reached (...) bool). With
      ``below = logit_change < tol`` at steps >= 2 this is the row's step count under
      ``eqr eval --halt convergence --tol tol --window window``.
    """
    b = np.asarray(below, bool)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    t = b.shape[0]
    streak = np.zeros(b.shape[1:], np.int64)
    steps = np.full(b.shape[1:], t, np.int64)
    reached = np.zeros(b.shape[1:], bool)
    for i in range(t):
        streak = np.where(b[i], streak + 1, 0)
        new = (streak >= window) & ~reached
        steps[new] = i + 1
        reached |= new
    return steps, reached


def steps_to_convergence(change, tol: float, window: int, skip_first: bool = True):
    """Steps until ``change`` stayed below ``tol`` for ``window`` consecutive steps.

    (T, ...) -> (steps (...), reached (...)); unreached rows get T (censored). The rule of
    ``eqr eval --halt convergence``: with the logit change (``skip_first``: step 1 compares with
    the initial latents' logits and never counts) or with the RMS latent residual per element
    (``--convergence-metric latents``, ``skip_first=False``).
    """
    below = np.asarray(change) < tol
    if skip_first:
        below[:1] = False
    return first_streak(below, window)


def steps_to_halt(q_halt):
    """First step whose halting logit is > 0 (the ``q_halt`` rule): (T, ...) -> (steps, reached)."""
    return first_streak(np.asarray(q_halt) > 0, 1)


def steps_to_solution(exact):
    """First step from which the decoded grid stays right until the last step.

    (T, ...) bool -> (steps (...), reached (...)); rows wrong at the end get T, reached False.
    """
    ex = np.asarray(exact, bool)
    t = ex.shape[0]
    # Length of the run of True ending at the last step.
    tail = np.cumprod(ex[::-1], axis=0).sum(axis=0)
    reached = tail > 0
    return np.where(reached, t - tail + 1, t).astype(np.int64), reached


def rankdata(a) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing the average of their ranks (float64)."""
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"rankdata needs a 1-D array, got shape {a.shape}")
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(a.shape[0], np.float64)
    # Boundaries of runs of equal values in sorted order.
    starts = np.r_[0, np.nonzero(sorted_a[1:] != sorted_a[:-1])[0] + 1] if a.size else \
        np.zeros(0, np.int64)
    ends = np.r_[starts[1:], a.shape[0]]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean of ranks s+1 .. e
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either input
    is constant or has fewer than 2 values."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equal lengths, got {a.size} and {b.size}")
    if a.size < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / den) if den > 0 else float("nan")


def rating_bucket(r: int) -> tuple[int, int]:
    """Bucket [lo, hi] of an integer rating: {0}, {1}, [2, 3], [4, 7], [8, 15], ..."""
    r = int(r)
    if r < 0:
        raise ValueError(f"ratings are >= 0, got {r}")
    if r <= 1:
        return r, r
    lo = 1 << (r.bit_length() - 1)
    return lo, 2 * lo - 1


def bucket_stats(ratings, values) -> list[dict[str, Any]]:
    """Count, mean and quartiles of ``values`` per rating bucket (see `rating_bucket`), in
    rating order."""
    r = np.asarray(ratings, np.int64).ravel()
    v = np.asarray(values, np.float64).ravel()
    if r.shape != v.shape:
        raise ValueError(f"{r.size} ratings but {v.size} values")
    groups: dict[tuple[int, int], list[float]] = {}
    for ri, vi in zip(r, v):
        groups.setdefault(rating_bucket(ri), []).append(vi)
    out = []
    for (lo, hi), vals in sorted(groups.items()):
        q = np.percentile(vals, [25, 50, 75])
        out.append({"bucket": str(lo) if lo == hi else f"{lo}-{hi}", "lo": lo, "hi": hi,
                    "count": len(vals), "mean": float(np.mean(vals)), "q25": float(q[0]),
                    "median": float(q[1]),
                    "q75": float(q[2])})
    return out


# ----------------------------------------------------------------------------------------------
# PCA


def pca_2d(points) -> tuple[np.ndarray, np.ndarray]:
    """Project points on their first two principal components (jitted SVD in JAX).

    Args:
      points: (..., n), e.g. a latent path (P, C, n).
    Returns:
      (coordinates (..., 2) float64, explained-variance ratios (2,)); components beyond the
      data's rank are zero.
    """
    p = jnp.asarray(points, jnp.float32)
    flat = p.reshape(-1, p.shape[-1])
    coords, ratio = _pca2(flat)
    coords, ratio = np.asarray(coords, np.float64), np.asarray(ratio, np.float64)
    return coords.reshape(p.shape[:-1] + (2,)), ratio


@jax.jit
def _pca2(flat):
    centred = flat - flat.mean(axis=0, keepdims=True)
    u, s, _ = jnp.linalg.svd(centred, full_matrices=False)
    k = min(2, s.shape[0])
    coords = jnp.zeros((flat.shape[0], 2), flat.dtype).at[:, :k].set(u[:, :k] * s[:k])
    var = jnp.sum(s ** 2)
    ratio = jnp.zeros((2,), flat.dtype).at[:k].set(
        jnp.where(var > 0, s[:k] ** 2 / jnp.where(var > 0, var, 1.0), 0.0))
    return coords, ratio
