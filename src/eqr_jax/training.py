"""Training: the Optax loop with ACT deep supervision, EMA, Orbax checkpoints and data parallelism.

Structure (after nanodo's ``train.py``): a thin host loop around one jitted function
`make_train_step` that runs ``steps_per_call`` optimiser steps with `lax.scan`, takes the
`TrainState` donated, and returns metric *sums* that stay on device until log time. The next
call is dispatched before the previous metrics are fetched. Batches and the ACT carry are
sharded along the ``data`` axis of a `jax.sharding.Mesh`; parameters, optimiser state and EMA
are replicated. The same code runs on one CPU, one GPU or a multi-host slice.

    eqr train --preset tiny                         # builds small data if missing, trains on CPU
    eqr train --preset sudoku --dry-run             # the plan only: ... total_steps: 50000
    eqr train --preset sudoku --data DIR train.lr=3e-4 --resume

Each step's loss and gradient norm are checked on device: from the first non-finite one the call
freezes the state, and the host raises `NonFiniteError` before anything after it is saved.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eqr_jax import config as config_lib
from eqr_jax import dynamics, losses, optim
from eqr_jax.act import ACTCarry, BATCH_KEYS, act_step, init_carry
from eqr_jax.config import RunConfig
from eqr_jax.model import EqRModel

DATA_AXIS = "data"
# Metric sums divided by `count` (halted rows with labels) when logged.
SUM_KEYS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "q_halt_precision",
            "q_halt_recall", "steps")
# Sums over all rows, divided by the global batch (and the number of steps) when logged.
LOSS_KEYS = ("lm_loss", "q_halt_loss", "total_loss")
LATENT_KEYS = ("zH_rms", "zL_rms")


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; donated to the train step)."""

    params: Any
    opt_state: Any
    ema: Any  # None when EMA is off
    step: jax.Array  # int32 scalar: optimiser steps done
    rng: jax.Array  # base PRNG key (uint32[2]); step s uses fold_in(rng, s)
    carry: ACTCarry


# ----------------------------------------------------------------------------------------------
# Loss and the jitted step


def act_loss(logits: jax.Array, q_halt: jax.Array, labels: jax.Array,
             global_batch_size: int) -> tuple[jax.Array, dict]:
    """The ACT loss of one step (spec §4.2) from read-outs; float32.

    Args:
      logits: (B, N, V); q_halt: (B,); labels: (B, N) with -100 for ignored tokens.
    Returns:
      (sum_b (lm_b + 0.5 * bce_b) / global_batch_size, parts) where lm_b is the per-row mean
      stablemax CE over valid tokens (divisor max(#valid, 1)) and bce_b the halting BCE against
      whole-sequence exactness; ``parts`` has per-row lm, bce, n_correct, n_valid, exact and the
      unscaled sum ``total``.
    """
    ce = losses.stablemax_cross_entropy(logits, labels).astype(jnp.float32)
    n_correct, n_valid, exact = losses.sequence_exact(logits, labels)
    lm = jnp.sum(ce, axis=-1) / jnp.maximum(n_valid, 1).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(q_halt.astype(jnp.float32),
                                             exact.astype(jnp.float32))
    total = jnp.sum(lm + 0.5 * bce)
    return total / global_batch_size, {"lm": lm, "bce": bce, "n_correct": n_correct,
                                       "n_valid": n_valid, "exact": exact, "total": total}


def loss_and_metrics(model: EqRModel, params, carry: ACTCarry, batch: Mapping[str, jax.Array],
                     key: jax.Array, *, train_cfg, global_batch_size: int, training: bool = True):
    """One ACT step and its loss (spec §4.2).

    loss = sum_rows (lm_b + 0.5 * BCE(q_halt_b, exact_b)) / global_batch_size, with
    lm_b = sum_t CE_bt / max(#valid_b, 1) (stablemax CE, float32).

    Returns:
      (loss, (new carry, metrics)): float32 metric *sums* over halted rows with labels
      (``count``, accuracies, ``steps``, q-halt precision/recall weighted by ``count``), loss sums
      and latent RMS over all rows, extrema ``min_steps``/``max_steps`` (inf/-inf when no row
      halted) and per-ACT-step vectors of length ``halt_max_steps``: ``steps_hist`` (halted rows
      by their step count) and ``residual_sum``/``residual_count`` (the L2 norm of the change of
      [z_H; z_L] this step, per row that continued from the previous step, binned by its step
      count; step 1 starts from fresh latents and is not binned). See `summarize`.
    """
    new_carry, out = act_step(
        model, params, carry, batch, key, training=training, grad_mode=train_cfg.grad_mode,
        unroll_steps=train_cfg.unroll_steps, remat=train_cfg.remat,
        implicit_maxiter=train_cfg.implicit_maxiter, implicit_tol=train_cfg.implicit_tol)
    labels = new_carry.batch["labels"]
    loss, parts = act_loss(out.logits, out.q_halt, labels, global_batch_size)
    metrics = _step_metrics(model.cfg.halt_max_steps, carry, new_carry, out.q_halt, parts)
    return loss, (new_carry, metrics)


def _step_metrics(halt_max_steps: int, carry: ACTCarry, new_carry: ACTCarry, q_halt: jax.Array,
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


def _neutral(metrics: Mapping[str, jax.Array]) -> dict:
    """Metrics of a step that did not count (identity of `merge_metrics`)."""
    fill = lambda k, v: jnp.full_like(v, jnp.inf if k.startswith("min_") else
                                      -jnp.inf if k.startswith("max_") else 0)
    return {k: fill(k, v) for k, v in metrics.items()}


# Codes of the quantities the non-finite guard watches (bit flags in ``nonfinite_what``).
NONFINITE_QUANTITIES = {1: "loss", 2: "gradient norm"}


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient norm (the message names step and quantity)."""


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices with axis ``data``.

    Room for model parallelism: add an ``fsdp``/``model`` axis here and give the parameter
    shardings in `state_shardings` a non-trivial spec.
    """
    devs = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
    return Mesh(devs, (DATA_AXIS,))


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """Replicated params/optimiser/EMA/step/rng; carry sharded on its batch axis."""
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA_AXIS))
    rep = lambda tree: jax.tree_util.tree_map(lambda _: repl, tree)
    return TrainState(rep(state.params), rep(state.opt_state), rep(state.ema), repl, repl,
                      jax.tree_util.tree_map(lambda _: data, state.carry))


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    return NamedSharding(mesh, P(None, DATA_AXIS) if stacked else P(DATA_AXIS))


def example_batch(cfg: RunConfig) -> dict[str, np.ndarray]:
    """Zeros shaped like one global batch (for shapes of the carry)."""
    G, N = cfg.data.global_batch_size, cfg.model.seq_len
    return {"inputs": np.zeros((G, N), np.int32), "labels": np.zeros((G, N), np.int32),
            "puzzle_identifiers": np.zeros((G,), np.int32)}


def init_state(model: EqRModel, cfg: RunConfig, optimizer: optax.GradientTransformation,
               batch_example: Mapping[str, Any]) -> TrainState:
    """Fresh state (pure; jit it with ``out_shardings``): params from ``seed``, EMA = params."""
    key = jax.random.PRNGKey(cfg.train.seed)
    k_params, k_run = jax.random.split(key)
    params = model.init(k_params)
    ema = optim.ema_init(params) if cfg.train.ema else None
    return TrainState(params, optimizer.init(params), ema, jnp.zeros((), jnp.int32), k_run,
                      init_carry(model, batch_example))


def make_train_step(model: EqRModel, cfg: RunConfig, optimizer: optax.GradientTransformation,
                    *, mesh: Mesh | None = None, state_sharding: TrainState | None = None,
                    steps_per_call: int | None = None) -> Callable:
    """Jitted ``fn(state, batches) -> (state, metrics)``.

    ``batches``: dict of arrays with a leading axis of length ``steps_per_call`` (default
    ``cfg.train.steps_per_call``) over which `lax.scan` runs that many optimiser steps. The state
    is donated. ``metrics`` holds the per-step metrics of `loss_and_metrics` combined over the
    steps (`merge_metrics`), ``grad_norm`` (summed), ``num_steps``, and the non-finite guard's
    record: ``nonfinite_step`` (int32: the 1-based step whose loss or gradient norm was not
    finite, 0 if none) and ``nonfinite_what`` (int32 bit flags, `NONFINITE_QUANTITIES`). From
    such a step on the call leaves the state as it was before it (params, optimiser, EMA, carry
    and step counter frozen), so the returned state is always the last finite one.
    With ``mesh``/``state_sharding`` the function has explicit in/out shardings.
    """
    tc = cfg.train
    G = cfg.data.global_batch_size
    n_steps = int(steps_per_call or tc.steps_per_call)
    grad_fn = jax.value_and_grad(
        functools.partial(loss_and_metrics, model, train_cfg=tc, global_batch_size=G),
        has_aux=True)

    def one(state: TrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, (carry, metrics)), grads = grad_fn(state.params, state.carry, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optim.ema_update(state.ema, params, tc.ema_rate) if state.ema is not None else None
        grad_norm = optax.tree.norm(grads).astype(jnp.float32)
        metrics["grad_norm"] = grad_norm
        metrics["num_steps"] = jnp.float32(1)
        what = (jnp.where(jnp.isfinite(loss), 0, 1)
                + jnp.where(jnp.isfinite(grad_norm), 0, 2)).astype(jnp.int32)
        return TrainState(params, opt_state, ema, state.step + 1, state.rng, carry), metrics, what

    def guarded(carry, batch):
        state, first_bad, first_what = carry
        new, metrics, what = one(state, batch)
        live = first_bad == 0
        take = live & (what == 0)
        # A select, not lax.cond: both sides exist anyway and XLA fuses the select into the
        # update; after a bad step nothing changes, so the bad state can never be saved.
        state = jax.tree_util.tree_map(lambda n, o: jnp.where(take, n, o), new, state)
        metrics = jax.tree_util.tree_map(lambda m, z: jnp.where(take, m, z), metrics,
                                         _neutral(metrics))
        bad_now = live & (what != 0)
        first_bad = jnp.where(bad_now, new.step, first_bad)
        first_what = jnp.where(bad_now, what, first_what)
        return (state, first_bad, first_what), metrics

    def many(state: TrainState, batches):
        zero = jnp.zeros((), jnp.int32)
        (state, first_bad, first_what), ms = jax.lax.scan(
            guarded, (state, zero, zero), batches, length=n_steps)
        out = {k: _reduce_axis0(k, v) for k, v in ms.items()}
        out["nonfinite_step"] = first_bad
        out["nonfinite_what"] = first_what
        return state, out

    if mesh is None:
        return jax.jit(many, donate_argnums=0)
    repl = NamedSharding(mesh, P())
    return jax.jit(many, in_shardings=(state_sharding, batch_sharding(mesh, stacked=True)),
                   out_shardings=(state_sharding, repl), donate_argnums=0)


def _reduce_axis0(key: str, v: jax.Array) -> jax.Array:
    if key.startswith("min_"):
        return jnp.min(v, axis=0)
    if key.startswith("max_"):
        return jnp.max(v, axis=0)
    return jnp.sum(v, axis=0)


def make_eval_step(model: EqRModel, depth: int, *, mesh: Mesh | None = None) -> Callable:
    """Jitted ``fn(params, batch, key) -> sums``: every row runs exactly ``depth`` ACT steps from
    fresh latents (evaluation mode, noise on, no halting) and is scored on its last read-out.

    Sums over rows with ``mask`` and labels: count, exact, token correct/total, q-halt accuracy.
    """
    def fn(params, batch, key):
        k_init, k_noise = jax.random.split(key)
        inputs, labels = batch["inputs"], batch["labels"]
        state = model.init_state(k_init, inputs.shape[0])
        x = model.embed(params, inputs)
        state, _ = dynamics.unroll(model.step, params, state, x, k_noise, depth, grad="none")
        out = model.readout(params, state)
        n_correct, n_valid, exact = losses.sequence_exact(out.logits, labels)
        valid = batch["mask"] & (n_valid > 0)
        f = lambda a: jnp.sum(jnp.where(valid, a, 0).astype(jnp.float32))
        return {"count": f(jnp.ones_like(n_valid)), "exact": f(exact),
                "token_correct": f(n_correct), "token_total": f(n_valid),
                "q_halt_accuracy": f((out.q_halt > 0) == exact)}

    if mesh is None:
        return jax.jit(fn)
    repl = NamedSharding(mesh, P())
    return jax.jit(fn, in_shardings=(repl, batch_sharding(mesh), repl), out_shardings=repl)


# ----------------------------------------------------------------------------------------------
# Host helpers


def to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Process-local numpy rows -> global jax.Arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def stack_batches(batches: list[Mapping[str, np.ndarray]]) -> dict:
    return {k: np.stack([b[k] for b in batches]) for k in BATCH_KEYS}


def summarize(sums: Mapping[str, Any], global_batch_size: int) -> dict[str, float]:
    """Loggable scalars from fetched metric sums of one or more steps, as the reference logs them.

    Losses and latent RMS are divided by ``global_batch_size x num_steps``; accuracies, q-halt
    precision/recall and mean steps by ``count`` (halted rows), and dropped when no row halted;
    ``min_steps``/``max_steps`` are the extrema; ``train/residual/act_step_{s}`` is the mean change
    norm of [z_H; z_L] at ACT step s (rows that continued into step s), ``train/residual_mean``
    its mean over all binned rows; ``grad_norm`` is the mean over steps.
    """
    s = {k: np.asarray(v, np.float64) for k, v in sums.items() if not k.startswith("nonfinite_")}
    n = max(float(s.get("num_steps", 1.0)), 1.0)
    denom = global_batch_size * n
    out = {f"train/{k}": float(s[k]) / denom for k in LOSS_KEYS + LATENT_KEYS if k in s}
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


def histograms(sums: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Histogram counts from fetched metric sums: ``train/steps_at_halt`` (halted rows by their
    ACT step count; bin i is step i + 1)."""
    return {"train/steps_at_halt": np.asarray(sums["steps_hist"], np.float64)} \
        if "steps_hist" in sums else {}


def evaluate(eval_fn: Callable, params, loader_factory: Callable[[], Any], sharding, key,
             max_batches: int = 0) -> dict[str, float]:
    """Run ``eval_fn`` over the test split; returns eval/exact_accuracy, eval/accuracy, ..."""
    total = None
    for i, batch in enumerate(loader_factory()):
        if max_batches and i >= max_batches:
            break
        b = {k: batch[k] for k in BATCH_KEYS + ("mask",)}
        m = eval_fn(params, to_global(b, sharding), jax.random.fold_in(key, i))
        total = m if total is None else jax.tree_util.tree_map(jnp.add, total, m)
    if total is None:
        return {}
    t = {k: float(v) for k, v in jax.device_get(total).items()}
    c = max(t["count"], 1.0)
    return {"eval/exact_accuracy": t["exact"] / c,
            "eval/accuracy": t["token_correct"] / max(t["token_total"], 1.0),
            "eval/q_halt_accuracy": t["q_halt_accuracy"] / c, "eval/count": t["count"]}


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched multi-process (coordinator env set)."""
    if any(os.environ.get(v) for v in ("JAX_COORDINATOR_ADDRESS", "EQR_DISTRIBUTED")):
        jax.distributed.initialize()


def data_build_command(cfg: RunConfig) -> str:
    """The `eqr data` command that builds ``data.path`` from the ``data.build_*`` options."""
    d = cfg.data
    if d.build_kind == "maze":
        return (f"eqr data maze --out {d.path} --grid {d.build_size} --train {d.build_train} "
                f"--test {d.build_test} --num-aug {d.build_num_aug} --seed {d.build_seed}")
    test = "" if (d.build_source == "hub" and d.build_test == 0) else f" --test {d.build_test}"
    extra = "" if d.build_source == "hub" else f" --size {d.build_size} --difficulty {d.build_difficulty}"
    return (f"eqr data sudoku --out {d.path} --source {d.build_source}{extra} "
            f"--train {d.build_train}{test} --num-aug {d.build_num_aug} --seed {d.build_seed}")


def ensure_dataset(cfg: RunConfig, progress: bool = True) -> None:
    """Build the dataset with the ``data.build_*`` options when ``data.path`` does not exist.

    ``build_kind=maze``: Maze-Unique (`build_maze_dataset`); ``build_kind=sudoku`` with
    ``build_source=hub``: Sudoku-Extreme from the hub, built as the reference builds it (raises
    `HubUnavailableError` naming the offline command when the hub cannot be reached);
    ``build_source=generate``: the project's generator, never into a folder named like
    Sudoku-Extreme.
    """
    path = Path(cfg.data.path)
    if path.exists():
        return
    from eqr_jax.data import build as build_lib
    d = cfg.data
    if d.build_kind == "sudoku" and d.build_source == "generate":
        build_lib.check_generated_name(path)
    if jax.process_index() != 0:
        return
    if d.build_kind == "maze":
        print(f"[eqr] building {d.build_size}x{d.build_size} Maze-Unique data in {path} ...",
              flush=True)
        build_lib.build_maze_dataset(str(path), grid=d.build_size, train=d.build_train,
                                     test=d.build_test, seed=d.build_seed,
                                     num_aug=d.build_num_aug, progress=progress)
    elif d.build_source == "hub":
        print(f"[eqr] building Sudoku-Extreme (hub, reference recipe) in {path} ...", flush=True)
        from eqr_jax.data.importers import HubUnavailableError
        try:
            build_lib.build_sudoku_dataset(
                str(path), size=9, train=d.build_train, test=d.build_test or None,
                num_aug=d.build_num_aug, seed=d.build_seed, source="hub", progress=progress)
        except HubUnavailableError as e:
            csv_cmd = data_build_command(cfg).replace("--source hub", "--source csv DIR")
            raise HubUnavailableError(
                f"{path} does not exist and cannot be built: {e}\n"
                f"Offline: put train.csv and test.csv of the hub dataset in a folder DIR and run\n"
                f"  {csv_cmd}\nthen train again (or pass --data PATH to a built dataset)") from None
    else:
        print(f"[eqr] building {d.build_size}x{d.build_size} Sudoku data (generated) in {path} ...",
              flush=True)
        build_lib.build_sudoku_dataset(str(path), size=d.build_size, train=d.build_train,
                                       test=d.build_test, num_aug=d.build_num_aug,
                                       seed=d.build_seed, difficulty=d.build_difficulty,
                                       progress=progress)


def _default_loaders(cfg: RunConfig):
    from eqr_jax.data.loader import EvalLoader, TrainLoader
    d = cfg.data
    pi, pc = jax.process_index(), jax.process_count()
    train_loader = TrainLoader(d.path, d.global_batch_size, cfg.train.seed,
                               epochs_per_iter=cfg.train.epochs_per_iter or cfg.train.epochs,
                               process_index=pi, process_count=pc, prefetch=d.prefetch)
    eval_bs = d.eval_batch_size or d.global_batch_size
    eval_factory = lambda: EvalLoader(d.path, eval_bs, process_index=pi, process_count=pc)
    return train_loader, eval_factory


def _check_data(cfg: RunConfig) -> None:
    from eqr_jax.data.format import dataset_info
    info = dataset_info(cfg.data.path)
    for key in ("seq_len", "vocab_size"):
        if int(info[key]) != getattr(cfg.model, key):
            raise config_lib.ConfigError(
                f"model.{key}={getattr(cfg.model, key)} does not match the data in "
                f"{cfg.data.path} ({key}={info[key]}); set model.{key}={info[key]}")


def total_steps_for(cfg: RunConfig, steps_per_epoch: int) -> int:
    """epochs x steps_per_epoch, capped by ``train.max_steps`` when it is set."""
    total = cfg.train.epochs * int(steps_per_epoch)
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def _flops_per_step(cfg: RunConfig) -> tuple[int, str]:
    """Matmul FLOPs of one optimiser step (loss + gradient over the global batch) and a note."""
    from eqr_jax import flops
    m, tc = cfg.model, cfg.train
    per_recursion = (m.L_cycles + 1) * m.L_layers
    if m.variant == "feedforward" or tc.grad_mode in ("one_step",):
        fwd, grad, note = tc.unroll_steps, m.blocks_per_step, ""
    elif tc.grad_mode == "full":
        fwd, grad, note = tc.unroll_steps, tc.unroll_steps * m.blocks_per_step, ""
    elif tc.grad_mode == "implicit":
        fwd, grad = tc.implicit_maxiter, m.blocks_per_step
        note = f" (upper bound: {tc.implicit_maxiter} solver iterations; backward solve not counted)"
    else:  # truncated: only the last latent recursion of the last step is on the tape
        fwd, grad, note = tc.unroll_steps, per_recursion if m.H_cycles > 1 else m.blocks_per_step, ""
    return flops.train_step_flops(m, cfg.data.global_batch_size, grad, fwd), note


def plan(cfg: RunConfig, mesh: Mesh | None = None) -> dict[str, Any]:
    """What `train` would do with ``cfg``, without building data, compiling or writing anything.

    Reads the training split's metadata when ``data.path`` exists (and checks it against the
    model), else the counts the ``data.build_*`` recipe would produce. Returns a dict with the
    parameter count, FLOPs per optimiser step, data counts, steps per epoch, total steps and the
    evaluation / checkpoint schedule; `format_plan` prints it.
    """
    from eqr_jax.data.loader import steps_per_epoch as spe_of
    d, tc, G = cfg.data, cfg.train, cfg.data.global_batch_size
    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    if G % n_dev:
        raise config_lib.ConfigError(
            f"data.global_batch_size={G} is not divisible by the {n_dev} devices of the mesh")
    out: dict[str, Any] = {"preset": cfg.preset, "data_path": d.path}
    if Path(d.path).exists():
        from eqr_jax.data.format import DataFormatError, dataset_info
        _check_data(cfg)
        meta = dataset_info(d.path, "train")
        try:
            test_examples = dataset_info(d.path, "test").total_samples
        except DataFormatError:
            test_examples = None
        out.update(data_status="present", total_groups=int(meta.total_groups),
                   mean_puzzle_examples=float(meta.mean_puzzle_examples),
                   train_examples=meta.total_samples, test_examples=test_examples)
    else:
        per_group = 1 + d.build_num_aug
        test = (None if (d.build_kind == "sudoku" and d.build_source == "hub" and not d.build_test)
                else d.build_test)
        out.update(data_status=f"missing; built on first `eqr train` by: {data_build_command(cfg)}",
                   total_groups=d.build_train, mean_puzzle_examples=1.0,
                   train_examples=d.build_train * per_group, test_examples=test)
    spe = spe_of({"total_groups": out["total_groups"],
                  "mean_puzzle_examples": out["mean_puzzle_examples"]}, G)
    total = total_steps_for(cfg, spe)
    model = EqRModel(cfg.model)
    from eqr_jax.model import num_params
    n_params = num_params(jax.eval_shape(model.init, jax.random.PRNGKey(0)))
    step_flops, flops_note = _flops_per_step(cfg)
    epi = tc.epochs_per_iter or tc.epochs
    evals = (total // tc.eval_every if tc.eval_every > 0 else 0)
    final_eval = total > 0 and (tc.eval_every <= 0 or total % tc.eval_every != 0)
    ckpts = (total // tc.checkpoint_every if tc.checkpoint_every > 0 else 0)
    final_ckpt = total > 0 and (tc.checkpoint_every <= 0 or total % tc.checkpoint_every != 0)
    devs = list(mesh.devices.reshape(-1))
    out.update(
        parameters=n_params, flops_per_step=step_flops, flops_note=flops_note,
        global_batch_size=G, steps_per_epoch=spe, epochs=tc.epochs, epochs_per_iter=epi,
        loader_passes=-(-tc.epochs // epi) if epi else 0,
        steps_uncapped=tc.epochs * spe, max_steps=tc.max_steps, total_steps=total,
        eval_every=tc.eval_every, evaluations=evals + int(final_eval),
        eval_depth=cfg.model.halt_max_steps,
        eval_batch_size=d.eval_batch_size or G,
        checkpoint_every=tc.checkpoint_every, checkpoints=ckpts + int(final_ckpt),
        keep_checkpoints=tc.keep_checkpoints, log_every=tc.log_every,
        steps_per_call=tc.steps_per_call, out_dir=tc.out_dir,
        devices=f"{n_dev} x {devs[0].platform} ({devs[0].device_kind})",
        processes=jax.process_count(), batch_per_device=G // n_dev)
    return out


def format_plan(p: Mapping[str, Any]) -> str:
    """Human-readable plan of `plan`; the last line is ``total_steps: N``."""
    m = p
    test = "all rows of the source" if m["test_examples"] is None else f"{m['test_examples']:,}"
    cap = (f" (capped by train.max_steps={m['max_steps']:,} from {m['steps_uncapped']:,})"
           if m["max_steps"] and m["max_steps"] < m["steps_uncapped"] else "")
    def sched(every: int, n: int) -> str:
        if every <= 0:
            return f"at the end only ({n} in all)"
        last = "" if m["total_steps"] % every == 0 else ", plus one at the end"
        return f"every {every:,} steps{last} ({n} in all)"

    ev = sched(m["eval_every"], m["evaluations"])
    ck = sched(m["checkpoint_every"], m["checkpoints"])
    lines = [
        f"preset: {m['preset']}",
        f"data: {m['data_path']} ({m['data_status']})",
        f"train examples: {m['train_examples']:,} in {m['total_groups']:,} groups "
        f"(mean puzzle examples {m['mean_puzzle_examples']:g}); test examples: {test}",
        f"parameters: {m['parameters']:,}",
        f"FLOPs per optimiser step: {m['flops_per_step']:.4g} (matmuls, global batch "
        f"{m['global_batch_size']}){m['flops_note']}",
        f"steps per epoch: {m['steps_per_epoch']:,} (max(floor(groups x mean puzzle examples / "
        f"batch), 1))",
        f"epochs: {m['epochs']:,} in {m['loader_passes']:,} loader pass(es) of "
        f"{m['epochs_per_iter']:,} epochs",
        f"total optimiser steps: {m['total_steps']:,}{cap}, {m['steps_per_call']} per jitted call",
        f"evaluation: {ev}, depth {m['eval_depth']}, batch {m['eval_batch_size']}, "
        f"EMA weights",
        f"checkpoints: {ck}, keep the newest {m['keep_checkpoints']} + best, in "
        f"{m['out_dir']}/checkpoints",
        f"logging: every {m['log_every']} steps to {m['out_dir']}/tb",
        f"devices: {m['devices']}, {m['processes']} process(es), {m['batch_per_device']} rows "
        f"per device",
        f"total_steps: {m['total_steps']}",
    ]
    return "\n".join(lines)


def _fetch_nonfinite(statuses: list) -> tuple[int, int] | None:
    """The first (step, quantity flags) recorded by the guard in ``statuses``, or None."""
    for st in statuses:
        bad, what = (int(v) for v in jax.device_get(st))
        if bad:
            return bad, what
    return None


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None,
          loaders: tuple[Any, Callable[[], Any]] | None = None, progress: bool = True,
          mesh: Mesh | None = None, verbose: bool = True) -> dict:
    """Train ``cfg``; returns the final metrics (train means, eval on the test split, timing).

    Args:
      cfg: resolved run config; ``cfg.train.out_dir`` receives config.json, tb/, checkpoints/.
      resume: continue from the latest checkpoint in ``out_dir/checkpoints`` (exact resume).
      stop_after: stop (and checkpoint) after this many optimiser steps in this invocation.
      loaders: optional ``(train_loader, eval_loader_factory)`` replacing the data module's
        (train loader: iterator of numpy batch dicts with ``state()``/``restore()``/
        ``steps_per_epoch``; factory: returns an iterable of batches with ``mask``).
      progress: tqdm progress bar on the console.
      mesh: device mesh (default: all devices on the ``data`` axis).
      verbose: without a progress bar, print a line per log interval and the results table.

    Raises:
      NonFiniteError: a step's loss or gradient norm was not finite. Nothing from that step on
        is saved (the guard freezes the state inside the jitted call and every save checks it
        first), so ``resume=True`` continues from the last good checkpoint.
    """
    from eqr_jax.checkpoint import Checkpointer

    t_start = time.time()
    tc, G = cfg.train, cfg.data.global_batch_size
    is_main = jax.process_index() == 0
    out_dir = Path(tc.out_dir)
    if loaders is None:
        ensure_dataset(cfg, progress=progress)
        _check_data(cfg)
        loaders = _default_loaders(cfg)
    train_loader, eval_factory = loaders
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        config_lib.save(cfg, str(out_dir / "config.json"))

    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    if G % n_dev:
        raise config_lib.ConfigError(
            f"data.global_batch_size={G} is not divisible by the {n_dev} devices of the mesh")
    steps_per_epoch = int(getattr(train_loader, "steps_per_epoch", 1) or 1)
    total_steps = total_steps_for(cfg, steps_per_epoch)

    model = EqRModel(cfg.model)
    optimizer, schedule = optim.make_optimizer(tc, total_steps)
    example = example_batch(cfg)
    abstract = jax.eval_shape(functools.partial(init_state, model, cfg, optimizer), example)
    shardings = state_shardings(abstract, mesh)
    ckpt = Checkpointer(out_dir / "checkpoints", keep=tc.keep_checkpoints)
    loader_state = None
    if resume and ckpt.latest_step() is not None:
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state, loader_state, _ = ckpt.restore(target, cfg)
        train_loader.restore(loader_state)
        print(f"[eqr] resumed from step {int(state.step)} in {ckpt.directory}", flush=True)
    else:
        state = jax.jit(functools.partial(init_state, model, cfg, optimizer),
                        out_shardings=shardings)(example)
    step = int(jax.device_get(state.step))
    start_step = step

    step_fn = lambda n: _cached_train_step(_compute_key(cfg), total_steps, n, mesh)
    eval_fn = _cached_eval_step(model, cfg.model.halt_max_steps, mesh)
    data_sharding = batch_sharding(mesh)
    stacked_sharding = batch_sharding(mesh, stacked=True)
    eval_key = jax.random.PRNGKey(cfg.eval.seed)

    writer = None
    if is_main:
        try:
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(str(out_dir / "tb"))
        except ImportError:  # pragma: no cover
            writer = None
    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.preset}",
                   dynamic_ncols=True, smoothing=0.1)

    def write(scalars: Mapping[str, float], at: int, hists: Mapping[str, np.ndarray] = {}):
        if writer is None:
            return
        for k, v in scalars.items():
            writer.add_scalar(k, v, at)
        for k, counts in hists.items():
            if counts.sum() > 0:
                vals = np.arange(1, len(counts) + 1, dtype=np.float64)
                nz = np.flatnonzero(counts)
                writer.add_histogram_raw(
                    k, min=float(vals[nz[0]]), max=float(vals[nz[-1]]), num=int(counts.sum()),
                    sum=float((vals * counts).sum()), sum_squares=float((vals ** 2 * counts).sum()),
                    bucket_limits=(vals + 0.5).tolist(), bucket_counts=counts.tolist(),
                    global_step=at)
        writer.flush()

    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    acc = None  # device metric sums since the last log
    pending = None  # (step, sums, wall time, steps, guard records) fetched after the next dispatch
    unchecked: list = []  # guard records (nonfinite_step, nonfinite_what) not yet in `pending`
    t_log, step_log = time.time(), step
    last_saved = step if resume else -1
    n_steps_this_run = 0
    limit = total_steps if stop_after is None else min(total_steps, step + int(stop_after))
    merge = jax.jit(merge_metrics)

    def raise_if_nonfinite(statuses):
        found = _fetch_nonfinite(statuses)
        if found is None:
            return
        at, what = found
        names = " and ".join(v for k, v in NONFINITE_QUANTITIES.items() if what & k)
        latest = ckpt.latest_step()
        where = (f"the newest checkpoint is step {latest} in {ckpt.directory}; `--resume` "
                 f"continues from it" if latest is not None else "no checkpoint was written")
        raise NonFiniteError(
            f"non-finite {names} at step {at}: training stopped, nothing from step {at} on was "
            f"saved ({where}; consider a lower train.lr or float32 compute)")

    def flush_pending():
        nonlocal pending, last_train
        if pending is None:
            return
        at, sums, dt, nst, statuses = pending
        pending = None
        raise_if_nonfinite(statuses)
        fetched = jax.device_get(sums)
        scalars = summarize(fetched, G)
        if not all(math.isfinite(v) for v in scalars.values()):
            raise NonFiniteError(f"non-finite training metrics at step {at}: {scalars}")
        scalars["train/lr"] = float(schedule(at))
        scalars["train/epoch"] = (at - 1) // steps_per_epoch
        scalars["train/step_time_s"] = dt / max(nst, 1)
        scalars["train/puzzles_per_s"] = G * nst / max(dt, 1e-9)
        last_train = scalars
        write(scalars, at, histograms(fetched))
        if bar is None and is_main and verbose:
            print(f"[eqr] step {at}: " + " ".join(
                f"{k.split('/')[1]}={scalars[k]:.4g}" for k in
                ("train/total_loss", "train/accuracy", "train/exact_accuracy", "train/steps",
                 "train/lr", "train/puzzles_per_s") if k in scalars), flush=True)
        if bar is not None:
            bar.set_postfix(loss=f"{scalars.get('train/total_loss', 0):.3f}",
                            acc=f"{scalars.get('train/accuracy', 0):.3f}",
                            exact=f"{scalars.get('train/exact_accuracy', 0):.3f}",
                            steps=f"{scalars.get('train/steps', 0):.1f}", refresh=False)

    def check_all():
        """Every guard record so far: before anything is saved or evaluated."""
        nonlocal unchecked
        flush_pending()
        raise_if_nonfinite(unchecked)
        unchecked = []

    def run_eval(at: int) -> dict[str, float]:
        nonlocal last_eval, last_eval_step
        last_eval_step = at
        params = state.ema if state.ema is not None else state.params
        res = evaluate(eval_fn, params, eval_factory, data_sharding,
                       jax.random.fold_in(eval_key, at), cfg.eval.max_batches)
        last_eval = res
        write(res, at)
        if res and is_main and (bar is not None or verbose):
            (bar.write if bar is not None else print)(f"[eqr] step {at}: eval exact {res['eval/exact_accuracy']:.4f} "
                      f"token acc {res['eval/accuracy']:.4f}")
        return res

    def save(at: int, metrics=None):
        nonlocal last_saved
        check_all()
        ckpt.save(at, state, loader_state=loader_state, cfg=cfg, metrics=metrics)
        last_saved = at

    def crossed(every: int, before: int, after: int) -> bool:
        return every > 0 and after // every > before // every

    interrupted = False
    try:
        try:
            while step < limit:
                n = min(max(1, tc.steps_per_call), limit - step)
                host = stack_batches([next(train_loader) for _ in range(n)])
                loader_state = train_loader.state() if hasattr(train_loader, "state") else None
                batches = to_global(host, stacked_sharding)
                state, sums = step_fn(n)(state, batches)  # async dispatch
                unchecked.append((sums.pop("nonfinite_step"), sums.pop("nonfinite_what")))
                flush_pending()  # previous log's metrics, fetched after the next step is queued
                acc = sums if acc is None else merge(acc, sums)
                before, step = step, step + n
                n_steps_this_run += n
                if bar is not None:
                    bar.update(n)
                if crossed(tc.log_every, before, step) or step >= limit:
                    now = time.time()
                    pending = (step, acc, now - t_log, step - step_log, unchecked)
                    acc, t_log, step_log, unchecked = None, now, step, []
                eval_now = crossed(tc.eval_every, before, step)
                if eval_now:
                    check_all()
                    run_eval(step)
                if crossed(tc.checkpoint_every, before, step):
                    save(step, last_eval if eval_now else None)
            check_all()
        except KeyboardInterrupt:
            interrupted = True
            if bar is not None:
                bar.write("[eqr] interrupted: saving a checkpoint before exiting")
        if bar is not None:
            bar.close()
            bar = None
        finished = not interrupted and step >= total_steps
        final_eval = last_eval
        if finished and last_eval_step != step:
            check_all()
            final_eval = run_eval(step)
        if step > start_step and (step != last_saved or (finished and last_eval_step == step)):
            save(step, final_eval if last_eval_step == step else None)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()
        if hasattr(train_loader, "close"):
            train_loader.close()
    elapsed = time.time() - t_start
    result = {"step": step, "total_steps": total_steps, "time_s": elapsed,
              "steps_this_run": n_steps_this_run, "interrupted": interrupted,
              **last_train, **final_eval}
    if is_main and (progress or verbose):
        print(results_table(cfg, result), flush=True)
    if interrupted:
        raise KeyboardInterrupt
    return result


def _compute_key(cfg: RunConfig) -> RunConfig:
    """The config without bookkeeping fields, as a cache key for compiled steps."""
    import dataclasses
    return dataclasses.replace(cfg, preset="", train=dataclasses.replace(
        cfg.train, out_dir="", log_every=0, eval_every=0, checkpoint_every=0),
        data=dataclasses.replace(cfg.data, path=""))


@functools.lru_cache(maxsize=16)
def _cached_train_step(cfg: RunConfig, total_steps: int, n: int, mesh: Mesh):
    # Compiled steps are reused by later `train` calls in the same process (resume, tests).
    model = EqRModel(cfg.model)
    optimizer, _ = optim.make_optimizer(cfg.train, total_steps)
    abstract = jax.eval_shape(functools.partial(init_state, model, cfg, optimizer),
                              example_batch(cfg))
    return make_train_step(model, cfg, optimizer, mesh=mesh,
                           state_sharding=state_shardings(abstract, mesh), steps_per_call=n)


@functools.lru_cache(maxsize=16)
def _cached_eval_step(model: EqRModel, depth: int, mesh: Mesh):
    return make_eval_step(model, depth, mesh=mesh)


def results_table(cfg: RunConfig, r: Mapping[str, Any]) -> str:
    """A short markdown results table of a run."""
    rows = [("preset", cfg.preset), ("steps", f"{r['step']} / {r['total_steps']}"),
            ("test exact accuracy", _pct(r.get("eval/exact_accuracy"))),
            ("test token accuracy", _pct(r.get("eval/accuracy"))),
            ("test puzzles", f"{int(r.get('eval/count', 0))}"),
            ("train exact accuracy (halted rows)", _pct(r.get("train/exact_accuracy"))),
            ("train loss", f"{r.get('train/total_loss', float('nan')):.4f}"),
            ("wall time", f"{r['time_s']:.1f} s")]
    w = max(len(a) for a, _ in rows)
    lines = [f"| {'metric':<{w}} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {a:<{w}} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eqr train", description="Train EqR (presets: " + ", ".join(config_lib.PRESETS) + ")")
    p.add_argument("--preset", default="tiny", choices=sorted(config_lib.PRESETS))
    p.add_argument("--data", help="dataset directory (built with data.build_* if missing)")
    p.add_argument("--out", help="run directory (config, TensorBoard logs, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, FLOPs, data, steps, schedule, devices) and "
                        "exit without building data, training or writing anything")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_lib.apply_overrides(config_lib.preset(args.preset), args.overrides)
        extra = []
        if args.data:
            extra.append(f"data.path={args.data}")
        if args.out:
            extra.append(f"train.out_dir={args.out}")
        cfg = config_lib.apply_overrides(cfg, extra)
    except config_lib.ConfigError as e:
        print(f"eqr train: {e}", file=sys.stderr)
        return 2
    maybe_initialize_distributed()
    from eqr_jax.data.format import DataFormatError
    from eqr_jax.data.importers import HubUnavailableError
    try:
        if args.dry_run:
            print(format_plan(plan(cfg)), flush=True)
            return 0
        train(cfg, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("[eqr] stopped; resume with --resume", file=sys.stderr)
        return 130
    except config_lib.ConfigError as e:
        print(f"eqr train: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, HubUnavailableError, DataFormatError) as e:
        print(f"eqr train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
