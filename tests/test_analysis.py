"""Analysis: spectral radius vs exact eigenvalues, census and difficulty statistics on cases with
known answers, the trace against the evaluation loop, `eqr analyze` end to end, and the
convergence statistics of the plots module."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_model, trained_checkpoint
from eqr_jax.analysis import landscape as L
from eqr_jax.analysis.stability import (exact_jacobian_eigenvalues, jacobian_spectral_radius,
                                        map_spectral_radius)
from eqr_jax.analysis.trace import trace_trajectories
from eqr_jax.config import EvalConfig
from eqr_jax.data.arrays import make_puzzles
from eqr_jax.evaluation import Evaluator
from eqr_jax.model import EqRModel

# Shrunk versions of the presets' block types, in the presets' bf16 (the radius is computed on
# the float32 version of the map; the exact reference below does the same).
MICRO = {
    "mlp_t": micro_model(H_cycles=2, L_cycles=2, hidden_size=16, forward_dtype="bfloat16"),
    "attention_rope": micro_model(seq_len=12, H_cycles=2, hidden_size=16, mlp_t=False,
                                  pos_encodings="rope", forward_dtype="bfloat16"),
}


# ---------------------------------------------------------------------------------------------
# Spectral radius


@pytest.mark.parametrize("name,seed", [("mlp_t", 3), ("attention_rope", 0)])
def test_spectral_radius_matches_exact_eigendecomposition(name, seed):
    cfg = MICRO[name]
    model = EqRModel(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed))
    inputs = jax.random.randint(jax.random.PRNGKey(seed + 10), (3, cfg.seq_len), 1, 6)
    x = jax.jit(model.embed)(params, inputs)
    state = jax.jit(model.init_latents, static_argnums=1)(jax.random.PRNGKey(seed + 20), 3)
    step = jax.jit(model.step)
    for _ in range(4):  # move off the random init onto the map's typical states
        state = step(params, state, x, None)
    n = 2 * cfg.seq_len * cfg.hidden_size
    radius, est = jacobian_spectral_radius(model, params, state, x, iters=16, restarts=3,
                                           return_estimate=True)
    exact = exact_jacobian_eigenvalues(model, params, state, x)
    assert radius.shape == (3,) and n > 16 * 4  # the Krylov space is far smaller than J
    for b, ev in enumerate(exact):
        top = ev[np.argmax(np.abs(ev))]
        assert radius[b] == pytest.approx(abs(top), rel=1e-3)
        # The leading Ritz value is the exact eigenvalue (or its conjugate).
        assert abs(est.eigenvalue[b].real - top.real) < 1e-3 * abs(top)
        assert abs(abs(est.eigenvalue[b].imag) - abs(top.imag)) < 1e-3 * abs(top)
        assert est.residual[b] < 1e-3
    if name == "mlp_t":
        # This seed has rows whose dominant eigenvalues are a complex-conjugate pair.
        assert sum(abs(e[np.argmax(np.abs(e))].imag) > 0.1 for e in exact) >= 1


def test_map_spectral_radius_dominant_complex_pair_of_a_linear_map():
    rng = np.random.default_rng(0)
    n, th = 60, 0.7
    mats = []
    for lead in ("complex", "negative"):
        d = np.diag(rng.uniform(-0.8, 0.8, n))
        if lead == "complex":
            d[:2, :2] = 0.9 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
            d[2, 2] = 0.85
        else:
            d[0, 0] = -0.95
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        s = np.diag(rng.uniform(0.5, 2.0, n))  # non-normal: similarity, not a rotation
        mats.append(q @ s @ d @ np.linalg.inv(s) @ q.T)
    A = jnp.asarray(np.stack(mats), jnp.float32)
    fn = lambda z: jnp.einsum("bij,bj->bi", A, z)
    est = map_spectral_radius(fn, jnp.ones((2, n)), iters=20, restarts=4)
    np.testing.assert_allclose(est.radius, [0.9, 0.95], rtol=2e-3)
    assert abs(est.eigenvalue[0].imag) == pytest.approx(0.9 * np.sin(th), rel=1e-2)
    assert est.eigenvalue[1].real == pytest.approx(-0.95, rel=2e-3)


def _two_well_map(c, A):
    """z -> s c + A (z - s c), s = sign(<z, c>): stable fixed points +c and -c (radius of A)."""
    def fn(z):
        s = jnp.where(z @ c >= 0, 1.0, -1.0)[:, None]
        return s * c + (z - s * c) @ A.T
    return fn


def test_census_and_radius_on_a_map_with_two_known_fixed_points():
    rng = np.random.default_rng(1)
    n, k = 8, 40
    c = jnp.asarray(rng.normal(size=n), jnp.float32)
    c = c / jnp.sqrt(jnp.mean(c ** 2))
    A = jnp.asarray(0.6 * np.linalg.qr(rng.normal(size=(n, n)))[0], jnp.float32)  # |eig| = 0.6
    fn = _two_well_map(c, A)
    z0 = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    z = z0
    for _ in range(60):
        z = fn(z)
    side = np.asarray(z0 @ c >= 0)  # the basin of each init is known in closed form
    np.testing.assert_allclose(np.asarray(z), np.where(side[:, None], 1, -1) * np.asarray(c),
                               atol=1e-4)
    grids = side[:, None].astype(np.int32) + 2  # "decoded grid": token 3 for +c, 2 for -c
    cen = L.attractor_census(np.asarray(z), grids, labels=np.array([3]), tol=1e-3)
    assert cen["n_attractors"] == 2 and cen["n_grids"] == 2
    assert cen["n_solution_attractors"] == 1
    assert cen["solution_basin"] == pytest.approx(side.mean())
    assert cen["largest_basin"] == pytest.approx(max(side.mean(), 1 - side.mean()))
    big = side if side.mean() >= 0.5 else ~side
    np.testing.assert_array_equal(cen["ids"], np.where(big, 0, 1))
    est = map_spectral_radius(fn, z[:4], iters=8, restarts=2)
    np.testing.assert_allclose(est.radius, 0.6, rtol=1e-4)
    # Stopped early (3 steps) the states have not met yet: a tight tolerance separates them,
    # a loose one joins each well into one attractor.
    z3 = z0
    for _ in range(3):
        z3 = fn(z3)
    assert L.attractor_census(np.asarray(z3), grids, np.array([3]), 1e-3)["n_attractors"] == k
    assert L.attractor_census(np.asarray(z3), grids, np.array([3]), 10.0)["n_attractors"] == 2


def test_group_attractors_single_linkage_grids_and_order():
    # a-b and b-c are within tol, a-c is not: one chain. d is far. e is at a's place but decodes
    # to another grid.
    s = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [5.0, 5], [0.0, 0]])
    g = np.array([[1], [1], [1], [1], [2]])
    tol = 0.12 / np.sqrt(2)  # RMS per element: distance / sqrt(2)
    ids = L.group_attractors(s, g, tol)
    np.testing.assert_array_equal(ids, [0, 0, 0, 1, 2])  # biggest first, then first seen
    np.testing.assert_array_equal(L.group_attractors(s, g, 0.0), [0, 1, 2, 3, 4])
    # Order independence: permuting the states permutes the grouping.
    perm = np.array([2, 4, 0, 3, 1])
    ids_p = L.group_attractors(s[perm], g[perm], tol)
    assert len(set(ids_p[[0, 2, 4]])) == 1 and len(set(ids_p)) == 3


# ---------------------------------------------------------------------------------------------
# Convergence and difficulty statistics


def test_first_streak_halt_and_solution_steps():
    below = np.array([[0, 1], [1, 1], [1, 0], [1, 1], [0, 1]], bool)[:, :, None]
    steps, reached = L.first_streak(below, 2)
    np.testing.assert_array_equal(steps[:, 0], [3, 2])
    assert reached.all()
    steps, reached = L.first_streak(below, 3)
    np.testing.assert_array_equal(steps[:, 0], [4, 5])
    np.testing.assert_array_equal(reached[:, 0], [True, False])  # never: censored at T
    # Step 1 never counts as converged.
    s, r = L.steps_to_convergence(np.array([[0.0], [0.0], [1.0], [0.0]]), 0.5, 1)
    assert s[0] == 2 and r[0]
    q = np.array([[-1.0, -1], [0.5, -1], [-2, -1]])
    s, r = L.steps_to_halt(q)
    np.testing.assert_array_equal(s, [2, 3])
    np.testing.assert_array_equal(r, [True, False])
    ex = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]], bool)
    s, r = L.steps_to_solution(ex)  # right from the step after the last wrong one
    np.testing.assert_array_equal(s, [3, 2, 3])
    np.testing.assert_array_equal(r, [True, True, False])


def test_rankdata_and_spearman_on_known_rankings():
    np.testing.assert_array_equal(L.rankdata([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(L.rankdata([3, 1, 2]), [3, 1, 2])
    assert L.spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert L.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Classic hand example: d = rank differences (0, 1, -1, 0, 0) -> 1 - 6*2/(5*24) = 0.9.
    assert L.spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    # With ties: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): Pearson of the ranks.
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4.0])
    want = np.corrcoef(ra, rb)[0, 1]
    assert L.spearman([0, 7, 7, 9], [5, 6, 7, 8]) == pytest.approx(want)
    assert np.isnan(L.spearman([1, 1, 1], [1, 2, 3]))  # constant input: undefined
    assert np.isnan(L.spearman([1], [2]))


def test_bucket_stats_and_puzzle_ratings():
    from eqr_jax.analysis import sudoku_difficulty
    from eqr_jax.data import sudoku

    assert [L.rating_bucket(r) for r in (0, 1, 2, 3, 4, 7, 8, 100)] == \
        [(0, 0), (1, 1), (2, 3), (2, 3), (4, 7), (4, 7), (8, 15), (64, 127)]
    b = L.bucket_stats([0, 0, 1, 2, 3, 5, 9], [1, 3, 4, 6, 8, 9, 20])
    assert [(e["bucket"], e["count"], e["median"]) for e in b] == \
        [("0", 2, 2.0), ("1", 1, 4.0), ("2-3", 2, 7.0), ("4-7", 1, 9.0), ("8-15", 1, 20.0)]
    # Puzzles with known ratings: one blank is solved by a single (rating 0); the 6x6 puzzle
    # (unique solution) needs 7 branching nodes of the exhaustive search.
    sol4 = sudoku.parse_grid("1234341221434321")
    one_blank = sol4.copy().reshape(-1)
    one_blank[5] = 0
    hard6 = sudoku.parse_grid("..61.......3...5.4..5.6..4......1...")
    sol6 = sudoku.parse_grid("236145154623362514415362643251521436")
    tok = lambda g: np.asarray(sudoku.tokens_from_grid(g), np.int32)
    ratings, blanks = sudoku_difficulty(tok(one_blank)[None], tok(sol4)[None])
    assert ratings == [0] and blanks == [1]
    ratings, blanks = sudoku_difficulty(np.stack([tok(hard6), tok(hard6)]),
                                        np.stack([tok(sol6), tok(sol6)]))
    assert ratings == [7, 7] and blanks == [27, 27]
    # A label that is not a solution of the puzzle: not Sudoku data, no ratings.
    bad = tok(sol4).copy()
    bad[[0, 1]] = bad[[1, 0]]
    assert sudoku_difficulty(tok(one_blank)[None], bad[None]) == (None, None)


def test_selection_vs_threshold_and_curves_by_outcome():
    scores = np.array([[0.1, 0.5], [0.3, 0.2], [0.9, 0.8]])
    exact = np.array([[1, 0], [0, 1], [0, 0]], bool)
    s = L.selection_vs_threshold(scores, exact, thresholds=[0.15, 0.35, 1.0])
    assert s["kept"] == pytest.approx([1 / 6, 3 / 6, 1.0])
    assert s["precision"] == pytest.approx([1.0, 2 / 3, 2 / 6])
    assert s["coverage"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert s["top1_answered"] == pytest.approx([1.0, 1.0, 2 / 3])
    assert s["top1_all"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert (s["baseline"], s["top1"], s["oracle"]) == pytest.approx((2 / 6, 2 / 3, 2 / 3))
    vals = np.stack([np.full((2, 3), t) for t in (1.0, 2.0)])  # (T=2, C=2, B=3)
    vals[:, 0, 0] = [10, 20]
    ok = np.zeros((2, 3), bool)
    ok[0, 0] = True
    c = L.curves_by_outcome(vals, ok)
    assert c["steps"] == [1, 2]
    assert c["correct"]["n"] == 1 and c["correct"]["median"] == [10, 20]
    assert c["wrong"]["n"] == 5 and c["wrong"]["median"] == [1, 2]
    assert L.curves_by_outcome(vals, np.zeros((2, 3), bool))["correct"]["median"] is None
    assert L.curve_steps(1000, 50)[[0, -1]].tolist() == [1, 1000]


def test_pca_2d_recovers_a_plane():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(30, 2)))[0].T  # 2 orthonormal directions in R^30
    coef = rng.normal(size=(5, 4, 2)) * np.array([3.0, 1.0])
    pts = coef @ basis + 7.0
    xy, ratio = L.pca_2d(pts)
    assert xy.shape == (5, 4, 2)
    assert ratio.sum() == pytest.approx(1.0, abs=1e-5) and ratio[0] > ratio[1]
    # Pairwise distances within the plane are preserved.
    d = lambda a: np.linalg.norm(a.reshape(-1, a.shape[-1])[:, None] - a.reshape(-1, a.shape[-1])
                                 [None], axis=-1)
    np.testing.assert_allclose(d(xy), d(pts), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The trace against the evaluation loop, and `eqr analyze` end to end (tiny trained model)


@pytest.fixture(scope="module")
def trained():
    from eqr_jax.checkpoint import load_for_inference

    run = trained_checkpoint()
    cfg, params = load_for_inference(run)
    return run, EqRModel(cfg.model), params


def test_trace_reproduces_evaluation_trajectories(trained):
    _, model, params = trained
    x, y = make_puzzles(6, 5, blanks=(3, 7))
    key = 11  # the first puzzle index
    batch = {"inputs": x, "labels": y, "mask": np.ones(len(x), bool)}
    run = lambda **cfg: Evaluator(model, EvalConfig(**cfg)).evaluate_batch(
        params, batch, key, depth=7, breadth=3)
    tr = trace_trajectories(Evaluator(model), params, x, y, key, copies=3, depth=7,
                            snapshots=(2, 7))
    fixed = run(halt="fixed")
    np.testing.assert_array_equal(tr.exact[-1].T, fixed.exact)
    np.testing.assert_array_equal(tr.preds[-1].transpose(1, 0, 2), fixed.preds)
    np.testing.assert_allclose(tr.residual[-1].T, fixed.residual, rtol=1e-5)
    np.testing.assert_allclose(L.convergence_score(tr.logit_change, 3).T, fixed.score,
                               rtol=1e-5)
    np.testing.assert_allclose(tr.q_halt[-1].T, fixed.q_halt, rtol=1e-5)
    # Per-row halting rules recomputed from the trace give the loop's step counts.
    tol = float(np.median(tr.logit_change[1:]))  # a tolerance some rows meet and some do not
    conv = run(halt="convergence", convergence_tol=tol, convergence_window=2)
    steps, _ = L.steps_to_convergence(tr.logit_change, tol, 2)
    np.testing.assert_array_equal(steps.T, conv.steps)
    assert len(np.unique(conv.steps)) > 1
    rms = tr.residual / np.sqrt(tr.state_size)
    tol = float(np.median(rms[2:]))
    conv = run(halt="convergence", convergence_tol=tol, convergence_window=2,
               convergence_metric="latents")
    steps, _ = L.steps_to_convergence(rms, tol, 2, skip_first=False)
    np.testing.assert_array_equal(steps.T, conv.steps)
    assert len(np.unique(conv.steps)) > 1
    qh = run(halt="q_halt")
    np.testing.assert_array_equal(L.steps_to_halt(tr.q_halt)[0].T, qh.steps)


def test_eqr_analyze_end_to_end(trained, tmp_path, capsys, gcs_bucket):
    from eqr_jax.cli import main
    from eqr_jax.data.format import write_split

    run, _, _ = trained
    x, y = make_puzzles(6, 9, blanks=(3, 8))
    data = tmp_path / "data"
    write_split(data, "test", x, y, vocab_size=6)
    out = tmp_path / "analysis"
    rc = main(["analyze", "--checkpoint", run, "--data", str(data), "--puzzles", "5",
               "--inits", "4", "--depth", "6", "--batch-size", "4", "--krylov", "8",
               "--restarts", "1", "--pca-puzzle", "4", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "analysis.json").read_text())
    assert res["num_puzzles"] == 5 and res["inits"] == 4 and res["depth"] == 6
    assert res["census"]["depths"] == [1, 6]
    assert len(res["per_puzzle"]) == 5
    for e in res["per_puzzle"]:
        assert all(1 <= a <= 4 for a in e["attractors"])
        assert all(0 <= s <= a for s, a in zip(e["settled_attractors"], e["attractors"]))
        assert all(0 <= s <= 1 for s in e["solution_basin"])
        assert 1 <= e["steps_convergence"] <= 6 and e["rating"] >= 0
        assert e["blanks"] == int((x[e["index"]] == 1).sum())
    # The basin share at the last depth is the per-puzzle pass rate.
    basins = [e["solution_basin"][-1] for e in res["per_puzzle"]]
    assert np.mean(basins) == pytest.approx(res["accuracy"]["per_init"])
    st = res["stability"]
    assert len(st["rows"]["radius"]) == 5 * 4
    assert all(r > 0 for r in st["rows"]["radius"])
    assert st["correct"]["n"] + st["wrong"]["n"] == 20
    assert len(res["pca"]["coords"]) == 6 and len(res["pca"]["coords"][0]) == 4  # steps 1..6
    assert len(res["pca"]["attractor"]) == 4 and res["pca"]["steps"] == [1, 2, 3, 4, 5, 6]
    assert res["pca"]["puzzle"] == 4
    assert "rating" in res["difficulty"] and "blanks" in res["difficulty"]
    for name in ("spectral_radius", "census_vs_depth", "convergence_curves",
                 "selection_vs_threshold", "compute_vs_difficulty", "pca_trajectories"):
        assert os.path.getsize(out / f"{name}.png") > 1000
    text = capsys.readouterr().out
    assert "spectral radius at end states" in text and "census (tol 0.05)" in text
    # What `--out gs://...` writes, from this analysis (a second one would compile again).
    from eqr_jax.analysis import save_landscape_plots
    from eqr_jax.reporting import write_json

    url = gcs_bucket.url("analysis")
    written = [str(write_json(url + "/analysis.json", res, machine=False))]
    written += save_landscape_plots(res, url)
    assert written[0] == url + "/analysis.json" and len(written) == 7
    assert gcs_bucket.objects(url) == sorted(w[len(url) + 1:] for w in written)
    assert json.loads(gcs_bucket.fs.cat(url + "/analysis.json")) == res
    assert not Path("gs:").exists() and not (out / "gs:").exists()


def test_eqr_analyze_reports_bad_input(trained, tmp_path, capsys):
    from eqr_jax.cli import main
    from eqr_jax.data.format import write_split

    run, _, _ = trained
    assert main(["analyze", "--checkpoint", run, "--data", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    x, y = make_puzzles(3, 0)
    write_split(tmp_path / "d", "test", x[:, :9], y[:, :9], vocab_size=6)
    assert main(["analyze", "--checkpoint", run, "--data", str(tmp_path / "d")]) == 2
    assert "does not fit" in capsys.readouterr().err
    write_split(tmp_path / "ok", "test", x, y, vocab_size=6)
    assert main(["analyze", "--checkpoint", run, "--data", str(tmp_path / "ok"), "--inits",
                 "0"]) == 2
    assert "inits must be >= 1" in capsys.readouterr().err
    assert main(["analyze", "--checkpoint", run, "--data", str(tmp_path / "ok"),
                 "--pca-puzzle", "3"]) == 2  # only 3 puzzles in the split
    assert "--pca-puzzle 3 outside the 3 puzzles" in capsys.readouterr().err


def test_eqr_analyze_reference_checkpoint_matches_native(trained, tmp_path, monkeypatch):
    """A .pth in the reference layout (written and read without torch) gives the same analysis
    as the native checkpoint."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails from here on
    from eqr_jax.analysis.report import AnalysisOptions, analyze
    from eqr_jax.interop import load_reference_checkpoint, load_reference_model, params_to_reference
    from torch_zip import save as torch_save

    _, model, params = trained
    cfg = model.cfg
    sd = {f"model.{k}": np.asarray(v, np.float32)
          for k, v in params_to_reference(params, cfg).items()}
    arch = {k: getattr(cfg, k) for k in ("H_cycles", "L_cycles", "L_layers", "hidden_size",
                                         "expansion", "num_heads", "pos_encodings", "mlp_t",
                                         "forward_dtype", "lambda_", "noise_scale",
                                         "halt_max_steps")}
    path = tmp_path / "ref.pth"
    torch_save({"model": sd, "config": {"arch": arch}, "step": 40}, path)
    ref_cfg, ref_params, which = load_reference_model(str(path), seq_len=cfg.seq_len,
                                                      vocab_size=cfg.vocab_size)
    ref_model = EqRModel(ref_cfg.model)
    assert which == "raw" and load_reference_checkpoint(str(path))["step"] == 40
    x, y = make_puzzles(3, 2)
    opts = AnalysisOptions(inits=2, depth=3, krylov=4, restarts=0)
    a = analyze(model, params, x, y, opts)
    b = analyze(ref_model, ref_params, x, y, opts)
    assert a["accuracy"] == b["accuracy"]
    np.testing.assert_allclose(a["stability"]["rows"]["radius"], b["stability"]["rows"]["radius"],
                               rtol=1e-4)


def test_analyze_bf16_attention_model_without_ratings(tmp_path):
    """The presets' bf16 compute with attention + RoPE, on data that is not Sudoku."""
    from eqr_jax.analysis import AnalysisOptions, analyze, save_landscape_plots, summary_lines

    cfg = MICRO["attention_rope"]
    model = EqRModel(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    x = rng.integers(1, 6, (3, cfg.seq_len)).astype(np.int32)
    y = rng.integers(2, 6, (3, cfg.seq_len)).astype(np.int32)
    res = analyze(model, params, x, y, AnalysisOptions(inits=2, depth=3, batch_size=2, krylov=4,
                                                       restarts=0),
                  blanks=(x == 1).sum(1).tolist())
    assert "rating" not in res["difficulty"] and "no difficulty ratings" in res["difficulty"]["note"]
    assert res["difficulty"]["blanks"]["range"] == [int((x == 1).sum(1).min()),
                                                    int((x == 1).sum(1).max())]
    assert len(res["stability"]["rows"]["radius"]) == 6
    assert np.all(np.isfinite(res["stability"]["rows"]["radius"]))
    assert res["pca"]["puzzle"] in (0, 1, 2)
    names = [os.path.basename(p) for p in save_landscape_plots(res, str(tmp_path))]
    assert "compute_vs_difficulty.png" in names and "pca_trajectories.png" in names
    assert any("Spearman(blanks" in line for line in summary_lines(res))


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
