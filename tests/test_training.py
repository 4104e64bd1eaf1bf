"""Training loop: the loss against the reference fixture, learning, exact resume, config
refusal, and data-parallel equivalence on 8 fake CPU devices."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqr_jax import config as config_lib
from eqr_jax import losses
from eqr_jax.checkpoint import ConfigMismatchError, load_for_inference
from eqr_jax.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from eqr_jax.train import act_loss, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_data import ArrayTrainLoader, eval_batches, make_puzzles  # noqa: E402

FIXTURES = Path(os.environ.get(
    "EQR_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


def _fixture(name):
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not found (expected ../shared/fixtures beside "
                    "the repository, or set EQR_FIXTURES)")
    return np.load(path)


def tiny_cfg(out_dir="", **train_kw) -> RunConfig:
    model = ModelConfig(seq_len=16, vocab_size=6, H_cycles=2, L_cycles=1, L_layers=1,
                        hidden_size=32, num_heads=2, expansion=1.0, mlp_t=True,
                        pos_encodings="none", halt_max_steps=2, forward_dtype="float32")
    kw = dict(epochs=100, lr=3e-3, lr_warmup_steps=2, weight_decay=0.1, ema_rate=0.9,
              steps_per_call=3, log_every=3, eval_every=0, checkpoint_every=0, out_dir=out_dir)
    kw.update(train_kw)
    return RunConfig(preset="test", model=model, data=DataConfig(global_batch_size=16),
                     train=TrainConfig(**kw))


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["parity_sudoku_mlpt.npz", "parity_maze_attn_rope.npz"])
def test_loss_matches_reference_stablemax(name):
    f = _fixture(name)
    logits, labels = jnp.asarray(f["step1/logits"]), jnp.asarray(f["labels_for_loss"])
    ref = f["stablemax_ce_tokenwise"]
    ce = np.asarray(losses.stablemax_cross_entropy(logits, labels))
    np.testing.assert_allclose(ce, ref, rtol=1e-5, atol=1e-6)
    # The ACT loss: per-row mean CE over valid tokens + 0.5 BCE(q_halt, exact), / global batch.
    q = jnp.asarray(f["step1/q_halt"])
    G = 7
    loss, parts = act_loss(logits, q, labels, G)
    lab = f["labels_for_loss"]
    valid = lab != -100
    lm = ref.sum(-1) / np.maximum(valid.sum(-1), 1)
    exact = ((np.argmax(f["step1/logits"], -1) == lab) | ~valid).all(-1) & valid.any(-1)
    qf = f["step1/q_halt"].astype(np.float64)
    bce = np.maximum(qf, 0) - qf * exact + np.log1p(np.exp(-np.abs(qf)))
    np.testing.assert_allclose(np.asarray(parts["lm"]), lm, rtol=1e-5)
    np.testing.assert_allclose(float(loss), (lm + 0.5 * bce).sum() / G, rtol=1e-5)


def test_tiny_model_learns():
    """Loss falls and accuracy rises within a few dozen steps (the jitted step directly; the
    config is the resume tests' one, so the compiled function is shared with them)."""
    from eqr_jax import optim
    from eqr_jax.model import EqRModel
    from eqr_jax.train import (_cached_train_step, _compute_key, init_state, make_mesh,
                               stack_batches, summarize)
    cfg = tiny_cfg(max_steps=6)  # schedule: warm-up 2 steps, then constant (lr_min_ratio 1)
    loader = ArrayTrainLoader(*make_puzzles(512, 0, blanks=(3, 6)), 16, 0)
    fn = _cached_train_step(_compute_key(cfg), 6, 3, make_mesh())
    opt, _ = optim.make_optimizer(cfg.train, 6)
    state = init_state(EqRModel(cfg.model), cfg, opt, next(loader))
    history = []
    for _ in range(12):
        batches = stack_batches([next(loader) for _ in range(3)])
        state, sums = fn(state, {k: jnp.asarray(v) for k, v in batches.items()})
        history.append(jax.device_get(sums))
    window = lambda hs: summarize({k: sum(h[k] for h in hs) for k in hs[0]}, 16)
    first, last = window(history[:3]), window(history[-3:])
    assert last["train/lm_loss"] < 0.8 * first["train/lm_loss"], (first, last)
    assert last["train/accuracy"] > first["train/accuracy"] + 0.1, (first, last)
    assert int(state.step) == 36


# ----------------------------------------------------------------------------------------------
# Exact resume and config refusal (one module-scoped set of runs, compiled once)


def _loaders(cfg):
    tr = make_puzzles(256, 0)
    return ArrayTrainLoader(*tr, cfg.data.global_batch_size, cfg.train.seed), lambda: iter(())


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    full = tiny_cfg(str(root / "full"), max_steps=6)
    r_full = train(full, loaders=_loaders(full), progress=False, verbose=False)
    split = tiny_cfg(str(root / "split"), max_steps=6)
    r_a = train(split, loaders=_loaders(split), progress=False, verbose=False, stop_after=3)
    r_b = train(split, loaders=_loaders(split), progress=False, verbose=False, resume=True)
    return root, split, (r_full, r_a, r_b)


def test_resume_is_bit_exact(resume_runs):
    root, _, (r_full, r_a, r_b) = resume_runs
    assert (r_a["step"], r_a["steps_this_run"]) == (3, 3)
    assert (r_b["step"], r_b["steps_this_run"]) == (6, 3)
    assert r_full["step"] == 6
    for use_ema in (False, True):
        cfg1, p1 = load_for_inference(root / "full", use_ema=use_ema)
        cfg2, p2 = load_for_inference(root / "split" / "checkpoints", use_ema=use_ema)
        assert cfg1.model == cfg2.model
        for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The last-window training metrics agree too (same carry, data and randomness).
    for k in ("train/total_loss", "train/accuracy", "train/grad_norm"):
        assert r_full[k] == r_b[k], k
    # Checkpoints hold the run config beside them.
    assert json.loads((root / "split" / "config.json").read_text())["train"]["max_steps"] == 6


def test_resume_refuses_other_config(resume_runs):
    root, split, _ = resume_runs
    other = dataclasses.replace(split, train=dataclasses.replace(split.train, lr=1e-2))
    with pytest.raises(ConfigMismatchError, match=r"train\.lr"):
        train(other, loaders=_loaders(other), progress=False, verbose=False, resume=True)


def test_load_for_inference_step_dir(resume_runs):
    root, _, _ = resume_runs
    cfg, params = load_for_inference(root / "split" / "checkpoints" / "3", use_ema=False)
    assert cfg.train.max_steps == 6 and "embed_tokens" in params


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


def _read_tb(run_dir):
    """{tag: [(step, value or histogram counts)]} from the tensorboardX event files of a run."""
    import struct
    from tensorboardX.proto import event_pb2
    out = {}
    for f in sorted(Path(run_dir, "tb").glob("events.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                val = list(v.histo.bucket) if v.HasField("histo") else v.simple_value
                out.setdefault(v.tag, []).append((ev.step, val))
    return out


def test_training_signals_in_tensorboard(resume_runs):
    root, _, (r_full, _, _) = resume_runs
    tb = _read_tb(root / "full")
    for tag in ("train/q_halt_accuracy", "train/q_halt_precision", "train/q_halt_recall",
                "train/min_steps", "train/max_steps", "train/steps", "train/zH_rms",
                "train/zL_rms", "train/residual/act_step_02", "train/residual_mean",
                "train/grad_norm", "train/lr", "train/total_loss"):
        assert tag in tb and len(tb[tag]) == 2, tag          # logged at steps 3 and 6
        assert all(np.isfinite(v) for _, v in tb[tag]), tag
    assert [s for s, _ in tb["train/lr"]] == [3, 6]
    # halt_max_steps 2: rows halt after 1 (q_halt > 0) or 2 steps; a histogram with two buckets.
    hist = tb["train/steps_at_halt"]
    assert [s for s, _ in hist] == [3, 6] and all(len(c) == 2 and sum(c) > 0 for _, c in hist)
    assert 1 <= r_full["train/min_steps"] <= r_full["train/steps"] <= r_full["train/max_steps"] <= 2
    assert 0 <= r_full["train/q_halt_precision"] <= 1 and 0 <= r_full["train/q_halt_recall"] <= 1
    assert r_full["train/zH_rms"] > 0 and r_full["train/residual/act_step_02"] > 0


def test_step_metrics_definitions():
    """q-halt precision/recall, steps extrema/histogram, latent RMS and residual binning on a
    hand-made step, against the definitions written out in NumPy."""
    import jax.numpy as jnp
    from eqr_jax.act import ACTCarry
    from eqr_jax.model import LatentState
    from eqr_jax.train import _step_metrics, summarize
    rng = np.random.default_rng(0)
    B, N, H = 6, 3, 4
    old = LatentState(*(jnp.asarray(rng.normal(size=(B, N, H)), jnp.float32) for _ in range(2)))
    new = LatentState(*(jnp.asarray(rng.normal(size=(B, N, H)), jnp.float32) for _ in range(2)))
    prev_halted = np.array([1, 0, 0, 1, 0, 0], bool)         # rows 0, 3 were reset this step
    steps = np.array([1, 2, 3, 1, 4, 2], np.int32)
    halted = np.array([1, 1, 0, 0, 1, 1], bool)
    n_valid = np.array([3, 3, 3, 3, 0, 3], np.int32)          # row 4: no labels
    n_correct = np.array([3, 1, 3, 2, 0, 3], np.int32)
    exact = (n_correct == n_valid) & (n_valid > 0)
    q = np.array([0.5, -1.0, 2.0, 0.0, 1.0, -0.5], np.float32)
    data = {"inputs": jnp.zeros((B, N), jnp.int32)}
    c_old = ACTCarry(old, jnp.zeros(B, jnp.int32), jnp.asarray(prev_halted), data)
    c_new = ACTCarry(new, jnp.asarray(steps), jnp.asarray(halted), data)
    parts = {"n_correct": jnp.asarray(n_correct), "n_valid": jnp.asarray(n_valid),
             "exact": jnp.asarray(exact), "lm": jnp.ones(B), "bce": jnp.ones(B),
             "total": jnp.float32(9.0)}
    m = {k: np.asarray(v) for k, v in _step_metrics(4, c_old, c_new, jnp.asarray(q), parts).items()}
    valid = halted & (n_valid > 0)                           # rows 0, 1, 5
    count = valid.sum()
    assert m["count"] == count == 3
    hit = ((q > 0) & exact).sum()                            # rows 0, 2
    np.testing.assert_allclose(m["q_halt_precision"], count * hit / max((q >= 0).sum(), 1))
    np.testing.assert_allclose(m["q_halt_recall"], count * hit / max(exact.sum(), 1))
    assert m["q_halt_accuracy"] == ((q > 0) == exact)[valid].sum()
    assert (m["min_steps"], m["max_steps"], m["steps"]) == (1, 2, 5)
    np.testing.assert_array_equal(m["steps_hist"], [1, 2, 0, 0])
    on = lambda z: np.asarray(z, np.float64)
    rms = np.sqrt((on(new.z_H) ** 2).mean(axis=(1, 2)))
    np.testing.assert_allclose(m["zH_rms"], rms.sum(), rtol=1e-5)
    res = np.sqrt(((on(new.z_H) - on(old.z_H)) ** 2).sum((1, 2))
                  + ((on(new.z_L) - on(old.z_L)) ** 2).sum((1, 2)))
    cont = ~prev_halted                                       # rows 1, 2, 4, 5 at steps 2, 3, 4, 2
    np.testing.assert_array_equal(m["residual_count"], [0, 2, 1, 1])
    np.testing.assert_allclose(m["residual_sum"], [0, res[1] + res[5], res[2], res[4]], rtol=1e-5)
    assert cont.sum() == m["residual_count"].sum()
    out = summarize(dict(m, num_steps=1.0, grad_norm=2.0), B)
    assert out["train/q_halt_precision"] == pytest.approx(hit / max((q >= 0).sum(), 1))
    assert out["train/residual/act_step_02"] == pytest.approx((res[1] + res[5]) / 2, rel=1e-5)
    assert "train/residual/act_step_01" not in out
    assert out["train/zH_rms"] == pytest.approx(rms.sum() / B, rel=1e-5)
    # no halted row: the per-halted-row keys are dropped, not divided by zero
    out0 = summarize(dict(m, count=0.0, num_steps=1.0), B)
    assert "train/min_steps" not in out0 and "train/q_halt_recall" not in out0


def test_nonfinite_guard_stops_without_saving_and_resume_continues(resume_runs, tmp_path):
    """A NaN loss at step 5 (inside the second jitted call of 3 steps) stops the run with an
    error naming the step and the quantity; the step-3 checkpoint is the newest one, and
    --resume from it reproduces the uninterrupted run exactly."""
    from eqr_jax.checkpoint import Checkpointer
    from eqr_jax.train import NonFiniteError
    root, _, _ = resume_runs
    cfg = tiny_cfg(str(tmp_path / "nan"), max_steps=6, checkpoint_every=3)
    tr, ev = _loaders(cfg)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 5: .*"
                                             r"newest checkpoint is step 3"):
        train(cfg, loaders=(_CorruptLabelsAt(tr, 5), ev), progress=False, verbose=False)
    ck = Checkpointer(tmp_path / "nan" / "checkpoints", read_only=True)
    assert ck.all_steps() == [3]
    ck.close()
    r = train(cfg, loaders=_loaders(cfg), progress=False, verbose=False, resume=True)
    assert (r["step"], r["steps_this_run"]) == (6, 3)
    _, p_full = load_for_inference(root / "full", use_ema=False)
    _, p_res = load_for_inference(tmp_path / "nan", use_ema=False)
    for a, b in zip(jax.tree_util.tree_leaves(p_full), jax.tree_util.tree_leaves(p_res)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_guard_freezes_state_inside_the_call():
    """A bad first step freezes the whole call: the good steps after it are not applied either,
    and the state comes back exactly as it went in."""
    from eqr_jax import optim
    from eqr_jax.model import EqRModel
    from eqr_jax.train import (_cached_train_step, _compute_key, init_state, make_mesh,
                               stack_batches)
    cfg = tiny_cfg(max_steps=6)
    fn = _cached_train_step(_compute_key(cfg), 6, 3, make_mesh())  # shared with the tests above
    opt, _ = optim.make_optimizer(cfg.train, 6)
    loader = ArrayTrainLoader(*make_puzzles(64, 1), 16, 0)
    good = [next(loader), next(loader)]
    bad = dict(good[0], labels=np.full((16, 16), 99, np.int32))
    state = init_state(EqRModel(cfg.model), cfg, opt, good[0])
    before = jax.device_get(state)
    state, m = fn(state, {k: jnp.asarray(v) for k, v in stack_batches([bad] + good).items()})
    # the loss is NaN; the gradient stays finite (the gather's transpose drops the bad index)
    assert int(m["nonfinite_step"]) == 1 and int(m["nonfinite_what"]) == 1
    assert float(m["num_steps"]) == 0 and float(m["count"]) == 0
    after = jax.device_get(state)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_rejects_unknown_override(capsys):
    from eqr_jax.train import main
    assert main(["--preset", "tiny", "train.not_a_key=1"]) == 2
    assert "not_a_key" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Data parallel: 8 fake CPU devices give the same steps as 1 device


_DP_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {tests!r})
    from test_train import tiny_cfg
    from _train_data import ArrayTrainLoader, make_puzzles
    from eqr_jax import optim
    from eqr_jax.model import EqRModel
    from eqr_jax.train import (init_state, make_mesh, make_train_step, state_shardings,
                               batch_sharding, to_global, stack_batches)
    import functools
    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_cfg(steps_per_call=3)
    model = EqRModel(cfg.model)
    opt, _ = optim.make_optimizer(cfg.train, 10)
    loader = ArrayTrainLoader(*make_puzzles(64, 0), 16, 0)
    host = stack_batches([next(loader) for _ in range(3)])
    out = {{}}
    for n in (8, 1):
        mesh = make_mesh(jax.devices()[:n])
        abstract = jax.eval_shape(functools.partial(init_state, model, cfg, opt),
                                  {{k: v[0] for k, v in host.items()}})
        sh = state_shardings(abstract, mesh)
        state = jax.jit(functools.partial(init_state, model, cfg, opt), out_shardings=sh)(
            {{k: v[0] for k, v in host.items()}})
        fn = make_train_step(model, cfg, opt, mesh=mesh, state_sharding=sh, steps_per_call=3)
        state, m = fn(state, to_global(host, batch_sharding(mesh, stacked=True)))
        assert len(state.carry.latents.z_H.sharding.device_set) == n
        out[n] = jax.device_get((state.params, state.carry.latents, m))
    for a, b in zip(jax.tree_util.tree_leaves(out[8]), jax.tree_util.tree_leaves(out[1])):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=2e-4, atol=2e-5)
    print("DP_OK")
""")


def test_data_parallel_8_devices_equals_1():
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _DP_SCRIPT.format(tests=tests)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert "DP_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
