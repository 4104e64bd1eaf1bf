"""The jitted evaluation programs and the one key-derivation rule (docs/evaluation.md).

`evaluate_copies` runs ``C`` copies of a batch of ``B`` puzzles through the noisy step map in one
`lax.while_loop` whose carry (`LoopState`) holds only the current latents, logits and a few
per-row counters, so memory does not depend on the depth. The depth and the halting rule
(`Stopping`) are traced values: one compilation serves every depth and every rule. A row that
halted is frozen (state, logits and counters no longer change); padding rows never run; the loop
exits as soon as every row halted. `solve_copies` is the jaxopt alternative (Anderson or plain
fixed-point iteration of the noise-free map).

Randomness (`batch_key`, `copy_keys`): batch ``i`` of an evaluation uses
``fold_in(PRNGKey(seed), i)``; copy ``c`` of it draws its initial latents from
``fold_in(fold_in(key, 0), c)`` and its noise from ``fold_in(fold_in(key, 1), c)``, step ``t``
folding in ``t`` as `eqr_jax.dynamics.unroll` does. So a depth-16 run is the prefix of the
depth-64 one, breadth-8 copies are the first 8 of breadth-64, and results do not depend on how
copies are chunked into calls or rows sharded over devices.
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


def batch_key(seed: int, index: int) -> jax.Array:
    """The key of batch ``index`` of an evaluation with ``seed``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), index)


def copy_keys(key: jax.Array, copy_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(initial-latent keys, noise keys) of the copies ``copy_ids`` (C,) of a batch key."""
    fold = lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(copy_ids)
    return fold(jax.random.fold_in(key, 0)), fold(jax.random.fold_in(key, 1))


class ResidualTrace(NamedTuple):
    """Residual-vs-step record in ``K`` slots: the step stored in each slot (0: unused), and the
    sum and count of the latent residuals of the real rows still running at that step."""

    steps: jax.Array  # (K,) int32
    total: jax.Array  # (K,) float32
    rows: jax.Array  # (K,) int32


class LoopState(NamedTuple):
    """Carry of the evaluation loop; per-row fields are (C, B) for C copies of B puzzles."""

    t: jax.Array  # int32: steps taken by the loop
    latents: LatentState  # leaves (C, B, N, H)
    logits: jax.Array  # (C, B, N, V): each row's last read-out
    running: jax.Array  # bool: the row still updates
    steps: jax.Array  # int32: steps the row used
    calm_streak: jax.Array  # int32: consecutive steps with the change below tol
    recent_changes: jax.Array  # (C, B, W) float32 ring of the last W logit changes
    changes_seen: jax.Array  # int32: logit changes recorded in the ring
    residual: jax.Array  # float32: the row's last latent residual
    q_halt: jax.Array  # float32: the row's last halting logit
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


def _row_sq(a, b):
    """Per (copy, row) squared L2 distance for leaves (C, B, N, H): float32 (C, B)."""
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.sum(jnp.square(d), axis=(-2, -1))


def latent_residual(new: LatentState, old: LatentState) -> jax.Array:
    """‖S_new − S_old‖₂ over [z_H; z_L] per (copy, row): (C, B) float32."""
    return jnp.sqrt(sum(_row_sq(a, b) for a, b in zip(new, old)))


def logit_change(new: jax.Array, old: jax.Array) -> jax.Array:
    """Mean over tokens of the L2 (over vocab) change of the logits: (C, B) float32."""
    d = new.astype(jnp.float32) - old.astype(jnp.float32)
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(d), axis=-1)), axis=-1)


def score_predictions(logits, labels):
    """(preds (C, B, N), correct tokens (C, B), supervised tokens (B,), exact (C, B)) of the
    logits (C, B, N, V) of C copies against labels (B, N)."""
    preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    n_correct, n_valid, exact = jax.vmap(lambda lg: sequence_exact(lg, labels))(logits)
    return preds, n_correct, n_valid[0], exact


@functools.partial(jax.jit, static_argnames=("model", "window", "trace_points"))
def evaluate_copies(model: EqRModel, params, inputs, labels, mask, key, copy_ids, num_copies,
                    depth, stop: Stopping, *, window: int, trace_points: int) -> CopyResults:
    """Run copies ``copy_ids`` (C,) of a batch through at most ``depth`` noisy steps.

    Args:
      model: static; its ``noise_scale`` is the update noise.
      inputs, labels: (B, N) int32; mask: (B,) bool, False rows never run.
      key: the batch key (`batch_key`); copies derive theirs with `copy_keys`.
      copy_ids: (C,) int32; ids >= ``num_copies`` (the overrun of a last, partial chunk) never run.
      depth: int32 scalar (traced); stop: `Stopping` (traced).
      window: consecutive changes below ``stop.tol`` that stop a row, and the length of the
        convergence score's window (0: the mean over all steps).
      trace_points: slots of the `ResidualTrace`.
    """
    c, b = copy_ids.shape[0], inputs.shape[0]
    depth = jnp.asarray(depth, jnp.int32)
    x = model.embed(params, inputs)
    init_keys, noise_keys = copy_keys(key, copy_ids)
    latents0 = jax.vmap(lambda k: model.init_latents(k, b))(init_keys)
    readout = jax.vmap(lambda s: model.readout(params, s))
    numel = 2 * latents0.z_H.shape[-2] * latents0.z_H.shape[-1]
    w, k = max(window, 1), trace_points
    zeros_f, zeros_i = jnp.zeros((c, b), jnp.float32), jnp.zeros((c, b), jnp.int32)
    init = LoopState(
        t=jnp.int32(0), latents=latents0, logits=readout(latents0).logits,
        running=mask[None, :] & (copy_ids < num_copies)[:, None], steps=zeros_i,
        calm_streak=zeros_i, recent_changes=jnp.zeros((c, b, w), jnp.float32),
        changes_seen=zeros_i, residual=zeros_f, q_halt=zeros_f,
        trace=ResidualTrace(jnp.zeros((k,), jnp.int32), jnp.zeros((k,), jnp.float32),
                            jnp.zeros((k,), jnp.int32)))

    def cond(s: LoopState):
        return (s.t < depth) & jnp.any(s.running)

    def body(s: LoopState) -> LoopState:
        t1 = s.t + 1
        run = s.running
        step_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, s.t))(noise_keys)
        new = jax.vmap(lambda z, kk: model.step(params, z, x, kk))(s.latents, step_keys)
        out = readout(new)
        res = latent_residual(new, s.latents)
        dlogits = logit_change(out.logits, s.logits)
        keep = run[:, :, None, None]
        latents = LatentState(*(jnp.where(keep, n, o) for n, o in zip(new, s.latents)))
        logits = jnp.where(keep, out.logits, s.logits)
        # The convergence score: the last `window` logit changes (from step 2 on), in a ring.
        record = run & (t1 >= 2)
        if window > 0:
            slot = jnp.arange(w)[None, None, :] == (s.changes_seen % w)[..., None]
            ring = jnp.where(record[..., None] & slot, dlogits[..., None], s.recent_changes)
        else:
            ring = s.recent_changes + jnp.where(record, dlogits, 0.0)[..., None]
        calm = jnp.where(stop.watch_latents, res / math.sqrt(numel) < stop.tol,
                         (dlogits < stop.tol) & (t1 >= 2))
        streak = jnp.where(run, jnp.where(calm, s.calm_streak + 1, 0), s.calm_streak)
        halts = ((stop.on_q_halt & (out.q_halt > 0))
                 | (stop.on_convergence & (streak >= w)))
        real = run & mask[None, :]
        at = _trace_slot(t1, depth, k)
        trace = ResidualTrace(s.trace.steps.at[at].set(t1),
                              s.trace.total.at[at].set(jnp.sum(jnp.where(real, res, 0.0))),
                              s.trace.rows.at[at].set(jnp.sum(real.astype(jnp.int32))))
        return LoopState(t=t1, latents=latents, logits=logits, running=run & ~halts,
                         steps=s.steps + run.astype(jnp.int32), calm_streak=streak,
                         recent_changes=ring,
                         changes_seen=s.changes_seen + record.astype(jnp.int32),
                         residual=jnp.where(run, res, s.residual),
                         q_halt=jnp.where(run, out.q_halt, s.q_halt), trace=trace)

    s = jax.lax.while_loop(cond, body, init)
    if window > 0:
        score = jnp.sum(s.recent_changes, -1) / jnp.maximum(jnp.minimum(s.changes_seen, w), 1)
    else:
        score = s.recent_changes[..., 0] / jnp.maximum(s.changes_seen, 1)
    preds, n_correct, n_valid, exact = score_predictions(s.logits, labels)
    return CopyResults(preds, n_correct, n_valid, exact, s.steps, score, s.residual, s.q_halt,
                       s.trace, s.t)


@functools.partial(jax.jit, static_argnames=("model", "solver", "depth", "tol", "history_size"))
def solve_copies(model: EqRModel, params, inputs, labels, mask, key, copy_ids, *, solver: str,
                 depth: int, tol: float, history_size: int = 5) -> CopyResults:
    """jaxopt solve of the noise-free map per copy (``depth`` = iteration cap, static).

    ``tol`` is an RMS per latent element; jaxopt's criterion is the L2 norm over a copy's whole
    batch, so it is scaled by sqrt(#elements). Keys, arguments and results as `evaluate_copies`
    (the solve has no residual trace: one unused slot).
    """
    c, b = copy_ids.shape[0], inputs.shape[0]
    x = model.embed(params, inputs)
    init_keys, _ = copy_keys(key, copy_ids)
    latents0 = jax.vmap(lambda k: model.init_latents(k, b))(init_keys)
    numel = 2 * b * latents0.z_H.shape[-2] * latents0.z_H.shape[-1]
    method = "anderson" if solver == "anderson" else "iteration"

    def solve(z):
        return dynamics.fixed_point(model.step, params, z, x, method=method,
                                    tol=tol * math.sqrt(numel), maxiter=depth,
                                    implicit_diff=False, history_size=history_size)

    sol = jax.vmap(solve)(latents0)
    readout = jax.vmap(lambda z: model.readout(params, z))
    out = readout(sol.state)
    # One more noise-free step measures the per-row residual and logit change at the solution.
    nxt = jax.vmap(lambda z: model.step(params, z, x, None))(sol.state)
    res = latent_residual(nxt, sol.state)
    score = logit_change(readout(nxt).logits, out.logits)
    preds, n_correct, n_valid, exact = score_predictions(out.logits, labels)
    steps = (jnp.broadcast_to(sol.iterations[:, None], (c, b)) * mask[None, :]).astype(jnp.int32)
    empty = ResidualTrace(jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.float32),
                          jnp.zeros((1,), jnp.int32))
    return CopyResults(preds, n_correct, n_valid, exact, steps, score, res, out.q_halt, empty,
                       jnp.max(sol.iterations))
