"""Evaluation: O(1)-in-depth memory, halting, breadth aggregation, and the eval table."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqr_jax import evaluation as ev
from eqr_jax.config import EvalConfig, ModelConfig
from eqr_jax.model import EqRModel

from _eval_model import eval_data, trained_checkpoint

CFG = ModelConfig(seq_len=16, vocab_size=6, H_cycles=1, L_cycles=1, L_layers=1, hidden_size=32,
                  num_heads=2, expansion=2.0, mlp_t=True, pos_encodings="none",
                  forward_dtype="float32")


@pytest.fixture(scope="module")
def tiny():
    model = EqRModel(CFG)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 6, (6, 16)).astype(np.int32)
    labels = rng.integers(2, 6, (6, 16)).astype(np.int32)
    mask = np.array([1, 1, 1, 1, 0, 0], bool)
    labels[~mask] = -100
    return model, params, inputs, labels, mask


# ---------------------------------------------------------------------------------------------
# Aggregations against hand-worked values


def test_pass_at_k_hand_values():
    got = ev.pass_at_k(4, np.array([0, 1, 2, 3, 4]), 2)
    # c=1: 1 - C(3,2)/C(4,2) = 1/2; c=2: 1 - C(2,2)/C(4,2) = 5/6; c=3: n-c < k -> 1.
    np.testing.assert_allclose(got, [0.0, 0.5, 5 / 6, 1.0, 1.0])
    np.testing.assert_allclose(ev.pass_at_k(5, [2], 1), [0.4])  # pass@1 = c / n
    with pytest.raises(ValueError):
        ev.pass_at_k(2, [1], 3)


def test_any_correct_and_avg_pass_rate():
    exact = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
    assert ev.any_correct(exact) == pytest.approx(2 / 3)
    assert ev.avg_pass_rate(exact) == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    tab = ev.pass_at_k_table(exact)
    assert sorted(tab) == [1, 2]
    assert tab[1] == pytest.approx(ev.avg_pass_rate(exact))


def test_majority_vote_ties_go_to_first_seen():
    a, b, c = [2, 3, 4], [3, 2, 4], [4, 4, 4]
    preds = np.array([[a, b, b, a], [a, b, b, c]])
    labels = np.array([[2, 3, -100], [3, 2, 5]])
    mv = ev.majority_vote(preds, labels)
    np.testing.assert_array_equal(mv.winner, [a, b])
    np.testing.assert_array_equal(mv.votes, [2, 2])
    np.testing.assert_array_equal(mv.exact, [True, False])  # ignored token does not count
    np.testing.assert_array_equal(mv.n_correct, [2, 2])
    np.testing.assert_array_equal(mv.n_valid, [2, 3])


def test_convergence_top_k_hand_values():
    scores = np.array([[0.3, 0.1, 0.2, 0.4], [0.5, 0.5, 0.1, 0.9]])
    exact = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], bool)
    r = ev.convergence_top_k(scores, exact, 2)
    # puzzle 0 picks copies 1 (wrong), 2 (right); puzzle 1 picks 2 (wrong), 0 (right, tie->first).
    assert r["k"] == 2 and r["total_samples"] == 2
    assert r["exact_accuracy"] == pytest.approx(0.5)
    assert r["any_correct"] == pytest.approx(1.0)
    assert r["avg_convergence_score"] == pytest.approx((0.15 + 0.3) / 2)
    assert r["cumulative_exact_acc_top1"] == pytest.approx(0.0)
    assert r["cumulative_exact_acc_top2"] == pytest.approx(0.5)
    assert r["pass@1"] == pytest.approx(0.5)
    assert ev.convergence_top_k(scores, exact, 99)["k"] == 4


# ---------------------------------------------------------------------------------------------
# The loop


def _mem(model, params, inputs, labels, mask, depth):
    ids = jnp.arange(2, dtype=jnp.int32)
    fn = jax.jit(lambda p: ev._unroll_core(model, p, inputs, labels, mask, jax.random.PRNGKey(0),
                                           ids, 2, depth, 1e-3, 2, 0, window=3, trace_points=16))
    return fn.lower(params).compile().memory_analysis()


def test_memory_independent_of_depth(tiny):
    model, params, inputs, labels, mask = tiny
    small = _mem(model, params, inputs, labels, mask, 4)
    large = _mem(model, params, inputs, labels, mask, 512)
    if small is None or large is None:
        pytest.skip("backend gives no memory analysis")
    assert abs(small.temp_size_in_bytes - large.temp_size_in_bytes) <= 4096
    assert abs(small.output_size_in_bytes - large.output_size_in_bytes) == 0


def test_q_halt_freezes_rows_and_stops_batch(tiny):
    model, params, inputs, labels, mask = tiny
    key = jax.random.PRNGKey(7)
    # Halting logit = z_H[token 0, channel 0]: rows halt at step 1 exactly when it is > 0.
    p = jax.tree_util.tree_map(lambda a: a, params)
    kernel = np.zeros(params["q_head"]["kernel"].shape, np.float32)
    kernel[0, 0] = 1.0
    p["q_head"] = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((2,), jnp.float32)}
    halt = ev.evaluate_batch(model, p, inputs, labels, mask, key, depth=6, breadth=2,
                             halt="q_halt")
    real = np.broadcast_to(mask[:, None], halt.steps.shape)
    assert np.all(halt.steps[~real] == 0)  # padding rows never run
    stopped = set(halt.steps[real].tolist())
    assert len(stopped) > 1, "need rows halting at different steps"
    for s in stopped:
        # A row that halted at step s is frozen there: same result as a fixed run of depth s
        # (rows that keep running see exactly the same noise as without halting).
        ref = ev.evaluate_batch(model, p, inputs, labels, mask, key, depth=s, breadth=2)
        rows = real & (halt.steps == s)
        np.testing.assert_array_equal(halt.preds[rows], ref.preds[rows])
        np.testing.assert_allclose(halt.residual[rows], ref.residual[rows], rtol=1e-5)
        np.testing.assert_allclose(halt.q_halt[rows], ref.q_halt[rows], rtol=1e-5, atol=1e-6)
        assert np.all(ref.q_halt[rows] > 0) or s == 6
        if s > 1:
            assert np.all(ev.evaluate_batch(model, p, inputs, labels, mask, key, depth=s - 1,
                                            breadth=2).q_halt[rows] <= 0)
    # Everything halts at step 1 with a positive bias: the batch loop stops after one step.
    p["q_head"] = {"kernel": jnp.zeros_like(p["q_head"]["kernel"]),
                   "bias": jnp.full((2,), 5.0, jnp.float32)}
    early = ev.evaluate_batch(model, p, inputs, labels, mask, key, depth=6, breadth=2,
                              halt="q_halt")
    assert early.loop_steps == 1
    np.testing.assert_array_equal(early.steps, np.where(mask[:, None], 1, 0) * np.ones((1, 2)))


def test_convergence_halting_window_and_padding(tiny):
    model, params, inputs, labels, mask = tiny
    key = jax.random.PRNGKey(1)
    r = ev.evaluate_batch(model, params, inputs, labels, mask, key, depth=50, breadth=2,
                          halt="convergence", tol=1e9, window=3)
    # The first logit change exists at step 2, so 3 changes below tol end the row at step 4.
    np.testing.assert_array_equal(r.steps, np.where(mask[:, None], 4, 0) * np.ones((1, 2)))
    assert r.loop_steps == 4
    assert set(r.trace_steps[r.trace_steps > 0]) == {1, 2, 3, 4}
    np.testing.assert_array_equal(r.trace_count[:4], [8, 8, 8, 8])  # 4 real rows x 2 copies
    # Breadth 3 in chunks of 2 copies (the last chunk overruns by one copy that must not run):
    # the first two copies are the same as above.
    c = ev.evaluate_batch(model, params, inputs, labels, mask, key, depth=50, breadth=3,
                          halt="convergence", tol=1e9, window=3, max_rows=12)
    assert c.preds.shape == (6, 3, 16)
    np.testing.assert_array_equal(c.preds[:, :2], r.preds)
    np.testing.assert_allclose(c.score[:, :2], r.score, rtol=1e-5)
    np.testing.assert_array_equal(c.trace_count[:4], [12, 12, 12, 12])
    assert not np.array_equal(c.preds[:, 2], c.preds[:, 0])  # copies differ


def test_anderson_solver_mode(tiny):
    model, params, inputs, labels, mask = tiny
    r = ev.evaluate_batch(model, params, inputs, labels, mask, jax.random.PRNGKey(0), depth=5,
                          breadth=2, solver="anderson", tol=1e-6)
    assert r.preds.shape == (6, 2, 16)
    assert np.all(r.steps[mask] <= 5) and np.all(r.steps[mask] >= 1)
    assert np.all(r.steps[~mask] == 0)
    with pytest.raises(ValueError):
        ev.evaluate_batch(model, params, inputs, labels, mask, jax.random.PRNGKey(0), depth=5,
                          solver="anderson", halt="q_halt")


def test_eval_noise_scale(tiny):
    model, params, inputs, labels, mask = tiny
    key = jax.random.PRNGKey(3)
    # Breadth 2 at the model's own noise: the compilation the halting tests already made; noise 0
    # adds one more.
    run = lambda m, noise: ev.evaluate_batch(m, params, inputs, labels, mask, key, depth=3,
                                             breadth=2, noise_scale=noise)
    assert EvalConfig().noise_scale is None
    default, quiet = run(model, None), run(model, 0.0)
    # Unset means the model's training value; an override equals a model trained with it.
    np.testing.assert_array_equal(default.residual, run(model, CFG.noise_scale).residual)
    silent = EqRModel(dataclasses.replace(CFG, noise_scale=0.0))
    np.testing.assert_array_equal(run(silent, None).residual, quiet.residual)
    np.testing.assert_array_equal(run(silent, CFG.noise_scale).residual, default.residual)
    # Noise 0 is the deterministic map: copy 0 from its initial latents, three noise-free steps.
    step = jax.jit(lambda s, x: model.step(params, s, x, None))
    s = model.init_state(jax.random.fold_in(jax.random.fold_in(key, 0), 0), inputs.shape[0])
    x = model.embed(params, jnp.asarray(inputs))
    for _ in range(3):
        prev, s = s, step(s, x)
    want = np.sqrt(sum(np.sum(np.square(np.asarray(a) - np.asarray(b)), axis=(1, 2))
                       for a, b in zip(s, prev)))
    np.testing.assert_allclose(quiet.residual[mask, 0], want[mask], rtol=1e-5)
    # With noise the trajectory differs.
    assert not np.allclose(default.residual[mask], quiet.residual[mask], rtol=1e-3)
    with pytest.raises(ValueError, match="noise_scale must be >= 0"):
        run(model, -0.1)


# ---------------------------------------------------------------------------------------------
# A trained model, end to end


@pytest.fixture(scope="module")
def trained():
    from eqr_jax.checkpoint import load_for_inference

    cfg, params = load_for_inference(trained_checkpoint())
    return cfg, EqRModel(cfg.model), params


def test_eval_table_for_trained_model(trained, tmp_path, capsys):
    from eqr_jax.evaluation_cli import run

    cfg, model, params = trained
    batches, x, y = eval_data(n=20, batch=8)
    # max_rows = batch: every call runs one copy, so one compilation serves the whole grid.
    eval_cfg = dataclasses.replace(EvalConfig(), convergence_top_k=1, max_rows=8)
    res = run(model, params, batches, eval_cfg, depths=[1, 4], breadths=[1, 3],
              out_dir=str(tmp_path), plots=True)
    out = capsys.readouterr().out
    assert "all/exact_accuracy:" in out and "depth \\ breadth" in out
    settings = {(s["depth"], s["breadth"]): s["metrics"] for s in res["settings"]}
    assert set(settings) == {(1, 1), (4, 1), (1, 3), (4, 3)}
    for (d, n), m in settings.items():
        assert m["num_puzzles"] == 20 and m["count"] == 20 * n  # 4 padding rows never count
        assert m["all/steps"] == d
        assert 0.0 <= m["all/exact_accuracy"] <= 1.0
    m = settings[(4, 3)]
    assert m["different_init/any_correct"] >= m["different_init/avg_pass_rate"]
    assert "majority_vote/exact_accuracy" in m and "convergence_top_k/exact_accuracy" in m
    # The trained model learned something: token accuracy well above chance (1/4).
    assert settings[(4, 1)]["all/accuracy"] > 0.4
    for name in ("results.json", "results.csv", "accuracy_vs_depth.png", "residual_vs_step.png",
                 "steps_histogram.png"):
        assert os.path.getsize(tmp_path / name) > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["settings"]) == 4
    assert "depth" in (tmp_path / "results.csv").read_text().splitlines()[0]


def test_convergence_statistics_hand_values():
    from eqr_jax.analysis import convergence_statistics, logit_delta_norms

    # One sample, one token, vocab 2: logits move by (3, 4) * a_t, i.e. delta norms 5 a_t.
    steps = np.cumsum([0.0, 1.0, 0.5, 0.25, 0.125])[:, None, None, None] * np.array([3.0, 4.0])
    d = logit_delta_norms(steps, last_k=3)
    np.testing.assert_allclose(d[:, 0, 0], [2.5, 1.25, 0.625])
    st = convergence_statistics(steps, last_k=3)
    assert st["score"][0] == pytest.approx((2.5 + 1.25 + 0.625) / 3)
    assert st["final_residual"][0] == pytest.approx(0.625)
    assert st["rate_mean"][0] == pytest.approx(0.5, abs=1e-8)  # (the +1e-9 in the ratio)
    assert st["rate_std"][0] == pytest.approx(0.0, abs=1e-8)
    assert st["discounted_residual"][0] == pytest.approx(2.5 + 0.95 * 1.25 + 0.95 ** 2 * 0.625)
