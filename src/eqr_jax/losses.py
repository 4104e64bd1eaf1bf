"""Losses: stablemax cross-entropy, exactness, and the ACT loss of training with its metrics.

Stablemax and exactness are shared by training and evaluation; `loss_and_metrics` is the
objective of one optimiser step (one ACT step of the batch, docs/training.md, "Loss").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from eqr_jax import dynamics
from eqr_jax.act import ACTCarry, act_step
from eqr_jax.data.loader import IGNORE_LABEL_ID as IGNORE_LABEL
from eqr_jax.model import EqRModel


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


# ----------------------------------------------------------------------------------------------
# The ACT loss of training


def act_loss(logits: jax.Array, q_halt: jax.Array, labels: jax.Array,
             global_batch_size: int) -> tuple[jax.Array, dict]:
    """The ACT loss of one step from read-outs (docs/training.md, "Loss"); float32.

    Args:
      logits: (B, N, V); q_halt: (B,); labels: (B, N) with -100 for ignored tokens.
    Returns:
      (sum_b (lm_b + 0.5 * bce_b) / global_batch_size, parts) where lm_b is the per-row mean
      stablemax CE over valid tokens (divisor max(#valid, 1)) and bce_b the halting BCE against
      whole-sequence exactness; ``parts`` has per-row lm, bce, n_correct, n_valid, exact and the
      unscaled sum ``total``.
    """
    ce = stablemax_cross_entropy(logits, labels).astype(jnp.float32)
    n_correct, n_valid, exact = sequence_exact(logits, labels)
    lm = jnp.sum(ce, axis=-1) / jnp.maximum(n_valid, 1).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(q_halt.astype(jnp.float32),
                                             exact.astype(jnp.float32))
    total = jnp.sum(lm + 0.5 * bce)
    return total / global_batch_size, {"lm": lm, "bce": bce, "n_correct": n_correct,
                                       "n_valid": n_valid, "exact": exact, "total": total}


def loss_and_metrics(model: EqRModel, params, carry: ACTCarry, batch: Mapping[str, jax.Array],
                     key: jax.Array, *, adjoint: dynamics.Adjoint, unroll_steps: int = 1,
                     global_batch_size: int, training: bool = True, jac_reg: float = 0.0,
                     jac_reg_samples: int = 1, backward_probe: jax.Array | None = None):
    """One ACT step and its loss (docs/training.md, "Loss").

    loss = sum_rows (lm_b + 0.5 * BCE(q_halt_b, exact_b)) / global_batch_size, with
    lm_b = sum_t CE_bt / max(#valid_b, 1) (stablemax CE, float32). With ``jac_reg`` > 0 the
    loss adds jac_reg * sum_rows J_b / global_batch_size, J_b the Hutchinson estimate
    (`dynamics.jacobian_frobenius_sq`, ``jac_reg_samples`` probes) of ||df/dz||_F^2 / dim at
    the segment's output state (the fixed point for ``implicit``); its sum is the metric
    ``jac_fro``. The implicit mode adds the per-row solve's sums ``implicit_iters``,
    ``implicit_residual``, ``implicit_converged`` and the extremum ``max_implicit_iters``;
    ``backward_probe`` (`dynamics.backward_probe`) is handed to the implicit solve, whose
    backward statistics arrive as its cotangent (`loss_and_grad`).

    Returns:
      (loss, (new carry, metrics)): float32 metric *sums* over halted rows with labels
      (``count``, accuracies, ``steps``, q-halt precision/recall weighted by ``count``), loss sums
      and latent RMS over all rows, extrema ``min_steps``/``max_steps`` (inf/-inf when no row
      halted) and per-ACT-step vectors of length ``halt_max_steps``: ``steps_hist`` (halted rows
      by their step count) and ``residual_sum``/``residual_count`` (the L2 norm of the change of
      [z_H; z_L] this step, per row that continued from the previous step, binned by its step
      count; step 1 starts from fresh latents and is not binned). `eqr_jax.metrics` turns
      sums of them into logged scalars.
    """
    # A key of its own, so that turning the regulariser on leaves the step's noise, resets and
    # exploration (drawn from `key`) exactly as they were.
    k_jac = jax.random.fold_in(key, 0x7AC0) if jac_reg > 0 else None
    new_carry, out, solve = act_step(model, params, carry, batch, key, training=training,
                                     adjoint=adjoint, unroll_steps=unroll_steps, with_stats=True,
                                     backward_probe=backward_probe)
    labels = new_carry.batch["labels"]
    loss, parts = act_loss(out.logits, out.q_halt, labels, global_batch_size)
    metrics = act_metrics(model.cfg.halt_max_steps, carry, new_carry, out.q_halt, parts)
    if jac_reg > 0:
        lat = new_carry.latents
        x = model.embed(params, new_carry.batch["inputs"])
        dim = 2 * lat.z_H.shape[1] * lat.z_H.shape[2]
        jac = dynamics.jacobian_frobenius_sq(model, params, lat, x, key=k_jac,
                                             samples=jac_reg_samples) / dim
        loss = loss + jac_reg * jnp.sum(jac) / global_batch_size
        metrics["jac_fro"] = jax.lax.stop_gradient(jnp.sum(jac)).astype(jnp.float32)
    if solve is not None:
        f32 = jnp.float32
        metrics["implicit_iters"] = jnp.sum(solve.iterations).astype(f32)
        metrics["implicit_residual"] = jnp.sum(solve.residual).astype(f32)
        metrics["implicit_converged"] = jnp.sum(solve.converged).astype(f32)
        metrics["max_implicit_iters"] = jnp.max(solve.iterations).astype(f32)
    return loss, (new_carry, metrics)


def loss_and_grad(model: EqRModel, *, adjoint: dynamics.Adjoint, **kw) -> Callable:
    """``fn(params, carry, batch, key) -> ((loss, (carry, metrics)), grads)``: the value and
    parameter gradient of `loss_and_metrics` (``kw``: its keyword arguments), like
    ``jax.value_and_grad(..., has_aux=True)``.

    Under `dynamics.Implicit` it also differentiates with respect to a zero
    `dynamics.backward_probe`, whose cotangent is the per-row residual, iteration count and
    fallback flag of the backward linear solve that produced ``grads`` (a custom VJP cannot
    return them otherwise), and adds their sums ``implicit_backward_residual``,
    ``implicit_backward_iters`` and ``implicit_backward_fallback`` and the extremum
    ``max_implicit_backward_residual`` to the metrics: the statistics of the very solve behind
    the update, at no extra cost.
    """
    loss_fn = functools.partial(loss_and_metrics, model, adjoint=adjoint, **kw)
    if not isinstance(adjoint, dynamics.Implicit):
        return jax.value_and_grad(loss_fn, has_aux=True)

    def with_probe(params, probe, carry, batch, key):
        return loss_fn(params, carry, batch, key, backward_probe=probe)

    grad = jax.value_and_grad(with_probe, argnums=(0, 1), has_aux=True)

    def fn(params, carry, batch, key):
        probe = dynamics.backward_probe(carry.latents.z_H.shape[0])
        (loss, (new_carry, metrics)), (grads, stats) = grad(params, probe, carry, batch, key)
        metrics = dict(metrics, **backward_metrics(stats))
        return (loss, (new_carry, metrics)), grads
    return fn


def backward_metrics(stats: jax.Array) -> dict[str, jax.Array]:
    """Metric sums of the backward solve's per-row statistics (batch, 3) (the probe's cotangent,
    columns `dynamics.BACKWARD_STATS`)."""
    residual, iters, fallback = stats[:, 0], stats[:, 1], stats[:, 2]
    return {"implicit_backward_residual": jnp.sum(residual),
            "implicit_backward_iters": jnp.sum(iters),
            "implicit_backward_fallback": jnp.sum(fallback),
            "max_implicit_backward_residual": jnp.max(residual)}


def act_metrics(halt_max_steps: int, carry: ACTCarry, new_carry: ACTCarry, q_halt: jax.Array,
                  parts: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Metric sums and extrema of one ACT step (no gradient flows through them)."""
    parts = jax.lax.stop_gradient(dict(parts))
    n_correct, n_valid, exact, lm, bce, total = (
        parts[k] for k in ("n_correct", "n_valid", "exact", "lm", "bce", "total"))
    f32 = jnp.float32
    divisor = jnp.maximum(n_valid, 1).astype(f32)
    q = jax.lax.stop_gradient(q_halt).astype(f32)
    valid = new_carry.halted & (n_valid > 0)
    count = jnp.sum(valid).astype(f32)
    f = lambda a: jnp.sum(jnp.where(valid, a, 0).astype(f32))
    # q-halt precision / recall as the reference: batch-wide ratios over all rows (note the
    # reference's denominator #(q >= 0) beside the numerator's q > 0), weighted by count.
    hit = jnp.sum((q > 0) & exact).astype(f32)
    precision = hit / jnp.maximum(jnp.sum(q >= 0).astype(f32), 1.0)
    recall = hit / jnp.maximum(jnp.sum(exact).astype(f32), 1.0)
    steps = new_carry.steps
    steps_f = steps.astype(f32)
    bins = jnp.arange(1, halt_max_steps + 1)
    onehot = (steps[:, None] == bins[None, :])  # (B, halt_max_steps)
    steps_hist = jnp.sum(onehot & valid[:, None], axis=0).astype(f32)

    def rms(z):  # per row, float32
        zf = z.astype(f32)
        return jnp.sqrt(jnp.mean(jnp.square(zf), axis=tuple(range(1, zf.ndim))))

    def sq_change(a, b):
        d = a.astype(f32) - b.astype(f32)
        return jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)))

    new_lat, old_lat = new_carry.latents, carry.latents
    residual = jnp.sqrt(sq_change(new_lat.z_H, old_lat.z_H) + sq_change(new_lat.z_L, old_lat.z_L))
    continued = ~carry.halted  # rows not reset this step: their previous latents are `carry`'s
    binned = onehot & continued[:, None]
    return {
        "count": count,
        "accuracy": f(n_correct / divisor),
        "exact_accuracy": f(exact),
        "q_halt_accuracy": f((q > 0) == exact),
        "q_halt_precision": count * precision,
        "q_halt_recall": count * recall,
        "steps": f(steps_f),
        "min_steps": jnp.min(jnp.where(valid, steps_f, jnp.inf)),
        "max_steps": jnp.max(jnp.where(valid, steps_f, -jnp.inf)),
        "steps_hist": steps_hist,
        "zH_rms": jnp.sum(rms(new_lat.z_H)),
        "zL_rms": jnp.sum(rms(new_lat.z_L)),
        "residual_sum": jnp.sum(jnp.where(binned, residual[:, None], 0.0), axis=0),
        "residual_count": jnp.sum(binned, axis=0).astype(f32),
        "lm_loss": jnp.sum(lm).astype(f32),
        "q_halt_loss": jnp.sum(bce).astype(f32),
        "total_loss": total.astype(f32),
    }


def implicit_gradient_check(model: EqRModel, points: Sequence[tuple[Any, ACTCarry]],
                            batch: Mapping[str, Any], key: jax.Array, train_cfg, *,
                            rows: int = 4, exact_tol: float = 1e-6,
                            exact_iters: int = 2000) -> list[dict[str, float]]:
    """How close a run's implicit gradient is to the exact implicit gradient, on a few rows.

    At each ``(params, carry)`` of ``points``, on the first ``rows`` rows of the carry and
    ``batch`` (leading axis), one ACT step's training loss (``train_cfg``: a `TrainConfig` with
    ``grad_mode="implicit"``) is differentiated twice at the same forward fixed point: with the
    run's backward settings, and with the backward solved by GMRES to ``exact_tol`` (at most
    ``exact_iters`` Krylov vectors), the reference, since a dense Jacobian is out of reach at
    real sizes. Returns per point ``cos_vs_exact`` and both solves' mean residual and iterations
    per row (``backward_residual``, ``backward_iters``, ``exact_residual``, ``exact_iters``: the
    reference is only as exact as its residual). Two compilations in all.
    """
    adj = dynamics.adjoint_for(train_cfg)
    if not isinstance(adj, dynamics.Implicit):
        raise ValueError(f"implicit_gradient_check needs grad_mode=implicit, got "
                         f"{train_cfg.grad_mode!r}")
    # The same rule for unconverged rows: the check measures the backward solve, not the rule.
    exact = dataclasses.replace(adj, backward="gmres", backward_tol=exact_tol,
                                backward_iters=exact_iters, backward_restart=50)
    sub = lambda tree: jax.tree_util.tree_map(lambda a: a[:rows], tree)
    batch = sub(dict(batch))
    n = batch["inputs"].shape[0]
    kw = dict(unroll_steps=train_cfg.unroll_steps, global_batch_size=n,
              jac_reg=train_cfg.jac_reg, jac_reg_samples=train_cfg.jac_reg_samples)
    fns = {name: jax.jit(loss_and_grad(model, adjoint=a, **kw))
           for name, a in (("backward", adj), ("exact", exact))}
    flat = lambda g: jnp.concatenate([jnp.ravel(x).astype(jnp.float32)
                                      for x in jax.tree_util.tree_leaves(g)])
    results = []
    for params, carry in points:
        out, grads = {}, []
        for name, fn in fns.items():
            (_, (_, m)), g = fn(params, sub(carry), batch, key)
            out[f"{name}_residual"] = float(m["implicit_backward_residual"]) / n
            out[f"{name}_iters"] = float(m["implicit_backward_iters"]) / n
            grads.append(flat(g))
        a, b = grads
        out["cos_vs_exact"] = float(a @ b / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b),
                                                        1e-30))
        results.append(out)
    return results
