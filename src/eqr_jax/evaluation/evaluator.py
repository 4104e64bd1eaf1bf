"""The one evaluation API: `Evaluator` (after big_vision's evaluators), used by training's
periodic evaluation, ``eqr eval``, ``eqr solve``, the analysis, the ablation and the benchmarks.

An `Evaluator` binds a model, an `EvalConfig` (halting rule, solver, test-time noise, seed,
streaming, ...) and a device mesh. `Evaluator.evaluate` makes one pass over a dataset and
evaluates every (depth, breadth) setting on each batch. A job (puzzle, copy) draws its keys from
the puzzle's index in the split and the copy (`core.job_keys`), so training's evaluation at
breadth 1 and ``eqr eval --breadth 1`` on the saved checkpoint give the same numbers, under the
same metric names (`aggregate.summarize_setting`), and the streaming evaluator
(``cfg.stream``) gives the batched one's per-job results.

Batches arrive as process-local rows; they are assembled into global arrays split along the
mesh's ``data`` axis, and per-row results come back through `eqr_jax.sharding.fetch`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax import modes, perf
from eqr_jax import sharding as sharding_lib
from eqr_jax.config import EvalConfig
from eqr_jax.evaluation import core
from eqr_jax.evaluation.aggregate import BatchResult, SettingAccumulator, summarize_setting
from eqr_jax.evaluation.stream import StreamRunner
from eqr_jax.losses import IGNORE_LABEL
from eqr_jax.model import EqRModel


def with_eval_noise(model: EqRModel, noise_scale: float | None) -> EqRModel:
    """``model`` with update noise ``noise_scale`` at test time (None: its training value).

    A different noise scale is a different static config, so it compiles separately.
    """
    if noise_scale is None or float(noise_scale) == float(model.cfg.noise_scale):
        return model
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    return EqRModel(dataclasses.replace(model.cfg, noise_scale=float(noise_scale)))


def copies_per_call(breadth: int, batch: int, max_rows: int = 0) -> int:
    """Copies run in one compiled call so that copies x batch <= max_rows (0: all at once)."""
    if max_rows <= 0:
        return breadth
    return max(1, min(breadth, max_rows // max(batch, 1)))


def default_mask(labels: np.ndarray) -> np.ndarray:
    """Real rows of a batch without a ``mask``: those with at least one supervised token."""
    return np.any(np.asarray(labels) != IGNORE_LABEL, axis=1)


class Evaluator:
    """Evaluate an `EqRModel` over depth x breadth with the settings of an `EvalConfig`.

    Args:
      model: the model; ``cfg.noise_scale`` (when set) replaces its update noise at test time.
      cfg: halting rule, solver, tolerances, seed, max_batches, max_rows, stream / stream_slots
        (see `EvalConfig`). ``cfg.depth`` 0 means the model's ``halt_max_steps``.
      mesh: device mesh whose ``data`` axis splits each batch (default: every device).
    """

    def __init__(self, model: EqRModel, cfg: EvalConfig = EvalConfig(), *, mesh=None):
        modes.check("halting rule", cfg.halt, modes.HALT_RULES)
        modes.check("solver", cfg.solver, modes.SOLVERS)
        modes.check("convergence metric", cfg.convergence_metric, modes.CONVERGENCE_METRICS)
        if cfg.solver != "unroll" and cfg.halt != "fixed":
            raise ValueError(f"halt={cfg.halt!r} needs solver='unroll' (the fixed-point solvers "
                             "stop each row on its own residual tolerance)")
        if cfg.stream and cfg.solver != "unroll":
            raise ValueError(f"stream=True needs solver='unroll', got {cfg.solver!r}")
        self.cfg = cfg
        self.model = with_eval_noise(model, cfg.noise_scale)
        self.mesh = sharding_lib.make_mesh() if mesh is None else mesh
        self.depth = cfg.depth_for(model.cfg.halt_max_steps)
        self._compiled: set = set()  # evaluation programs compiled ahead (several processes)

    @property
    def noise_scale(self) -> float:
        """The update noise std used at test time."""
        return float(self.model.cfg.noise_scale)

    # -- placement ----------------------------------------------------------------------------
    def place_params(self, params):
        """Parameters replicated over the mesh (a no-op when they already are)."""
        repl = sharding_lib.replicated(self.mesh)
        if jax.process_count() > 1:
            # A process-local copy (e.g. loaded from a checkpoint on each process) goes through
            # the host: every process holds the same values.
            params = jax.tree_util.tree_map(
                lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable
                else x, params)
        return jax.device_put(params, repl)

    def place_batch(self, batch: Mapping[str, Any]) -> dict:
        """Process-local ``inputs``/``labels`` (B, N) and ``mask`` (B,) -> global arrays split
        along ``data`` (replicated when the rows do not split evenly, on one process)."""
        labels = np.asarray(batch["labels"], np.int32)
        host = {"inputs": np.asarray(batch["inputs"], np.int32), "labels": labels,
                "mask": np.asarray(batch["mask"], bool) if "mask" in batch
                else default_mask(labels)}
        return sharding_lib.to_global(host, self.batch_sharding(labels.shape[0] *
                                                                 jax.process_count()))

    def batch_sharding(self, rows: int):
        """The sharding of a global batch of ``rows`` rows: split along ``data``, or replicated
        when the rows do not split evenly (one process only; `ValueError` otherwise)."""
        if rows % self.mesh.devices.size == 0:
            return sharding_lib.batch_sharding(self.mesh)
        if jax.process_count() == 1:
            return sharding_lib.replicated(self.mesh)
        raise ValueError(f"evaluation batch of {rows} rows does not split over the "
                         f"{self.mesh.devices.size} devices")

    def _check(self, depth: int | None, breadth: int | None) -> tuple[int, int]:
        depth = self.depth if depth is None else int(depth)
        breadth = self.cfg.breadth if breadth is None else int(breadth)
        if depth < 1 or breadth < 1:
            raise ValueError(f"depth and breadth must be >= 1, got {depth}, {breadth}")
        return depth, breadth

    # -- one batch ----------------------------------------------------------------------------
    def evaluate_batch(self, params, batch: Mapping[str, Any], first_index: int = 0, *,
                       depth: int | None = None, breadth: int | None = None) -> BatchResult:
        """Evaluate one batch at ``depth`` (default the config's) with ``breadth`` random
        initialisations per puzzle, chunked so that copies x B <= ``cfg.max_rows``.

        Args:
          params: model parameters.
          batch: ``inputs``, ``labels`` (B, N) int (`IGNORE_LABEL` for unsupervised tokens) and
            optionally ``mask`` (B,) bool (False rows never run and count nowhere); host or
            already placed (`place_batch`).
          first_index: the index in the evaluated split of the batch's first (global) row: row
            ``r`` is puzzle ``first_index + r`` and its copies draw `core.job_keys` of it.
        """
        depth, breadth = self._check(depth, breadth)
        params = self.place_params(params)
        if not isinstance(batch.get("mask"), jax.Array):
            batch = self.place_batch(batch)
        inputs, labels, mask = batch["inputs"], batch["labels"], batch["mask"]
        c = self.cfg
        b = inputs.shape[0]
        chunk = copies_per_call(breadth, b, c.max_rows)
        stop = core.stopping(c.halt, c.convergence_metric, c.convergence_tol)
        seed, first = jnp.int32(c.seed), jnp.int32(first_index)
        outs = []
        for start in range(0, breadth, chunk):
            ids = jnp.arange(start, start + chunk, dtype=jnp.int32)  # the last may overrun
            if c.solver == "unroll":
                fn, args = core.evaluate_copies, (self.model, params, inputs, labels, mask, seed,
                                                  first, ids, breadth, depth, stop)
                kw = dict(window=int(c.convergence_window), trace_points=int(c.trace_points))
            else:
                fn, args = core.solve_copies, (self.model, params, inputs, labels, mask, seed,
                                               first, ids)
                kw = dict(solver=c.solver, depth=depth, tol=float(c.convergence_tol))
            if jax.process_count() > 1:
                key = (fn.__name__, depth, breadth, chunk, inputs.shape)
                if key not in self._compiled:
                    self._compiled.add(key)
                    sharding_lib.compile_together(fn, args, fn.__name__, **kw)
            out = fn(*args, **kw)
            outs.append(sharding_lib.fetch(out))
        host_mask, host_labels = sharding_lib.fetch((mask, labels))
        cat = lambda name: np.concatenate([getattr(o, name) for o in outs], axis=0)[:breadth]
        per_copy = {name: np.moveaxis(cat(name), 0, 1) for name in
                    ("preds", "n_correct", "exact", "steps", "score", "residual", "q_halt")}
        # The residual record: chunks share the slot layout; sum them.
        return BatchResult(
            n_valid=np.asarray(outs[0].n_valid), trace_steps=np.asarray(outs[0].trace.steps),
            trace_sum=sum(o.trace.total.astype(np.float64) for o in outs),
            trace_count=sum(o.trace.rows.astype(np.int64) for o in outs),
            loop_steps=int(max(int(o.loop_steps) for o in outs)),
            executed=int(sum(int(o.loop_steps) * chunk * b for o in outs)),
            mask=np.asarray(host_mask, bool), labels=np.asarray(host_labels), **per_copy)

    # -- a dataset ----------------------------------------------------------------------------
    def runner(self, params, *, depth: int | None = None, breadth: int | None = None,
               accumulator: SettingAccumulator | None = None) -> "BatchedRunner | StreamRunner":
        """A runner of one (depth, breadth) setting over a sequence of batches: a
        `StreamRunner` when ``cfg.stream``, else a `BatchedRunner` (the same interface)."""
        depth, breadth = self._check(depth, breadth)
        cls = StreamRunner if self.cfg.stream else BatchedRunner
        return cls(self, self.place_params(params), depth, breadth, accumulator)

    def results(self, params, batches: Iterable[Mapping[str, Any]], *,
                depth: int | None = None, breadth: int | None = None, first_index: int = 0,
                accumulator: SettingAccumulator | None = None) -> Iterator[tuple[int, BatchResult]]:
        """(batch number, `BatchResult`) of every batch of one setting, as batches complete
        (in order when batched; streaming completes them roughly in order).

        ``first_index`` is the split index of the first batch's row 0; later batches follow
        on (each advances it by its global row count). ``accumulator`` (optional) also receives
        the per-setting cost (executed row-steps, residual record) of a streaming run.
        """
        run = self.runner(params, depth=depth, breadth=breadth, accumulator=accumulator)
        index = int(first_index)
        for bi, batch in enumerate(batches):
            placed = self.place_batch(batch)
            yield from run.feed(placed, index, bi)
            index += int(placed["inputs"].shape[0])
        yield from run.finish()

    def evaluate(self, params, batches: Iterable[Mapping[str, Any]], *,
                 depths: Sequence[int] | None = None, breadths: Sequence[int] | None = None,
                 progress: bool = False) -> dict[str, Any]:
        """Evaluate every (depth, breadth) combination in one pass over ``batches``.

        Args:
          batches: iterable of dicts as in `evaluate_batch` (e.g. an `EvalLoader`), in split
            order (batch ``i``'s rows are puzzles ``i * B ...``); only the first
            ``cfg.max_batches`` are used when that is set.
          depths, breadths: the grid (default: the config's depth / breadth).
        Returns:
          ``{"settings": [one `summarize_setting` dict per (depth, breadth), breadth-major, each
          with halt / solver / noise_scale / stream; empty without batches], "eval_config",
          "num_batches", "devices", "platform"}``; each setting's ``perf`` holds its
          throughput (`eqr_jax.perf.eval_scalars`: puzzle-steps/s, TFLOP/s per device, MFU).
        """
        depths = [self.depth] if depths is None else [int(d) for d in depths]
        breadths = [self.cfg.breadth] if breadths is None else [int(n) for n in breadths]
        params = self.place_params(params)
        grid = [(d, n) for n in breadths for d in depths]
        accs = {s: SettingAccumulator() for s in grid}
        runs = {s: self.runner(params, depth=s[0], breadth=s[1], accumulator=accs[s])
                for s in grid}
        it = iter(batches)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="eval", leave=False)
        num_batches, index = 0, 0
        for bi, batch in enumerate(it):
            if self.cfg.max_batches and bi >= self.cfg.max_batches:
                break
            placed = self.place_batch(batch)
            for s in grid:
                t0 = time.perf_counter()
                for _, r in runs[s].feed(placed, index, bi):
                    accs[s].add(r)
                accs[s].seconds += time.perf_counter() - t0
            index += int(placed["inputs"].shape[0])
            num_batches += 1
        for s in grid:
            t0 = time.perf_counter()
            for _, r in runs[s].finish():
                accs[s].add(r)
            accs[s].seconds += time.perf_counter() - t0
        settings = [summarize_setting(accs[s], s[0], s[1], self.cfg.convergence_top_k)
                    for s in grid] if num_batches else []
        for s in settings:
            s.update(halt=self.cfg.halt, solver=self.cfg.solver, noise_scale=self.noise_scale,
                     stream=bool(self.cfg.stream))
            # Throughput apart from the metrics: timing, not a result of the evaluation.
            s["perf"] = perf.eval_scalars(self.model.cfg, s["metrics"], self.mesh.size,
                                          perf.device_kind(self.mesh))
        return {"settings": settings, "eval_config": dataclasses.asdict(self.cfg),
                "num_batches": num_batches, "devices": jax.device_count(),
                "platform": jax.devices()[0].platform}

    # -- trajectories -------------------------------------------------------------------------
    def trajectory(self, params, inputs, first_index: int = 0, *, depth: int,
                   trace: Callable[[Any, Any], Any], copies: Sequence[int] = (0,)):
        """Per-step ``trace(params, latents)`` of the noisy trajectories of ``copies``.

        The same keys as `evaluate_batch` (copy ``c`` of puzzle ``first_index + r`` for row
        ``r``), so the state after step ``t`` is the one a fixed-depth evaluation reaches at
        depth ``t``. Not O(1) in depth: every step's trace is kept. Returns traces with axes
        (copies, depth, ...).
        """
        return _trajectory(self.model, depth, trace, self.place_params(params),
                           jnp.asarray(inputs, jnp.int32), jnp.int32(self.cfg.seed),
                           jnp.int32(first_index), jnp.asarray(list(copies), jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _trajectory(model: EqRModel, depth: int, trace: Callable, params, inputs, seed, first_index,
                copy_ids):
    x = model.embed(params, inputs)
    init_keys, noise_keys = core.batch_job_keys(seed, first_index, inputs.shape[0], copy_ids)

    def body(z, t):
        z = core.step_rows(model, params, z, x, core.fold_step(noise_keys, t))
        return z, jax.vmap(lambda s: trace(params, s))(z)

    _, out = jax.lax.scan(body, core.init_rows(model, init_keys), jnp.arange(depth))
    return jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1), out)


# ----------------------------------------------------------------------------------------------
# Runners: one (depth, breadth) setting over a sequence of batches


class BatchedRunner:
    """Each batch in one call of the frozen-row loop (`Evaluator.evaluate_batch`)."""

    def __init__(self, ev: Evaluator, params, depth: int, breadth: int,
                 accumulator: SettingAccumulator | None = None):
        self.ev, self.params, self.depth, self.breadth = ev, params, depth, breadth

    def feed(self, placed: Mapping[str, Any], first_index: int,
             tag: int) -> list[tuple[int, BatchResult]]:
        """Evaluate a placed batch whose row 0 is puzzle ``first_index``; returns it."""
        return [(tag, self.ev.evaluate_batch(self.params, placed, first_index, depth=self.depth,
                                             breadth=self.breadth))]

    def finish(self) -> list[tuple[int, BatchResult]]:
        return []


def evaluate(model: EqRModel, params, batches: Iterable[Mapping[str, Any]],
             cfg: EvalConfig = EvalConfig(), *, depths: Sequence[int] | None = None,
             breadths: Sequence[int] | None = None, mesh=None,
             progress: bool = False) -> dict[str, Any]:
    """``Evaluator(model, cfg, mesh=mesh).evaluate(params, batches, ...)`` (see there).

    Args:
      model: `EqRModel`; params: its parameters.
      batches: dicts with ``inputs``/``labels`` (B, N) and optionally ``mask`` (B,).
    """
    return Evaluator(model, cfg, mesh=mesh).evaluate(params, batches, depths=depths,
                                                     breadths=breadths, progress=progress)
