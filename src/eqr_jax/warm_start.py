"""Starting a run from existing weights (``eqr train --init-from``, ``train(init_params=...)``).

A *warm start* is a new run: its parameters and EMA shadow start from given weights, while the
optimiser state, the learning-rate schedule, the step counter, the data order and the ACT carry
start fresh, exactly as for a run from random weights. The weights come from one of this
project's runs (any checkpoint, EMA or raw) or from an official ``.pth`` read without torch.
The weights must fit the new run's architecture, parameter by parameter and shape by shape; the
rest of the model config (noise, cycles, halting, dtype) may differ, which is what fine-tuning
at another depth or noise needs. Continuing a run (same optimiser state, same step) is
``--resume`` instead (`eqr_jax.training.train`).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from eqr_jax import storage
from eqr_jax.config import ConfigError, RunConfig

# What `train` records in ``train.init_from`` for weights handed over as ``init_params``.
API_SOURCE = "<init_params>"


class WarmStart(NamedTuple):
    """Initial weights already fitted to the run's model (`initial_params`): `eqr_jax.startup`
    starts from them without fitting them again."""

    params: Any
    source: str  # where they came from, for the log


def is_reference_file(source: str | os.PathLike) -> bool:
    """Whether ``source`` (local or gs://) names an official PyTorch checkpoint rather than a
    run directory."""
    p = storage.path(source, name="--init-from")
    return p.name.endswith(".pth") or p.is_file()


def load_init_weights(cfg: RunConfig) -> tuple[Any, str]:
    """The weights ``cfg.train.init_from`` names, as a float32 NumPy parameter tree in the
    source's own architecture, and a description for the log; `fit_to_model` then checks them
    against the new run's model.

    Run directories (or their ``checkpoints/``, or one step directory) give the checkpoint of
    ``train.init_step`` (0: the newest) with its EMA or raw weights (``train.init_weights``; a
    run without EMA gives its raw weights and says so); an official ``.pth`` gives its EMA shadow
    or raw state dict, converted under the architecture its saved config records (a bare state
    dict: under ``cfg.model``).

    Raises:
      ConfigError: ``init_from`` is empty, or ``init_step`` was given for a ``.pth``.
      FileNotFoundError, CheckpointError, PthError, CheckpointMismatchError: the source is
        missing or damaged, or an official file whose tensors do not fit its own config.
    """
    tc = cfg.train
    if not tc.init_from:
        raise ConfigError("train.init_from is empty: nothing to start from")
    source = str(storage.absolute(tc.init_from, name="--init-from"))
    use_ema = tc.init_weights == "ema"
    if is_reference_file(source):
        from eqr_jax import interop

        if tc.init_step:
            raise ConfigError(f"train.init_step={tc.init_step} applies to a run directory, not "
                              f"to the official checkpoint {source}")
        ckpt = interop.load_reference_checkpoint(source)
        which = "ema" if use_ema and ckpt["ema_state_dict"] is not None else "raw"
        state = ckpt["ema_state_dict"] if which == "ema" else ckpt["state_dict"]
        model = cfg.model  # a bare state dict records no architecture: the new run's
        if ckpt["config"] is not None:
            # The checkpoint's own architecture, so that a misfit is reported parameter by
            # parameter as for a run directory; sizes the weights do not show (an attention
            # model's seq_len) are the new run's.
            try:
                model = interop.run_config_from_reference(ckpt).model
            except ConfigError:
                model = interop.run_config_from_reference(
                    ckpt, seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size).model
        params = interop.params_from_reference(state, model)
        where = f"{source} (official checkpoint, step {ckpt['step']})"
    else:
        from eqr_jax.checkpoint import load_for_inference, locate

        directory, step = locate(source, tc.init_step or None)
        which = "ema" if use_ema and (directory / str(step) / "ema").is_dir() else "raw"
        _, params = load_for_inference(directory, step=step, use_ema=which == "ema")
        where = f"{directory / str(step)}"
    note = " (it saved no EMA)" if use_ema and which == "raw" else ""
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), jax.device_get(params))
    return params, f"{where}, {'EMA' if which == 'ema' else 'raw'} weights{note}"


def initial_params(cfg: RunConfig) -> WarmStart:
    """`load_init_weights` then `fit_to_model` against ``EqRModel(cfg.model)``'s parameters:
    the ``init_from`` weights ready for ``train(init_params=...)`` or an evaluation, and their
    description (a `WarmStart`, which unpacks as ``(params, source)``). Raises as both do,
    before any data is built or anything is compiled."""
    from eqr_jax.model import EqRModel

    params, where = load_init_weights(cfg)
    template = jax.eval_shape(EqRModel(cfg.model).init, jax.random.PRNGKey(0))
    return WarmStart(fit_to_model(params, template, f"the weights of {where}"), where)


def fit_to_model(params: Any, template: Any, what: str = "the initial weights") -> Any:
    """``params`` as NumPy arrays with ``template``'s dtypes, after checking that both trees
    hold the same parameters with the same shapes (``template``: arrays or
    `jax.ShapeDtypeStruct`s, e.g. ``jax.eval_shape(model.init, key)``).

    Raises `ConfigError` naming the first parameter (in sorted order) that is missing, extra or
    shaped differently, with both shapes.
    """
    got = flatten_dict(params) if isinstance(params, dict) else None
    want = flatten_dict(template)
    if got is None:
        raise ConfigError(f"{what}: expected a parameter tree (nested dict), got "
                          f"{type(params).__name__}")
    name = lambda path: "/".join(map(str, path))
    for path in sorted(set(got) | set(want), key=name):
        if path not in want:
            raise ConfigError(f"{what} do not fit the model: parameter {name(path)} "
                              f"{tuple(np.shape(got[path]))} is not in the model")
        if path not in got:
            raise ConfigError(f"{what} do not fit the model: its parameter {name(path)} "
                              f"{tuple(want[path].shape)} is missing from them")
        if tuple(np.shape(got[path])) != tuple(want[path].shape):
            raise ConfigError(f"{what} do not fit the model: parameter {name(path)} has shape "
                              f"{tuple(np.shape(got[path]))}, the model needs "
                              f"{tuple(want[path].shape)}")
    return jax.tree_util.tree_map(lambda a, t: np.asarray(a, dtype=t.dtype),
                                  jax.device_get(params), template)
