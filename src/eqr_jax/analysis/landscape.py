"""The attractor landscape of a trained EqR, from the per-step records of many initialisations per
puzzle (`eqr_jax.analysis.trace.trace_trajectories`):

* `convergence_score`, `steps_to_convergence` -- the evaluator's convergence rules on the records;
* attractor census -- `group_attractors` / `attractor_census`: final states of one puzzle are
  grouped into attractors (same decoded grid, then single-linkage on RMS latent distance).
* convergence vs correctness -- `curves_by_outcome`, `selection_vs_threshold`.
* compute vs difficulty -- `first_streak`, `steps_to_halt`, `steps_to_solution`, `rankdata`,
  `spearman`, `bucket_stats`.
* `pca_2d` -- a two-component PCA of latent paths.

Everything after the trace is NumPy on host arrays, so it is tested on arrays with known answers.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax.losses import IGNORE_LABEL


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
