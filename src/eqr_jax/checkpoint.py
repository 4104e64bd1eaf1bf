"""Orbax checkpoints of a training run, and loading a trained model for inference.

Layout: ``<run>/checkpoints/<step>/`` written atomically by an Orbax `CheckpointManager`, with
items

* ``params``, ``ema`` (if enabled), ``opt_state``, ``misc`` (step, rng, ACT carry): array trees;
* ``loader``: the data iterator position (JSON), ``config``: the resolved `RunConfig` (JSON),
  ``meta``: step and eval metrics (JSON); Orbax's own ``metrics`` item holds the eval metrics
  its retention policy ranks.

The run directory may be local or a Cloud Storage URL (``gs://bucket/run``, `eqr_jax.storage`).
A step is finished in one of Orbax's two ways (``train.checkpoint_commit``, `commit_mode`):
*rename* (a local disk: written under a temporary name, renamed when complete) or *marker* (an
object store has no atomic rename: written in place, finished when its ``commit_success.txt``
appears; also what a bucket mounted with gcsfuse needs, whose rename is a copy). A reader
detects the marker mode from the markers themselves, so an unfinished step is never taken as
the newest.

Retention is Orbax's preservation policy, applied inside ``save`` by every process: the newest
``keep`` checkpoints plus the best one by ``all/exact_accuracy`` (the evaluator's metric, which
``eqr eval`` on the checkpoint reproduces; docs/evaluation.md). Every method that touches
Orbax (save, restore, delete) is a collective in a multi-process run: every process calls it,
in the same order; nothing here reads or writes on one process only.

A checkpoint restores only into a run whose config agrees on every key that changes the
computation, except the run's length (`RESUME_LENGTH_KEYS`); the error names the keys that
differ (`ConfigMismatchError`). One that fails to
restore (a missing item, a truncated file) is reported in one line and `Checkpointer.restore`
falls back to the newest one that restores (`CheckpointError` when none does).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp

from eqr_jax import config as config_lib
from eqr_jax import storage
from eqr_jax import sharding as sharding_lib
from eqr_jax.config import ConfigError, RunConfig

BEST_METRIC = "all/exact_accuracy"
# Keys that may differ between the saving and the resuming run (bookkeeping, not computation).
RESUME_IGNORED_KEYS = frozenset({
    "preset", "data.path", "data.prefetch", "data.eval_batch_size", "train.out_dir",
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.steps_per_call", "train.init_from", "train.init_step", "train.init_weights",
    "train.profile", "train.profile_all_processes", "train.checkpoint_commit",
}) | frozenset(f"data.build_{k}" for k in ("kind", "source", "size", "train", "test", "num_aug",
                                            "difficulty", "seed"))
# Keys that set how long a run is: a resume may change them to extend (or shorten) the run;
# `eqr_jax.training.train` re-plans the total and the learning-rate schedule.
RESUME_LENGTH_KEYS = ("train.epochs", "train.max_steps")
_ARRAY_ITEMS = ("params", "ema", "opt_state", "misc")
_JSON_ITEMS = ("loader", "config", "meta")
COMMIT_MODES = ("auto", "rename", "marker")
COMMIT_MARKER = "commit_success.txt"  # Orbax's mark of a finished step in marker mode


class ConfigMismatchError(ConfigError):
    """The checkpoint was written by a run with a different configuration."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: absent, unreadable or incomplete (the message names the
    step and the directory)."""


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


def resolve_dir(path) -> storage.AnyPath:
    """Accept a run directory (with ``checkpoints/``) or the checkpoints directory itself (a
    local path or a gs:// URL)."""
    p = storage.absolute(path)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    return p


def commit_mode(directory, setting: str = "auto") -> str:
    """How the steps of checkpoints ``directory`` are finished: ``rename`` or ``marker``.

    ``setting`` ``auto``: marker on a bucket (gs://); on a local path, marker when a step there
    already carries Orbax's commit marker (a run written in marker mode, e.g. on a gcsfuse
    mount), else rename."""
    if setting not in COMMIT_MODES:
        raise ConfigError(f"train.checkpoint_commit={setting!r} is not one of "
                          f"{list(COMMIT_MODES)}")
    if setting != "auto":
        return setting
    d = storage.absolute(directory)
    if storage.is_remote(d):
        return "marker"
    try:
        steps = [p for p in d.iterdir() if p.name.isdigit()]
    except OSError:
        return "rename"
    return "marker" if any((p / COMMIT_MARKER).exists() for p in steps) else "rename"


def _best_value(metrics: Mapping[str, Any] | None) -> float:
    """The retention metric of a checkpoint's metrics (-inf without one: never the best)."""
    v = (metrics or {}).get(BEST_METRIC)
    return float(v) if v is not None and math.isfinite(float(v)) else -math.inf


def short_reason(e: BaseException, limit: int = 240) -> str:
    """One line for an exception: its type and the first line of its message, shortened
    (TensorStore errors run to pages)."""
    first = (str(e).strip().splitlines() or [""])[0]
    first = re.sub(r"\s*\[tensorstore_spec.*", "", first)  # pages of JSON
    parts = first.split(": ")
    if len(parts) > 3 and "driver" in first:  # TensorStore nests every layer's message
        first = ": ".join(parts[-2:])
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[eqr] warning: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for `eqr_jax.training.TrainState`-like trees."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False,
                 commit: str = "auto"):
        self.directory = storage.absolute(directory)
        self.keep = max(1, int(keep))
        self.commit = commit_mode(self.directory, commit)
        # The newest `keep` plus the best by BEST_METRIC (latest among ties). best_fn makes Orbax
        # store the metrics beside each step, where the policy reads them back on every process.
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=self.keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=_best_value, n=1,
                                          keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(
            create=not read_only, enable_async_checkpointing=False, read_only=read_only,
            best_fn=_best_value, best_mode="max",
            preservation_policy=None if read_only else policy,
            temporary_path_class=(ocp.path.atomicity.CommitFileTemporaryPath
                                  if self.commit == "marker" else None))
        self.manager = ocp.CheckpointManager(self.epath(self.directory), options=options)

    @staticmethod
    def epath(p):
        """``p`` as the `etils.epath.Path` Orbax takes (a URL stays a URL)."""
        from etils import epath

        return epath.Path(str(p))

    # -- queries (file reads on this process: no collective) ------------------------------------
    def all_steps(self) -> list[int]:
        """The finished steps (an unfinished one, under its temporary name or without its
        commit marker, is not listed)."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int):
        return self.directory / str(int(step))

    def read_item_json(self, step: int, name: str) -> Any:
        """A JSON item of ``step`` read from its file on this process (no collective).

        Raises `CheckpointError` when it is missing or unreadable."""
        f = self.step_dir(step) / name / "metadata"
        try:
            return json.loads(f.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {self.step_dir(step)} lacks its {name!r} item "
                                  f"({f} not found)") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.step_dir(step)}: cannot read {f} "
                                  f"({short_reason(e)})") from None

    def read_json(self, step: int, name: str) -> Any:
        """A JSON item of ``step`` through Orbax (a collective: every process calls it)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.JsonRestore()}))[name]

    def metrics(self, step: int) -> dict[str, float]:
        """The eval metrics saved with ``step`` ({} when it had none)."""
        return dict(self.manager.metrics(step) or {})

    def best_step(self) -> int | None:
        """The step the retention keeps as the best (None when no step has the metric)."""
        scored = [(_best_value(self.metrics(s)), s) for s in self.all_steps()]
        scored = [(v, s) for v, s in scored if v > -math.inf]
        return max(scored)[1] if scored else None

    # -- save / restore -----------------------------------------------------------------------
    def save(self, step: int, state, *, loader_state: Mapping | None, cfg: RunConfig,
             metrics: Mapping[str, float] | None = None) -> None:
        """Save ``state`` (fields params, opt_state, ema, step, rng, carry) at ``step``, then
        apply the retention policy. A collective: every process calls it."""
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        items = {
            "params": ocp.args.StandardSave(state.params),
            "opt_state": ocp.args.StandardSave(state.opt_state),
            "misc": ocp.args.StandardSave({"step": state.step, "rng": state.rng,
                                           "carry": state.carry}),
            "loader": ocp.args.JsonSave(dict(loader_state or {})),
            "config": ocp.args.JsonSave(config_lib.to_dict(cfg)),
            "meta": ocp.args.JsonSave({"step": int(step), "metrics": metrics}),
        }
        if state.ema is not None:
            items["ema"] = ocp.args.StandardSave(state.ema)
        if step in self.manager.all_steps():
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def _problem(self, step: int, abstract_state, cfg: RunConfig) -> str | None:
        """Why ``step`` cannot be resumed, from its files on this process (None: it looks whole).
        Raises `ConfigMismatchError` when it was written under another config."""
        d = self.step_dir(step)
        if not (d / "opt_state").exists() and (d / "params").exists():
            return ("it holds weights only (e.g. converted by `eqr convert`): it can be "
                    "evaluated, not resumed")
        need = ["params", "opt_state", "misc", *_JSON_ITEMS]
        if abstract_state.ema is not None:
            need.append("ema")
        missing = [n for n in need if not (d / n).is_dir()]
        if missing:
            return f"missing item(s) {', '.join(missing)}"
        try:
            saved = self.read_item_json(step, "config")
            self.read_item_json(step, "loader")
        except CheckpointError as e:
            return str(e).split(": ", 1)[-1]
        diff = config_differences(saved, cfg, RESUME_IGNORED_KEYS | set(RESUME_LENGTH_KEYS))
        if diff:
            lines = ", ".join(f"{k}: checkpoint={a!r} vs now={b!r}" for k, (a, b) in diff.items())
            raise ConfigMismatchError(
                f"checkpoint {d} was written with a different config ({lines}); refusing to "
                "resume (start a new --out, or pass the same overrides)")
        return None

    def _restore_step(self, step: int, abstract_state):
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
        if int(jax.device_get(misc["step"])) != int(step):
            raise CheckpointError(f"it records step {int(jax.device_get(misc['step']))}")
        state = abstract_state._replace(
            params=r["params"], opt_state=r["opt_state"],
            ema=r["ema"] if abstract_state.ema is not None else None,
            step=misc["step"], rng=misc["rng"], carry=misc["carry"])
        return state, dict(r["loader"] or {}), dict(r["meta"] or {})

    def restore(self, abstract_state, cfg: RunConfig, step: int | None = None,
                warn: Callable[[str], None] = _warn):
        """Restore into the structure/shardings of ``abstract_state`` (a `TrainState` of
        `jax.ShapeDtypeStruct`s). Returns ``(state, loader_state dict, meta dict)``.

        ``step`` None: the newest checkpoint that restores; each one that does not (a missing
        item, a truncated or corrupt file) is reported through ``warn`` in one line and the
        previous one is tried. A given ``step`` must restore itself. Every process calls this
        and they agree on each attempt (`eqr_jax.sharding.agree`), so all of them fall back
        together.

        Raises:
          CheckpointError: no checkpoint, the given ``step`` does not exist or does not restore,
            or none restores (the message lists each step and why).
          ConfigMismatchError: the checkpoint was written under another config (names the keys).
        """
        from eqr_jax.sharding import agree

        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is not None:
            if int(step) not in steps:
                raise CheckpointError(f"no checkpoint at step {step} in {self.directory} "
                                      f"(steps: {', '.join(map(str, steps))})")
            candidates = [int(step)]
        else:
            candidates = steps[::-1]
        failures = []
        for i, s in enumerate(candidates):
            problem = self._problem(s, abstract_state, cfg)
            result = None
            if agree([problem is None])[0]:
                try:
                    result = self._restore_step(s, abstract_state)
                except Exception as e:  # a corrupt checkpoint raises many kinds; all reported
                    problem = short_reason(e)
            if agree([result is not None])[0]:
                return result
            problem = problem or "another process could not restore it"
            failures.append((s, problem))
            if step is not None:
                raise CheckpointError(f"checkpoint {self.step_dir(s)} does not restore: "
                                      f"{problem}")
            if i + 1 < len(candidates):
                warn(f"checkpoint {self.step_dir(s)} does not restore ({problem}); trying step "
                     f"{candidates[i + 1]}")
        raise CheckpointError(f"no checkpoint in {self.directory} restores: " + "; ".join(
            f"step {s}: {p}" for s, p in failures))

    def close(self) -> None:
        self.manager.close()


def _open_step(ckpt_dir, step: int | None = None, commit: str = "auto"):
    """A read-only `Checkpointer` on the checkpoints of ``ckpt_dir`` and the step `locate`
    picks (the caller closes it); raises as `locate` does."""
    path = storage.absolute(ckpt_dir, name="--checkpoint")
    if path.name.isdigit() and (path / "config").exists():
        step, path = int(path.name), path.parent
    path = resolve_dir(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    # The finished steps as Orbax lists them: a step still being written (under a temporary
    # name, or without its commit marker) is not one.
    ck = Checkpointer(path, read_only=True, commit=commit)
    steps = ck.all_steps()
    if not steps or (step is not None and int(step) not in steps):
        ck.close()
        if not steps:
            raise CheckpointError(f"no checkpoint in {path}")
        raise CheckpointError(f"no checkpoint at step {step} in {path} (steps: "
                              f"{', '.join(map(str, steps))})")
    return ck, steps[-1] if step is None else int(step)


def locate(ckpt_dir, step: int | None = None, commit: str = "auto"):
    """``(checkpoints directory, step)`` of a run directory, its ``checkpoints/`` or one step
    directory ``.../checkpoints/<step>`` (which fixes the step); ``step`` None: the newest
    finished one. Local or gs:// (the directory is a `pathlib.Path` or an `etils.epath.Path`).

    Raises FileNotFoundError (no such directory) or `CheckpointError` (no checkpoint, or none
    at ``step``: the message lists the steps there are)."""
    ck, step = _open_step(ckpt_dir, step, commit)
    ck.close()
    return ck.directory, step


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

    ck, step = _open_step(ckpt_dir, step)
    try:
        path, steps = ck.directory, ck.all_steps()
        where = f"{path}/{step}/config"
        try:
            cfg = config_lib.from_dict(RunConfig, ck.read_item_json(step, "config"), where=where)
        except ConfigError as e:
            raise ConfigError(str(e) if where in str(e) else f"{where}: {e}") from None
        model = EqRModel(cfg.model)
        abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0))
        # This process's first device: with several processes each loads its own copy.
        target = sharding_lib.abstract(abstract,
                                       jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        has_ema = (path / str(step) / "ema").exists()
        name = "ema" if (use_ema and has_ema) else "params"
        try:
            params = ck.manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(target)}))[name]
        except Exception as e:  # a corrupt checkpoint raises many kinds; one line names it
            others = [s for s in steps if s != step]
            hint = f"; pick another with --step ({', '.join(map(str, others))})" if others else ""
            raise CheckpointError(f"checkpoint {path}/{step} does not restore ({name}: "
                                  f"{short_reason(e)}){hint}") from None
        return cfg, params
    finally:
        ck.close()
