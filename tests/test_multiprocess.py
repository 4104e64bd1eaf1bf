"""Several processes, as on a TPU pod or a GPU cluster, on localhost: two `eqr train` processes x
2 CPU devices (gloo collectives), with their run directory and dataset in a Cloud Storage
bucket (a local emulator), train with checkpoints and evaluations inside the run; one of
them receives SIGTERM mid-run, both save a checkpoint at the same step and exit 75; `--resume`
(two processes again, with a one-call profiler window that process 0 alone writes) finishes
the run. Every logged loss and evaluation metric, and the final
``exact_accuracy:`` of both processes, match one process x 4 devices on a local disk. Two
processes then warm-start a new run from the bucket run (`--init-from gs://...`), whose step-0
evaluation equals that run's last, and extend the bucket run (`--resume` with a larger
`train.max_steps`); `eqr eval --checkpoint gs://...` reproduces its last evaluation.

Every launch is a subprocess group with a hard timeout, killed on failure, so a hang fails the
test instead of the CI job.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import EVAL_MODEL_OVERRIDES, read_tensorboard, write_array_dataset
from eqr_jax.data.arrays import make_puzzles

TIMEOUT_S = 300  # per launch; a healthy one takes ~10-30 s on a quiet 2-core CI box
GRACE_S = 60  # for the other processes once one has exited
# The processes' own timeouts (join, barriers, heartbeat), generous for a loaded machine.
DISTRIBUTED_TIMEOUT_S = 600

# `eqr train` as the command line runs it; on the process given EQR_TEST_SIGTERM_AT, the
# training loader sends SIGTERM to its own process when that batch is drawn, then draws slowly
# so the preemption notice reaches every process while the run still has steps to go.
_LAUNCH = textwrap.dedent("""
    import os, signal, sys, time
    at = int(os.environ.get("EQR_TEST_SIGTERM_AT", "0"))
    if at:
        from eqr_jax.data import prepare
        make = prepare.make_loaders

        class SigtermAt:
            def __init__(self, inner):
                self.inner, self.n = inner, 0
            def __getattr__(self, name):
                return getattr(self.inner, name)
            def __iter__(self):
                return self
            def __next__(self):
                self.n += 1
                if self.n == at:
                    os.kill(os.getpid(), signal.SIGTERM)
                if self.n >= at:
                    time.sleep(0.5)
                return next(self.inner)

        def patched(*a, **k):
            train_loader, eval_factory = make(*a, **k)
            return SigtermAt(train_loader), eval_factory
        prepare.make_loaders = patched
    from eqr_jax.cli import main
    sys.exit(main(sys.argv[1:]))
""")

STEPS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], processes: int, devices: int, tmp, *, flags: bool = False,
            sigterm_at: dict[int, int] = {}, cwds: list | None = None,
            timeout_s: float = TIMEOUT_S) -> list[tuple[int, str]]:
    """Run `eqr train ARGS` as ``processes`` processes x ``devices`` CPU devices; returns each
    process's (exit status, output). The coordinator comes from the JAX_* environment, or from
    the --coordinator/--num-processes/--process-id flags when ``flags``; ``cwds``: each
    process's working directory. Once one process has exited the others get `GRACE_S` to
    follow (a peer that died leaves them waiting in a collective); all are killed at
    ``timeout_s``."""
    port = _free_port()
    procs, logs = [], []
    for i in range(processes):
        # Backend optimisation level 0 halves XLA's compile time, which dominates these short
        # runs; every launch uses it, so the comparisons are like for like.
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
            f"--xla_force_host_platform_device_count={devices} "
            "--xla_backend_optimization_level=0"),
            EQR_DISTRIBUTED_TIMEOUT=str(DISTRIBUTED_TIMEOUT_S))
        for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                  "EQR_TEST_SIGTERM_AT"):
            env.pop(k, None)
        extra = []
        if processes > 1 and flags:
            extra = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                     "--process-id", str(i)]
        elif processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
        if i in sigterm_at:
            env["EQR_TEST_SIGTERM_AT"] = str(sigterm_at[i])
        logs.append(tmp / f"launch-{port}-{i}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, "train", *args, *extra], env=env, text=True,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=cwds[i] if cwds else None))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                deadline = min(deadline, time.monotonic() + GRACE_S)
            time.sleep(0.2)
    finally:
        hung = [i for i, p in enumerate(procs) if p.poll() is None]
        for i in hung:  # a hang never outlives the test
            os.killpg(procs[i].pid, signal.SIGKILL)
            procs[i].wait()
    outs = [f.read_text() for f in logs]
    if hung:
        tails = "\n".join(f"--- process {i} (exit {p.returncode}):\n{outs[i][-3000:]}"
                          for i, p in enumerate(procs))
        pytest.fail(f"{processes}-process launch: process(es) {hung} did not finish\n{tails}")
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def _check(results, status: int):
    for i, (rc, out) in enumerate(results):
        assert rc == status, f"process {i} exited {rc}, expected {status}:\n{out[-4000:]}"


def _final_accuracy(out: str) -> float:
    line = out.strip().splitlines()[-1]
    assert line.startswith("exact_accuracy: "), out[-2000:]
    return float(line.split(": ")[1])


def test_two_processes_on_a_bucket_with_preemption_and_resume_match_one_process(
        tmp_path, gcs_bucket, monkeypatch):
    """The two-process runs keep their run directory and read their dataset in a bucket (the
    emulator): ``--out gs://...``, ``--data gs://...``; the one-process reference is local."""
    from pathlib import Path

    from eqr_jax import storage

    data = write_array_dataset(tmp_path / "data", make_puzzles(256, 0, blanks=(2, 5)),
                               make_puzzles(40, 1, blanks=(2, 5)))
    data_url = gcs_bucket.url("data")
    storage.copy_tree(data, storage.path(data_url))
    monkeypatch.setenv("EQR_CACHE_DIR", str(tmp_path / "cache"))  # both "hosts" share it
    common = ["--preset", "tiny", "--no-progress", *EVAL_MODEL_OVERRIDES,
              "data.global_batch_size=16", "data.eval_batch_size=8", f"train.max_steps={STEPS}",
              "train.steps_per_call=2", "train.log_every=2", "train.eval_every=8",
              "train.checkpoint_every=8", "train.lr=3e-3", "train.lr_warmup_steps=2",
              "eval.noise_scale=0.5"]
    one, two = tmp_path / "one", gcs_bucket.url("two")

    (rc, out_one), = _launch([*common, "--data", str(data), "--out", str(one)], 1, 4, tmp_path)
    assert rc == 0, out_one[-4000:]
    common += ["--data", data_url]

    # Process 1 alone is sent SIGTERM while drawing its 3rd batch (inside step 3).
    preempted = _launch([*common, "--out", two], 2, 2, tmp_path, sigterm_at={1: 3})
    _check(preempted, 75)
    saved = {int(m) for _, out in preempted
             for m in re.findall(r"checkpoint saved at step (\d+)", out)}
    assert len(saved) == 1, [out[-2000:] for _, out in preempted]  # the same step on both
    step = saved.pop()
    assert 2 <= step < STEPS
    # Finished on the bucket as Orbax marks it there: its commit marker.
    assert f"checkpoints/{step}/commit_success.txt" in gcs_bucket.objects(two)

    # With a profiler window (one call from step 10): process 0 alone writes the trace, and
    # the results below are unchanged by it.
    resumed = _launch([*common, "--out", two, "--resume", "--profile", "10:1"], 2, 2,
                      tmp_path, flags=True)
    _check(resumed, 0)
    assert f"resumed from step {step}" in resumed[0][1]
    first = max(10, step)  # the first call boundary at or after step 10 (calls of 2 steps)
    assert f"[eqr] profile of steps {first}-{first + 2} (1 call(s))" in resumed[0][1]
    assert "[eqr] profile of" not in resumed[1][1]
    assert len([o for o in gcs_bucket.objects(two) if o.startswith("tb/plugins/profile/")
                and o.endswith(".xplane.pb")]) == 1
    finals = [_final_accuracy(out) for _, out in resumed]
    assert finals[0] == finals[1] == _final_accuracy(out_one)

    # Every logged training loss and evaluation metric: same steps, same values up to the
    # summation order of the cross-process reductions.
    tb_one, tb_two = read_tensorboard(one), read_tensorboard(two)
    logs, evals = list(range(2, STEPS + 1, 2)), [8, 16]
    for tag, steps in (("train/total_loss", logs), ("train/lm_loss", logs),
                       ("train/grad_norm", logs), ("train/accuracy", None),  # when rows halt
                       ("all/exact_accuracy", evals), ("all/accuracy", evals),
                       ("all/final_residual", evals)):
        a, b = dict(tb_one[tag]), dict(tb_two[tag])
        assert sorted(a) == sorted(b) and sorted(a) == (steps or sorted(a)), (tag, a, b)
        np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)],
                                   rtol=1e-5, atol=1e-7, err_msg=tag)
    assert dict(tb_one["all/accuracy"])[16] > 0

    # A two-process warm start from the bucket run: its step-0 evaluation is that run's last
    # one (the same EMA weights and evaluation settings).
    longer = [a for a in common if not a.startswith("train.max_steps=")]
    warm = _launch([*longer, "train.max_steps=2", "--init-from", two, "--out",
                    str(tmp_path / "warm")], 2, 2, tmp_path)
    _check(warm, 0)
    tb_warm = read_tensorboard(tmp_path / "warm")
    for tag in ("all/exact_accuracy", "all/accuracy", "all/final_residual"):
        assert dict(tb_warm[tag])[0] == pytest.approx(dict(tb_two[tag])[STEPS], rel=1e-5), tag

    # Train longer: the two-process run resumed with a larger total continues to it.
    extended = _launch([*longer, f"train.max_steps={STEPS + 4}", "--out", two, "--resume"],
                       2, 2, tmp_path)
    _check(extended, 0)
    out = extended[0][1]  # process 0 reports
    assert (f"resumed from step {STEPS}" in out and f"total steps {STEPS} -> {STEPS + 4}"
            in out), out[-2000:]
    assert f"checkpoints/{STEPS + 4}/commit_success.txt" in gcs_bucket.objects(two)

    # `eqr eval` of the bucket checkpoint (one process) reproduces the run's last evaluation,
    # reading its dataset through the bucket too.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    ev = subprocess.run([sys.executable, "-m", "eqr_jax.cli", "eval", "--checkpoint", two,
                         "--no-progress"], env=env, capture_output=True, text=True,
                        timeout=TIMEOUT_S)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
    assert _final_accuracy(ev.stdout) == _final_accuracy(out)
    assert "eval/results.json" in gcs_bucket.objects(two)
    assert not Path("gs:").exists()


def _error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("eqr train: ")]


def test_separate_disks_stop_every_process_before_training(tmp_path):
    """Two processes whose working directories differ ("hosts" with their own disks) and the
    same relative ``--out``: both stop within a minute with the same one line, exit 2, before
    anything is trained or checkpointed, and the check's token is gone."""
    data = write_array_dataset(tmp_path / "data", make_puzzles(64, 0, blanks=(2, 5)),
                               make_puzzles(8, 1, blanks=(2, 5)))
    disks = [tmp_path / "host0", tmp_path / "host1"]
    for d in disks:
        d.mkdir()
    start = time.monotonic()
    results = _launch(["--preset", "tiny", "--data", str(data), "--out", "runs/x",
                       "--no-progress", "data.global_batch_size=16", "train.max_steps=4",
                       "train.checkpoint_every=2"], 2, 2, tmp_path, cwds=disks, timeout_s=60)
    assert time.monotonic() - start < 60
    _check(results, 2)
    lines = [_error_lines(out) for _, out in results]
    assert all(len(ls) == 1 for ls in lines), [out[-2000:] for _, out in results]
    assert lines[0] == lines[1], lines
    assert ("process 1 of 2 does not see the run directory --out runs/x" in lines[0][0]
            and "a shared mount (NFS" in lines[0][0]), lines[0]
    for (_, out), d in zip(results, disks):
        assert "Traceback" not in out and "step 1" not in out, out[-2000:]
        run = d / "runs" / "x"
        assert not (run / "checkpoints").exists() and not (run / ".eqr-shared-storage-check"
                                                           ).exists(), list(run.iterdir())


def test_a_peer_that_never_joins_is_one_line(tmp_path):
    """Process 0 of 2 alone, with a 3 s distributed timeout: one line naming process 1, exit 2,
    soon after the timeout (JAX alone would abort with a C++ stack trace)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", EQR_DISTRIBUTED_TIMEOUT="1000")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "eqr_jax.cli", "train", "--preset", "tiny", "--out",
         str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{_free_port()}",
         "--num-processes", "2", "--process-id", "0", "--distributed-timeout", "3"],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - start < 40
    assert proc.stderr.strip().splitlines() == [
        "eqr train: process 1 of 2 did not join within 3 s (the coordinator at "
        f"{proc.args[proc.args.index('--coordinator') + 1]}, this is process 0); start every "
        "process with the same --coordinator and --num-processes and its own --process-id, or "
        "wait longer with --distributed-timeout SECONDS / EQR_DISTRIBUTED_TIMEOUT"], proc.stderr
    assert not (tmp_path / "run").exists()


def test_shared_storage_verdict_on_data_and_init_from(tmp_path):
    """The start-up check's decision from the processes' views: identical per-host copies of a
    dataset pass, a copy missing on one process or holding other data is named, and so is an
    ``--init-from`` run with other checkpoint steps."""
    from eqr_jax.shared_storage import _fingerprint_data, _fingerprint_source, verdict

    a = write_array_dataset(tmp_path / "a", make_puzzles(16, 0), make_puzzles(4, 1))
    b = write_array_dataset(tmp_path / "b", make_puzzles(16, 0), make_puzzles(4, 1))
    c = write_array_dataset(tmp_path / "c", make_puzzles(32, 0), make_puzzles(4, 1))
    fa, fb, fc = (_fingerprint_data(p) for p in (a, b, c))
    assert fa == fb != fc and _fingerprint_data(tmp_path / "none") == ""
    view = lambda data, init="": {"out": True, "data": data, "init": init}
    assert verdict([view(fa), view(fb)], "o", "d") is None
    assert verdict([view(fa), {**view(fa), "out": False}, {**view(fa), "out": False}], "o"
                   ).startswith("processes 1, 2 of 3 do not see the run directory --out o")
    assert verdict([view(fa), view("")], "o", "d").startswith(
        "--data d is missing on process 1 of 2 but present on process 0:")
    assert verdict([view(fa), view(fc)], "o", "d").startswith(
        f"--data d differs between process 0 ({fa}) and process 1 ({fc}):")
    run = tmp_path / "run" / "checkpoints"
    (run / "4").mkdir(parents=True)
    one = _fingerprint_source(tmp_path / "run")
    (run / "8").mkdir()
    assert one == "directory with checkpoint steps 4" != _fingerprint_source(tmp_path / "run")
    assert "--init-from r differs between process 0 (directory with checkpoint steps 4)" in \
        verdict([view(fa, one), view(fa, _fingerprint_source(tmp_path / "run"))], "o", "d", "r")


def test_distributed_timeout_setting(monkeypatch):
    """The flag's value, else EQR_DISTRIBUTED_TIMEOUT, else 300 s; a bad value is one error."""
    from eqr_jax import sharding

    monkeypatch.setattr(sharding, "_timeout_s", None)
    monkeypatch.delenv("EQR_DISTRIBUTED_TIMEOUT", raising=False)
    assert sharding.distributed_timeout() == 300
    monkeypatch.setenv("EQR_DISTRIBUTED_TIMEOUT", "45")
    assert (sharding.distributed_timeout(), sharding.distributed_timeout("2.5")) == (45, 2.5)
    with pytest.raises(sharding.ConfigError, match="--distributed-timeout must be a positive"):
        sharding.distributed_timeout("0")
    monkeypatch.setenv("EQR_DISTRIBUTED_TIMEOUT", "soon")
    with pytest.raises(sharding.ConfigError, match="EQR_DISTRIBUTED_TIMEOUT must be a positive"):
        sharding.distributed_timeout()
