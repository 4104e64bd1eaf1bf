"""Preemption: a SIGTERM (what TPU and cloud preemption send) stops training at a step boundary
that every process agrees on, after a checkpoint (`eqr_jax.training.train`; ``eqr train`` then
exits with status 75)."""

from __future__ import annotations

import signal
import sys
import threading

import jax


class Preempted(Exception):
    """Training stopped at a preemption notice (SIGTERM) after every process saved a checkpoint
    at ``step`` in ``directory``; ``--resume`` continues exactly (``eqr train`` exits with
    status 75)."""

    def __init__(self, step: int, directory):
        super().__init__(f"preempted (SIGTERM): checkpoint saved at step {step} in {directory}; "
                         "continue with --resume")
        self.step, self.directory = int(step), directory


class PreemptionWatch:
    """Whether a preemption notice (SIGTERM) arrived, agreed by every process at one step
    boundary.

    In a multi-process run (`jax.distributed` initialised) JAX's preemption sync manager
    receives SIGTERM on any process and `multihost_utils.reached_preemption_sync_point` turns
    True on every process at the same boundary id (each process calls it at every boundary with
    the same increasing ids; no per-step communication). With one process a SIGTERM handler sets
    a flag. Use as ``watch.reached(boundary)``; ``close()`` restores the previous handler.
    """

    def __init__(self):
        self.distributed = jax.distributed.is_initialized()
        self._flag = False
        self._previous = None
        if not self.distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._flag = True

    def reached(self, boundary: int) -> bool:
        if not self.distributed:
            return self._flag
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(int(boundary)))
        except RuntimeError as e:  # jax_enable_preemption_service off: no coordinated stop
            if jax.process_index() == 0:
                print(f"[eqr] warning: no preemption handling ({e})", file=sys.stderr,
                      flush=True)
            self.distributed, self._flag = False, False
            self.reached = lambda boundary: False  # type: ignore[method-assign]
            return False

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
