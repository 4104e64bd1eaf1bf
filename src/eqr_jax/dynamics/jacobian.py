"""Jacobian regularisation: a Hutchinson estimate of ||d step / d state||_F^2 per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import chex

from eqr_jax.dynamics.unrolled import _stop
from eqr_jax.model import LatentState


def jacobian_frobenius_sq(model, params, state: LatentState, x: jax.Array, *, key: jax.Array,
                          samples: int = 1) -> jax.Array:
    """Hutchinson estimate of ||d step / d state||_F^2 per row: (batch,) float32.

    The map is the noise-free ``model.step(params, state, x, None, truncate=False)`` with both
    latents as the state; for v ~ N(0, I), E ||v^T J||^2 = ||J||_F^2, averaged over ``samples``
    draws (one forward linearisation, ``samples`` vector-Jacobian products). ``state`` enters
    without gradient (the point where the Jacobian is measured); the estimate is differentiable
    in ``params`` and ``x``, so adding it to the loss (``train.jac_reg``, Bai, Koltun & Kolter
    2021) pushes the map towards a contraction there.

    Args:
      model: an `EqRModel`; params: its parameters.
      state: latents, leaves (batch, seq, hidden); x: input injection (batch, seq, hidden).
      key: PRNG key of the probe vectors; samples: probes per row (>= 1, static).
    """
    chex.assert_equal_shape([state.z_H, state.z_L, x])
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    z = _stop(state)
    _, vjp = jax.vjp(lambda s: model.step(params, s, x, None, truncate=False), z)

    def one(k):
        ks = jax.random.split(k, len(z))
        v = LatentState(*(jax.random.normal(kk, a.shape, jnp.float32).astype(a.dtype)
                          for kk, a in zip(ks, z)))
        (jtv,) = vjp(v)
        return sum(jnp.sum(jnp.square(a.astype(jnp.float32)), axis=(1, 2)) for a in jtv)

    return jnp.mean(jax.vmap(one)(jax.random.split(key, samples)), axis=0)
