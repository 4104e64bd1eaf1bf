"""Training: the Optax loop with ACT deep supervision, EMA, Orbax checkpoints and data parallelism.

Structure (after nanodo's ``train.py``): a thin host loop around one jitted function,
`make_train_step`, that runs ``steps_per_call`` optimiser steps with `lax.scan`, takes the
`TrainState` donated, and returns metric *sums* that stay on device until log time. The next
call is dispatched before the previous metrics are fetched. Batches and the ACT carry are split
along the ``data`` axis of a mesh (`eqr_jax.sharding`); parameters, optimiser state and EMA are
replicated. The loss is `eqr_jax.losses.loss_and_metrics`; the periodic evaluation is the
`eqr_jax.evaluation.Evaluator` that ``eqr eval`` runs, at breadth 1. `train` builds no data:
it takes its loaders (`eqr_jax.data.prepare.make_loaders` opens a dataset folder's).

Each step's loss and gradient norm are checked on device: from the first non-finite one the call
freezes the state, and the host raises `NonFiniteError` before anything after it is saved.
A SIGTERM (preemption) stops the loop at the next call boundary, the same one on every process
(`eqr_jax.preemption`), after a checkpoint; `train` then raises `Preempted`. With several
processes every collective (the step, evaluation gathers, checkpoint saves and restores) is
entered by all of them in the same order; only process 0 writes the single-writer files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from eqr_jax import config as config_lib
from eqr_jax import dynamics, metrics as metrics_lib, optim
from eqr_jax import sharding as sharding_lib
from eqr_jax.act import ACTCarry, BATCH_KEYS, init_carry
from eqr_jax.config import RunConfig
from eqr_jax.losses import loss_and_grad
from eqr_jax.model import EqRModel
from eqr_jax.preemption import Preempted, PreemptionWatch
from eqr_jax.reporting import TrainLog, train_results_table
from eqr_jax.warm_start import API_SOURCE, fit_to_model

# Bit flags of the quantities the non-finite guard watches (``nonfinite_what``).
NONFINITE_QUANTITIES = {1: "loss", 2: "gradient norm"}


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient norm (the message names step and quantity)."""


def _check_local_rows(host: Mapping[str, np.ndarray], global_batch: int) -> None:
    """The loader must feed this process's share of every global batch."""
    rows, procs = int(host["inputs"].shape[1]), jax.process_count()
    if rows * procs != global_batch:
        raise config_lib.ConfigError(
            f"the training loader yields {rows} rows per batch on each of {procs} process(es), "
            f"but data.global_batch_size={global_batch} needs {global_batch // procs} per "
            "process (give the loader process_index / process_count)")


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; donated to the train step)."""

    params: Any
    opt_state: Any
    ema: Any  # None when EMA is off
    step: jax.Array  # int32 scalar: optimiser steps done
    rng: jax.Array  # base PRNG key (uint32[2]); step s uses fold_in(rng, s)
    carry: ACTCarry


def example_batch(cfg: RunConfig) -> dict[str, np.ndarray]:
    """Zeros shaped like one global batch (for shapes of the carry)."""
    G, N = cfg.data.global_batch_size, cfg.model.seq_len
    return {"inputs": np.zeros((G, N), np.int32), "labels": np.zeros((G, N), np.int32),
            "puzzle_identifiers": np.zeros((G,), np.int32)}


def init_train_state(model: EqRModel, cfg: RunConfig, optimizer: optax.GradientTransformation,
                     batch_example: Mapping[str, Any], params: Any = None) -> TrainState:
    """Fresh state (pure; jit it with ``out_shardings``): params from ``seed`` (or ``params``,
    a warm start: same tree as ``model.init``'s), EMA = params, a fresh optimiser state, step 0,
    an empty ACT carry shaped like ``batch_example`` (global batch rows)."""
    key = jax.random.PRNGKey(cfg.train.seed)
    k_params, k_run = jax.random.split(key)
    params = model.init(k_params) if params is None else params
    ema = optim.ema_init(params) if cfg.train.ema else None
    return TrainState(params, optimizer.init(params), ema, jnp.zeros((), jnp.int32), k_run,
                      init_carry(model, batch_example))


def make_train_step(model: EqRModel, cfg: RunConfig, optimizer: optax.GradientTransformation,
                    *, mesh: Mesh | None = None, state_sharding: TrainState | None = None,
                    steps_per_call: int | None = None) -> Callable:
    """Jitted ``fn(state, batches) -> (state, metrics)``.

    ``batches``: dict of arrays with a leading axis of length ``steps_per_call`` (default
    ``cfg.train.steps_per_call``) over which `lax.scan` runs that many optimiser steps. The state
    is donated. ``metrics`` holds the per-step `eqr_jax.losses.act_metrics` combined over the
    steps (`eqr_jax.metrics.merge_metrics`), ``grad_norm`` (summed), ``num_steps``, and the
    non-finite guard's record: ``nonfinite_step`` (int32: the 1-based step whose loss or gradient
    norm was not finite, 0 if none) and ``nonfinite_what`` (int32 bit flags,
    `NONFINITE_QUANTITIES`). From such a step on the call leaves the state as it was before it
    (params, optimiser, EMA, carry and step counter frozen), so the returned state is always the
    last finite one. With ``mesh``/``state_sharding`` the function has explicit in/out
    shardings.
    """
    tc = cfg.train
    n_steps = int(steps_per_call or tc.steps_per_call)
    grad_fn = loss_and_grad(
        model, adjoint=dynamics.adjoint_for(tc), unroll_steps=tc.unroll_steps,
        global_batch_size=cfg.data.global_batch_size, jac_reg=tc.jac_reg,
        jac_reg_samples=tc.jac_reg_samples)

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
                                         metrics_lib.neutral_metrics(metrics))
        bad_now = live & (what != 0)
        first_bad = jnp.where(bad_now, new.step, first_bad)
        first_what = jnp.where(bad_now, what, first_what)
        return (state, first_bad, first_what), metrics

    def many(state: TrainState, batches):
        zero = jnp.zeros((), jnp.int32)
        (state, first_bad, first_what), ms = jax.lax.scan(
            guarded, (state, zero, zero), batches, length=n_steps)
        out = {k: metrics_lib.reduce_steps(k, v) for k, v in ms.items()}
        out["nonfinite_step"] = first_bad
        out["nonfinite_what"] = first_what
        return state, out

    if mesh is None:
        return jax.jit(many, donate_argnums=0)
    return jax.jit(many, in_shardings=(state_sharding,
                                       sharding_lib.batch_sharding(mesh, stacked=True)),
                   out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
                   donate_argnums=0)


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    """epochs x steps_per_epoch, capped by ``train.max_steps`` when it is set."""
    total = cfg.train.epochs * int(steps_per_epoch)
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def _resumed_config(cfg: RunConfig, saved: Mapping[str, Any], step: int,
                    steps_per_epoch: int) -> tuple[RunConfig, str | None]:
    """The config a resume from a checkpoint of ``step`` (saved config ``saved``, a dict) runs
    under, and the line that says how its length changed (None: unchanged).

    The run's length (``train.epochs``, ``train.max_steps``) may differ from the checkpoint's;
    the total and the learning-rate schedule are then re-planned over the new total, as if the
    run had been launched with it (the presets' schedules are constant after warm-up, so the
    extended run equals one launched with the new total). Where the resumed command gives no
    ``train.init_*``, the checkpoint's are kept, so the run keeps the record of its start.
    Raises `ConfigError` when the new total is below ``step``.
    """
    old = saved.get("train", {})
    tc = cfg.train
    if not tc.init_from and old.get("init_from"):
        tc = dataclasses.replace(tc, init_from=str(old["init_from"]),
                                 init_step=int(old.get("init_step", 0)),
                                 init_weights=str(old.get("init_weights", "ema")))
        cfg = dataclasses.replace(cfg, train=tc)
    before = dataclasses.replace(tc, epochs=int(old.get("epochs", tc.epochs)),
                                 max_steps=int(old.get("max_steps", tc.max_steps)))
    if (before.epochs, before.max_steps) == (tc.epochs, tc.max_steps):
        return cfg, None
    was = total_steps(dataclasses.replace(cfg, train=before), steps_per_epoch)
    now = total_steps(cfg, steps_per_epoch)
    keys = ", ".join(f"train.{k} {getattr(before, k)} -> {getattr(tc, k)}"
                     for k in ("epochs", "max_steps") if getattr(before, k) != getattr(tc, k))
    if now < step:
        raise config_lib.ConfigError(
            f"{keys} gives {now} total steps, fewer than the {step} the checkpoint has done; "
            f"give a total of at least {step}")
    lr_was = float(optim.make_schedule(before, was)(step + 1))
    lr_now = float(optim.make_schedule(tc, now)(step + 1))
    return cfg, (f"[eqr] run length changed ({keys}): total steps {was:,} -> {now:,}; the "
                 f"learning-rate schedule is re-planned over {now:,} steps (lr at step "
                 f"{step + 1:,}: {lr_now:.4g}, the old plan's: {lr_was:.4g})")


def stack_batches(batches: list[Mapping[str, np.ndarray]]) -> dict:
    """Host batches -> one dict with a leading (steps) axis, as `make_train_step` takes."""
    return {k: np.stack([b[k] for b in batches]) for k in BATCH_KEYS}


def _compute_key(cfg: RunConfig) -> RunConfig:
    """The config without bookkeeping fields, as a cache key for compiled steps."""
    return dataclasses.replace(cfg, preset="", train=dataclasses.replace(
        cfg.train, out_dir="", log_every=0, eval_every=0, checkpoint_every=0, init_from="",
        init_step=0, init_weights="ema"),
        data=dataclasses.replace(cfg.data, path=""))


@functools.lru_cache(maxsize=16)
def _cached_train_step(cfg: RunConfig, total: int, n: int, mesh: Mesh):
    # Compiled steps are reused by later `train` calls in the same process (resume, tests).
    model = EqRModel(cfg.model)
    optimizer, _ = optim.make_optimizer(cfg.train, total)
    abstract = jax.eval_shape(functools.partial(init_train_state, model, cfg, optimizer),
                              example_batch(cfg))
    return make_train_step(model, cfg, optimizer, mesh=mesh, steps_per_call=n,
                           state_sharding=sharding_lib.train_state_shardings(abstract, mesh))


def _first_nonfinite(statuses: list) -> tuple[int, int] | None:
    """The first (step, quantity flags) recorded by the guard in ``statuses``, or None."""
    for st in statuses:
        bad, what = (int(v) for v in jax.device_get(st))
        if bad:
            return bad, what
    return None


def train(cfg: RunConfig, loaders: tuple[Any, Callable[[], Iterable]], mesh: Mesh | None = None,
          *, resume: bool = False, resume_step: int | None = None, init_params: Any = None,
          stop_after: int | None = None, progress: bool = True,
          verbose: bool = True) -> tuple[TrainState, dict]:
    """Train ``cfg`` on ``loaders``; returns the final state and metrics.

    Args:
      cfg: resolved run config; ``cfg.train.out_dir`` receives config.json, tb/, checkpoints/.
      loaders: ``(train_loader, eval_batches)``: an iterator of process-local numpy batch dicts
        (``inputs``/``labels`` (B, N), ``puzzle_identifiers`` (B,)) with ``steps_per_epoch`` and
        JSON ``state()`` / ``restore()``, and a zero-argument callable returning the evaluation
        batches (with ``mask``); see `eqr_jax.data.prepare.make_loaders`.
      mesh: device mesh (default: every device on the ``data`` axis).
      resume: continue from the newest checkpoint in ``out_dir/checkpoints`` that restores
        (exact resume; each one that does not is reported and skipped). Without any checkpoint
        the run starts from step 0 with a warning, so one launch command serves the first start
        and every restart.
        A resume may change the run's length (``train.epochs`` / ``train.max_steps``, e.g. to
        train a finished run longer): the total and the learning-rate schedule are re-planned
        over the new total and a line says so; every other computing key must match.
      resume_step: continue from this step's checkpoint (implies ``resume``; it must restore).
      init_params: a warm start: parameters (the tree ``EqRModel(cfg.model).init`` returns,
        e.g. ``load_for_inference(...)[1]``) that the new run's parameters and EMA start from,
        with a fresh optimiser, schedule and step counter; ``cfg.train.init_from`` (a run
        directory or an official ``.pth``, `eqr_jax.warm_start`) does the same from a path.
        A warm-started run is evaluated at step 0 too. With ``resume`` and a checkpoint in
        ``out_dir`` the checkpoint wins (one command serves the first start and restarts).
      stop_after: stop (and checkpoint) after this many optimiser steps in this invocation.
      progress: tqdm progress bar on the console.
      verbose: without a progress bar, print a line per log interval and the results table.
    Returns:
      ``(state, metrics)``: the last `TrainState`, and a dict with ``step``, ``total_steps``,
      ``time_s``, ``steps_this_run``, ``interrupted``, the last logged ``train/*`` means and the
      last evaluation's metrics (``all/exact_accuracy``, ``all/accuracy``, ... as ``eqr eval``
      names them, and ``eval_puzzles``).
    Raises:
      NonFiniteError: a step's loss or gradient norm was not finite. Nothing from that step on
        is saved (the guard freezes the state inside the jitted call and every save checks it
        first), so ``resume=True`` continues from the last good checkpoint.
      Preempted: SIGTERM arrived (preemption); every process saved a checkpoint at the same
        step boundary first (`PreemptionWatch`), so ``resume=True`` continues exactly.
      KeyboardInterrupt: Ctrl-C; with one process a checkpoint is saved first.
      CheckpointError: ``out_dir`` holds checkpoints but neither ``resume`` nor ``resume_step``
        was given, ``resume_step`` does not restore, or no checkpoint restores.
      ConfigMismatchError: the checkpoint was written under another config.
      ConfigError: the loader's batches do not fit ``data.global_batch_size`` and the processes;
        a resume's new total is below the checkpoint's step; the initial weights do not fit
        the model (names the first differing parameter and shapes).
    """
    from eqr_jax.checkpoint import CheckpointError, Checkpointer
    from eqr_jax.evaluation import Evaluator

    t_start = time.time()
    tc, G = cfg.train, cfg.data.global_batch_size
    out_dir = Path(tc.out_dir)
    train_loader, eval_batches = loaders
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    sharding_lib.check_divisible(G, mesh, "data.global_batch_size")
    if jax.process_count() > 1:  # evaluation rows must split over every process's devices
        sharding_lib.check_divisible(cfg.data.eval_batch, mesh,
                                     "data.eval_batch_size (0: data.global_batch_size)")
    out_dir.mkdir(parents=True, exist_ok=True)
    resume = resume or resume_step is not None
    steps_per_epoch = int(getattr(train_loader, "steps_per_epoch", 1) or 1)
    total = total_steps(cfg, steps_per_epoch)

    model = EqRModel(cfg.model)
    optimizer, schedule = optim.make_optimizer(tc, total)
    make_state = functools.partial(init_train_state, model, cfg, optimizer)
    abstract = jax.eval_shape(make_state, example_batch(cfg))
    shardings = sharding_lib.train_state_shardings(abstract, mesh)
    ckpt = Checkpointer(out_dir / "checkpoints", keep=tc.keep_checkpoints)
    main = jax.process_index() == 0
    loader_state = None
    existing = ckpt.all_steps()
    warm_from = None  # what a warm start's weights came from (None: not a warm start)
    if resume and existing:
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state, loader_state, _ = ckpt.restore(target, cfg, step=resume_step)
        train_loader.restore(loader_state)
        at = int(jax.device_get(state.step))
        cfg, length_change = _resumed_config(cfg, ckpt.read_item_json(at, "config"), at,
                                             steps_per_epoch)
        tc, total = cfg.train, total_steps(cfg, steps_per_epoch)
        if length_change:  # the schedule is re-planned over the new total
            optimizer, schedule = optim.make_optimizer(tc, total)
        if main:
            print(f"[eqr] resumed from step {at} in {ckpt.directory}", flush=True)
            if length_change:
                print(length_change, flush=True)
    else:
        if existing and not resume:
            raise CheckpointError(
                f"{out_dir} already holds checkpoints (steps {', '.join(map(str, existing))}): "
                "pass --resume to continue that run, or choose another --out")
        if resume_step is not None:
            raise CheckpointError(f"no checkpoint at step {resume_step}: {ckpt.directory} is "
                                  "empty")
        if resume and main:
            print(f"[eqr] warning: --resume: no checkpoint in {ckpt.directory} yet; starting "
                  "from step 0", file=sys.stderr, flush=True)
        if init_params is None and tc.init_from:
            from eqr_jax.warm_start import load_init_weights

            init_params, warm_from = load_init_weights(cfg)
        elif init_params is not None:
            warm_from = tc.init_from or "the given init_params"
            if not tc.init_from:  # the run's config records that it did not start from seed
                tc = dataclasses.replace(tc, init_from=API_SOURCE)
                cfg = dataclasses.replace(cfg, train=tc)
        if init_params is None:
            state = jax.jit(make_state, out_shardings=shardings)(example_batch(cfg))
        else:
            params = fit_to_model(init_params, abstract.params)
            state = jax.jit(make_state, out_shardings=shardings)(example_batch(cfg), params)
            if main:
                print(f"[eqr] starting from {warm_from} (fresh optimiser, schedule and step)",
                      flush=True)
    # Written once the run is known to be this config's (a refused resume leaves it alone).
    if main:
        config_lib.save(cfg, str(out_dir / "config.json"))
    step = start_step = int(jax.device_get(state.step))

    step_fn = lambda n: _cached_train_step(_compute_key(cfg), total, n, mesh)
    stacked = sharding_lib.batch_sharding(mesh, stacked=True)
    evaluator = Evaluator(model, cfg.eval, mesh=mesh)
    log = TrainLog(cfg, out_dir, total, step, progress, verbose)
    merge = jax.jit(metrics_lib.merge_metrics)

    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    acc = None  # device metric sums since the last log
    pending = None  # (step, sums, wall time, steps, guard records) fetched after the next dispatch
    unchecked: list = []  # guard records (nonfinite_step, nonfinite_what) not yet in `pending`
    t_log, step_log = time.time(), step
    last_saved = step if step > 0 else -1
    limit = total if stop_after is None else min(total, step + int(stop_after))
    preemption = PreemptionWatch()
    checked_rows = False

    def raise_if_nonfinite(statuses):
        found = _first_nonfinite(statuses)
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
        scalars = metrics_lib.train_scalars(fetched, G)
        if not all(math.isfinite(v) for v in scalars.values()):
            raise NonFiniteError(f"non-finite training metrics at step {at}: {scalars}")
        scalars["train/lr"] = float(schedule(at))
        scalars["train/epoch"] = (at - 1) // steps_per_epoch
        scalars["train/step_time_s"] = dt / max(nst, 1)
        scalars["train/puzzles_per_s"] = G * nst / max(dt, 1e-9)
        last_train = scalars
        log.write(scalars, at, metrics_lib.train_histograms(fetched))
        log.train_line(at, scalars)

    def check_all():
        """Every guard record so far: before anything is saved or evaluated."""
        nonlocal unchecked
        flush_pending()
        raise_if_nonfinite(unchecked)
        unchecked = []

    def run_eval(at: int) -> dict[str, float]:
        nonlocal last_eval, last_eval_step
        check_all()
        last_eval_step = at
        params = state.ema if state.ema is not None else state.params
        res = evaluator.evaluate(params, eval_batches(), depths=[evaluator.depth], breadths=[1])
        if not res["num_batches"]:
            last_eval = {}
            return last_eval
        m = res["settings"][0]["metrics"]
        last_eval = {k: v for k, v in m.items() if "/" in k}
        log.write(last_eval, at)
        last_eval["eval_puzzles"] = m["num_puzzles"]
        log.print(f"[eqr] step {at}: eval exact {m['all/exact_accuracy']:.4f} "
                  f"token acc {m['all/accuracy']:.4f}")
        return last_eval

    def save(at: int, metrics=None):
        nonlocal last_saved
        check_all()
        ckpt.save(at, state, loader_state=loader_state, cfg=cfg, metrics=metrics)
        last_saved = at

    def crossed(every: int, before: int, after: int) -> bool:
        return every > 0 and after // every > before // every

    interrupted = preempted = False
    boundary = 0  # call boundaries passed in this invocation (the preemption sync point ids)
    try:
        try:
            if warm_from is not None:
                run_eval(0)  # where a warm start begins: its source's accuracy, these settings
            while step < limit:
                n = min(max(1, tc.steps_per_call), limit - step)
                host = stack_batches([next(train_loader) for _ in range(n)])
                if not checked_rows:
                    _check_local_rows(host, G)
                    checked_rows = True
                loader_state = train_loader.state() if hasattr(train_loader, "state") else None
                state, sums = step_fn(n)(state, sharding_lib.to_global(host, stacked))
                unchecked.append((sums.pop("nonfinite_step"), sums.pop("nonfinite_what")))
                flush_pending()  # previous log's metrics, fetched after the next step is queued
                acc = sums if acc is None else merge(acc, sums)
                before, step = step, step + n
                if log.bar is not None:
                    log.bar.update(n)
                if crossed(tc.log_every, before, step) or step >= limit:
                    now = time.time()
                    pending = (step, acc, now - t_log, step - step_log, unchecked)
                    acc, t_log, step_log, unchecked = None, now, step, []
                eval_now = crossed(tc.eval_every, before, step)
                if eval_now:
                    run_eval(step)
                if crossed(tc.checkpoint_every, before, step):
                    save(step, last_eval if eval_now else None)
                boundary += 1
                if step < limit and preemption.reached(boundary):
                    preempted = True
                    log.print(f"[eqr] preemption notice (SIGTERM): saving a checkpoint at step "
                              f"{step} and stopping")
                    break
            check_all()
        except KeyboardInterrupt:
            interrupted = True
            if jax.process_count() > 1:
                # A save is a collective the other processes are not entering: do not start one.
                log.print(f"[eqr] interrupted: not saving (multi-process; send SIGTERM for a "
                          f"coordinated save); the newest checkpoint is step {ckpt.latest_step()}")
            else:
                log.print("[eqr] interrupted: saving a checkpoint before exiting")
        log.close_bar()
        finished = not (interrupted or preempted) and step >= total
        if finished and last_eval_step != step:
            run_eval(step)
        may_save = not (interrupted and jax.process_count() > 1)
        if may_save and step > start_step and (
                step != last_saved or (finished and last_eval_step == step)):
            save(step, last_eval if last_eval_step == step else None)
    finally:
        preemption.close()
        log.close()
        ckpt.close()
        if hasattr(train_loader, "close"):
            train_loader.close()
    result = {"step": step, "total_steps": total, "time_s": time.time() - t_start,
              "steps_this_run": step - start_step, "interrupted": interrupted,
              **last_train, **last_eval}
    if jax.process_index() == 0 and (progress or verbose):
        print(train_results_table(cfg, result), flush=True)
    if interrupted:
        raise KeyboardInterrupt
    if preempted:
        raise Preempted(step, ckpt.directory)
    return state, result
