"""Per-step records of many initialisations per puzzle: the trace the landscape analysis reads.

`trace_trajectories` runs ``copies`` random initialisations of every puzzle in a batch for
``depth`` steps of an `Evaluator`'s model (its test-time noise, its keys: copy ``c`` of puzzle
``first_index + r`` exactly as `Evaluator.evaluate_batch` draws it, so the trajectories are the
ones ``eqr eval --halt fixed`` scores) and records per step and row the latent residual, the logit
change, the halting logit and whether the decoded grid is right, plus the full state at a few
*snapshot* depths and, for one puzzle, a subsampled latent path. The evaluation loop keeps O(1)
memory in depth and so cannot give these per-step series; the quantities are computed by the
evaluation core's own functions (`eqr_jax.evaluation.core`), so they are measured the same way.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax.evaluation import core
from eqr_jax.model import EqRModel, LatentState


class Trajectories(NamedTuple):
    """Per-step records of ``C`` copies of ``B`` puzzles over ``T`` steps (NumPy).

    Step ``t`` (1-based, index ``t - 1``) compares the state after ``t`` steps with the one before
    (the initial latents for ``t = 1``):

    * ``residual`` (T, C, B): ‖S_t − S_{t−1}‖₂ over [z_H; z_L] (as in `evaluation.BatchResult`);
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


@functools.partial(jax.jit, static_argnames=("model", "depth", "snapshots", "path_stride"))
def _trace_core(model: EqRModel, params, inputs, labels, seed, first_index, copy_ids, path_row,
                *, depth: int, snapshots: tuple[int, ...], path_stride: int):
    c, b = copy_ids.shape[0], inputs.shape[0]
    x = model.embed(params, inputs)
    init_keys, noise_keys = core.batch_job_keys(seed, first_index, b, copy_ids)
    state0 = core.init_rows(model, init_keys)
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
        # With noise_scale 0 the update adds no noise whatever the key: the noise-free map.
        new = core.step_rows(model, params, state, x, core.fold_step(noise_keys, t))
        ro = readout(new)
        res = core.latent_residual(new, state)
        dl = core.logit_change(ro.logits, logits)
        preds, _, _, exact = core.score_predictions(ro.logits, labels)
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


def trace_trajectories(evaluator, params, inputs, labels, first_index: int = 0, *, copies: int,
                       depth: int, snapshots: Sequence[int] | None = None,
                       path_row: int | None = None, path_points: int = 128) -> Trajectories:
    """Run ``copies`` initialisations of each puzzle for ``depth`` steps, recording every step.

    Args:
      evaluator: an `eqr_jax.evaluation.Evaluator`: its model with its test-time noise
        (``EvalConfig(noise_scale=0.0)`` runs the noise-free map); params: the parameters.
      inputs, labels: (B, N) token ids; labels use `IGNORE_LABEL` for unsupervised tokens.
      first_index: the split index of row 0: copy ``c`` of row ``r`` draws its initial latents
        and noise from `eqr_jax.evaluation.job_keys` of (``first_index + r``, ``c``) with the
        evaluator's seed, as `Evaluator.evaluate_batch` does, so its ``halt="fixed"`` results
        are these.
      copies: initialisations per puzzle.
      depth: steps (static: one compilation per depth).
      snapshots: increasing depths in [1, depth] at which full states are kept (default: depth).
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
    out = jax.device_get(_trace_core(evaluator.model, params, inputs, labels,
                                     jnp.int32(evaluator.cfg.seed), jnp.int32(first_index),
                                     jnp.arange(copies, dtype=jnp.int32),
                                     jnp.int32(path_row or 0), depth=depth, snapshots=snaps,
                                     path_stride=stride))
    path = steps = None
    if stride:
        path = np.asarray(out["path"])
        steps = np.arange(path.shape[0]) * stride
    return Trajectories(residual=np.asarray(out["residual"]),
                        logit_change=np.asarray(out["logit_change"]),
                        q_halt=np.asarray(out["q_halt"]), exact=np.asarray(out["exact"], bool),
                        snapshot_depths=np.asarray(snaps), states=LatentState(*out["states"]),
                        preds=np.asarray(out["preds"]), path=path, path_steps=steps)
