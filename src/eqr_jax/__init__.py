"""eqr-jax: Equilibrium Reasoners in JAX/Flax.

The public API (imported lazily, so ``import eqr_jax`` stays light; see docs/ and README.md):

Configs
  `RunConfig` (`ModelConfig`, `DataConfig`, `TrainConfig`, `EvalConfig`), `preset` (``sudoku``,
  ``maze``, ``tiny``), `apply_overrides` (``section.key=value`` strings), `ConfigError`.
Model
  `EqRModel`: ``model.init(key) -> params``; ``model.embed(params, inputs (B, N) int) -> x
  (B, N, H)``; ``model.init_latents(key, B) -> LatentState`` (z_H, z_L each (B, N, H));
  ``model.step(params, latents, x, key) -> latents``; ``model.readout(params, latents) ->
  Readout`` (logits (B, N, V), q_halt (B,)).
Dynamics
  `unroll` (``lax.scan`` of the step map under a gradient adjoint: `Truncated`, `Full`,
  `OneStep`, `Phantom`, `NoGrad`), `fixed_point` (per-row Anderson / iteration solve of the
  noise-free map, implicit gradient), `jacobian_frobenius_sq` (Hutchinson estimate of
  ||d step / d state||_F^2 per row, for Jacobian regularisation).
Training
  `train(cfg, loaders, mesh=None) -> (TrainState, metrics)`; `make_train_program(cfg,
  total_steps, mesh) -> TrainProgram` (the jitted step, initial state and abstract arguments
  that `train` runs and ``eqr plan`` compiles); `make_loaders(cfg)` opens a dataset
  folder's loaders, `ArrayTrainLoader` / `eval_batches` wrap NumPy arrays.
Evaluation
  `Evaluator(model, eval_cfg).evaluate(params, batches, depths=..., breadths=...)` and the
  function `evaluate`: the one evaluation path of training, ``eqr eval`` and ``eqr solve``.
Checkpoints and interop
  `load_checkpoint(run_dir) -> (RunConfig, params)`; official PyTorch checkpoints:
  `load_reference_model(path) -> (RunConfig, params, which)`, `load_reference_checkpoint`,
  `params_from_reference`.
"""

from __future__ import annotations

import importlib

from eqr_jax.platforms import quiet_absent_tpu

__version__ = "0.1.0"

# name -> (module, attribute): resolved on first access (PEP 562).
_API = {
    "RunConfig": ("eqr_jax.config", "RunConfig"),
    "ModelConfig": ("eqr_jax.config", "ModelConfig"),
    "DataConfig": ("eqr_jax.config", "DataConfig"),
    "TrainConfig": ("eqr_jax.config", "TrainConfig"),
    "EvalConfig": ("eqr_jax.config", "EvalConfig"),
    "ConfigError": ("eqr_jax.config", "ConfigError"),
    "preset": ("eqr_jax.config", "preset"),
    "apply_overrides": ("eqr_jax.config", "apply_overrides"),
    "EqRModel": ("eqr_jax.model", "EqRModel"),
    "LatentState": ("eqr_jax.model", "LatentState"),
    "Readout": ("eqr_jax.model", "Readout"),
    "unroll": ("eqr_jax.dynamics", "unroll"),
    "fixed_point": ("eqr_jax.dynamics", "fixed_point"),
    "Truncated": ("eqr_jax.dynamics", "Truncated"),
    "Full": ("eqr_jax.dynamics", "Full"),
    "OneStep": ("eqr_jax.dynamics", "OneStep"),
    "Phantom": ("eqr_jax.dynamics", "Phantom"),
    "jacobian_frobenius_sq": ("eqr_jax.dynamics", "jacobian_frobenius_sq"),
    "Implicit": ("eqr_jax.dynamics", "Implicit"),
    "NoGrad": ("eqr_jax.dynamics", "NoGrad"),
    "train": ("eqr_jax.training", "train"),
    "TrainState": ("eqr_jax.training", "TrainState"),
    "TrainProgram": ("eqr_jax.train_program", "TrainProgram"),
    "make_train_program": ("eqr_jax.train_program", "make_train_program"),
    "make_loaders": ("eqr_jax.data.prepare", "make_loaders"),
    "ArrayTrainLoader": ("eqr_jax.data.arrays", "ArrayTrainLoader"),
    "eval_batches": ("eqr_jax.data.arrays", "eval_batches"),
    "Evaluator": ("eqr_jax.evaluation", "Evaluator"),
    "evaluate": ("eqr_jax.evaluation", "evaluate"),
    "load_checkpoint": ("eqr_jax.checkpoint", "load_for_inference"),
    "load_reference_model": ("eqr_jax.interop", "load_reference_model"),
    "load_reference_checkpoint": ("eqr_jax.interop", "load_reference_checkpoint"),
    "params_from_reference": ("eqr_jax.interop", "params_from_reference"),
}

__all__ = ["__version__", *_API]


# Before JAX starts a backend: on a machine without TPU chips, libtpu (installed by the test and
# tpu extras) would print errors from its TPU probe (eqr_jax.platforms).
quiet_absent_tpu()


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'eqr_jax' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
