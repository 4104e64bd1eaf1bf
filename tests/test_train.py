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
