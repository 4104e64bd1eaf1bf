"""Training metrics: combining the per-step sums of `eqr_jax.losses.act_metrics` on device, and
turning fetched sums into the scalars and histograms training logs (docs/training.md, "Signals").
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Metric sums divided by `count` (halted rows with labels) when logged.
SUM_KEYS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "q_halt_precision",
            "q_halt_recall", "steps")
# Sums over all rows, divided by the global batch (and the number of steps) when logged.
LOSS_KEYS = ("lm_loss", "q_halt_loss", "total_loss")
LATENT_KEYS = ("zH_rms", "zL_rms")
# Present only with train.jac_reg > 0 (jac_fro) or grad_mode=implicit (implicit_*): sums over
# all rows, logged as per-row means like the losses.
SOLVER_KEYS = ("jac_fro", "implicit_iters", "implicit_residual", "implicit_converged",
               "implicit_backward_residual", "implicit_backward_iters",
               "implicit_backward_fallback")


def _reducer(key: str) -> Callable:
    """How a metric combines over steps: extrema for ``min_*``/``max_*``, sums otherwise."""
    if key.startswith("min_"):
        return jnp.minimum
    if key.startswith("max_"):
        return jnp.maximum
    return jnp.add


def merge_metrics(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> dict:
    """Combine the metric sums/extrema of two stretches of steps (same keys)."""
    return {k: _reducer(k)(a[k], b[k]) for k in a}


def neutral_metrics(metrics: Mapping[str, jax.Array]) -> dict:
    """Metrics of a step that did not count (the identity of `merge_metrics`)."""
    fill = lambda k, v: jnp.full_like(v, jnp.inf if k.startswith("min_") else
                                      -jnp.inf if k.startswith("max_") else 0)
    return {k: fill(k, v) for k, v in metrics.items()}


def reduce_steps(key: str, v: jax.Array) -> jax.Array:
    """Combine a metric's per-step values (leading axis) as `merge_metrics` combines two."""
    if key.startswith("min_"):
        return jnp.min(v, axis=0)
    if key.startswith("max_"):
        return jnp.max(v, axis=0)
    return jnp.sum(v, axis=0)


def train_scalars(sums: Mapping[str, Any], global_batch_size: int) -> dict[str, float]:
    """Loggable scalars from fetched metric sums of one or more steps, as the reference logs them.

    Losses and latent RMS are divided by ``global_batch_size x num_steps``; accuracies, q-halt
    precision/recall and mean steps by ``count`` (halted rows), and dropped when no row halted;
    ``min_steps``/``max_steps`` are the extrema; `SOLVER_KEYS` are per-row means like the
    losses (``train/implicit_converged``: the fraction of rows whose implicit solve converged)
    (``train/implicit_backward_residual`` / ``_iters``: the backward linear solve's mean relative
    residual and iterations per row; ``_fallback``: the fraction of rows whose backward returned
    a non-finite solution and took the one-step gradient) and ``max_implicit_iters`` /
    ``max_implicit_backward_residual`` the extrema; ``train/residual/act_step_{s}`` is the mean change
    norm of [z_H; z_L] at ACT step s (rows that continued into step s), ``train/residual_mean``
    its mean over all binned rows; ``grad_norm`` is the mean over steps.
    """
    s = {k: np.asarray(v, np.float64) for k, v in sums.items() if not k.startswith("nonfinite_")}
    n = max(float(s.get("num_steps", 1.0)), 1.0)
    denom = global_batch_size * n
    out = {f"train/{k}": float(s[k]) / denom for k in LOSS_KEYS + LATENT_KEYS + SOLVER_KEYS
           if k in s}
    for k in ("max_implicit_iters", "max_implicit_backward_residual"):
        if k in s:
            out[f"train/{k}"] = float(s[k])
    count = float(s.get("count", 0.0))
    if count > 0:
        for k in SUM_KEYS:
            if k != "count" and k in s:
                out[f"train/{k}"] = float(s[k]) / count
        for k in ("min_steps", "max_steps"):
            if k in s:
                out[f"train/{k}"] = float(s[k])
    out["train/count"] = count / n
    out["train/grad_norm"] = float(s.get("grad_norm", 0.0)) / n
    if "residual_sum" in s:
        rs, rc = s["residual_sum"], s["residual_count"]
        for i in np.flatnonzero(rc > 0):
            out[f"train/residual/act_step_{i + 1:02d}"] = float(rs[i] / rc[i])
        if rc.sum() > 0:
            out["train/residual_mean"] = float(rs.sum() / rc.sum())
    return out


def train_histograms(sums: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Histogram counts from fetched metric sums: ``train/steps_at_halt`` (halted rows by their
    ACT step count; bin i is step i + 1)."""
    return {"train/steps_at_halt": np.asarray(sums["steps_hist"], np.float64)} \
        if "steps_hist" in sums else {}
