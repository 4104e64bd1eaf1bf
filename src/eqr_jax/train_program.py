"""The train program: the one place that assembles what a training step needs.

`make_train_program` turns (config, total steps, mesh) into a `TrainProgram` holding the model,
the optimiser and its learning-rate schedule, the abstract `TrainState` with its shardings and
the batch sharding, and hands out the jitted step (`TrainProgram.step`, ``n`` optimiser steps per
call, compiled once per process for the computing part of the config), the initial state
(`TrainProgram.init_state`, optionally from given weights), the restore target of a checkpoint
and the abstract arguments of an ahead-of-time compilation (`TrainProgram.abstract_args`).
`eqr_jax.training.train` runs it, `eqr plan` (`eqr_jax.aot`) compiles it for a target, and the
benchmarks and the ablation time it; so the program a plan compiles is the one a run executes.

The pieces stay public for tests and the parity harness: `TrainState`, `init_train_state`
(pure), `make_train_step` (the jitted scan over steps with the non-finite guard),
`example_batch` and `stack_batches`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from eqr_jax import dynamics, metrics as metrics_lib, optim, profiling
from eqr_jax import sharding as sharding_lib
from eqr_jax.act import ACTCarry, BATCH_KEYS, init_carry
from eqr_jax.config import RunConfig
from eqr_jax.losses import loss_and_grad
from eqr_jax.model import EqRModel

# Bit flags of the quantities the non-finite guard watches (``nonfinite_what``).
NONFINITE_QUANTITIES = {1: "loss", 2: "gradient norm"}


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; donated to the train step)."""

    params: Any
    opt_state: Any
    ema: Any  # None when EMA is off
    step: jax.Array  # int32 scalar: optimiser steps done
    rng: jax.Array  # base PRNG key (uint32[2]); step s uses fold_in(rng, s)
    carry: ACTCarry


def example_batch(cfg: RunConfig) -> dict[str, np.ndarray]:
    """Zeros shaped like one global batch: ``inputs``/``labels`` (G, N), ``puzzle_identifiers``
    (G,) (for shapes of the carry)."""
    G, N = cfg.data.global_batch_size, cfg.model.seq_len
    return {"inputs": np.zeros((G, N), np.int32), "labels": np.zeros((G, N), np.int32),
            "puzzle_identifiers": np.zeros((G,), np.int32)}


def stack_batches(batches: list[Mapping[str, np.ndarray]]) -> dict:
    """Host batches -> one dict with a leading (steps) axis, as `make_train_step` takes."""
    return {k: np.stack([b[k] for b in batches]) for k in BATCH_KEYS}


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
    # Named scopes: the ACT step and the optimiser are found by name in a profile.
    grad_fn = profiling.scoped("act_step", grad_fn)
    update = profiling.scoped("optimizer", optimizer.update)

    def one(state: TrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, (carry, metrics)), grads = grad_fn(state.params, state.carry, batch, key)
        updates, opt_state = update(grads, state.opt_state, state.params)
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


def compute_key(cfg: RunConfig) -> RunConfig:
    """``cfg`` without its bookkeeping fields (paths, intervals, where the weights came from):
    two configs with the same key compute the same step."""
    return dataclasses.replace(cfg, preset="", train=dataclasses.replace(
        cfg.train, out_dir="", log_every=0, eval_every=0, checkpoint_every=0, init_from="",
        init_step=0, init_weights="ema", profile="", profile_all_processes=False),
        data=dataclasses.replace(cfg.data, path=""))


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What one run's training step is made of (build it with `make_train_program`).

    ``abstract_state`` is the `TrainState` of `jax.ShapeDtypeStruct`s carrying
    ``state_shardings`` (the restore target of a checkpoint); ``batch_sharding`` places a
    stacked (steps, global batch, ...) batch. ``steps`` caches the jitted step per steps-per-call
    and is shared by every program of the same computing config (`compute_key`), total and mesh.
    """

    cfg: RunConfig
    total_steps: int
    mesh: Mesh
    model: EqRModel
    optimizer: optax.GradientTransformation
    schedule: Callable[[Any], Any]
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    steps: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def step(self, n: int | None = None) -> Callable:
        """The jitted, state-donating ``fn(state, batches) -> (state, metrics)`` of
        `make_train_step` for ``n`` steps per call (default ``train.steps_per_call``), with this
        program's shardings; compiled once per ``n`` in this process."""
        n = int(n or max(1, self.cfg.train.steps_per_call))
        if n not in self.steps:
            self.steps[n] = make_train_step(self.model, self.cfg, self.optimizer, mesh=self.mesh,
                                            state_sharding=self.state_shardings,
                                            steps_per_call=n)
        return self.steps[n]

    def init_state(self, params: Any = None) -> TrainState:
        """The first `TrainState`, placed with ``state_shardings``: from ``train.seed``, or from
        ``params`` (a warm start: a tree with the model's parameter names, shapes and dtypes,
        as `eqr_jax.warm_start.fit_to_model` checks and casts them in `eqr_jax.startup`)."""
        make = functools.partial(init_train_state, self.model, self.cfg, self.optimizer)
        init = jax.jit(make, out_shardings=self.state_shardings)
        if params is None:
            return init(example_batch(self.cfg))
        return init(example_batch(self.cfg), params)

    def first_call_steps(self) -> int:
        """Steps in the first call of a run from step 0: ``train.steps_per_call``, at most the
        total."""
        n = max(1, self.cfg.train.steps_per_call)
        return min(n, self.total_steps) if self.total_steps else n

    def abstract_args(self, n: int | None = None) -> tuple[TrainState, dict]:
        """``(state, batches)`` of `jax.ShapeDtypeStruct`s with the run's shardings for a call
        of ``n`` steps (default `first_call_steps`): what ``step(n)`` is lowered with ahead of
        time. ``batches``: ``inputs``/``labels`` (n, G, N), ``puzzle_identifiers`` (n, G)."""
        n = int(n or self.first_call_steps())
        batch = stack_batches([example_batch(self.cfg)] * n)
        return self.abstract_state, sharding_lib.abstract(batch, self.batch_sharding)


@functools.lru_cache(maxsize=16)
def _program_of(key: RunConfig, total: int, mesh: Mesh) -> TrainProgram:
    # One per computing config: its compiled steps are reused by later runs in the process
    # (a resume, the tests) and by `eqr plan`'s compilation of the same run.
    model = EqRModel(key.model)
    optimizer, schedule = optim.make_optimizer(key.train, total)
    make = functools.partial(init_train_state, model, key, optimizer)
    shapes = jax.eval_shape(make, example_batch(key))
    shardings = sharding_lib.train_state_shardings(shapes, mesh)
    return TrainProgram(key, total, mesh, model, optimizer, schedule,
                        sharding_lib.abstract(shapes, shardings), shardings,
                        sharding_lib.batch_sharding(mesh, stacked=True))


def make_train_program(cfg: RunConfig, total_steps: int, mesh: Mesh | None = None
                       ) -> TrainProgram:
    """The `TrainProgram` of ``cfg`` over ``total_steps`` optimiser steps (the length the
    learning-rate schedule is planned over) on ``mesh`` (default: every device,
    `eqr_jax.sharding.make_mesh`). Raises `ConfigError` when ``data.global_batch_size`` does not
    split over the mesh's devices."""
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    sharding_lib.check_divisible(cfg.data.global_batch_size, mesh, "data.global_batch_size")
    return dataclasses.replace(_program_of(compute_key(cfg), int(total_steps), mesh), cfg=cfg)
