"""Evaluation: aggregations against hand-worked values, O(1)-in-depth memory, halting rules,
breadth chunking, test-time noise, trajectories, and a trained model's depth x breadth table."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import eval_data, micro_model
from eqr_jax import evaluation as ev
from eqr_jax import modes
from eqr_jax.config import EvalConfig
from eqr_jax.evaluation import Evaluator, core
from eqr_jax.model import EqRModel

CFG = micro_model()


def _batch(inputs, labels, mask):
    return {"inputs": inputs, "labels": labels, "mask": mask}


def _run(model, params, batch, first, depth, breadth, **cfg):
    """`Evaluator.evaluate_batch` (row 0 = puzzle ``first``) with `EvalConfig` fields ``cfg``."""
    return Evaluator(model, EvalConfig(**cfg)).evaluate_batch(params, batch, first, depth=depth,
                                                              breadth=breadth)


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
    fn = jax.jit(lambda p: core.evaluate_copies(
        model, p, inputs, labels, mask, 0, 0, ids, 2, depth,
        core.stopping("convergence"), window=3, trace_points=16))
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
    key = 7  # the batch's first puzzle index
    # Halting logit = z_H[token 0, channel 0]: rows halt at step 1 exactly when it is > 0.
    p = jax.tree_util.tree_map(lambda a: a, params)
    kernel = np.zeros(params["q_head"]["kernel"].shape, np.float32)
    kernel[0, 0] = 1.0
    p["q_head"] = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((2,), jnp.float32)}
    batch = _batch(inputs, labels, mask)
    halt = _run(model, p, batch, key, 6, 2, halt="q_halt")
    real = np.broadcast_to(mask[:, None], halt.steps.shape)
    assert np.all(halt.steps[~real] == 0)  # padding rows never run
    stopped = set(halt.steps[real].tolist())
    assert len(stopped) > 1, "need rows halting at different steps"
    for s in stopped:
        # A row that halted at step s is frozen there: same result as a fixed run of depth s
        # (rows that keep running see exactly the same noise as without halting).
        ref = _run(model, p, batch, key, s, 2)
        rows = real & (halt.steps == s)
        np.testing.assert_array_equal(halt.preds[rows], ref.preds[rows])
        np.testing.assert_allclose(halt.residual[rows], ref.residual[rows], rtol=1e-5)
        np.testing.assert_allclose(halt.q_halt[rows], ref.q_halt[rows], rtol=1e-5, atol=1e-6)
        assert np.all(ref.q_halt[rows] > 0) or s == 6
        if s > 1:
            assert np.all(_run(model, p, batch, key, s - 1, 2).q_halt[rows] <= 0)
    # Everything halts at step 1 with a positive bias: the batch loop stops after one step.
    p["q_head"] = {"kernel": jnp.zeros_like(p["q_head"]["kernel"]),
                   "bias": jnp.full((2,), 5.0, jnp.float32)}
    early = _run(model, p, batch, key, 6, 2, halt="q_halt")
    assert early.loop_steps == 1
    np.testing.assert_array_equal(early.steps, np.where(mask[:, None], 1, 0) * np.ones((1, 2)))


def test_convergence_halting_window_and_padding(tiny):
    model, params, inputs, labels, mask = tiny
    key = 1
    batch = _batch(inputs, labels, mask)
    conv = dict(halt="convergence", convergence_tol=1e9, convergence_window=3)
    r = _run(model, params, batch, key, 50, 2, **conv)
    # The first logit change exists at step 2, so 3 changes below tol end the row at step 4.
    np.testing.assert_array_equal(r.steps, np.where(mask[:, None], 4, 0) * np.ones((1, 2)))
    assert r.loop_steps == 4
    assert set(r.trace_steps[r.trace_steps > 0]) == {1, 2, 3, 4}
    np.testing.assert_array_equal(r.trace_count[:4], [8, 8, 8, 8])  # 4 real rows x 2 copies
    # Breadth 3 in chunks of 2 copies (the last chunk overruns by one copy that must not run):
    # the first two copies are the same as above.
    c = _run(model, params, batch, key, 50, 3, max_rows=12, **conv)
    assert c.preds.shape == (6, 3, 16)
    np.testing.assert_array_equal(c.preds[:, :2], r.preds)
    np.testing.assert_allclose(c.score[:, :2], r.score, rtol=1e-5)
    np.testing.assert_array_equal(c.trace_count[:4], [12, 12, 12, 12])
    assert not np.array_equal(c.preds[:, 2], c.preds[:, 0])  # copies differ


def test_anderson_solver_mode(tiny):
    model, params, inputs, labels, mask = tiny
    batch = _batch(inputs, labels, mask)
    r = _run(model, params, batch, 0, 5, 2, solver="anderson",
             convergence_tol=1e-6)
    assert r.preds.shape == (6, 2, 16)
    assert np.all(r.steps[mask] <= 5) and np.all(r.steps[mask] >= 1)
    assert np.all(r.steps[~mask] == 0)
    with pytest.raises(ValueError, match="needs solver='unroll'"):
        Evaluator(model, EvalConfig(solver="anderson", halt="q_halt"))


def test_solver_is_per_row(trained_model):
    # Each row (copy of a puzzle) mixes, stops and counts on its own, so a row's result does not
    # depend on the other rows of its batch. A briefly trained model: rows converge at different
    # counts. The other rows are swapped for other puzzles at the same batch shape: XLA may
    # round a matmul differently at another batch size (rows alone agree to ~1e-6, which can
    # flip a near-tied token of this barely trained model), never at the same shape.
    _, model, params = trained_model
    b = eval_data(n=6, batch=6)[0][0]
    others = eval_data(n=6, batch=6, seed=11)[0][0]
    conv = dict(solver="anderson", convergence_tol=2e-2)
    r = _run(model, params, b, 0, 40, 2, **conv)
    assert len(set(r.steps.ravel().tolist())) > 1, r.steps
    for i in range(4):
        mixed = {k: np.concatenate([v[:i], b[k][i:i + 1], v[i + 1:]]) for k, v in others.items()}
        m = _run(model, params, mixed, 0, 40, 2, **conv)
        assert not np.array_equal(m.steps, r.steps)  # the neighbours did behave differently
        np.testing.assert_array_equal(m.steps[i], r.steps[i])
        np.testing.assert_array_equal(m.preds[i], r.preds[i])
        np.testing.assert_array_equal(m.residual[i], r.residual[i])


def test_eval_noise_scale(tiny):
    model, params, inputs, labels, mask = tiny
    key = 3
    # Breadth 2 at the model's own noise: the compilation the halting tests already made; noise 0
    # adds one more.
    batch = _batch(inputs, labels, mask)
    run = lambda m, noise: _run(m, params, batch, key, 3, 2, noise_scale=noise)
    assert EvalConfig().noise_scale is None
    default, quiet = run(model, None), run(model, 0.0)
    # Unset means the model's training value; an override equals a model trained with it.
    np.testing.assert_array_equal(default.residual, run(model, CFG.noise_scale).residual)
    silent = EqRModel(dataclasses.replace(CFG, noise_scale=0.0))
    np.testing.assert_array_equal(run(silent, None).residual, quiet.residual)
    np.testing.assert_array_equal(run(silent, CFG.noise_scale).residual, default.residual)
    # Noise 0 is the deterministic map: copy 0 from its initial latents, three noise-free steps.
    step = jax.jit(lambda s, x: model.step(params, s, x, None))
    b = inputs.shape[0]
    init_keys, _ = ev.job_keys(0, key + jnp.arange(b), jnp.zeros(b, jnp.int32))
    s = jax.vmap(lambda k: model.init_latents(k, 1))(init_keys)
    s = jax.tree_util.tree_map(lambda a: a[:, 0], s)  # one draw per row from its own key
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


def test_eval_table_for_trained_model(trained_model, tmp_path, capsys):
    from eqr_jax.cli.eval import run

    cfg, model, params = trained_model
    batches, x, y = eval_data(n=20, batch=8)
    # max_rows = batch: every call runs one copy, so one compilation serves the whole grid.
    eval_cfg = dataclasses.replace(EvalConfig(), convergence_top_k=1, max_rows=8)
    res = run(model, params, batches, eval_cfg, depths=[1, 4], breadths=[1, 3],
              out_dir=str(tmp_path), plots=True)
    out = capsys.readouterr().out
    assert "all/exact_accuracy:" in out and "depth \\ breadth" in out
    assert out.strip().splitlines()[-1] == (
        f"exact_accuracy: {res['settings'][-1]['metrics']['all/exact_accuracy']:.6g}")
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


# ---------------------------------------------------------------------------------------------
# Keys, copies and trajectories: one rule


def test_halting_rules_registry():
    assert tuple(core.HALT_RULES) == modes.HALT_RULES
    for name in modes.HALT_RULES:
        stop = core.stopping(name)
        assert bool(stop.on_q_halt) == (name == "q_halt")
        assert bool(stop.on_convergence) == (name == "convergence")
    with pytest.raises(ValueError, match="unknown halting rule 'never'"):
        core.stopping("never")


def test_copies_independent_reproducible_and_trajectory_follows_them(tiny):
    """Copies start from different latents and stay apart, a job's keys depend only on (seed,
    puzzle index, copy) (not on the row it sits in), and `Evaluator.trajectory` follows exactly
    the evaluation's keys: its state after t steps is what a fixed-depth evaluation at depth t
    reaches."""
    model, params, inputs, labels, mask = tiny
    b = inputs.shape[0]
    init_keys, _ = ev.job_keys(0, jnp.broadcast_to(5 + jnp.arange(b), (4, b)),
                               jnp.broadcast_to(jnp.arange(4)[:, None], (4, b)))
    states0 = core.init_rows(model, init_keys)
    assert states0.z_H.shape == (4, b, CFG.seq_len, CFG.hidden_size)
    assert not np.allclose(states0.z_H[0], states0.z_H[1])
    assert not np.allclose(states0.z_H[0, 0], states0.z_H[0, 1])
    assert abs(float(states0.z_H.std()) - CFG.H_init_std) < 0.05
    evaluator = Evaluator(model, EvalConfig())
    latents = lambda p, z: z
    states = evaluator.trajectory(params, inputs, 5, depth=3, trace=latents, copies=[0, 1])
    traj = states.z_H
    assert traj.shape == (2, 3, b, CFG.seq_len, CFG.hidden_size)
    assert not np.allclose(traj[0, -1], traj[1, -1])
    same = evaluator.trajectory(params, inputs, 5, depth=3, trace=latents, copies=[0, 1])
    np.testing.assert_array_equal(same.z_H, traj)  # same keys, same result
    # The evaluation's residual at depth 3 is the trajectory's last step change (breadth 2: the
    # halting tests' compiled program; chunking copies is checked there too).
    full = _batch(inputs, labels, np.ones(6, bool))
    r = evaluator.evaluate_batch(params, full, 5, depth=3, breadth=2)
    # The same puzzles one row up (puzzle 6 now in row 0): the same per-job results.
    shifted = _batch(np.roll(inputs, -1, 0), np.roll(labels, -1, 0), np.arange(6) < 5)
    up = evaluator.evaluate_batch(params, shifted, 6, depth=3, breadth=2)
    np.testing.assert_array_equal(up.preds[:5], r.preds[1:])
    np.testing.assert_allclose(up.residual[:5], r.residual[1:], rtol=1e-5)
    want = np.sqrt(sum(np.sum(np.square(np.asarray(a[:, 2], np.float64)
                                        - np.asarray(a[:, 1], np.float64)), axis=(-2, -1))
                       for a in states))  # (copies, B)
    np.testing.assert_allclose(r.residual, want.T, rtol=1e-3, atol=1e-4)


def test_eqr_eval_writes_its_results_to_a_bucket(gcs_bucket, tmp_path, monkeypatch, capsys):
    """``eqr eval --out gs://...``: results.json/csv and the plots become objects (and no local
    ``gs:`` folder); an --out in a bucket that does not exist is one line before any work."""
    from pathlib import Path

    from conftest import trained_checkpoint, write_array_dataset
    from eqr_jax.cli import common, main
    from eqr_jax.config import ConfigError
    from eqr_jax.data.arrays import make_puzzles

    monkeypatch.chdir(tmp_path)
    data = write_array_dataset(tmp_path / "data", make_puzzles(8, 0), make_puzzles(8, 1))
    url = gcs_bucket.url("eval")
    assert main(["eval", "--checkpoint", trained_checkpoint(), "--data", str(data), "--depth",
                 "2", "--breadth", "1", "--batch-size", "8", "--out", url, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"[eqr eval] writing to {url}" in out and f"wrote {url}/results.json" in out
    assert gcs_bucket.objects(url) == ["accuracy_vs_depth.png", "residual_vs_step.png",
                                       "results.csv", "results.json", "steps_histogram.png"]
    saved = json.loads(gcs_bucket.fs.cat(url + "/results.json"))
    exact = saved["settings"][0]["metrics"]["all/exact_accuracy"]
    assert out.strip().splitlines()[-1] == f"exact_accuracy: {exact:.6g}"
    assert not Path("gs:").exists()
    with pytest.raises(ConfigError, match=r"^--out gs://no-such-bucket/x: cannot write there "
                                          r"\([A-Za-z]+Error: [^\n]*\)$"):
        common.check_writable("gs://no-such-bucket/x")
