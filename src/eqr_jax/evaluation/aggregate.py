"""Test-time scaling: evaluate a model over depth (steps), breadth (random inits) and halting rules.

The core is one jitted `lax.while_loop` over reasoning steps whose carry holds only the current
latents, logits and a few per-row counters, so memory does not depend on the depth ``D`` (depth is
even a traced argument: one compilation serves every depth). Per row and per copy:

* **halting** -- ``fixed`` (every row runs exactly ``D`` steps, the reference's evaluation),
  ``q_halt`` (a row stops once its halting logit is > 0) or ``convergence`` (a row stops once the
  change of its logits -- or latents -- stayed below ``tol`` for ``window`` consecutive steps).
  A row that halted is frozen (its state, logits and counters no longer change); padding rows
  never run; the loop exits as soon as every row halted.
* **breadth** -- ``n`` copies per puzzle with independent initial latents and noise run side by
  side under `vmap` (copy ``i`` uses keys folded with ``i``, so results do not depend on how the
  copies are chunked into calls).
* **noise** -- the update noise std at test time (``noise_scale``, default the model's training
  value; the paper evaluates Sudoku with 0.5).
* **solvers** -- besides the noisy step map (``unroll``), jaxopt Anderson acceleration or plain
  fixed-point iteration of the noise-free map (``anderson`` | ``fixed_point``) with at most ``D``
  iterations.

Aggregations (`pass_at_k`, `majority_vote`, `convergence_top_k`, `any_correct`, `avg_pass_rate`)
are plain NumPy over per-puzzle arrays and follow the reference definitions (spec §7.4-7.5), but
never count padding rows (quirk Q1 fixed) and measure the first residual against the initial
latents (quirk Q2 fixed).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax import dynamics
from eqr_jax.config import EvalConfig
from eqr_jax.losses import IGNORE_LABEL, sequence_exact
from eqr_jax.model import EqRModel, LatentState

HALT_MODES = ("fixed", "q_halt", "convergence")
SOLVERS = ("unroll", "anderson", "fixed_point")
CONV_METRICS = ("logits", "latents")


# ----------------------------------------------------------------------------------------------
# Aggregations (NumPy; every array holds real puzzles only -- callers drop padding rows first)


def pass_at_k(n: int, c, k: int) -> np.ndarray:
    """Unbiased pass@k: probability that ``k`` of ``n`` samples, ``c`` of them correct, hit one.

    ``1 - C(n - c, k) / C(n, k)``, evaluated as a stable product; 1 when ``n - c < k``, 0 when
    ``c == 0``. ``c`` may be an array (one count per puzzle); returns float64 of its shape.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    c = np.asarray(c, np.int64)
    if np.any((c < 0) | (c > n)):
        raise ValueError(f"correct counts must lie in [0, {n}]")
    out = np.empty(c.shape, np.float64)
    for idx, ci in np.ndenumerate(c):
        if n - ci < k:
            out[idx] = 1.0
        else:
            out[idx] = 1.0 - np.prod(1.0 - k / np.arange(n - ci + 1, n + 1, dtype=np.float64))
    return out


def any_correct(exact) -> float:
    """Fraction of puzzles with at least one exact copy; ``exact`` is (puzzles, copies) bool."""
    exact = np.asarray(exact, bool)
    return float(exact.any(axis=1).mean()) if exact.size else 0.0


def avg_pass_rate(exact) -> float:
    """Mean over puzzles of the fraction of exact copies; ``exact`` is (puzzles, copies) bool."""
    exact = np.asarray(exact, bool)
    return float(exact.mean()) if exact.size else 0.0


def pass_at_k_table(exact, ks: Sequence[int] | None = None) -> dict[int, float]:
    """Mean pass@k over puzzles for ``ks`` (default 1, 2, 4, ... < copies)."""
    exact = np.asarray(exact, bool)
    n = exact.shape[1]
    ks = [k for k in (2 ** i for i in range(20)) if k < n] if ks is None else ks
    c = exact.sum(axis=1)
    return {k: float(pass_at_k(n, c, k).mean()) for k in ks}


class MajorityVote(NamedTuple):
    winner: np.ndarray  # (puzzles, seq) the most frequent whole prediction
    votes: np.ndarray  # (puzzles,) how many copies predicted it
    exact: np.ndarray  # (puzzles,) bool: winner right on every supervised token
    n_correct: np.ndarray  # (puzzles,) correct supervised winner tokens
    n_valid: np.ndarray  # (puzzles,) supervised tokens


def majority_vote(preds, labels) -> MajorityVote:
    """Whole-sequence majority vote over copies.

    Args:
      preds: (puzzles, copies, seq) predicted token ids.
      labels: (puzzles, seq), `IGNORE_LABEL` marks unsupervised positions.
    Ties go to the prediction seen first in copy order. A puzzle without supervised tokens is
    never exact.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    p, n, s = preds.shape
    winner = np.empty((p, s), preds.dtype)
    votes = np.empty((p,), np.int64)
    for b in range(p):
        uniq, first, inverse, counts = np.unique(preds[b], axis=0, return_index=True,
                                                 return_inverse=True, return_counts=True)
        # Highest count, then earliest first appearance.
        best = np.lexsort((first, -counts))[0]
        winner[b], votes[b] = uniq[best], counts[best]
    mask = labels != IGNORE_LABEL
    n_correct = np.sum(mask & (winner == labels), axis=1)
    n_valid = mask.sum(axis=1)
    return MajorityVote(winner, votes, (n_correct == n_valid) & (n_valid > 0), n_correct, n_valid)


def convergence_top_k(scores, exact, k: int) -> dict[str, float]:
    """Verifier-free selection: per puzzle keep the ``k`` copies with the lowest scores.

    Args:
      scores: (puzzles, copies) convergence scores (lower = more converged).
      exact: (puzzles, copies) bool correctness of each copy.
      k: copies kept per puzzle (clipped to the number of copies).
    Returns the reference's keys (without prefix): ``exact_accuracy`` (correct chosen / (P k)),
    ``any_correct``, ``avg_convergence_score``, ``pass@j`` (j = 1, 2, 4, ... < k),
    ``cumulative_exact_acc_top{i}`` (i = 1..k), ``total_samples``, ``k``. Ties keep copy order.
    """
    scores, exact = np.asarray(scores, np.float64), np.asarray(exact, bool)
    p, n = scores.shape
    k = max(1, min(int(k), n))
    order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    chosen = np.take_along_axis(exact, order, axis=1)
    chosen_scores = np.take_along_axis(scores, order, axis=1)
    out = {"exact_accuracy": float(chosen.mean()), "any_correct": float(chosen.any(1).mean()),
           "avg_convergence_score": float(chosen_scores.mean(1).mean()),
           "total_samples": int(p), "k": int(k)}
    c = chosen.sum(axis=1)
    for j in (2 ** i for i in range(20)):
        if j >= k:
            break
        out[f"pass@{j}"] = float(pass_at_k(k, c, j).mean())
    cum = np.cumsum(chosen, axis=1)
    for i in range(1, k + 1):
        out[f"cumulative_exact_acc_top{i}"] = float(cum[:, i - 1].mean() / i)
    return out


# ----------------------------------------------------------------------------------------------
# The jitted core


class BatchResult(NamedTuple):
    """Per puzzle and copy results of one batch (NumPy, puzzle-major: (batch, copies, ...)).

    ``steps`` counts the step-map applications (or solver iterations) a row used; ``residual`` is
    its last latent residual ‖S_t − S_{t−1}‖₂ over [z_H; z_L] (S_0 = the initial latents);
    ``score`` the convergence score (mean over the last ``window`` logit changes of the per-token
    L2 norm, lowest = most converged); ``trace_*`` the residual-vs-step record (sums over the
    real rows still running at that step, slots with step 0 unused).
    """

    preds: np.ndarray  # (B, n, N) int32
    n_correct: np.ndarray  # (B, n) int32
    n_valid: np.ndarray  # (B,) int32
    exact: np.ndarray  # (B, n) bool
    steps: np.ndarray  # (B, n) int32
    score: np.ndarray  # (B, n) float32
    residual: np.ndarray  # (B, n) float32
    q_halt: np.ndarray  # (B, n) float32
    trace_steps: np.ndarray  # (K,) int32
    trace_sum: np.ndarray  # (K,) float64
    trace_count: np.ndarray  # (K,) int64
    loop_steps: int  # iterations of the batch loop (max over chunks)


def _trace_slot(t, depth, k: int):
    """Slot of step ``t`` (1-based) in a ``k``-slot record: exact for t <= k/2, log-spaced after.

    Every slot keeps the last step mapped to it; step ``depth`` always lands in the last slot.
    """
    half = max(k // 2, 1)
    tf = t.astype(jnp.float32)
    df = jnp.maximum(depth.astype(jnp.float32), half + 1.0)
    frac = jnp.log(tf / half) / jnp.log(df / half)
    late = half + jnp.floor((k - half - 1) * frac + 1e-4).astype(jnp.int32)
    slot = jnp.where(t <= half, t - 1, late)
    return jnp.clip(slot, 0, k - 1)


def _copy_keys(key, copy_ids):
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(copy_ids)


def _row_norm(a, b):
    """Per (copy, row) L2 norm of a - b for leaves (C, B, N, H): float32 (C, B)."""
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.sum(jnp.square(d), axis=(-2, -1))


def _latent_residual(new: LatentState, old: LatentState):
    return jnp.sqrt(sum(_row_norm(a, b) for a, b in zip(new, old)))


def _logit_change(new, old):
    """Mean over tokens of the L2 (over vocab) change of the logits: (C, B)."""
    d = new.astype(jnp.float32) - old.astype(jnp.float32)
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(d), axis=-1)), axis=-1)


def _finish(logits, labels):
    preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    n_correct, n_valid, exact = jax.vmap(lambda l: sequence_exact(l, labels))(logits)
    return preds, n_correct, n_valid[0], exact


@functools.partial(jax.jit, static_argnames=("model", "window", "trace_points"))
def _unroll_core(model: EqRModel, params, inputs, labels, mask, key, copy_ids, num_copies, depth,
                 tol, halt, conv_metric, *, window: int, trace_points: int):
    """While-loop evaluation of ``len(copy_ids)`` copies.

    ``depth``, ``tol``, ``halt`` (index into `HALT_MODES`) and ``conv_metric`` (0 logits,
    1 latents) are traced, so one compilation serves every depth and halting rule. Copies with an
    id >= ``num_copies`` (the overrun of a last, partial chunk) never run.
    """
    c, b = copy_ids.shape[0], inputs.shape[0]
    depth = jnp.asarray(depth, jnp.int32)
    tol = jnp.asarray(tol, jnp.float32)
    halt = jnp.asarray(halt, jnp.int32)
    conv_metric = jnp.asarray(conv_metric, jnp.int32)
    x = model.embed(params, inputs)
    init_keys = _copy_keys(jax.random.fold_in(key, 0), copy_ids)
    noise_keys = _copy_keys(jax.random.fold_in(key, 1), copy_ids)
    state0 = jax.vmap(lambda k: model.init_state(k, b))(init_keys)
    readout = jax.vmap(lambda s: model.readout(params, s))
    logits0 = readout(state0).logits
    numel = 2 * state0.z_H.shape[-2] * state0.z_H.shape[-1]
    w = max(window, 1)
    k = trace_points
    active0 = mask[None, :] & (copy_ids < num_copies)[:, None]
    zeros_f = jnp.zeros((c, b), jnp.float32)
    zeros_i = jnp.zeros((c, b), jnp.int32)
    carry0 = dict(t=jnp.int32(0), state=state0, logits=logits0, active=active0, steps=zeros_i,
                  streak=zeros_i, ring=jnp.zeros((c, b, w), jnp.float32), nfill=zeros_i,
                  resid=zeros_f, q=zeros_f, tr_steps=jnp.zeros((k,), jnp.int32),
                  tr_sum=jnp.zeros((k,), jnp.float32), tr_cnt=jnp.zeros((k,), jnp.int32))

    def cond(cr):
        return (cr["t"] < depth) & jnp.any(cr["active"])

    def body(cr):
        t1 = cr["t"] + 1
        act = cr["active"]
        keys = jax.vmap(lambda kk: jax.random.fold_in(kk, cr["t"]))(noise_keys)
        new = jax.vmap(lambda s, kk: model.step(params, s, x, kk))(cr["state"], keys)
        ro = readout(new)
        res = _latent_residual(new, cr["state"])
        dl = _logit_change(ro.logits, cr["logits"])
        a4 = act[:, :, None, None]
        state = LatentState(*(jnp.where(a4, n_, o_) for n_, o_ in zip(new, cr["state"])))
        logits = jnp.where(a4, ro.logits, cr["logits"])
        # Convergence score: the last `window` logit changes (steps >= 2), in a ring buffer.
        upd = act & (t1 >= 2)
        if window > 0:
            hot = jnp.arange(w)[None, None, :] == (cr["nfill"] % w)[..., None]
            ring = jnp.where(upd[..., None] & hot, dl[..., None], cr["ring"])
        else:
            ring = cr["ring"] + jnp.where(upd, dl, 0.0)[..., None]
        below = jnp.where(conv_metric == 0, (dl < tol) & (t1 >= 2),
                          res / math.sqrt(numel) < tol)
        streak = jnp.where(act, jnp.where(below, cr["streak"] + 1, 0), cr["streak"])
        crit = jnp.where(halt == 1, ro.q_halt > 0, (halt == 2) & (streak >= w))
        live = act & mask[None, :]
        slot = _trace_slot(t1, depth, k)
        return dict(t=t1, state=state, logits=logits, active=act & ~crit,
                    steps=cr["steps"] + act.astype(jnp.int32), streak=streak, ring=ring,
                    nfill=cr["nfill"] + upd.astype(jnp.int32),
                    resid=jnp.where(act, res, cr["resid"]),
                    q=jnp.where(act, ro.q_halt, cr["q"]),
                    tr_steps=cr["tr_steps"].at[slot].set(t1),
                    tr_sum=cr["tr_sum"].at[slot].set(jnp.sum(jnp.where(live, res, 0.0))),
                    tr_cnt=cr["tr_cnt"].at[slot].set(jnp.sum(live.astype(jnp.int32))))

    cr = jax.lax.while_loop(cond, body, carry0)
    if window > 0:
        score = jnp.sum(cr["ring"], -1) / jnp.maximum(jnp.minimum(cr["nfill"], w), 1)
    else:
        score = cr["ring"][..., 0] / jnp.maximum(cr["nfill"], 1)
    preds, n_correct, n_valid, exact = _finish(cr["logits"], labels)
    return dict(preds=preds, n_correct=n_correct, n_valid=n_valid, exact=exact,
                steps=cr["steps"], score=score, residual=cr["resid"], q_halt=cr["q"],
                trace_steps=cr["tr_steps"], trace_sum=cr["tr_sum"], trace_count=cr["tr_cnt"],
                loop_steps=cr["t"])


@functools.partial(jax.jit, static_argnames=("model", "solver", "depth", "tol", "history_size"))
def _solver_core(model: EqRModel, params, inputs, labels, mask, key, copy_ids, *, solver: str,
                 depth: int, tol: float, history_size: int = 5):
    """jaxopt solve of the noise-free map per copy (``depth`` = iteration cap, static).

    ``tol`` is an RMS per latent element; jaxopt's criterion is the L2 norm over a copy's whole
    batch, so it is scaled by sqrt(#elements).
    """
    c, b = copy_ids.shape[0], inputs.shape[0]
    x = model.embed(params, inputs)
    init_keys = _copy_keys(jax.random.fold_in(key, 0), copy_ids)
    state0 = jax.vmap(lambda k: model.init_state(k, b))(init_keys)
    numel = 2 * b * state0.z_H.shape[-2] * state0.z_H.shape[-1]
    method = "anderson" if solver == "anderson" else "iteration"

    def solve(s):
        return dynamics.fixed_point(model.step, params, s, x, method=method,
                                    tol=tol * math.sqrt(numel), maxiter=depth,
                                    implicit_diff=False, history_size=history_size)

    sol = jax.vmap(solve)(state0)
    state = sol.state
    readout = jax.vmap(lambda s: model.readout(params, s))
    logits = readout(state).logits
    # One more noise-free step measures the per-row residual and logit change at the solution.
    nxt = jax.vmap(lambda s: model.step(params, s, x, None))(state)
    res = _latent_residual(nxt, state)
    score = _logit_change(readout(nxt).logits, logits)
    preds, n_correct, n_valid, exact = _finish(logits, labels)
    steps = jnp.broadcast_to(sol.iterations[:, None], (c, b)) * mask[None, :]
    k = 1
    return dict(preds=preds, n_correct=n_correct, n_valid=n_valid, exact=exact,
                steps=steps.astype(jnp.int32), score=score, residual=res,
                q_halt=readout(state).q_halt, trace_steps=jnp.zeros((k,), jnp.int32),
                trace_sum=jnp.zeros((k,), jnp.float32), trace_count=jnp.zeros((k,), jnp.int32),
                loop_steps=jnp.max(sol.iterations))


def with_eval_noise(model: EqRModel, noise_scale: float | None) -> EqRModel:
    """``model`` with update noise ``noise_scale`` at test time (None: its training value).

    A different noise scale is a different static config, so it compiles separately.
    """
    if noise_scale is None or float(noise_scale) == float(model.cfg.noise_scale):
        return model
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    return EqRModel(dataclasses.replace(model.cfg, noise_scale=float(noise_scale)))


def copies_per_call(breadth: int, batch: int, max_rows: int = 0) -> int:
    """Copies run in one compiled call so that copies x batch <= max_rows (0: all at once)."""
    if max_rows <= 0:
        return breadth
    return max(1, min(breadth, max_rows // max(batch, 1)))


def evaluate_batch(model: EqRModel, params, inputs, labels, mask, key, *, depth: int,
                   breadth: int = 1, halt: str = "fixed", tol: float = 1e-3, window: int = 3,
                   solver: str = "unroll", convergence_metric: str = "logits",
                   max_rows: int = 0, trace_points: int = 64, noise_scale: float | None = None,
                   sharding=None) -> BatchResult:
    """Evaluate one batch at depth ``depth`` with ``breadth`` random initialisations per puzzle.

    Args:
      model: `EqRModel` (static).
      params: model parameters.
      inputs, labels: (B, N) int token ids; labels use `IGNORE_LABEL` for unsupervised tokens.
      mask: (B,) bool, True for real rows (False rows never run and count nowhere).
      key: PRNG key of this batch; copy ``i`` uses ``fold_in(fold_in(key, 0|1), i)`` for its
        initial latents (0) and noise (1); step ``t`` folds ``t`` into the noise key.
      depth: maximum reasoning steps (or solver iterations).
      breadth: copies per puzzle; chunked so that copies x B <= ``max_rows`` (0: no limit).
      halt: ``fixed`` | ``q_halt`` | ``convergence`` (only for ``solver="unroll"``).
      tol, window: convergence tolerance and the number of consecutive steps below it; ``window``
        is also the convergence-score window (0: all steps). For the jaxopt solvers ``tol`` is the
        RMS residual per latent element at which they stop.
      solver: ``unroll`` | ``anderson`` | ``fixed_point``.
      convergence_metric: ``logits`` | ``latents`` (see `EvalConfig`).
      trace_points: slots of the residual-vs-step record.
      noise_scale: std of the update noise (None: the model's ``noise_scale``; see
        `with_eval_noise`). The jaxopt solvers iterate the noise-free map whatever it is.
      sharding: optional `NamedSharding` for the batch axis of inputs/labels/mask.
    Returns:
      `BatchResult`.
    """
    if halt not in HALT_MODES:
        raise ValueError(f"unknown halt mode {halt!r}; choose from {HALT_MODES}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
    if convergence_metric not in CONV_METRICS:
        raise ValueError(f"unknown convergence metric {convergence_metric!r}; choose from "
                         f"{CONV_METRICS}")
    if solver != "unroll" and halt != "fixed":
        raise ValueError(f"halt={halt!r} needs solver='unroll' (the jaxopt solvers stop on their "
                         "own residual tolerance)")
    if depth < 1 or breadth < 1:
        raise ValueError(f"depth and breadth must be >= 1, got {depth}, {breadth}")
    model = with_eval_noise(model, noise_scale)
    inputs = jnp.asarray(inputs, jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)
    mask = jnp.asarray(mask, bool)
    if sharding is not None:
        inputs, labels, mask = (jax.device_put(a, sharding) for a in (inputs, labels, mask))
    b = inputs.shape[0]
    chunk = copies_per_call(breadth, b, max_rows)
    outs = []
    for start in range(0, breadth, chunk):
        ids = jnp.arange(start, start + chunk, dtype=jnp.int32)  # the last chunk may overrun
        if solver == "unroll":
            out = _unroll_core(model, params, inputs, labels, mask, key, ids, breadth, depth, tol,
                               HALT_MODES.index(halt), CONV_METRICS.index(convergence_metric),
                               window=int(window), trace_points=int(trace_points))
        else:
            out = _solver_core(model, params, inputs, labels, mask, key, ids, solver=solver,
                               depth=int(depth), tol=float(tol))
        outs.append(jax.device_get(out))
    cat = lambda name: np.concatenate([o[name] for o in outs], axis=0)[:breadth]
    per_copy = {name: np.moveaxis(cat(name), 0, 1) for name in
                ("preds", "n_correct", "exact", "steps", "score", "residual", "q_halt")}
    # The residual record: chunks share the slot layout; sum them.
    tr_steps = outs[0]["trace_steps"]
    tr_sum = sum(o["trace_sum"].astype(np.float64) for o in outs)
    tr_cnt = sum(o["trace_count"].astype(np.int64) for o in outs)
    return BatchResult(n_valid=np.asarray(outs[0]["n_valid"]), trace_steps=np.asarray(tr_steps),
                       trace_sum=tr_sum, trace_count=tr_cnt,
                       loop_steps=int(max(int(o["loop_steps"]) for o in outs)), **per_copy)


# ----------------------------------------------------------------------------------------------
# Datasets: one pass over the batches, every (depth, breadth) setting per batch


def data_mesh(devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over all (or the given) devices with axis ``data``."""
    devs = np.asarray(list(jax.devices() if devices is None else devices))
    return jax.sharding.Mesh(devs, ("data",))


class _Acc:
    """Accumulates one setting's per-puzzle results over batches (real rows only)."""

    def __init__(self):
        self.parts: dict[str, list] = {}
        self.trace: dict[int, list[float]] = {}
        self.mv: list[np.ndarray] = []
        self.seconds = 0.0
        self.loop_steps: list[int] = []

    def add(self, r: BatchResult, keep: np.ndarray, labels: np.ndarray, seconds: float):
        for name in ("n_correct", "exact", "steps", "score", "residual", "q_halt"):
            self.parts.setdefault(name, []).append(getattr(r, name)[keep])
        self.parts.setdefault("n_valid", []).append(r.n_valid[keep])
        if r.exact.shape[1] > 1:
            mv = majority_vote(r.preds[keep], labels[keep])
            self.mv.append(np.stack([mv.exact, mv.n_correct, mv.n_valid], axis=1))
        for s, tot, cnt in zip(r.trace_steps, r.trace_sum, r.trace_count):
            if s > 0:
                e = self.trace.setdefault(int(s), [0.0, 0])
                e[0] += float(tot)
                e[1] += int(cnt)
        self.seconds += seconds
        self.loop_steps.append(r.loop_steps)

    def get(self, name):
        return np.concatenate(self.parts[name], axis=0)


def summarize(acc: _Acc, depth: int, breadth: int, top_k: int) -> dict[str, Any]:
    """Flat metrics (reference-style keys) plus the steps histogram and residual record."""
    exact, steps = acc.get("exact"), acc.get("steps")
    n_correct, n_valid = acc.get("n_correct"), acc.get("n_valid")
    p = exact.shape[0]
    m: dict[str, Any] = {
        "num_puzzles": int(p), "count": int(exact.size),
        "all/exact_accuracy": float(exact.mean()) if p else 0.0,
        "all/accuracy": float(n_correct.sum() / max(1, n_valid.sum() * breadth)),
        "all/steps": float(steps.mean()) if p else 0.0,
        "all/final_residual": float(acc.get("residual").mean()) if p else 0.0,
        "halting/mean_steps": float(steps.mean()) if p else 0.0,
        "halting/halted_early": float((steps < depth).mean()) if p else 0.0,
        "halting/compute_saved": float(1.0 - steps.mean() / depth) if p else 0.0,
        "halting/mean_batch_loop_steps": float(np.mean(acc.loop_steps)) if acc.loop_steps else 0.,
        "time_s": acc.seconds,
    }
    if breadth > 1 and p:
        m["different_init/n"] = breadth
        m["different_init/total_samples"] = int(p)
        m["different_init/avg_pass_rate"] = avg_pass_rate(exact)
        m["different_init/any_correct"] = any_correct(exact)
        for k, v in pass_at_k_table(exact).items():
            m[f"different_init/pass@{k}"] = v
        mv = np.concatenate(acc.mv, axis=0)
        m["majority_vote/exact_accuracy"] = float(mv[:, 0].mean())
        m["majority_vote/accuracy"] = float(mv[:, 1].sum() / max(1, mv[:, 2].sum()))
        if top_k > 0:
            for key, v in convergence_top_k(acc.get("score"), exact, top_k).items():
                m[f"convergence_top_k/{key}"] = v
    hist = np.bincount(steps.ravel(), minlength=depth + 1) if p else np.zeros(depth + 1, int)
    nz = np.nonzero(hist)[0]
    tr = sorted(acc.trace.items())
    return {"depth": depth, "breadth": breadth, "metrics": m,
            "steps_histogram": {"steps": nz.tolist(), "count": hist[nz].tolist()},
            "residual_trace": {"steps": [s for s, _ in tr],
                               "mean": [v[0] / v[1] if v[1] else float("nan") for _, v in tr],
                               "rows": [v[1] for _, v in tr]}}


def evaluate_dataset(model: EqRModel, params, loader: Iterable[Mapping[str, np.ndarray]],
                     eval_cfg: EvalConfig, depths: Sequence[int] | None = None,
                     breadths: Sequence[int] | None = None, mesh: jax.sharding.Mesh | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Evaluate every (depth, breadth) combination in one pass over ``loader``.

    Args:
      loader: iterable of dicts with ``inputs`` and ``labels`` (B, N) and optionally ``mask``
        (B,) (default: rows with any supervised token).
      eval_cfg: halting, solver, tolerances, window, top-k, max_batches, seed, max_rows.
      depths, breadths: the grid (default ``eval_cfg.depth`` / ``eval_cfg.breadth``).
      mesh: shard each batch over ``mesh``'s ``data`` axis when its size divides the batch
        (default: all local devices when there is more than one).
    Batch ``i`` uses key ``fold_in(PRNGKey(seed), i)`` in every setting, so a depth-16 trajectory
    is the prefix of the depth-64 one and breadth-8 copies are the first 8 of breadth-64.
    Returns ``{"settings": [per-setting summaries], "eval_config": ..., "devices": ...}``.
    """
    depths = [eval_cfg.depth] if depths is None else [int(d) for d in depths]
    breadths = [eval_cfg.breadth] if breadths is None else [int(n) for n in breadths]
    if mesh is None and jax.local_device_count() > 1:
        # Local devices: with several processes each one evaluates its own slice of the data.
        mesh = data_mesh(jax.local_devices())
    if mesh is not None:
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh,
                                                                    jax.sharding.PartitionSpec()))
    root = jax.random.PRNGKey(eval_cfg.seed)
    accs = {(d, n): _Acc() for n in breadths for d in depths}
    it = iter(loader)
    if progress:
        try:
            from tqdm import tqdm
            it = tqdm(it, desc="eval", leave=False)
        except ImportError:  # pragma: no cover
            pass
    num_batches = 0
    for bi, batch in enumerate(it):
        if eval_cfg.max_batches and bi >= eval_cfg.max_batches:
            break
        inputs, labels = np.asarray(batch["inputs"]), np.asarray(batch["labels"])
        mask = np.asarray(batch["mask"], bool) if "mask" in batch else \
            np.any(labels != IGNORE_LABEL, axis=1)
        sharding = None
        if mesh is not None and inputs.shape[0] % mesh.devices.size == 0:
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        key = jax.random.fold_in(root, bi)
        for n in breadths:
            for d in depths:
                t0 = time.perf_counter()
                r = evaluate_batch(model, params, inputs, labels, mask, key, depth=d, breadth=n,
                                   halt=eval_cfg.halt, tol=eval_cfg.convergence_tol,
                                   window=eval_cfg.convergence_window, solver=eval_cfg.solver,
                                   convergence_metric=eval_cfg.convergence_metric,
                                   max_rows=eval_cfg.max_rows,
                                   trace_points=eval_cfg.trace_points,
                                   noise_scale=eval_cfg.noise_scale, sharding=sharding)
                accs[(d, n)].add(r, mask, labels, time.perf_counter() - t0)
        num_batches += 1
    settings = [summarize(accs[(d, n)], d, n, eval_cfg.convergence_top_k)
                for n in breadths for d in depths]
    noise = with_eval_noise(model, eval_cfg.noise_scale).cfg.noise_scale
    for s in settings:
        s.update(halt=eval_cfg.halt, solver=eval_cfg.solver, noise_scale=noise)
    return {"settings": settings, "eval_config": dataclasses.asdict(eval_cfg),
            "num_batches": num_batches, "devices": jax.device_count(),
            "platform": jax.devices()[0].platform}


# ----------------------------------------------------------------------------------------------
# Reporting helpers


TABLE_KEYS = ("all/exact_accuracy", "majority_vote/exact_accuracy",
              "convergence_top_k/exact_accuracy", "different_init/any_correct",
              "halting/mean_steps")


def format_table(results: Mapping[str, Any], key: str = "all/exact_accuracy",
                 markdown: bool = False) -> str:
    """A depth (rows) x breadth (columns) table of one metric ('-' where it does not apply)."""
    settings = results["settings"]
    depths = sorted({s["depth"] for s in settings})
    breadths = sorted({s["breadth"] for s in settings})
    cell = {(s["depth"], s["breadth"]): s["metrics"].get(key) for s in settings}
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    head = ["depth \\ breadth"] + [str(n) for n in breadths]
    rows = [[str(d)] + [fmt(cell.get((d, n))) for n in breadths] for d in depths]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join([f"{key}:", line(head)] + [line(r) for r in rows])


def results_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per setting (for CSV)."""
    rows = []
    for s in results["settings"]:
        row = {"depth": s["depth"], "breadth": s["breadth"], "halt": s.get("halt"),
               "solver": s.get("solver"), "noise_scale": s.get("noise_scale")}
        row.update(s["metrics"])
        rows.append(row)
    return rows
