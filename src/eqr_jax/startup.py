"""Start-up of a training run: where its first state comes from.

`start_run` is the only place that resumes a checkpoint (re-planning the schedule when the run's
length changed, `resumed_config`), starts from given weights (a warm start, `eqr_jax.warm_start`)
or from ``train.seed``; `eqr_jax.training.train` then runs the loop from what it returns.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Mapping, NamedTuple

import jax

from eqr_jax import config as config_lib
from eqr_jax import optim, storage
from eqr_jax.config import RunConfig
from eqr_jax.train_program import TrainProgram, TrainState, make_train_program
from eqr_jax.warm_start import API_SOURCE, WarmStart, fit_to_model


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    """epochs x steps_per_epoch, capped by ``train.max_steps`` when it is set."""
    total = cfg.train.epochs * int(steps_per_epoch)
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def resumed_config(cfg: RunConfig, saved: Mapping[str, Any], step: int,
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


class RunStart(NamedTuple):
    """Where a run starts: the state, the config it runs under (a resume may change its length
    and records the warm-start source), the program over that run's total steps, the loader's
    restored position (None: from the start), the warm start's source (None: not a warm start)
    and the first step."""

    state: TrainState
    cfg: RunConfig
    program: TrainProgram
    loader_state: Mapping | None
    warm_from: str | None
    start_step: int


def start_run(cfg: RunConfig, program: TrainProgram, checkpointer, loader, *,
              resume: bool = False, resume_step: int | None = None,
              init_params: Any = None) -> RunStart:
    """The starting point of ``cfg``'s run, and config.json written to ``train.out_dir``.

    Args:
      cfg: the run's config as given.
      program: `make_train_program` of ``cfg`` over the run's total steps.
      checkpointer: the run's `eqr_jax.checkpoint.Checkpointer`.
      loader: the training loader (``steps_per_epoch``; ``restore`` on a resume).
      resume: continue from the newest checkpoint that restores (``resume_step``: from that
        one, and implies ``resume``); without checkpoints, start at step 0 with a warning.
      init_params: a warm start's weights: a `WarmStart` (`eqr_jax.warm_start.initial_params`,
        already fitted) or a parameter tree of ``model.init``'s structure (fitted here). Without
        them ``train.init_from`` is loaded. A checkpoint to resume wins over both.
    Raises:
      CheckpointError: checkpoints exist and no resume was asked for, or ``resume_step`` does
        not restore. ConfigMismatchError, ConfigError: as `resumed_config` and `fit_to_model`.
    """
    from eqr_jax.checkpoint import CheckpointError

    resume = resume or resume_step is not None
    steps_per_epoch = int(getattr(loader, "steps_per_epoch", 1) or 1)
    existing = checkpointer.all_steps()
    main = jax.process_index() == 0
    loader_state = warm_from = None
    if resume and existing:
        state, loader_state, _ = checkpointer.restore(program.abstract_state, cfg,
                                                      step=resume_step)
        loader.restore(loader_state)
        at = int(jax.device_get(state.step))
        cfg, length_change = resumed_config(cfg, checkpointer.read_item_json(at, "config"), at,
                                            steps_per_epoch)
        if main:
            print(f"[eqr] resumed from step {at} in {checkpointer.directory}", flush=True)
            if length_change:
                print(length_change, flush=True)
    else:
        if existing and not resume:
            raise CheckpointError(
                f"{cfg.train.out_dir} already holds checkpoints (steps "
                f"{', '.join(map(str, existing))}): pass --resume to continue that run, or "
                "choose another --out")
        if resume_step is not None:
            raise CheckpointError(f"no checkpoint at step {resume_step}: "
                                  f"{checkpointer.directory} is empty")
        if resume and main:
            print(f"[eqr] warning: --resume: no checkpoint in {checkpointer.directory} yet; "
                  "starting from step 0", file=sys.stderr, flush=True)
        cfg, warm = _warm_start(cfg, program, init_params)
        state = program.init_state(None if warm is None else warm.params)
        if warm is not None:
            warm_from = warm.source
            if main:
                print(f"[eqr] starting from {warm_from} (fresh optimiser, schedule and step)",
                      flush=True)
    # Written once the run is known to be this config's (a refused resume leaves it alone).
    if main:
        config_lib.save(cfg, storage.path(cfg.train.out_dir) / "config.json")
    # A resume may change the length (the schedule is re-planned over the new total).
    program = make_train_program(cfg, total_steps(cfg, steps_per_epoch), program.mesh)
    return RunStart(state, cfg, program, loader_state, warm_from, int(jax.device_get(state.step)))


def _warm_start(cfg: RunConfig, program: TrainProgram,
                init_params: Any) -> tuple[RunConfig, WarmStart | None]:
    """The weights a new run starts from, fitted to ``program``'s model (None: from seed), and
    the config that records where they came from."""
    tc = cfg.train
    if init_params is None:
        if not tc.init_from:
            return cfg, None
        from eqr_jax.warm_start import initial_params

        return cfg, initial_params(cfg)
    if isinstance(init_params, WarmStart):
        params = init_params.params
    else:
        params = fit_to_model(init_params, program.abstract_state.params)
    if not tc.init_from:  # the run's config records that it did not start from seed
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, init_from=API_SOURCE))
    return cfg, WarmStart(params, tc.init_from or "the given init_params")
