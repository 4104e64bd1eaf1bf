"""The preemption watch (`eqr_jax.preemption`) in one process: SIGTERM is caught, not fatal, and
reported at the next boundary; closing restores the previous handler. Training's stop and exact
resume after SIGTERM are in test_training.py, the two-process agreement in
test_multiprocess.py, the exit status 75 in test_cli.py."""

from __future__ import annotations

import os
import signal
import threading

from eqr_jax.preemption import Preempted, PreemptionWatch


def test_sigterm_is_reported_at_the_next_boundary_and_the_handler_restored():
    before = signal.getsignal(signal.SIGTERM)
    watch = PreemptionWatch()
    try:
        assert not watch.distributed
        assert not watch.reached(1) and not watch.reached(2)
        os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the watch
        assert watch.reached(3) and watch.reached(4)  # stays set until the loop acts on it
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGTERM) is before
    watch.close()  # idempotent


def test_watch_off_the_main_thread_installs_no_handler():
    """Signal handlers can only be set from the main thread: elsewhere the watch stays inert
    instead of failing (a library caller's worker thread)."""
    before = signal.getsignal(signal.SIGTERM)
    out = {}

    def worker():
        w = PreemptionWatch()
        out["reached"] = w.reached(1)
        out["handler"] = signal.getsignal(signal.SIGTERM)
        w.close()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert out == {"reached": False, "handler": before}


def test_preempted_names_step_and_directory():
    e = Preempted(12, "/runs/x/checkpoints")
    assert e.step == 12 and e.directory == "/runs/x/checkpoints"
    assert str(e) == ("preempted (SIGTERM): checkpoint saved at step 12 in /runs/x/checkpoints; "
                      "continue with --resume")
