"""The jitted evaluation programs and the one key-derivation rule (docs/evaluation.md).

Two programs run the noisy step map on evaluation *jobs* (one job = one random initialisation,
a *copy*, of one puzzle), with the same per-row halting rules (`advance_rows`):

* `evaluate_copies` (batched): ``C`` copies of a batch of ``B`` puzzles in one `lax.while_loop`
  whose carry holds only the current latents, logits and a few per-row counters, so memory does
  not depend on the depth. A row that halted is frozen; the loop exits once every row halted.
* `eqr_jax.evaluation.stream.stream_jobs` (streaming): a fixed pool of slots; a slot whose job
  halts (q_halt, convergence or the depth cap) records the job's result and takes the next job
  of a queue held on device, inside the same loop, so no slot idles while work is left. One pool
  per device (`jax.shard_map`): nothing crosses devices inside the loop. It is built from this
  module's per-row pieces (`Rows`, `advance_rows`, `step_rows`, `job_keys`).

The depth and the halting rule (`Stopping`) are traced values: one compilation serves every
depth and every rule. `solve_copies` is the solver alternative (per-row Anderson or plain
fixed-point iteration of the noise-free map, `eqr_jax.dynamics.solve_rows`).

Randomness (`job_keys`): the job (puzzle ``p``, copy ``c``) of an evaluation with ``seed``, where
``p`` is the puzzle's index in the evaluated split, draws its initial latents from
``fold_in(fold_in(k_p, 0), c)`` and its update noise from ``fold_in(fold_in(k_p, 1), c)``, with
``k_p = fold_in(PRNGKey(seed), p)``; its step ``t`` (its own count, from 0) folds in ``t``. Every
row draws its own latents and noise, so a job's trajectory depends on nothing but (seed, p, c):
not on the batch it sits in, the batch size, how copies are chunked into calls, the device, the
slot or the time a streaming pool runs it. A depth-16 run is the prefix of the depth-64 one and
breadth-8 copies are the first 8 of breadth-64.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eqr_jax import dynamics, modes
from eqr_jax.losses import sequence_exact
from eqr_jax.model import EqRModel, LatentState

# Halting rule name -> (stop on q_halt > 0, stop on convergence); `fixed` stops only at depth.
HALT_RULES = {"fixed": (False, False), "q_halt": (True, False), "convergence": (False, True)}
assert tuple(HALT_RULES) == modes.HALT_RULES


class Stopping(NamedTuple):
    """When a row stops, as traced scalars (so every rule shares one compiled program)."""

    on_q_halt: jax.Array  # bool: stop once the halting logit is > 0
    on_convergence: jax.Array  # bool: stop after `window` consecutive changes below `tol`
    watch_latents: jax.Array  # bool: the change is the latent RMS residual, else logit change
    tol: jax.Array  # float32


def stopping(halt: str, convergence_metric: str = "logits", tol: float = 1e-3) -> Stopping:
    """The `Stopping` of a halting rule and convergence metric named in `eqr_jax.modes`."""
    q, conv = HALT_RULES[modes.check("halting rule", halt, modes.HALT_RULES)]
    modes.check("convergence metric", convergence_metric, modes.CONVERGENCE_METRICS)
    return Stopping(jnp.asarray(q), jnp.asarray(conv),
                    jnp.asarray(convergence_metric == "latents"), jnp.asarray(tol, jnp.float32))


# ----------------------------------------------------------------------------------------------
# Keys, initial latents and steps of rows that each carry their own key


def job_keys(seed, puzzle_ids: jax.Array, copy_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(initial-latent keys, noise keys) of the jobs (``puzzle_ids[r]``, ``copy_ids[r]``).

    Args:
      seed: int or int32 scalar (may be traced); puzzle_ids, copy_ids: int32 of one shape L.
    Returns:
      Two raw PRNG key arrays of shape L + (2,).
    """
    base = jax.random.PRNGKey(seed)

    def one(p, c):
        k = jax.random.fold_in(base, p)
        return (jax.random.fold_in(jax.random.fold_in(k, 0), c),
                jax.random.fold_in(jax.random.fold_in(k, 1), c))

    shape = jnp.shape(puzzle_ids)
    init, noise = jax.vmap(one)(jnp.ravel(puzzle_ids), jnp.ravel(copy_ids))
    return init.reshape(shape + init.shape[-1:]), noise.reshape(shape + noise.shape[-1:])


def batch_job_keys(seed, first_index, batch: int, copy_ids: jax.Array):
    """`job_keys` of copies ``copy_ids`` (C,) of puzzles ``first_index + arange(batch)``: two
    (C, batch, 2) key arrays."""
    rows = jnp.asarray(first_index, jnp.int32) + jnp.arange(batch, dtype=jnp.int32)
    c = copy_ids.shape[0]
    return job_keys(seed, jnp.broadcast_to(rows[None, :], (c, batch)),
                    jnp.broadcast_to(copy_ids[:, None], (c, batch)))


def _per_row(fn, n_lead: int):
    """``fn`` mapped over ``n_lead`` leading axes (vmap nested once per axis)."""
    for _ in range(n_lead):
        fn = jax.vmap(fn)
    return fn


def init_rows(model: EqRModel, keys: jax.Array) -> LatentState:
    """Initial latents of rows with keys (*L, 2): leaves (*L, N, H), one draw per row's key."""
    one = lambda k: jax.tree_util.tree_map(lambda a: a[0], model.init_latents(k, 1))
    return _per_row(one, keys.ndim - 1)(keys)


def step_rows(model: EqRModel, params, latents: LatentState, x: jax.Array,
              keys: jax.Array) -> LatentState:
    """One noisy step of rows that each carry their own noise key.

    Args:
      latents: leaves (*L, N, H); x: the input injection (*L, N, H), or (*L[1:], N, H) shared
        by the first axis (the copies of a batch); keys: (*L, 2).
    """
    lead = keys.ndim - 1

    def one(z, xr, k):
        z1 = jax.tree_util.tree_map(lambda a: a[None], z)
        return jax.tree_util.tree_map(lambda a: a[0], model.step(params, z1, xr[None], k))

    if x.ndim == latents.z_H.ndim:
        return _per_row(one, lead)(latents, x, keys)
    inner = _per_row(one, lead - 1)
    return jax.vmap(inner, in_axes=(0, None, 0))(latents, x, keys)


def fold_step(keys: jax.Array, t: jax.Array) -> jax.Array:
    """Noise keys (*L, 2) of step ``t`` ((*L) int32, or a scalar) of each row."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), keys.shape[:-1])
    return _per_row(jax.random.fold_in, keys.ndim - 1)(keys, t)


# ----------------------------------------------------------------------------------------------
# Per-row measurements and the halting rules, shared by the batched and the streaming loop


def _row_sq(a, b):
    """Per row squared L2 distance for leaves (*L, N, H): float32 (*L)."""
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.sum(jnp.square(d), axis=(-2, -1))


def latent_residual(new: LatentState, old: LatentState) -> jax.Array:
    """‖S_new − S_old‖₂ over [z_H; z_L] per row: (*L) float32 for leaves (*L, N, H)."""
    return jnp.sqrt(sum(_row_sq(a, b) for a, b in zip(new, old)))


def logit_change(new: jax.Array, old: jax.Array) -> jax.Array:
    """Mean over tokens of the L2 (over vocab) change of the logits: (*L) float32."""
    d = new.astype(jnp.float32) - old.astype(jnp.float32)
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(d), axis=-1)), axis=-1)


def score_predictions(logits, labels):
    """(preds (C, B, N), correct tokens (C, B), supervised tokens (B,), exact (C, B)) of the
    logits (C, B, N, V) of C copies against labels (B, N)."""
    preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    n_correct, n_valid, exact = jax.vmap(lambda lg: sequence_exact(lg, labels))(logits)
    return preds, n_correct, n_valid[0], exact


class Rows(NamedTuple):
    """Per-row evaluation state; every field has the rows' leading axes L."""

    latents: LatentState  # leaves (*L, N, H)
    logits: jax.Array  # (*L, N, V): the row's last read-out
    steps: jax.Array  # int32: steps the row took (its own clock)
    calm_streak: jax.Array  # int32: consecutive steps with the change below tol
    recent_changes: jax.Array  # (*L, W) float32 ring of the last W logit changes
    changes_seen: jax.Array  # int32: logit changes recorded in the ring
    residual: jax.Array  # float32: the row's last latent residual
    q_halt: jax.Array  # float32: the row's last halting logit


def fresh_rows(latents: LatentState, logits: jax.Array, window: int) -> Rows:
    """`Rows` at step 0 from initial latents and their read-out logits."""
    lead = logits.shape[:-2]
    zf, zi = jnp.zeros(lead, jnp.float32), jnp.zeros(lead, jnp.int32)
    return Rows(latents, logits, zi, zi, jnp.zeros(lead + (max(window, 1),), jnp.float32), zi,
                zf, zf)


def advance_rows(rows: Rows, new: LatentState, logits: jax.Array, q_halt: jax.Array,
                 active: jax.Array, stop: Stopping, window: int) -> tuple[Rows, jax.Array,
                                                                           jax.Array]:
    """Take one computed step (``new`` latents, their ``logits`` and ``q_halt``) into the rows
    that are ``active``; the others keep their state. Returns (rows, halts, residual): ``halts``
    marks active rows that stop by the halting rule (not the depth cap), ``residual`` the
    latent residual of the step for every row."""
    w = max(window, 1)
    t1 = rows.steps + 1
    res = latent_residual(new, rows.latents)
    dlogits = logit_change(logits, rows.logits)
    keep = active[..., None, None]
    latents = LatentState(*(jnp.where(keep, n, o) for n, o in zip(new, rows.latents)))
    # The convergence score: the last `window` logit changes (from step 2 on), in a ring.
    record = active & (t1 >= 2)
    if window > 0:
        slot = jnp.arange(w) == (rows.changes_seen % w)[..., None]
        ring = jnp.where(record[..., None] & slot, dlogits[..., None], rows.recent_changes)
    else:
        ring = rows.recent_changes + jnp.where(record, dlogits, 0.0)[..., None]
    numel = 2 * new.z_H.shape[-2] * new.z_H.shape[-1]
    calm = jnp.where(stop.watch_latents, res / math.sqrt(numel) < stop.tol,
                     (dlogits < stop.tol) & (t1 >= 2))
    streak = jnp.where(active, jnp.where(calm, rows.calm_streak + 1, 0), rows.calm_streak)
    halts = active & ((stop.on_q_halt & (q_halt > 0)) | (stop.on_convergence & (streak >= w)))
    out = Rows(latents=latents, logits=jnp.where(keep, logits, rows.logits),
               steps=rows.steps + active.astype(jnp.int32), calm_streak=streak,
               recent_changes=ring, changes_seen=rows.changes_seen + record.astype(jnp.int32),
               residual=jnp.where(active, res, rows.residual),
               q_halt=jnp.where(active, q_halt, rows.q_halt))
    return out, halts, res


def convergence_score(rows: Rows, window: int) -> jax.Array:
    """Mean of the last ``window`` logit changes (0: of all of them) per row; lower = more
    converged."""
    if window > 0:
        return jnp.sum(rows.recent_changes, -1) / jnp.maximum(
            jnp.minimum(rows.changes_seen, window), 1)
    return rows.recent_changes[..., 0] / jnp.maximum(rows.changes_seen, 1)


# ----------------------------------------------------------------------------------------------
# The residual-vs-step record


class ResidualTrace(NamedTuple):
    """Residual-vs-step record in ``K`` slots: the step recorded in each slot (0: unused), and
    the sum and count of the latent residuals of the real rows that took that step."""

    steps: jax.Array  # (K,) int32
    total: jax.Array  # (K,) float32
    rows: jax.Array  # (K,) int32


def empty_trace(k: int) -> ResidualTrace:
    return ResidualTrace(jnp.zeros((k,), jnp.int32), jnp.zeros((k,), jnp.float32),
                         jnp.zeros((k,), jnp.int32))


def _trace_slot(t, depth, k: int):
    """Slot of step ``t`` (1-based) in a ``k``-slot record: exact for t <= k/2, log-spaced after
    (step ``depth`` always lands in the last slot)."""
    half = max(k // 2, 1)
    tf = t.astype(jnp.float32)
    df = jnp.maximum(depth.astype(jnp.float32), half + 1.0)
    frac = jnp.log(tf / half) / jnp.log(df / half)
    late = half + jnp.floor((k - half - 1) * frac + 1e-4).astype(jnp.int32)
    slot = jnp.where(t <= half, t - 1, late)
    return jnp.clip(slot, 0, k - 1)


def record_trace(trace: ResidualTrace, t1: jax.Array, res: jax.Array, took: jax.Array,
                 depth: jax.Array) -> ResidualTrace:
    """Add the residuals ``res`` of the rows that ``took`` their step ``t1`` (all (*L)).

    Each slot records one step: the last step that maps to it (so every step up to k/2, then
    log-spaced ones, and ``depth``); a row's residual counts at that step only. The record is
    a function of the rows' own steps, the same in the batched and the streaming loop.
    """
    k = trace.steps.shape[0]
    t1 = jnp.ravel(jnp.broadcast_to(t1, took.shape))
    slot = _trace_slot(t1, depth, k)
    use = jnp.ravel(took) & ((t1 == depth) | (_trace_slot(t1 + 1, depth, k) != slot))
    return ResidualTrace(trace.steps.at[slot].max(jnp.where(use, t1, 0)),
                         trace.total.at[slot].add(jnp.where(use, jnp.ravel(res), 0.0)),
                         trace.rows.at[slot].add(use.astype(jnp.int32)))


# ----------------------------------------------------------------------------------------------
# The batched loop


class LoopState(NamedTuple):
    """Carry of the batched loop; per-row fields are (C, B) for C copies of B puzzles."""

    t: jax.Array  # int32: steps taken by the loop
    rows: Rows
    running: jax.Array  # bool: the row still updates
    trace: ResidualTrace


class CopyResults(NamedTuple):
    """Per copy and row results on device ((C, B, ...) leading axes)."""

    preds: jax.Array  # (C, B, N) int32
    n_correct: jax.Array  # (C, B) int32
    n_valid: jax.Array  # (B,) int32
    exact: jax.Array  # (C, B) bool
    steps: jax.Array  # (C, B) int32
    score: jax.Array  # (C, B) float32: convergence score, lower = more converged
    residual: jax.Array  # (C, B) float32
    q_halt: jax.Array  # (C, B) float32
    trace: ResidualTrace
    loop_steps: jax.Array  # int32: iterations of the loop


@functools.partial(jax.jit, static_argnames=("model", "window", "trace_points"))
def evaluate_copies(model: EqRModel, params, inputs, labels, mask, seed, first_index, copy_ids,
                    num_copies, depth, stop: Stopping, *, window: int,
                    trace_points: int) -> CopyResults:
    """Run copies ``copy_ids`` (C,) of a batch through at most ``depth`` noisy steps.

    Args:
      model: static; its ``noise_scale`` is the update noise.
      inputs, labels: (B, N) int32; mask: (B,) bool, False rows never run.
      seed, first_index: int32 scalars: the evaluation's seed and the split index of row 0
        (row ``r`` is puzzle ``first_index + r`` of `job_keys`).
      copy_ids: (C,) int32; ids >= ``num_copies`` (the overrun of a last, partial chunk) never run.
      depth: int32 scalar (traced); stop: `Stopping` (traced).
      window: consecutive changes below ``stop.tol`` that stop a row, and the length of the
        convergence score's window (0: the mean over all steps).
      trace_points: slots of the `ResidualTrace`.
    """
    b = inputs.shape[0]
    depth = jnp.asarray(depth, jnp.int32)
    x = model.embed(params, inputs)
    init_keys, noise_keys = batch_job_keys(seed, first_index, b, copy_ids)
    latents0 = init_rows(model, init_keys)
    readout = jax.vmap(lambda s: model.readout(params, s))
    init = LoopState(t=jnp.int32(0),
                     rows=fresh_rows(latents0, readout(latents0).logits, window),
                     running=mask[None, :] & (copy_ids < num_copies)[:, None],
                     trace=empty_trace(trace_points))

    def cond(s: LoopState):
        return (s.t < depth) & jnp.any(s.running)

    def body(s: LoopState) -> LoopState:
        new = step_rows(model, params, s.rows.latents, x, fold_step(noise_keys, s.t))
        out = readout(new)
        rows, halts, res = advance_rows(s.rows, new, out.logits, out.q_halt, s.running, stop,
                                        window)
        trace = record_trace(s.trace, s.t + 1, res, s.running & mask[None, :], depth)
        return LoopState(t=s.t + 1, rows=rows, running=s.running & ~halts, trace=trace)

    s = jax.lax.while_loop(cond, body, init)
    preds, n_correct, n_valid, exact = score_predictions(s.rows.logits, labels)
    return CopyResults(preds, n_correct, n_valid, exact, s.rows.steps,
                       convergence_score(s.rows, window), s.rows.residual, s.rows.q_halt,
                       s.trace, s.t)


# ----------------------------------------------------------------------------------------------
# The solver alternative


@functools.partial(jax.jit, static_argnames=("model", "solver", "depth", "tol", "history_size"))
def solve_copies(model: EqRModel, params, inputs, labels, mask, seed, first_index, copy_ids, *,
                 solver: str, depth: int, tol: float, history_size: int = 5) -> CopyResults:
    """Per-row solve of the noise-free map per copy (``depth`` = iteration cap, static).

    Every row (copy of a puzzle) converges, stops and (Anderson) mixes on its own
    (`dynamics.solve_rows`): it stops once the RMS per latent element of ``f(z) - z`` is at
    most ``tol``, and its ``steps`` are its own map evaluations. Keys, arguments and results as
    `evaluate_copies` (the solve has no residual trace: one unused slot).
    """
    c, b = copy_ids.shape[0], inputs.shape[0]
    x = model.embed(params, inputs)
    init_keys, _ = batch_job_keys(seed, first_index, b, copy_ids)
    latents0 = init_rows(model, init_keys)
    method = "anderson" if solver == "anderson" else "iteration"

    def solve(z):
        return dynamics.fixed_point(model.step, params, z, x, method=method, tol=tol,
                                    criterion="rms", maxiter=depth, implicit_diff=False,
                                    history_size=history_size)

    sol = jax.vmap(solve)(latents0)
    readout = jax.vmap(lambda z: model.readout(params, z))
    out = readout(sol.state)
    # One more noise-free step measures the per-row residual and logit change at the solution.
    nxt = jax.vmap(lambda z: model.step(params, z, x, None))(sol.state)
    res = latent_residual(nxt, sol.state)
    score = logit_change(readout(nxt).logits, out.logits)
    preds, n_correct, n_valid, exact = score_predictions(out.logits, labels)
    steps = (sol.iterations * mask[None, :]).astype(jnp.int32)
    return CopyResults(preds, n_correct, n_valid, exact, steps, score, res, out.q_halt,
                       empty_trace(1), jnp.max(steps))
