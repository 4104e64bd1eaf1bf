"""Sharding: the mesh helpers, and data parallelism on 8 fake CPU devices: the same training steps
and the same evaluation as on 1 device, and the streaming evaluator's per-device pools give the
batched results (one subprocess, training and evaluation sharing the `eqr_jax.sharding`
helpers)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from eqr_jax import sharding
from eqr_jax.config import ConfigError


def test_mesh_and_shardings_on_this_process():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == (sharding.DATA_AXIS,) and mesh.devices.size == jax.device_count()
    batch = {"inputs": np.arange(8 * 3).reshape(8, 3)}
    g = sharding.to_global(batch, sharding.batch_sharding(mesh))
    np.testing.assert_array_equal(sharding.fetch(g["inputs"]), batch["inputs"])
    assert sharding.batch_sharding(mesh, stacked=True).spec == P(None, sharding.DATA_AXIS)
    assert sharding.replicated(mesh).spec == P()
    with pytest.raises(ValueError, match=r"rows=7 is not divisible by the 2 devices"):
        sharding.check_divisible(7, sharding.make_mesh(jax.devices() * 2), "rows")


_DP_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import functools
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import micro_run
    from eqr_jax import optim
    from eqr_jax.config import EvalConfig
    from eqr_jax.data.arrays import ArrayTrainLoader, eval_batches, make_puzzles
    from eqr_jax.evaluation import Evaluator
    from eqr_jax.model import EqRModel
    from eqr_jax.sharding import batch_sharding, make_mesh, to_global, train_state_shardings
    from eqr_jax.training import init_train_state, make_train_step, stack_batches
    assert jax.device_count() == 8, jax.devices()
    cfg = micro_run(steps_per_call=3)
    model = EqRModel(cfg.model)
    opt, _ = optim.make_optimizer(cfg.train, 10)
    loader = ArrayTrainLoader(*make_puzzles(64, 0), 16, 0)
    host = stack_batches([next(loader) for _ in range(3)])
    first = {{k: v[0] for k, v in host.items()}}
    batch = next(eval_batches(*make_puzzles(13, 1), 16))   # 13 puzzles, 3 padding rows
    out, ev = {{}}, {{}}
    for n in (8, 1):
        mesh = make_mesh(jax.devices()[:n])
        make = functools.partial(init_train_state, model, cfg, opt)
        sh = train_state_shardings(jax.eval_shape(make, first), mesh)
        state = jax.jit(make, out_shardings=sh)(first)
        fn = make_train_step(model, cfg, opt, mesh=mesh, state_sharding=sh, steps_per_call=3)
        state, m = fn(state, to_global(host, batch_sharding(mesh, stacked=True)))
        assert len(state.carry.latents.z_H.sharding.device_set) == n
        out[n] = jax.device_get((state.params, state.carry.latents, m))
        # The evaluator on the same mesh: rows split over n devices, results gathered back.
        evaluator = Evaluator(model, EvalConfig(), mesh=mesh)
        placed = evaluator.place_batch(batch)
        assert len(placed["inputs"].sharding.device_set) == n
        r = evaluator.evaluate_batch(state.params, placed, 0, depth=2, breadth=2)
        ev[n] = (r, evaluator.evaluate(state.params, [batch], depths=[2], breadths=[2]))
        if n == 8:  # streaming: one pool of 2 slots per device, each with its share of jobs
            streamer = Evaluator(model, EvalConfig(stream=True, stream_slots=16), mesh=mesh)
            (_, s8), = streamer.results(state.params, [batch], depth=2, breadth=2)
    real = s8.mask
    np.testing.assert_array_equal(s8.preds[real], ev[8][0].preds[real])
    np.testing.assert_array_equal(s8.steps[real], ev[8][0].steps[real])
    np.testing.assert_allclose(s8.residual[real], ev[8][0].residual[real], rtol=2e-4,
                               atol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(out[8]), jax.tree_util.tree_leaves(out[1])):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=2e-4, atol=2e-5)
    (r8, res8), (r1, res1) = ev[8], ev[1]
    assert r8.exact.shape == (16, 2) and r8.mask.sum() == 13
    np.testing.assert_array_equal(r8.mask, r1.mask)
    np.testing.assert_array_equal(r8.steps, r1.steps)
    np.testing.assert_allclose(r8.residual, r1.residual, rtol=2e-4, atol=2e-5)
    m8, m1 = res8["settings"][0]["metrics"], res1["settings"][0]["metrics"]
    assert m8["num_puzzles"] == m1["num_puzzles"] == 13
    for k in ("all/accuracy", "all/final_residual", "all/exact_accuracy"):
        assert abs(m8[k] - m1[k]) <= 1e-3 * max(1.0, abs(m1[k])), (k, m8[k], m1[k])
    print("DP_OK")
""")


def test_data_parallel_8_devices_equals_1():
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _DP_SCRIPT.format(tests=tests)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert "DP_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def test_initialize_distributed_reads_flags_then_environment(monkeypatch):
    """Flags override JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which are
    passed to `jax.distributed.initialize` explicitly (its bare call does not read them), with
    gloo collectives on CPU; without any setting nothing is initialised; malformed settings are
    `ConfigError`s naming the setting."""
    calls, updates = [], []
    monkeypatch.setattr(sharding, "_timeout_s", None)  # restored after the test
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.config, "update", lambda k, v: updates.append((k, v)))
    for var in (*sharding.DISTRIBUTED_ENV, "EQR_DISTRIBUTED", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert sharding.initialize_distributed() is False and calls == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert sharding.initialize_distributed() is True
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                         "process_id": 2}
    assert updates == [("jax_cpu_collectives_implementation", "gloo")]
    assert sharding.initialize_distributed("h:9", 2, 1) is True
    assert calls[-1] == {"coordinator_address": "h:9", "num_processes": 2, "process_id": 1}
    for args, match in ((("h:9", 2, 2), r"--process-id 2 is outside 0\.\.1"),
                        (("h", 2, 0), r"--coordinator 'h' must be HOST:PORT"),
                        ((None, 0, None), r"--num-processes must be >= 1")):
        with pytest.raises(ConfigError, match=match):
            sharding.initialize_distributed(*args)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers"):
        sharding.initialize_distributed()
    # A cluster launcher JAX detects itself: the bare call.
    for var in sharding.DISTRIBUTED_ENV:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert sharding.initialize_distributed() is True
    assert calls[-1] == {"coordinator_address": None, "num_processes": None, "process_id": None}


def test_initialize_distributed_passes_the_timeouts_this_jax_has(monkeypatch):
    """--distributed-timeout reaches `jax.distributed.initialize` as the arguments it has: the
    join deadline later than the watchdog's (which reports a missing peer in one line), the
    heartbeat and shutdown timeouts never below JAX's defaults; the barriers then use it."""
    calls = []

    def initialize(coordinator_address=None, num_processes=None, process_id=None,
                   initialization_timeout=300, heartbeat_timeout_seconds=100):
        calls.append((initialization_timeout, heartbeat_timeout_seconds))

    monkeypatch.setattr(sharding, "_timeout_s", None)
    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("EQR_DISTRIBUTED_TIMEOUT", "45")
    assert sharding.initialize_distributed("h:9", 2, 1, timeout_s="600") is True
    assert calls == [(2 * 600 + 30, 600)] and sharding.distributed_timeout() == 600
    assert sharding.initialize_distributed("h:9", 2, 1) is True
    assert calls[-1] == (2 * 45 + 30, 100) and sharding.distributed_timeout() == 45
