"""Profiler windows (``eqr train --profile START[:CALLS]``, ``eqr eval --profile``;
docs/performance.md, "Reading a profile").

`ProfileWindow` traces a few of training's jitted calls with `jax.profiler`: from the first
call boundary at or after optimiser step START, CALLS calls (each ``steps_per_call`` steps),
each under a `jax.profiler.StepTraceAnnotation` named by its first step. It waits for the
state before starting and after stopping (one host sync each, at the window only), so the
trace holds exactly those calls' device work and nothing of the calls before. The trace goes
where TensorBoard's profile plugin (XProf) looks: ``<log_dir>/plugins/profile/<run_id>/
<host>.xplane.pb``, with ``log_dir`` the run's ``tb/``. Only process 0 traces unless
``all_processes``. Tracing changes no result: the same programs run on the same values.
When ``log_dir`` is in a bucket (``gs://``), the profiler writes into a local staging folder
and the trace files are uploaded to ``log_dir`` once the window is stopped (outside the traced
calls), so TensorBoard / XProf read them from the bucket as from a local run.

`profile_batches` does the same for one batch of an evaluation.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import jax

from eqr_jax import storage

TRACE_GLOB = "plugins/profile/*/*.xplane.pb"


def scoped(name: str, fn):
    """``fn`` with its ops under ``jax.named_scope(name)`` when traced: the name prefixes the
    ops' ``op_name`` in the compiled program, so a profile groups them (docs/performance.md:
    ``act_step`` for the loss and gradient of one ACT step, ``optimizer`` for the update).
    Names only: the computation is unchanged."""
    def wrapped(*args, **kwargs):
        with jax.named_scope(name):
            return fn(*args, **kwargs)

    return wrapped


class ProfileWindow:
    """When to trace, decided at call boundaries.

    Args:
      start: optimiser step at (or after) which the first traced call begins.
      calls: jitted calls to trace (0: never trace).
      steps_per_call: optimiser steps per call (the window's length is calls x this).
      log_dir: the TensorBoard directory (the trace goes to ``log_dir/plugins/profile``).
      process_index / all_processes: only process 0 traces unless ``all_processes``.
    Use: ``state, *out = window.run(step, state, call)`` for every call (or its parts:
    ``before_call(step, state)``, the call under ``annotate(step)``, ``after_call(state)``);
    ``close()`` at the end (stops a window the run ended inside).
    """

    def __init__(self, start: int, calls: int, steps_per_call: int, log_dir: str | Path, *,
                 process_index: int = 0, all_processes: bool = False):
        self.start, self.calls = int(start), int(calls)
        self.steps_per_call = max(1, int(steps_per_call))
        self.log_dir = storage.path(log_dir, name="profile directory")
        self._staging: Path | None = None
        self.enabled = self.calls > 0 and (process_index == 0 or all_processes)
        self.tracing = self.done = False
        self.traced: list[int] = []  # first step of every traced call

    @classmethod
    def from_config(cls, cfg, log_dir: str | Path) -> "ProfileWindow":
        """The window ``cfg.train.profile`` asks for (never tracing when it is "")."""
        tc = cfg.train
        start, calls = tc.profile_window or (0, 0)
        return cls(start, calls, tc.steps_per_call, log_dir, process_index=jax.process_index(),
                   all_processes=tc.profile_all_processes)

    def before_call(self, step: int, state: Any) -> None:
        """At the boundary before the call that starts at optimiser ``step``."""
        if self.enabled and not (self.tracing or self.done) and step >= self.start:
            jax.block_until_ready(state)  # the calls before the window stay out of the trace
            self._staging = _start_trace(self.log_dir)
            self.tracing = True

    def annotate(self, step: int, name: str = "train"):
        """The context of one call: a step annotation while tracing (nothing otherwise)."""
        if not self.tracing:
            return contextlib.nullcontext()
        self.traced.append(int(step))
        return jax.profiler.StepTraceAnnotation(name, step_num=int(step))

    def after_call(self, state: Any) -> None:
        """At the boundary after a call (``state`` its output): stop after the last one."""
        if self.tracing and len(self.traced) >= self.calls:
            self._stop(state)

    def run(self, step: int, state: Any, call) -> Any:
        """``call(state)`` (one jitted call starting at optimiser ``step``, returning
        ``(state, ...)``) inside the window's boundaries: what the training loop calls."""
        self.before_call(step, state)
        with self.annotate(step):
            out = call(state)
        self.after_call(out[0])
        return out

    def close(self, state: Any = None) -> None:
        """Stop a window still open (the run ended inside it)."""
        if self.tracing:
            self._stop(state)

    def _stop(self, state: Any) -> None:
        if state is not None:
            jax.block_until_ready(state)  # the window's device work ends inside the trace
        jax.profiler.stop_trace()
        _upload_trace(self._staging, self.log_dir)
        self._staging = None
        self.tracing, self.done = False, True
        last = self.traced[-1] + self.steps_per_call if self.traced else self.start
        print(f"[eqr] profile of steps {self.traced[0] if self.traced else self.start}-{last} "
              f"({len(self.traced)} call(s)) written under {self.log_dir}/plugins/profile "
              "(TensorBoard's profile tab / XProf)", flush=True)

    def trace_files(self) -> list:
        """The ``.xplane.pb`` files under ``log_dir`` (every window's, oldest run id first)."""
        return sorted(self.log_dir.glob(TRACE_GLOB), key=str)


def profile_batches(batches: Iterable, log_dir: str | Path, *, index: int = 1,
                    enabled: bool = True) -> Iterator:
    """``batches`` passed through, tracing the work done on batch ``index`` (0-based; the first
    batch when there is only one, as batch 0 carries the compilations): from handing it out
    until the next batch is asked for (the evaluator has then finished with it for every
    setting of its grid) or the iteration ends. Annotated as step ``index`` of "eval"."""
    it = iter(batches)
    first = next(it, None)
    if first is None:
        return
    second = next(it, None)
    todo = [first] if second is None else [first, second]
    target = min(index, len(todo) - 1)
    tracing = staging = None
    log_dir = storage.path(log_dir, name="profile directory")
    try:
        for i, batch in enumerate(_chain(todo, it)):
            if enabled and i == target:
                staging = _start_trace(log_dir)
                tracing = jax.profiler.StepTraceAnnotation("eval", step_num=i)
                tracing.__enter__()
            yield batch
            if tracing is not None:
                _stop_eval(tracing, staging, log_dir)
                tracing = None
    finally:
        if tracing is not None:
            _stop_eval(tracing, staging, log_dir)


def _stop_eval(annotation, staging: Path | None, log_dir) -> None:
    annotation.__exit__(None, None, None)
    jax.effects_barrier()
    jax.profiler.stop_trace()
    _upload_trace(staging, log_dir)


def _start_trace(log_dir) -> Path | None:
    """Start `jax.profiler` tracing into ``log_dir``; the profiler writes local files only, so
    for a bucket it traces into a local staging folder, which it returns (None when local)."""
    if storage.is_remote(log_dir):
        staging = Path(tempfile.mkdtemp(prefix="eqr-profile-"))
        jax.profiler.start_trace(str(staging))
        return staging
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(str(log_dir))
    return None


def _upload_trace(staging: Path | None, log_dir) -> None:
    """After the trace is stopped: copy a staging folder's files to ``log_dir`` and drop it."""
    if staging is not None:
        storage.upload_tree(staging, log_dir)
        shutil.rmtree(staging, ignore_errors=True)


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest
