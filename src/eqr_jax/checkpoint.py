"""Orbax checkpoints of a training run, and loading a trained model for inference.

Layout: ``<run>/checkpoints/<step>/`` written atomically by an Orbax `CheckpointManager`, with
items

* ``params``, ``ema`` (if enabled), ``opt_state``, ``misc`` (step, rng, ACT carry): array trees;
* ``loader``: the data iterator position (JSON), ``config``: the resolved `RunConfig` (JSON),
  ``meta``: step and eval metrics (JSON).

Retention: the newest ``keep`` checkpoints plus the best one by ``all/exact_accuracy`` (the
evaluator's metric, which ``eqr eval`` on the checkpoint reproduces; docs/evaluation.md).
A checkpoint restores only into a run whose config agrees on every key that changes the
computation; the error names the keys that differ (`ConfigMismatchError`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from eqr_jax import config as config_lib
from eqr_jax.config import RunConfig

BEST_METRIC = "all/exact_accuracy"
# Keys that may differ between the saving and the resuming run (bookkeeping, not computation).
RESUME_IGNORED_KEYS = frozenset({
    "preset", "data.path", "data.prefetch", "data.eval_batch_size", "train.out_dir",
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.steps_per_call",
}) | frozenset(f"data.build_{k}" for k in ("kind", "source", "size", "train", "test", "num_aug",
                                            "difficulty", "seed"))
_ARRAY_ITEMS = ("params", "ema", "opt_state", "misc")


class ConfigMismatchError(ValueError):
    """The checkpoint was written by a run with a different configuration."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: RunConfig | Mapping, current: RunConfig | Mapping,
                       ignore=RESUME_IGNORED_KEYS) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every differing key not in ``ignore``."""
    a = _flatten(saved if isinstance(saved, Mapping) else config_lib.to_dict(saved))
    b = _flatten(current if isinstance(current, Mapping) else config_lib.to_dict(current))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)}


def resolve_dir(path: str | os.PathLike) -> Path:
    """Accept a run directory (with ``checkpoints/``) or the checkpoints directory itself."""
    p = Path(path).absolute()
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    return p


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for `eqr_jax.training.TrainState`-like trees."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.keep = max(1, int(keep))
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only,
                                               enable_async_checkpointing=False,
                                               read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # -- queries ------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_json(self, step: int, name: str) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.JsonRestore()}))[name]

    def best_step(self) -> int | None:
        best, best_val = None, -np.inf
        for s in self.all_steps():
            val = (self.read_json(s, "meta") or {}).get("metrics", {}).get(BEST_METRIC)
            if val is not None and val > best_val:
                best, best_val = s, val
        return best

    # -- save / restore -----------------------------------------------------------------------
    def save(self, step: int, state, *, loader_state: Mapping | None, cfg: RunConfig,
             metrics: Mapping[str, float] | None = None) -> None:
        """Save ``state`` (fields params, opt_state, ema, step, rng, carry) at ``step``."""
        items = {
            "params": ocp.args.StandardSave(state.params),
            "opt_state": ocp.args.StandardSave(state.opt_state),
            "misc": ocp.args.StandardSave({"step": state.step, "rng": state.rng,
                                           "carry": state.carry}),
            "loader": ocp.args.JsonSave(dict(loader_state or {})),
            "config": ocp.args.JsonSave(config_lib.to_dict(cfg)),
            "meta": ocp.args.JsonSave({"step": int(step), "metrics": {
                k: float(v) for k, v in (metrics or {}).items()}}),
        }
        if state.ema is not None:
            items["ema"] = ocp.args.StandardSave(state.ema)
        if step in self.manager.all_steps():
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()
        self._prune()

    def _prune(self) -> None:
        if jax.process_index() != 0:
            return
        steps = self.all_steps()
        keep = set(steps[-self.keep:])
        best = self.best_step()
        if best is not None:
            keep.add(best)
        for s in steps:
            if s not in keep:
                self.manager.delete(s)

    def restore(self, abstract_state, cfg: RunConfig, step: int | None = None):
        """Restore into the structure/shardings of ``abstract_state`` (a `TrainState` of
        `jax.ShapeDtypeStruct`s). Returns (state, loader_state dict, meta dict).

        Raises `ConfigMismatchError` naming the keys whose values differ from ``cfg``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if not (self.directory / str(step) / "opt_state").exists():
            raise ValueError(f"checkpoint {self.directory}/{step} holds weights only (e.g. "
                             "converted by `eqr convert`): it can be evaluated, not resumed")
        saved = self.read_json(step, "config")
        diff = config_differences(saved, cfg)
        if diff:
            lines = ", ".join(f"{k}: checkpoint={a!r} vs now={b!r}" for k, (a, b) in diff.items())
            raise ConfigMismatchError(
                f"checkpoint {self.directory}/{step} was written with a different config "
                f"({lines}); refusing to resume")
        misc_abs = {"step": abstract_state.step, "rng": abstract_state.rng,
                    "carry": abstract_state.carry}
        items = {
            "params": ocp.args.StandardRestore(abstract_state.params),
            "opt_state": ocp.args.StandardRestore(abstract_state.opt_state),
            "misc": ocp.args.StandardRestore(misc_abs),
            "loader": ocp.args.JsonRestore(),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_state.ema is not None:
            items["ema"] = ocp.args.StandardRestore(abstract_state.ema)
        r = self.manager.restore(step, args=ocp.args.Composite(**items))
        misc = r["misc"]
        state = abstract_state._replace(
            params=r["params"], opt_state=r["opt_state"],
            ema=r["ema"] if abstract_state.ema is not None else None,
            step=misc["step"], rng=misc["rng"], carry=misc["carry"])
        return state, dict(r["loader"] or {}), dict(r["meta"] or {})

    def close(self) -> None:
        self.manager.close()


def abstract_with_sharding(tree, sharding):
    """`jax.ShapeDtypeStruct` tree of ``tree`` (arrays or structs), all with ``sharding``."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def load_for_inference(ckpt_dir: str | os.PathLike, step: int | None = None,
                       use_ema: bool = True) -> tuple[RunConfig, Any]:
    """Load the config and parameters of a training checkpoint, on the default device.

    Args:
      ckpt_dir: a run directory (containing ``checkpoints/``), its ``checkpoints`` directory,
        or one step directory ``.../checkpoints/<step>``.
      step: which step (default: the latest; ignored when ``ckpt_dir`` is a step directory).
      use_ema: return the EMA (shadow) parameters when the checkpoint has them (the reference
        evaluates with EMA weights); otherwise the raw parameters.
    Returns:
      (RunConfig, params) with float32 parameters as `EqRModel.init` makes them.
    """
    from eqr_jax.model import EqRModel

    path = Path(ckpt_dir).absolute()
    if path.name.isdigit() and (path / "config").exists():
        step, path = int(path.name), path.parent
    path = resolve_dir(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    ck = Checkpointer(path, read_only=True)
    step = ck.latest_step() if step is None else int(step)
    if step is None or step not in ck.all_steps():
        raise FileNotFoundError(f"no checkpoint step {step} in {path} (have {ck.all_steps()})")
    cfg = config_lib.from_dict(RunConfig, ck.read_json(step, "config"), where=f"{path}/{step}")
    model = EqRModel(cfg.model)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    target = abstract_with_sharding(abstract, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    has_ema = (path / str(step) / "ema").exists()
    name = "ema" if (use_ema and has_ema) else "params"
    params = ck.manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(target)}))[name]
    return cfg, params
