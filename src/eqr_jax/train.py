"""Training: the Optax loop with ACT deep supervision, EMA, Orbax checkpoints and data parallelism.

Structure (after nanodo's ``train.py``): a thin host loop around one jitted function
`make_train_step` that runs ``steps_per_call`` optimiser steps with `lax.scan`, takes the
`TrainState` donated, and returns metric *sums* that stay on device until log time. The next
call is dispatched before the previous metrics are fetched. Batches and the ACT carry are
sharded along the ``data`` axis of a `jax.sharding.Mesh`; parameters, optimiser state and EMA
are replicated. The same code runs on one CPU, one GPU or a multi-host slice.

    eqr train --preset tiny                         # builds small data if missing, trains on CPU
    eqr train --preset sudoku --data DIR train.lr=3e-4 --resume
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
SUM_KEYS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps")
LOSS_KEYS = ("lm_loss", "q_halt_loss", "total_loss")


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
    lm_b = sum_t CE_bt / max(#valid_b, 1) (stablemax CE, float32). Metric sums are over halted
    rows with labels (``count``), losses over all rows.

    Returns:
      (loss, (new carry, metric sums dict of float32 scalars)).
    """
    new_carry, out = act_step(
        model, params, carry, batch, key, training=training, grad_mode=train_cfg.grad_mode,
        unroll_steps=train_cfg.unroll_steps, remat=train_cfg.remat,
        implicit_maxiter=train_cfg.implicit_maxiter, implicit_tol=train_cfg.implicit_tol)
    labels = new_carry.batch["labels"]
    loss, parts = act_loss(out.logits, out.q_halt, labels, global_batch_size)
    n_correct, n_valid, exact, lm, bce, total = (
        parts[k] for k in ("n_correct", "n_valid", "exact", "lm", "bce", "total"))
    divisor = jnp.maximum(n_valid, 1).astype(jnp.float32)
    q = out.q_halt.astype(jnp.float32)
    valid = new_carry.halted & (n_valid > 0)
    f = lambda a: jnp.sum(jnp.where(valid, a, 0).astype(jnp.float32))
    metrics = {
        "count": f(jnp.ones_like(q)),
        "accuracy": f(n_correct / divisor),
        "exact_accuracy": f(exact),
        "q_halt_accuracy": f((q > 0) == exact),
        "steps": f(new_carry.steps),
        "lm_loss": jax.lax.stop_gradient(jnp.sum(lm)),
        "q_halt_loss": jax.lax.stop_gradient(jnp.sum(bce)),
        "total_loss": jax.lax.stop_gradient(total),
    }
    return loss, (new_carry, metrics)


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
    """Jitted ``fn(state, batches) -> (state, metric_sums)``.

    ``batches``: dict of arrays with a leading axis of length ``steps_per_call`` (default
    ``cfg.train.steps_per_call``) over which `lax.scan` runs that many optimiser steps. The state
    is donated. Metric sums include ``grad_norm`` (summed over the steps) and ``num_steps``.
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
        (_, (carry, metrics)), grads = grad_fn(state.params, state.carry, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optim.ema_update(state.ema, params, tc.ema_rate) if state.ema is not None else None
        metrics["grad_norm"] = optax.tree.norm(grads).astype(jnp.float32)
        metrics["num_steps"] = jnp.float32(1)
        return TrainState(params, opt_state, ema, state.step + 1, state.rng, carry), metrics

    def many(state: TrainState, batches):
        state, ms = jax.lax.scan(one, state, batches, length=n_steps)
        return state, jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), ms)

    if mesh is None:
        return jax.jit(many, donate_argnums=0)
    repl = NamedSharding(mesh, P())
    return jax.jit(many, in_shardings=(state_sharding, batch_sharding(mesh, stacked=True)),
                   out_shardings=(state_sharding, repl), donate_argnums=0)


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
    """Divide device metric sums (fetched) into loggable means (spec §4.2 'Logged values')."""
    s = {k: float(v) for k, v in sums.items()}
    n = max(s.get("num_steps", 1.0), 1.0)
    out = {f"train/{k}": s[k] / (global_batch_size * n) for k in LOSS_KEYS if k in s}
    count = s.get("count", 0.0)
    if count > 0:
        for k in SUM_KEYS:
            if k != "count":
                out[f"train/{k}"] = s[k] / count
    out["train/count"] = count / n
    out["train/grad_norm"] = s.get("grad_norm", 0.0) / n
    return out


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


def ensure_dataset(cfg: RunConfig, progress: bool = True) -> None:
    """Build the dataset with the ``data.build_*`` options when ``data.path`` does not exist."""
    path = Path(cfg.data.path)
    if path.exists():
        return
    from eqr_jax.data.build import build_sudoku_dataset
    d = cfg.data
    if jax.process_index() == 0:
        print(f"[eqr] building {d.build_size}x{d.build_size} Sudoku data in {path} ...", flush=True)
        build_sudoku_dataset(str(path), size=d.build_size, train=d.build_train, test=d.build_test,
                             num_aug=d.build_num_aug, seed=d.build_seed,
                             difficulty=d.build_difficulty, progress=progress)


def _default_loaders(cfg: RunConfig):
    from eqr_jax.data.loader import EvalLoader, TrainLoader
    d = cfg.data
    pi, pc = jax.process_index(), jax.process_count()
    train_loader = TrainLoader(d.path, d.global_batch_size, cfg.train.seed, process_index=pi,
                               process_count=pc, prefetch=d.prefetch)
    eval_bs = d.eval_batch_size or d.global_batch_size
    eval_factory = lambda: EvalLoader(d.path, eval_bs, process_index=pi, process_count=pc)
    return train_loader, eval_factory


def _check_data(cfg: RunConfig) -> None:
    try:
        from eqr_jax.data.format import dataset_info
    except ImportError:
        return
    info = dataset_info(cfg.data.path)
    get = (lambda k: info[k]) if isinstance(info, Mapping) else (lambda k: getattr(info, k))
    for key in ("seq_len", "vocab_size"):
        if int(get(key)) != getattr(cfg.model, key):
            raise config_lib.ConfigError(
                f"model.{key}={getattr(cfg.model, key)} does not match the data in "
                f"{cfg.data.path} ({key}={get(key)}); set model.{key}={get(key)}")


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
    """
    from eqr_jax.checkpoint import Checkpointer

    t_start = time.time()
    tc, G = cfg.train, cfg.data.global_batch_size
    is_main = jax.process_index() == 0
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        config_lib.save(cfg, str(out_dir / "config.json"))
    if loaders is None:
        ensure_dataset(cfg, progress=progress)
        _check_data(cfg)
        loaders = _default_loaders(cfg)
    train_loader, eval_factory = loaders

    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    if G % n_dev:
        raise config_lib.ConfigError(
            f"data.global_batch_size={G} is not divisible by the {n_dev} devices of the mesh")
    steps_per_epoch = int(getattr(train_loader, "steps_per_epoch", 1) or 1)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)

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

    def write(scalars: Mapping[str, float], at: int):
        if writer is not None:
            for k, v in scalars.items():
                writer.add_scalar(k, v, at)
            writer.flush()

    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    acc = None  # device metric sums since the last log
    pending = None  # (step, sums, wall time, steps) to fetch after the next dispatch
    t_log, step_log = time.time(), step
    last_saved = step if resume else -1
    n_steps_this_run = 0
    limit = total_steps if stop_after is None else min(total_steps, step + int(stop_after))
    add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))

    def flush_pending():
        nonlocal pending, last_train
        if pending is None:
            return
        at, sums, dt, nst = pending
        pending = None
        scalars = summarize(jax.device_get(sums), G)
        if not all(math.isfinite(v) for v in scalars.values()):
            raise FloatingPointError(f"non-finite training metrics at step {at}: {scalars}")
        scalars["train/lr"] = float(schedule(at))
        scalars["train/epoch"] = (at - 1) // steps_per_epoch
        scalars["train/step_time_s"] = dt / max(nst, 1)
        scalars["train/puzzles_per_s"] = G * nst / max(dt, 1e-9)
        last_train = scalars
        write(scalars, at)
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
        ckpt.save(at, state, loader_state=loader_state, cfg=cfg, metrics=metrics)
        last_saved = at

    def crossed(every: int, before: int, after: int) -> bool:
        return every > 0 and after // every > before // every

    interrupted = False
    try:
        while step < limit:
            n = min(max(1, tc.steps_per_call), limit - step)
            host = stack_batches([next(train_loader) for _ in range(n)])
            loader_state = train_loader.state() if hasattr(train_loader, "state") else None
            batches = to_global(host, stacked_sharding)
            state, sums = step_fn(n)(state, batches)  # async dispatch
            flush_pending()  # previous log's metrics, fetched after the next step is queued
            acc = sums if acc is None else add(acc, sums)
            before, step = step, step + n
            n_steps_this_run += n
            if bar is not None:
                bar.update(n)
            if crossed(tc.log_every, before, step) or step >= limit:
                now = time.time()
                pending = (step, acc, now - t_log, step - step_log)
                acc, t_log, step_log = None, now, step
            eval_now = crossed(tc.eval_every, before, step)
            if eval_now:
                flush_pending()
                run_eval(step)
            if crossed(tc.checkpoint_every, before, step):
                save(step, last_eval if eval_now else None)
        flush_pending()
    except KeyboardInterrupt:
        interrupted = True
        if bar is not None:
            bar.write("[eqr] interrupted: saving a checkpoint before exiting")
    if bar is not None:
        bar.close()
    finished = not interrupted and step >= total_steps
    final_eval = last_eval
    if finished and last_eval_step != step:
        final_eval = run_eval(step)
    if step > start_step and (step != last_saved or (finished and last_eval_step == step)):
        save(step, final_eval if last_eval_step == step else None)
    if writer is not None:
        writer.close()
    elapsed = time.time() - t_start
    result = {"step": step, "total_steps": total_steps, "time_s": elapsed,
              "steps_this_run": n_steps_this_run, "interrupted": interrupted,
              **last_train, **final_eval}
    if is_main and (progress or verbose):
        print(results_table(cfg, result), flush=True)
    ckpt.close()
    if hasattr(train_loader, "close"):
        train_loader.close()
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
    try:
        train(cfg, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("[eqr] stopped; resume with --resume", file=sys.stderr)
        return 130
    except config_lib.ConfigError as e:
        print(f"eqr train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
