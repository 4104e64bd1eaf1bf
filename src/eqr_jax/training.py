"""Training: the host loop of a run, around the jitted step of its `TrainProgram`.

Structure (after nanodo's ``train.py``): `eqr_jax.train_program` builds the program (model,
optimiser, schedule, shardings and the jitted step that runs ``steps_per_call`` optimiser steps
with `lax.scan`, takes the `TrainState` donated and returns metric *sums* that stay on device
until log time); `eqr_jax.startup.start_run` gives the first state (resumed, warm-started or
from seed); `train` is a thin loop over calls with named actions (`HostActions`: log, evaluate,
save) and the non-finite `Guard`. The next call is dispatched before the previous metrics are
fetched. Batches and the ACT carry are split along the ``data`` axis of a mesh
(`eqr_jax.sharding`); parameters, optimiser state and EMA are replicated. The loss is
`eqr_jax.losses.loss_and_metrics`; the periodic evaluation is the `eqr_jax.evaluation.Evaluator`
that ``eqr eval`` runs, at breadth 1. `train` builds no data: it takes its loaders
(`eqr_jax.data.prepare.make_loaders` opens a dataset folder's).

Each step's loss and gradient norm are checked on device: from the first non-finite one the call
freezes the state, and the host raises `NonFiniteError` before anything after it is saved.
A SIGTERM (preemption) stops the loop at the next call boundary, the same one on every process
(`eqr_jax.preemption`), after a checkpoint; `train` then raises `Preempted`. With several
processes every collective (the step, evaluation gathers, checkpoint saves and restores) is
entered by all of them in the same order; only process 0 writes the single-writer files.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from eqr_jax import config as config_lib
from eqr_jax import metrics as metrics_lib, perf, profiling
from eqr_jax import sharding as sharding_lib
from eqr_jax import storage
from eqr_jax.config import RunConfig
from eqr_jax.preemption import Preempted, PreemptionWatch
from eqr_jax.reporting import TrainLog, train_results_table
from eqr_jax.startup import start_run, total_steps
# The step's pieces, public here as before (tests, the parity harness).
from eqr_jax.train_program import (NONFINITE_QUANTITIES, TrainProgram, TrainState,  # noqa: F401
                                   example_batch, init_train_state, make_train_program,
                                   make_train_step, stack_batches)


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient norm (the message names step and quantity)."""


def check_local_rows(host: Mapping[str, np.ndarray], global_batch: int) -> None:
    """The loader must feed this process's share of every global batch (``host``: a stacked
    batch, ``inputs`` (steps, rows, N))."""
    rows, procs = int(host["inputs"].shape[1]), jax.process_count()
    if rows * procs != global_batch:
        raise config_lib.ConfigError(
            f"the training loader yields {rows} rows per batch on each of {procs} process(es), "
            f"but data.global_batch_size={global_batch} needs {global_batch // procs} per "
            "process (give the loader process_index / process_count)")


def crossed(every: int, before: int, after: int) -> bool:
    """Whether a multiple of ``every`` (0: never) lies in ``(before, after]``."""
    return every > 0 and after // every > before // every


class Guard:
    """The non-finite guard's records (``nonfinite_step``, ``nonfinite_what`` of each call),
    left on device until checked. The rule, enforced by `HostActions`: every step is checked
    before any save or evaluation (`HostActions.check_all`)."""

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self.unchecked: list = []  # records of calls not yet handed to a log window

    def record(self, sums: dict) -> None:
        """Take the guard's record out of a call's metric sums."""
        self.unchecked.append((sums.pop("nonfinite_step"), sums.pop("nonfinite_what")))

    def take(self) -> list:
        """The unchecked records, handed over (to a log window, or to `check`)."""
        out, self.unchecked = self.unchecked, []
        return out

    def check(self, records: list) -> None:
        """Raise `NonFiniteError` naming the first non-finite step in ``records``."""
        for record in records:
            at, what = (int(v) for v in jax.device_get(record))
            if at:
                break
        else:
            return
        names = " and ".join(v for k, v in NONFINITE_QUANTITIES.items() if what & k)
        latest = self.checkpointer.latest_step()
        where = (f"the newest checkpoint is step {latest} in {self.checkpointer.directory}; "
                 "`--resume` continues from it" if latest is not None
                 else "no checkpoint was written")
        raise NonFiniteError(
            f"non-finite {names} at step {at}: training stopped, nothing from step {at} on was "
            f"saved ({where}; consider a lower train.lr or float32 compute)")


def window_scalars(sums: Mapping[str, Any], *, step: int, steps: int, wall_s: float,
                   program: TrainProgram, steps_per_epoch: int,
                   run_perf: perf.RunPerf | None = None) -> dict[str, float]:
    """The logged scalars of one log window: the means of its fetched metric ``sums``
    (`eqr_jax.metrics.train_scalars`), the learning rate at ``step`` (the window's last), the
    epoch, and the speed over its ``steps`` optimiser steps and ``wall_s`` seconds of wall time:
    puzzles/s and, with ``run_perf``, ``perf/tflops_per_device`` and (where the device kind's
    peak is known) ``perf/mfu``. Raises `NonFiniteError` when a mean is not finite."""
    G = program.cfg.data.global_batch_size
    scalars = metrics_lib.train_scalars(sums, G)
    if not all(math.isfinite(v) for v in scalars.values()):
        raise NonFiniteError(f"non-finite training metrics at step {step}: {scalars}")
    scalars["train/lr"] = float(program.schedule(step))
    scalars["train/epoch"] = (step - 1) // steps_per_epoch
    scalars["train/step_time_s"] = wall_s / max(steps, 1)
    scalars["train/puzzles_per_s"] = G * steps / max(wall_s, 1e-9)
    if run_perf is not None:
        scalars.update(run_perf.scalars(steps, wall_s))
    return scalars


class Window(NamedTuple):
    """A closed log window, fetched after the next call is dispatched."""

    step: int  # its last step
    sums: dict  # device metric sums over its steps
    wall_s: float
    steps: int
    records: list  # its calls' guard records


class HostActions:
    """The host loop's actions on a run (log, evaluate, save) and what they remember (the last
    logged and evaluated metrics, the last saved step). Each takes the state it acts on."""

    def __init__(self, program: TrainProgram, checkpointer, log: TrainLog, evaluator,
                 eval_batches: Callable[[], Iterable], steps_per_epoch: int, step: int):
        self.program, self.checkpointer, self.log = program, checkpointer, log
        self.evaluator, self.eval_batches = evaluator, eval_batches
        self.steps_per_epoch = steps_per_epoch
        self.guard = Guard(checkpointer)
        self.perf = perf.RunPerf(program.cfg, program.mesh)  # FLOPs per step, devices, peak
        self.merge = jax.jit(metrics_lib.merge_metrics)
        self.sums = None  # device metric sums since the last log window closed
        self.window_start = (time.time(), step)
        self.pending: Window | None = None
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self.last_saved = step if step > 0 else -1

    def add(self, sums: dict) -> None:
        """One call's metric sums (its guard record goes to the `Guard`)."""
        self.guard.record(sums)
        self.flush_log()  # the previous window, fetched now that the next call is queued
        self.sums = sums if self.sums is None else self.merge(self.sums, sums)

    def close_window(self, step: int) -> None:
        """End the log window at ``step``; it is logged after the next call is dispatched."""
        now, (t0, first) = time.time(), self.window_start
        self.pending = Window(step, self.sums, now - t0, step - first, self.guard.take())
        self.sums, self.window_start = None, (now, step)

    def flush_log(self) -> None:
        """Log the pending window (its steps checked first)."""
        if self.pending is None:
            return
        w, self.pending = self.pending, None
        self.guard.check(w.records)
        fetched = jax.device_get(w.sums)
        self.last_train = window_scalars(fetched, step=w.step, steps=w.steps, wall_s=w.wall_s,
                                         program=self.program,
                                         steps_per_epoch=self.steps_per_epoch,
                                         run_perf=self.perf)
        self.log.write(self.last_train, w.step, metrics_lib.train_histograms(fetched))
        self.log.train_line(w.step, self.last_train)

    def check_all(self) -> None:
        """Every step so far passes the guard: before anything is saved or evaluated."""
        self.flush_log()
        self.guard.check(self.guard.take())

    def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
        """Evaluate ``state``'s EMA (or raw) weights at breadth 1; log and keep the metrics."""
        self.check_all()
        self.last_eval_step = step
        params = state.ema if state.ema is not None else state.params
        res = self.evaluator.evaluate(params, self.eval_batches(),
                                      depths=[self.evaluator.depth], breadths=[1])
        if not res["num_batches"]:
            self.last_eval = {}
            return self.last_eval
        m = res["settings"][0]["metrics"]
        self.last_eval = {k: v for k, v in m.items() if "/" in k}
        self.log.write(self.last_eval, step)
        self.log.write(res["settings"][0].get("perf", {}), step)  # perf/eval_* throughput
        self.last_eval["eval_puzzles"] = m["num_puzzles"]
        self.log.print(f"[eqr] step {step}: eval exact {m['all/exact_accuracy']:.4f} "
                       f"token acc {m['all/accuracy']:.4f}")
        return self.last_eval

    def save(self, state: TrainState, loader_state: Mapping | None, step: int,
             metrics: Mapping | None = None) -> None:
        """Checkpoint ``state`` and the loader position (every step checked first)."""
        self.check_all()
        self.checkpointer.save(step, state, loader_state=loader_state, cfg=self.program.cfg,
                               metrics=metrics)
        self.last_saved = step

    def after_call(self, state: TrainState, loader_state: Mapping | None, before: int,
                   step: int, limit: int) -> None:
        """The periodic actions due after a call took the run from ``before`` to ``step``."""
        tc = self.program.cfg.train
        if crossed(tc.log_every, before, step) or step >= limit:
            self.close_window(step)
        evaluated = crossed(tc.eval_every, before, step)
        if evaluated:
            self.evaluate(state, step)
        if crossed(tc.checkpoint_every, before, step):
            self.save(state, loader_state, step, self.last_eval if evaluated else None)

    def finish(self, state: TrainState, loader_state: Mapping | None, step: int,
               start_step: int, *, finished: bool, may_save: bool) -> None:
        """A finished run's final evaluation, and the last save when this invocation advanced
        past the last checkpoint (or the final evaluation adds its metrics to it)."""
        if finished and self.last_eval_step != step:
            self.evaluate(state, step)
        evaluated_here = self.last_eval_step == step
        if may_save and step > start_step and (step != self.last_saved
                                               or (finished and evaluated_here)):
            self.save(state, loader_state, step, self.last_eval if evaluated_here else None)


def _run_mesh(cfg: RunConfig, mesh: Mesh | None) -> Mesh:
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    sharding_lib.check_divisible(cfg.data.global_batch_size, mesh, "data.global_batch_size")
    if jax.process_count() > 1:  # evaluation rows must split over every process's devices
        sharding_lib.check_divisible(cfg.data.eval_batch, mesh,
                                     "data.eval_batch_size (0: data.global_batch_size)")
    return mesh


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
      resume, resume_step, init_params: where the run starts (`eqr_jax.startup.start_run`):
        the newest checkpoint that restores (without any, step 0 with a warning), the checkpoint
        of ``resume_step``, or a warm start from ``init_params`` (the tree
        ``EqRModel(cfg.model).init`` returns, or a `eqr_jax.warm_start.WarmStart`) or from
        ``cfg.train.init_from``. A resume may change the run's length (the schedule is
        re-planned over the new total). A warm-started run is evaluated at step 0 too.
      stop_after: stop (and checkpoint) after this many optimiser steps in this invocation.
      progress: tqdm progress bar on the console.
      verbose: without a progress bar, print a line per log interval and the results table.
    Returns:
      ``(state, metrics)``: the last `TrainState`, and a dict with ``step``, ``total_steps``,
      ``time_s``, ``steps_this_run``, ``interrupted``, the last logged ``train/*`` means and the
      last evaluation's metrics (``all/exact_accuracy``, ``all/accuracy``, ... as ``eqr eval``
      names them, and ``eval_puzzles``).
    Raises:
      NonFiniteError: a step's loss or gradient norm was not finite; nothing from that step on
        is saved, so ``resume=True`` continues from the last good checkpoint.
      Preempted: SIGTERM arrived; every process saved a checkpoint at the same step boundary
        first (`PreemptionWatch`), so ``resume=True`` continues exactly.
      KeyboardInterrupt: Ctrl-C; with one process a checkpoint is saved first.
      CheckpointError, ConfigMismatchError, ConfigError: as `eqr_jax.startup.start_run`; also
        when the loader's batches do not fit ``data.global_batch_size`` and the processes.
    """
    from eqr_jax.checkpoint import Checkpointer
    from eqr_jax.evaluation import Evaluator

    t_start = time.time()
    train_loader, eval_batches = loaders
    mesh = _run_mesh(cfg, mesh)
    out = storage.path(cfg.train.out_dir, name="train.out_dir")
    storage.makedirs(out)
    steps_per_epoch = int(getattr(train_loader, "steps_per_epoch", 1) or 1)
    ckpt = Checkpointer(out / "checkpoints", keep=cfg.train.keep_checkpoints,
                        commit=cfg.train.checkpoint_commit)
    start = start_run(cfg, make_train_program(cfg, total_steps(cfg, steps_per_epoch), mesh), ckpt,
                      train_loader, resume=resume, resume_step=resume_step,
                      init_params=init_params)
    program, state, loader_state = start.program, start.state, start.loader_state
    cfg, total, step = program.cfg, program.total_steps, start.start_step
    log = TrainLog(cfg, out, total, step, progress, verbose)
    act = HostActions(program, ckpt, log, Evaluator(program.model, cfg.eval, mesh=mesh),
                      eval_batches, steps_per_epoch, step)
    limit = total if stop_after is None else min(total, step + int(stop_after))
    window = profiling.ProfileWindow.from_config(cfg, out / "tb")
    preemption = PreemptionWatch()
    interrupted = preempted = False
    boundary = 0  # call boundaries passed in this invocation (the preemption sync point ids)
    compiled: set[int] = set()  # steps-per-call whose step is compiled
    try:
        try:
            if start.warm_from is not None:
                act.evaluate(state, 0)  # where a warm start begins: its source's accuracy
            while step < limit:
                n = min(max(1, cfg.train.steps_per_call), limit - step)
                host = stack_batches([next(train_loader) for _ in range(n)])
                if step == start.start_step:
                    check_local_rows(host, cfg.data.global_batch_size)
                loader_state = train_loader.state() if hasattr(train_loader, "state") else None
                batch = sharding_lib.to_global(host, program.batch_sharding)
                if n not in compiled:
                    compiled.add(n)
                    sharding_lib.compile_together(program.step(n), (state, batch),
                                                  f"train-step-{n}")
                # Inside the --profile window's call boundaries (a no-op outside it).
                state, sums = window.run(step, state, lambda s: program.step(n)(s, batch))
                act.add(sums)
                if log.bar is not None:
                    log.bar.update(n)
                before, step = step, step + n
                act.after_call(state, loader_state, before, step, limit)
                boundary += 1
                if step < limit and preemption.reached(boundary):
                    preempted = True
                    log.print(f"[eqr] preemption notice (SIGTERM): saving a checkpoint at step "
                              f"{step} and stopping")
                    break
            act.check_all()
        except KeyboardInterrupt:
            interrupted = True
            if jax.process_count() > 1:
                # A save is a collective the other processes are not entering: do not start one.
                log.print(f"[eqr] interrupted: not saving (multi-process; send SIGTERM for a "
                          f"coordinated save); the newest checkpoint is step {ckpt.latest_step()}")
            else:
                log.print("[eqr] interrupted: saving a checkpoint before exiting")
        log.close_bar()
        act.finish(state, loader_state, step, start.start_step,
                   finished=not (interrupted or preempted) and step >= total,
                   may_save=not (interrupted and jax.process_count() > 1))
    finally:
        window.close()  # a window the run ended inside
        preemption.close()
        log.close()
        ckpt.close()
        if hasattr(train_loader, "close"):
            train_loader.close()
    result = {"step": step, "total_steps": total, "time_s": time.time() - t_start,
              "steps_this_run": step - start.start_step, "interrupted": interrupted,
              **act.last_train, **act.last_eval}
    if jax.process_index() == 0 and (progress or verbose):
        print(train_results_table(cfg, result), flush=True)
    if interrupted:
        raise KeyboardInterrupt
    if preempted:
        raise Preempted(step, ckpt.directory)
    return state, result
