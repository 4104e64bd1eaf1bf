"""Stablemax cross-entropy and the exactness helpers shared by training and evaluation (spec §4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_LABEL = -100


def _loss_dtype():
    # float64 as the reference when x64 is enabled; float32 otherwise (~1e-7 relative difference).
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def stablemax_log_probs(logits: jax.Array) -> jax.Array:
    """log of stablemax: s(x) = 1/(1 - x) for x < 0 else x + 1, normalised over the last axis."""
    x = logits.astype(_loss_dtype())
    # Each branch sees its argument confined to its own domain. `where` differentiates both
    # branches, so the unused 1/(1 - x) at x = 1 (exactly representable, and common in bf16)
    # would give 0 * inf = NaN in the gradient. The confinement is itself a `where` with a
    # constant in the other domain: jnp.minimum/maximum would split the gradient 50/50 at the
    # tie x = 0 and halve it there.
    is_neg = x < 0
    neg = jnp.where(is_neg, x, 0.0)
    pos = jnp.where(is_neg, 0.0, x)
    s = jnp.where(is_neg, 1.0 / (1.0 - neg + 1e-30), pos + 1.0)
    return jnp.log(s / jnp.sum(s, axis=-1, keepdims=True))


def stablemax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Token-wise stablemax CE.

    Args:
      logits: (batch, seq, vocab) any float dtype.
      labels: (batch, seq) int, `IGNORE_LABEL` marks unsupervised positions.
    Returns:
      (batch, seq) losses (float64 under x64, else float32), exactly 0 at ignored positions.
    """
    mask = labels != IGNORE_LABEL
    logp = stablemax_log_probs(logits)
    picked = jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, -picked, 0.0)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Token-wise softmax CE in float32 with the same masking as `stablemax_cross_entropy`."""
    mask = labels != IGNORE_LABEL
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, -picked, 0.0)


def sequence_exact(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row correctness from logits (batch, seq, vocab) and labels (batch, seq).

    Returns (correct tokens (batch,) int32, supervised tokens (batch,) int32, exact (batch,) bool);
    a row with no supervised token (padding) is never exact.
    """
    mask = labels != IGNORE_LABEL
    preds = jnp.argmax(logits, axis=-1)
    n_correct = jnp.sum(mask & (preds == labels), axis=-1)
    n_valid = jnp.sum(mask, axis=-1)
    return n_correct, n_valid, (n_correct == n_valid) & (n_valid > 0)
