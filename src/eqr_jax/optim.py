"""Optimisers, learning-rate schedule and parameter EMA for training (docs/training.md,
"Optimiser").

* `adam_atan2`: the AdamATan2 rule of the reference (``adam-atan2`` 0.0.3) as an optax
  `GradientTransformation`: decoupled weight decay first (with the current learning rate),
  Adam moments, then ``p <- p - (lr / bc1) * atan2(m, sqrt(v) / sqrt(bc2))``; no epsilon.
* `make_schedule`: linear warm-up then cosine to ``lr_min_ratio``, as a function of the
  **1-based** optimiser step ``s`` (the reference evaluates it after incrementing the step).
* `make_optimizer`: the configured optimiser (AdamATan2 or AdamW), optional global-norm
  clipping, with the schedule injected per step.
* `ema_init` / `ema_update`: shadow parameters, ``shadow <- (1 - mu) p + mu shadow``.

Optax convention: the learning-rate argument of the transforms is a function of the 0-based
update ``count`` (updates already applied); `make_optimizer` passes ``count + 1`` to the
1-based schedule so the first update uses ``schedule(1)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eqr_jax.config import TrainConfig

Schedule = Callable[[Any], jax.Array]


class AdamATan2State(NamedTuple):
    """Update count (int32 scalar), first and second moments (float32, shaped as the params)."""

    count: jax.Array
    mu: Any
    nu: Any


def adam_atan2(learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.95,
               weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamATan2 as the reference computes it (docs/training.md); the returned *updates* are
    added with `optax.apply_updates`.

    Per parameter p with gradient g, with t the 1-based update index and lr = learning_rate(t-1):
        bc1 = 1 - b1**t, bc2 = 1 - b2**t
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g**2
        update = -lr * wd * p - (lr / bc1) * atan2(m, sqrt(v) / sqrt(bc2))
    i.e. ``p_new = p (1 - lr wd) - (lr / bc1) atan2(...)`` (weight decay uses the pre-step p).

    Args:
      learning_rate: a float or a function of the 0-based update count.
      b1, b2: moment decay rates.
      weight_decay: decoupled weight decay (applied to every parameter, no exclusions).
    """

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
        return AdamATan2State(jnp.zeros((), jnp.int32), jax.tree_util.tree_map(zeros, params),
                              jax.tree_util.tree_map(zeros, params))

    def update_fn(updates, state, params=None):
        if params is None and weight_decay:
            raise ValueError("adam_atan2 with weight decay needs params in update()")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        t = state.count + 1
        tf = t.astype(jnp.float32)
        bc1 = 1.0 - jnp.power(jnp.float32(b1), tf)
        bc2 = 1.0 - jnp.power(jnp.float32(b2), tf)
        step_size = lr / bc1
        sqrt_bc2 = jnp.sqrt(bc2)

        mu = jax.tree_util.tree_map(
            lambda m, g: m + (1.0 - b1) * (g.astype(jnp.float32) - m), state.mu, updates)
        nu = jax.tree_util.tree_map(
            lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates)

        def leaf(m, v, p):
            u = -step_size * jnp.arctan2(m, jnp.sqrt(v) / sqrt_bc2)
            if weight_decay:
                u = u - (lr * weight_decay) * p.astype(jnp.float32)
            return u.astype(p.dtype if p is not None else jnp.float32)

        params_or_mu = params if params is not None else mu
        new_updates = jax.tree_util.tree_map(leaf, mu, nu, params_or_mu)
        return new_updates, AdamATan2State(t, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def make_schedule(train: TrainConfig, total_steps: int) -> Schedule:
    """Learning rate as a function of the 1-based optimiser step ``s`` (docs/training.md).

    ``s < W``: ``lr * s / W``; afterwards ``lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)`` with
    ``p = (s - W) / max(1, T - W)``, ``W = lr_warmup_steps``, ``T = total_steps``,
    ``r = lr_min_ratio``. Built from optax schedules (`optax.join_schedules`).
    """
    base, warm = float(train.lr), int(round(train.lr_warmup_steps))
    r = float(train.lr_min_ratio)
    decay = max(1, int(total_steps) - warm)
    cosine = optax.cosine_decay_schedule(init_value=base, decay_steps=decay, alpha=r)
    if warm <= 0:
        return cosine
    # base * s / W directly (optax.linear_schedule's 1 - s/W form loses ~1e-5 relative at s = 1).
    warmup = lambda s: base * jnp.asarray(s, jnp.float32) / warm
    return optax.join_schedules([warmup, cosine], boundaries=[warm])


def make_optimizer(train: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                   Schedule]:
    """The configured optimiser and its 1-based schedule.

    ``train.optimizer``: ``adam_atan2`` (reference) or ``adamw`` (optax, eps 1e-8); betas,
    weight decay from the config; ``grad_clip_norm > 0`` prepends global-norm clipping.
    """
    schedule = make_schedule(train, total_steps)
    lr_of_count = lambda count: schedule(count + 1)
    if train.optimizer == "adam_atan2":
        opt = adam_atan2(lr_of_count, train.beta1, train.beta2, train.weight_decay)
    elif train.optimizer == "adamw":
        opt = optax.adamw(lr_of_count, b1=train.beta1, b2=train.beta2, eps=1e-8,
                          weight_decay=train.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {train.optimizer!r}")
    if train.grad_clip_norm and train.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), opt)
    return opt, schedule


def ema_init(params):
    """Shadow parameters: a float32 copy of the initial parameters (no warm-up)."""
    # A real copy: the shadow must not share buffers with the (donated) parameters.
    return jax.tree_util.tree_map(lambda p: jnp.array(p, jnp.float32, copy=True), params)


def ema_update(ema, params, rate: float):
    """``shadow <- (1 - rate) * param + rate * shadow`` (after every optimiser step)."""
    return jax.tree_util.tree_map(
        lambda e, p: (1.0 - rate) * p.astype(jnp.float32) + rate * e, ema, params)
