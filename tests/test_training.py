"""Training loop: learning, the non-finite guard, and the training signals in TensorBoard.

Exact resume and config refusal are in test_checkpoint.py (the runs are the session's
`resume_runs`), data parallelism in test_sharding.py, the loss in test_losses.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_params, micro_run, read_tensorboard, train_loaders as _loaders
from eqr_jax import optim
from eqr_jax.checkpoint import Checkpointer
from eqr_jax.data.arrays import ArrayTrainLoader, make_puzzles
from eqr_jax.metrics import train_scalars
from eqr_jax.model import EqRModel
from eqr_jax.sharding import make_mesh
from eqr_jax.train_program import make_train_program
from eqr_jax.training import NonFiniteError, init_train_state, stack_batches, train


def _assert_resumes_from_step_3_to_the_full_run(cfg, full_dir, run_dir):
    """The stopped run's only checkpoint is step 3, and --resume ends with the uninterrupted
    6-step run's parameters to the last bit."""
    ck = Checkpointer(run_dir / "checkpoints", read_only=True)
    assert ck.all_steps() == [3]
    ck.close()
    _, r = train(cfg, _loaders(cfg), progress=False, verbose=False, resume=True)
    assert (r["step"], r["steps_this_run"]) == (6, 3)
    for a, b in zip(jax.tree_util.tree_leaves(load_params(full_dir)),
                    jax.tree_util.tree_leaves(load_params(run_dir))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiny_model_learns():
    """Loss falls and accuracy rises within a few dozen steps (the jitted step directly; the
    config is the resume tests' one, so the compiled function is shared with them)."""
    cfg = micro_run(max_steps=6)  # schedule: warm-up 2 steps, then constant (lr_min_ratio 1)
    loader = ArrayTrainLoader(*make_puzzles(512, 0, blanks=(3, 6)), 16, 0)
    fn = make_train_program(cfg, 6, make_mesh()).step(3)
    opt, _ = optim.make_optimizer(cfg.train, 6)
    state = init_train_state(EqRModel(cfg.model), cfg, opt, next(loader))
    history = []
    for _ in range(12):
        batches = stack_batches([next(loader) for _ in range(3)])
        state, sums = fn(state, {k: jnp.asarray(v) for k, v in batches.items()})
        history.append(jax.device_get(sums))
    window = lambda hs: train_scalars({k: sum(h[k] for h in hs) for k in hs[0]}, 16)
    first, last = window(history[:3]), window(history[-3:])
    assert last["train/lm_loss"] < 0.8 * first["train/lm_loss"], (first, last)
    assert last["train/accuracy"] > first["train/accuracy"] + 0.1, (first, last)
    assert int(state.step) == 36


class _CorruptLabelsAt:
    """A training loader whose ``at``-th batch (1-based) has out-of-vocabulary labels, so the
    stablemax gather returns NaN there: a reproducible non-finite loss at that step."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.n = inner, at, 0
        self.steps_per_epoch = inner.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.inner)
        self.n += 1
        if self.n == self.at:
            b = dict(b, labels=np.full_like(b["labels"], 99))
        return b

    def state(self):
        return self.inner.state()

    def restore(self, st):
        self.inner.restore(st)


def test_training_signals_in_tensorboard(resume_runs):
    root, _, (r_full, _, _) = resume_runs
    tb = read_tensorboard(root / "full")
    for tag in ("train/q_halt_accuracy", "train/q_halt_precision", "train/q_halt_recall",
                "train/min_steps", "train/max_steps", "train/steps", "train/zH_rms",
                "train/zL_rms", "train/residual/act_step_02", "train/residual_mean",
                "train/grad_norm", "train/lr", "train/total_loss", "perf/tflops_per_device"):
        assert tag in tb and len(tb[tag]) == 2, tag          # logged at steps 3 and 6
        assert all(np.isfinite(v) for _, v in tb[tag]), tag
    assert [s for s, _ in tb["train/lr"]] == [3, 6]
    assert "perf/mfu" not in tb  # a CPU has no peak: no MFU rather than an invented one
    # halt_max_steps 2: rows halt after 1 (q_halt > 0) or 2 steps; a histogram with two buckets.
    hist = tb["train/steps_at_halt"]
    assert [s for s, _ in hist] == [3, 6] and all(len(c) == 2 and sum(c) > 0 for _, c in hist)
    assert 1 <= r_full["train/min_steps"] <= r_full["train/steps"] <= r_full["train/max_steps"] <= 2
    assert 0 <= r_full["train/q_halt_precision"] <= 1 and 0 <= r_full["train/q_halt_recall"] <= 1
    assert r_full["train/zH_rms"] > 0 and r_full["train/residual/act_step_02"] > 0


def test_nonfinite_guard_stops_without_saving_and_resume_continues(resume_runs, tmp_path):
    """A NaN loss at step 5 (inside the second jitted call of 3 steps) stops the run with an
    error naming the step and the quantity; the step-3 checkpoint is the newest one, and
    --resume from it reproduces the uninterrupted run exactly."""
    root, _, _ = resume_runs
    cfg = micro_run(str(tmp_path / "nan"), max_steps=6, checkpoint_every=3)
    tr, ev = _loaders(cfg)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 5: .*"
                                             r"newest checkpoint is step 3"):
        train(cfg, (_CorruptLabelsAt(tr, 5), ev), progress=False, verbose=False)
    _assert_resumes_from_step_3_to_the_full_run(cfg, root / "full", tmp_path / "nan")


def test_guard_freezes_state_inside_the_call():
    """A bad first step freezes the whole call: the good steps after it are not applied either,
    and the state comes back exactly as it went in."""
    cfg = micro_run(max_steps=6)
    fn = make_train_program(cfg, 6, make_mesh()).step(3)  # shared with the tests above
    opt, _ = optim.make_optimizer(cfg.train, 6)
    loader = ArrayTrainLoader(*make_puzzles(64, 1), 16, 0)
    good = [next(loader), next(loader)]
    bad = dict(good[0], labels=np.full((16, 16), 99, np.int32))
    state = init_train_state(EqRModel(cfg.model), cfg, opt, good[0])
    before = jax.device_get(state)
    state, m = fn(state, {k: jnp.asarray(v) for k, v in stack_batches([bad] + good).items()})
    # the loss is NaN; the gradient stays finite (the gather's transpose drops the bad index)
    assert int(m["nonfinite_step"]) == 1 and int(m["nonfinite_what"]) == 1
    assert float(m["num_steps"]) == 0 and float(m["count"]) == 0
    after = jax.device_get(state)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _SigtermAt(_CorruptLabelsAt):
    """A training loader that sends SIGTERM to this process when its ``at``-th batch is drawn
    (what a preemption does, at a reproducible point)."""

    def __next__(self):
        import os
        import signal

        self.n += 1
        if self.n == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)


def test_sigterm_saves_at_the_next_step_boundary_and_resume_is_exact(resume_runs, tmp_path):
    """SIGTERM while the 2nd batch is drawn (inside the first call of 3 steps): the run saves a
    checkpoint at step 3, the next boundary, and raises `Preempted`; --resume ends bit for bit
    where the uninterrupted run ended. The SIGTERM handler is the caller's again afterwards."""
    import signal

    from eqr_jax.preemption import Preempted

    root, _, _ = resume_runs
    cfg = micro_run(str(tmp_path / "pre"), max_steps=6)
    before = signal.getsignal(signal.SIGTERM)
    tr, ev = _loaders(cfg)
    with pytest.raises(Preempted, match=r"checkpoint saved at step 3 in .*pre/checkpoints; "
                                        r"continue with --resume") as e:
        train(cfg, (_SigtermAt(tr, 2), ev), progress=False, verbose=False)
    assert e.value.step == 3 and signal.getsignal(signal.SIGTERM) is before
    _assert_resumes_from_step_3_to_the_full_run(cfg, root / "full", tmp_path / "pre")


def test_jacobian_regularisation_trains_the_tiny_preset_without_harming_it(tmp_path):
    """`train.jac_reg` on the tiny preset at the micro width: 200 steps (both runs saturate, so
    the comparison is not at the mercy of a steep early learning curve), the same random
    streams. The Jacobian estimate ||df/dz||_F^2 / dim at the end states falls well below the
    unregularised run's, and test exact accuracy stays as high. (Measured once on the 2-core
    sandbox: exact 0.992 / 0.988, ||J||^2/dim 0.0085 / 0.0057; a weight of 3 instead of 0.5
    slows learning to 0.50 exact at this budget: the weight matters.)"""
    from conftest import eval_data, eval_run_config, replace
    from eqr_jax import dynamics
    from eqr_jax.evaluation import Evaluator

    batches, _, _ = eval_data(n=256, batch=64, seed=11)
    x_tr, y_tr = make_puzzles(512, 0, blanks=(2, 5))
    results = {}
    for reg in (0.0, 0.5):
        cfg = replace(eval_run_config(str(tmp_path / f"reg{reg}")),
                      train={"max_steps": 200, "jac_reg": reg, "jac_reg_samples": 2,
                             "log_every": 50, "steps_per_call": 10})
        state, r = train(cfg, (ArrayTrainLoader(x_tr, y_tr, 32), lambda: iter(())),
                         progress=False, verbose=False)
        model = EqRModel(cfg.model)
        ev = Evaluator(model, cfg.eval).evaluate(state.params, iter(batches), depths=[4],
                                                 breadths=[1])
        x = model.embed(state.params, jnp.asarray(batches[0]["inputs"]))
        z0 = model.init_latents(jax.random.PRNGKey(0), x.shape[0])
        z = dynamics.unroll(model.step, state.params, z0, x, None, 4,
                            adjoint=dynamics.NoGrad())[0]
        jac = dynamics.jacobian_frobenius_sq(model, state.params, z, x,
                                             key=jax.random.PRNGKey(1), samples=8)
        results[reg] = (r, ev["settings"][0]["metrics"]["all/exact_accuracy"],
                        float(jnp.mean(jac)) / (2 * z.z_H[0].size))
    (r0, acc0, jac0), (r1, acc1, jac1) = results[0.0], results[0.5]
    assert "train/jac_fro" not in r0 and r1["train/jac_fro"] > 0
    assert jac1 < 0.8 * jac0, (jac0, jac1)
    assert acc0 > 0.9 and acc1 >= acc0 - 0.05, (acc0, acc1)


def test_profile_window_traces_one_call_logs_perf_and_changes_nothing(resume_runs, tmp_path,
                                                                       monkeypatch):
    """`train.profile="3:1"` on the 6-step micro run (2 calls of 3 steps): one call traced,
    from step 3, into tb/plugins/profile where the profile plugin looks; the run's parameters
    and metrics equal the unprofiled run's (`resume_runs`' full run: the same compiled step).
    With a clock that advances 2 s per reading and the device kind patched to a v5e, each log
    window's perf/tflops_per_device is FLOPs / (2 s x devices) and perf/mfu that over 197 TFLOP/s."""
    from types import SimpleNamespace

    from jax.profiler import ProfileData

    from eqr_jax import perf, training

    root, _, (r_full, _, _) = resume_runs
    ticks = iter(range(0, 10_000, 2))
    monkeypatch.setattr(training, "time", SimpleNamespace(time=lambda: float(next(ticks))))
    monkeypatch.setattr(perf, "device_kind", lambda mesh=None: "TPU v5 lite")
    cfg = micro_run(str(tmp_path / "prof"), max_steps=6, profile="3:1")
    _, r = train(cfg, _loaders(cfg), progress=False, verbose=False)
    for a, b in zip(jax.tree_util.tree_leaves(load_params(root / "full")),
                    jax.tree_util.tree_leaves(load_params(tmp_path / "prof"))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k, v in r_full.items():
        if k.startswith("train/") and "time" not in k and "per_s" not in k:
            assert r[k] == v, k
    traces = sorted((tmp_path / "prof" / "tb").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1
    events = [e for plane in ProfileData.from_file(str(traces[0])).planes
              for line in plane.lines for e in line.events if e.name == "train"]
    assert len(events) == 1  # the one call's StepTraceAnnotation
    assert dict(events[0].stats)["step_num"] == 3
    tb = read_tensorboard(tmp_path / "prof")
    expected = perf.train_flops_per_step(cfg) * 3 / (2.0 * jax.device_count())
    assert [s for s, _ in tb["perf/tflops_per_device"]] == [3, 6]
    for (_, tflops), (_, mfu) in zip(tb["perf/tflops_per_device"], tb["perf/mfu"]):
        assert tflops == pytest.approx(expected / 1e12, rel=1e-6)  # float32 event values
        assert mfu == pytest.approx(expected / 197e12, rel=1e-6)
    assert r["perf/mfu"] == pytest.approx(expected / 197e12)
