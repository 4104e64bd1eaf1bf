"""Adaptive computation time (ACT) carry and one ACT step (docs/training.md, "ACT").

The carry lives across optimiser steps. Each `act_step`:

1. resets the rows that halted last time: fresh latents (`EqRModel.init_latents`), the new
   batch's row at the same index, steps = 0 (the other rows of the new batch are discarded);
2. advances the carried latents one supervision segment under the gradient's adjoint
   (`dynamics.advance`: ``unroll_steps`` noisy steps, or the implicit fixed point);
3. reads out logits and the halting logit;
4. steps += 1 and decides halting: at ``halt_max_steps`` always; in training also when
   ``q_halt > 0``, postponed by exploration (probability ``halt_exploration_prob`` a row draws a
   minimum of ``UniformInt{2..halt_max_steps}`` steps).

The returned carry is stop-gradient'ed: every ACT step is its own truncated backprop segment.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from eqr_jax import dynamics
from eqr_jax.model import EqRModel, LatentState, Readout

BATCH_KEYS = ("inputs", "labels", "puzzle_identifiers")


class ACTCarry(NamedTuple):
    """Latents (B, N, H) compute dtype; steps int32 (B,); halted bool (B,); the rows' data."""

    latents: LatentState
    steps: jax.Array
    halted: jax.Array
    batch: dict


def init_carry(model: EqRModel, batch: Mapping[str, Any]) -> ACTCarry:
    """An empty carry shaped like ``batch``: every row halted, so the first step resets all rows.

    The latents are zeros (never used: reset rows get fresh draws).
    """
    cfg = model.cfg
    b = batch["inputs"].shape[0]
    dt = jnp.bfloat16 if cfg.forward_dtype == "bfloat16" else jnp.float32
    shape = (b, cfg.seq_len, cfg.hidden_size)
    data = {k: jnp.zeros(jnp.shape(batch[k]), jnp.asarray(batch[k]).dtype) for k in BATCH_KEYS}
    return ACTCarry(LatentState(jnp.zeros(shape, dt), jnp.zeros(shape, dt)),
                    jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool), data)


def _rows(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    m = mask.reshape(mask.shape + (1,) * (new.ndim - 1))
    return jnp.where(m, new, old)


def reset_carry(model: EqRModel, carry: ACTCarry, batch: Mapping[str, Any],
                key: jax.Array) -> ACTCarry:
    """Rows with ``carry.halted`` take fresh latents and the new batch's row; steps -> 0."""
    reset = carry.halted
    fresh = model.init_latents(key, reset.shape[0])
    latents = jax.tree_util.tree_map(lambda f, o: _rows(reset, f.astype(o.dtype), o),
                                     fresh, carry.latents)
    data = {k: _rows(reset, jnp.asarray(batch[k]).astype(carry.batch[k].dtype), carry.batch[k])
            for k in BATCH_KEYS}
    steps = jnp.where(reset, 0, carry.steps)
    return ACTCarry(latents, steps, jnp.zeros_like(reset), data)


def halting(steps: jax.Array, q_halt: jax.Array, key: jax.Array | None, *, halt_max_steps: int,
            exploration_prob: float, training: bool) -> jax.Array:
    """Halting decision after ``steps`` (already incremented) ACT steps; bool (B,).

    Evaluation: only at ``halt_max_steps``. Training (with halt_max_steps > 1):
    ``(steps >= max or q_halt > 0) and steps >= min_steps``, where a row explores with
    probability ``exploration_prob`` and then needs ``min_steps ~ UniformInt{2..max}``.
    """
    halted = steps >= halt_max_steps
    if training and halt_max_steps > 1:
        k_explore, k_min = jax.random.split(key)
        explore = jax.random.uniform(k_explore, steps.shape) < exploration_prob
        min_steps = jnp.where(
            explore, jax.random.randint(k_min, steps.shape, 2, halt_max_steps + 1), 0)
        halted = (halted | (q_halt > 0)) & (steps >= min_steps)
    return halted


def act_step(model: EqRModel, params, carry: ACTCarry, batch: Mapping[str, Any], key: jax.Array,
             *, training: bool, adjoint: dynamics.Adjoint = dynamics.Truncated(),
             unroll_steps: int = 1, with_stats: bool = False,
             backward_probe: jax.Array | None = None):
    """One ACT step of the whole batch (pure; jit/scan/grad friendly).

    Args:
      model: the bound model (static).
      params: model parameters (gradient flows into them through this step only).
      carry: `ACTCarry` from the previous step (or `init_carry`).
      batch: dict with ``inputs`` (B, N) int, ``labels`` (B, N) int, ``puzzle_identifiers`` (B,).
      key: PRNG key of this step; split into reset / noise / exploration keys, each drawing
        per-row arrays, so rows, steps and updates all get different randomness.
      training: enables q-halting with exploration; evaluation halts only at halt_max_steps.
      adjoint: how gradient flows through the dynamics (`eqr_jax.dynamics`; `Truncated` is the
        reference's).
      unroll_steps: step-map applications per ACT step for the unrolled adjoints.
      with_stats: also return the implicit solve's per-row `dynamics.FixedPointResult` (None
        for the unrolled adjoints).
      backward_probe: implicit only: the zero probe (`dynamics.backward_probe`) whose cotangent
        is the backward solve's per-row statistics.
    Returns:
      (new carry with stop-gradient latents, `Readout` of the new state), and the solve's
      result third when ``with_stats``.
    """
    k_reset, k_noise, k_halt = jax.random.split(key, 3)
    carry = reset_carry(model, carry, batch, k_reset)
    x = model.embed(params, carry.batch["inputs"])
    # The carried latents are the implicit solve's initial guess: a warm start for rows that
    # continue, a fresh draw for rows just reset.
    state, solve = dynamics.segment(model.step, params, carry.latents, x, k_noise, unroll_steps,
                                    adjoint, probe=backward_probe)
    out = model.readout(params, state)
    steps = carry.steps + 1
    halted = halting(steps, jax.lax.stop_gradient(out.q_halt), k_halt,
                     halt_max_steps=model.cfg.halt_max_steps,
                     exploration_prob=model.cfg.halt_exploration_prob, training=training)
    new = ACTCarry(jax.tree_util.tree_map(jax.lax.stop_gradient, state), steps, halted,
                   carry.batch)
    if with_stats:
        return new, out, solve
    return new, out
