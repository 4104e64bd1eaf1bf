"""The whole landscape analysis of one model on a set of puzzles: numbers, plots, summary.

`analyze` runs `trace.trace_trajectories` batch by batch through an `Evaluator` of the model
(puzzle ``i`` draws the evaluator's keys of puzzle ``i``, so the trajectories are those
``eqr eval --halt fixed`` scores with the same seed) and returns one JSON-ready
dict; `eqr_jax.analysis.plots.save_landscape_plots` draws every figure from that dict alone, and
`summary_lines` condenses it for the terminal. What each number means is documented in
``docs/analysis.md``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax.analysis import landscape as L
from eqr_jax.analysis.stability import float32_model, jacobian_spectral_radius
from eqr_jax.analysis.trace import Trajectories, trace_trajectories
from eqr_jax.config import EvalConfig
from eqr_jax.evaluation import Evaluator, convergence_top_k, majority_vote
from eqr_jax.losses import IGNORE_LABEL
from eqr_jax.model import EqRModel, LatentState


CONV_METRICS = ("latents", "logits")


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """Settings of `analyze` (all recorded in ``analysis.json``).

    inits: random initialisations per puzzle (K). depth: noisy steps (D). snapshots: depths of
    the attractor census (default D/16, D/4, D). batch_size: puzzles per compiled call (rows =
    inits x batch_size). seed: as ``eqr eval --seed``. noise: run the noisy map (as evaluation)
    or the noise-free one. cluster_tol: RMS latent distance per element under which two final
    states with the same decoded grid join one attractor. conv_metric, conv_tol, window: a row
    has converged once its ``latents`` RMS residual per element (or its ``logits`` change) stayed
    below conv_tol for window steps, the rule of ``eqr eval --halt convergence``; conv_tol 0
    picks 3 x noise_scale for latents with noise on (the residual cannot fall below the noise
    the map injects), else 1e-3. krylov, restarts: Arnoldi settings of the spectral radius.
    radius_copies: initialisations per puzzle whose end state gets a spectral radius (0: all).
    radius_rows: end states per Arnoldi call. pca_puzzle: the puzzle whose latent paths are
    drawn (-1: the most mixed one, solution basin nearest 1/2). path_points: path samples.
    """

    inits: int = 16
    depth: int = 64
    snapshots: tuple[int, ...] = ()
    batch_size: int = 32
    seed: int = 0
    noise: bool = True
    cluster_tol: float = 0.05
    conv_metric: str = "latents"
    conv_tol: float = 0.0
    window: int = 3
    krylov: int = 32
    restarts: int = 2
    radius_copies: int = 0
    radius_rows: int = 256
    pca_puzzle: int = -1
    path_points: int = 128

    def __post_init__(self):
        for name in ("inits", "depth", "batch_size", "window", "krylov", "radius_rows",
                     "path_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"analysis option {name} must be >= 1, got {getattr(self, name)}")
        for name in ("radius_copies", "restarts", "cluster_tol", "conv_tol"):
            if getattr(self, name) < 0:
                raise ValueError(f"analysis option {name} must be >= 0, got {getattr(self, name)}")
        if self.pca_puzzle < -1:
            raise ValueError(f"analysis option pca_puzzle must be >= -1, got {self.pca_puzzle}")
        if self.conv_metric not in CONV_METRICS:
            raise ValueError(f"analysis option conv_metric must be one of {CONV_METRICS}, got "
                             f"{self.conv_metric!r}")
        snaps = self.census_depths
        if list(snaps) != sorted(set(snaps)) or snaps[0] < 1 or snaps[-1] > self.depth:
            raise ValueError(f"snapshots must be increasing depths in [1, {self.depth}], got "
                             f"{self.snapshots}")

    @property
    def census_depths(self) -> tuple[int, ...]:
        if self.snapshots:
            return tuple(int(s) for s in self.snapshots)
        return tuple(sorted({max(1, self.depth // 16), max(1, self.depth // 4), self.depth}))

    def convergence_tol(self, noise_scale: float) -> float:
        """The tolerance in force (resolves conv_tol = 0)."""
        if self.conv_tol > 0:
            return float(self.conv_tol)
        if self.conv_metric == "latents" and self.noise and noise_scale > 0:
            return 3.0 * float(noise_scale)
        return 1e-3


def _quantiles(v) -> dict[str, Any]:
    v = np.asarray(v, np.float64)
    if v.size == 0:
        return {"n": 0}
    q = np.percentile(v, [10, 25, 50, 75, 90])
    return {"n": int(v.size), "mean": float(v.mean()), "q10": float(q[0]), "q25": float(q[1]),
            "median": float(q[2]), "q75": float(q[3]), "q90": float(q[4])}


def _flat_states(states: LatentState, m: int, b: int) -> np.ndarray:
    """[z_H; z_L] of snapshot m, batch row b, every copy: (C, 2 N H) float32."""
    c = states.z_H.shape[1]
    return np.concatenate([np.asarray(a[m, :, b], np.float32).reshape(c, -1) for a in states],
                          axis=1)


def _radius_rows(model, params, states: LatentState, x, rows: int, iters: int, restarts: int,
                 key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectral radius at every row of (R, N, H) states, ``rows`` rows per call (padded)."""
    r = states.z_H.shape[0]
    rad, lam, res = [], [], []
    for start in range(0, r, rows):
        idx = np.arange(start, start + rows)
        idx = np.where(idx < r, idx, start)  # pad the last call to one compiled shape
        sub = LatentState(*(jnp.asarray(a[idx]) for a in states))
        rr, est = jacobian_spectral_radius(model, params, sub, x[idx], iters=iters,
                                           restarts=restarts, key=jax.random.fold_in(key, start),
                                           return_estimate=True)
        n = min(rows, r - start)
        rad.append(rr[:n])
        lam.append(est.eigenvalue[:n])
        res.append(est.residual[:n])
    return np.concatenate(rad), np.concatenate(lam), np.concatenate(res)


def _census_rows(tr: Trajectories, labels, nb: int, snaps, tol: float, settle: float):
    """Census of every real row of a batch at every snapshot depth: [row][snapshot] dicts."""
    out = []
    for b in range(nb):
        row = []
        for mi, dm in enumerate(snaps):
            rms = tr.residual[dm - 1, :, b] / math.sqrt(tr.state_size)
            c = L.attractor_census(_flat_states(tr.states, mi, b), tr.preds[mi, :, b], labels[b],
                                   tol, residual=rms)
            c["n_settled"] = int(sum(e["residual"] <= settle for e in c["attractors"]))
            row.append(c)
        out.append(row)
    return out


def analyze(model: EqRModel, params, inputs, labels, opts: AnalysisOptions = AnalysisOptions(),
            ratings: Sequence[int] | None = None, blanks: Sequence[int] | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Landscape analysis of ``model`` on puzzles ``inputs``/``labels`` (P, N).

    Args:
      ratings: optional (P,) difficulty ratings (`eqr_jax.data.sudoku.rate`); blanks: optional
        (P,) number of unknown cells. Without ratings the compute-vs-difficulty section says so.
      progress: print one line per batch.
    Returns:
      A JSON-ready dict: ``accuracy``, ``stability``, ``census``, ``convergence``,
      ``difficulty``, ``pca``, ``per_puzzle`` and ``timing`` (see docs/analysis.md).
    """
    inputs = np.asarray(inputs, np.int32)
    labels = np.asarray(labels, np.int32)
    _check_puzzles(inputs, labels, opts, ratings, blanks)
    p, n_tok = inputs.shape
    t_start = time.perf_counter()
    conv_tol = opts.convergence_tol(model.cfg.noise_scale)
    # "Settled" (at a fixed point up to the injected noise) is judged on the latent residual.
    settle_tol = conv_tol if opts.conv_metric == "latents" else dataclasses.replace(
        opts, conv_metric="latents", conv_tol=0.0).convergence_tol(model.cfg.noise_scale)
    # The evaluator's model (noise off: noise_scale 0) and key rule.
    evaluator = Evaluator(model, EvalConfig(seed=opts.seed, noise_scale=None if opts.noise
                                            else 0.0))
    S, preds, census, radius, timing = _trace_all(model, evaluator, params, inputs, labels, opts,
                                                  settle_tol, progress, t_start)
    rms = S["residual"] / math.sqrt(2 * n_tok * model.cfg.hidden_size)
    final_ok = S["exact"][-1].T  # (P, K)
    score = L.convergence_score(S["logit_change"], opts.window).T  # (P, K)
    final_rms = rms[-1].T
    mv = majority_vote(preds, labels)
    accuracy = {"per_init": float(final_ok.mean()), "any_correct": float(final_ok.any(1).mean()),
                "majority_vote": float(mv.exact.mean()),
                "convergence_top1": convergence_top_k(score, final_ok, 1)["exact_accuracy"]}
    conv = {"residual_rms": L.curves_by_outcome(rms, S["exact"][-1]),
            "logit_change": L.curves_by_outcome(S["logit_change"], S["exact"][-1]),
            "selection_by_residual": L.selection_vs_threshold(final_rms, final_ok),
            "selection_by_logit_score": L.selection_vs_threshold(score, final_ok),
            "final_rms_residual": {"correct": _quantiles(final_rms[final_ok]),
                                   "wrong": _quantiles(final_rms[~final_ok])}}
    diff, steps, reached = _difficulty(S, rms, final_ok, opts, conv_tol, ratings, blanks)
    t0 = time.perf_counter()
    pca = _pca(evaluator, params, inputs, labels, opts, census, final_ok)
    timing["pca_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start
    return {"num_puzzles": p, "inits": opts.inits, "depth": opts.depth,
            "options": dataclasses.asdict(opts), "model": dataclasses.asdict(model.cfg),
            "accuracy": accuracy,
            "stability": _stability(radius, final_ok, final_rms, settle_tol, opts),
            "census": _census_summary(census, opts, settle_tol), "convergence": conv,
            "difficulty": diff, "pca": pca,
            "per_puzzle": _per_puzzle(census, steps, reached, ratings, blanks),
            "timing": timing, "time_s": timing["total_s"],
            "platform": jax.devices()[0].platform}


def _check_puzzles(inputs, labels, opts: AnalysisOptions, ratings, blanks) -> None:
    if inputs.ndim != 2 or inputs.shape != labels.shape:
        raise ValueError(f"inputs and labels must both be (puzzles, seq), got {inputs.shape} and "
                         f"{labels.shape}")
    p = inputs.shape[0]
    if p == 0:
        raise ValueError("no puzzles to analyse")
    if opts.pca_puzzle >= p:
        raise ValueError(f"pca_puzzle {opts.pca_puzzle} outside the {p} puzzles analysed")
    for name, arr in (("ratings", ratings), ("blanks", blanks)):
        if arr is not None and len(arr) != p:
            raise ValueError(f"{len(arr)} {name} for {p} puzzles")


def _padded_batch(inputs, labels, bi: int, bs: int):
    """Batch ``bi`` of ``bs`` rows: (first puzzle, real rows, inputs, labels), padded."""
    p, n_tok = inputs.shape
    start = bi * bs
    nb = min(bs, p - start)
    xi = np.zeros((bs, n_tok), np.int32)
    yi = np.full((bs, n_tok), IGNORE_LABEL, np.int32)
    xi[:nb], yi[:nb] = inputs[start:start + nb], labels[start:start + nb]
    return start, nb, xi, yi


def _trace_all(model: EqRModel, evaluator, params, inputs, labels, opts: AnalysisOptions,
               settle_tol: float, progress: bool, t_start: float):
    """Every batch's trajectories, attractor census and spectral radii: the per-step signals
    ``S`` (T, K, P), final predictions (P, K, N), census rows, radius rows and timings."""
    p = inputs.shape[0]
    k, d, snaps = opts.inits, opts.depth, opts.census_depths
    bs = min(opts.batch_size, p)
    rc = opts.inits if opts.radius_copies == 0 else min(opts.radius_copies, opts.inits)
    f32 = float32_model(model)
    timing = {"trace_s": 0.0, "census_s": 0.0, "radius_s": 0.0, "pca_s": 0.0}
    per_step = {name: [] for name in ("residual", "logit_change", "q_halt", "exact")}
    final_preds, census = [], []
    radius = {"radius": [], "eig": [], "res": [], "puzzle": [], "copy": []}
    for bi in range(math.ceil(p / bs)):
        start, nb, xi, yi = _padded_batch(inputs, labels, bi, bs)
        t0 = time.perf_counter()
        # Row 0's path is recorded and dropped: the PCA re-run then reuses this compilation
        # with another (traced) row.
        tr = trace_trajectories(evaluator, params, xi, yi, start, copies=k, depth=d,
                                snapshots=snaps, path_row=0, path_points=opts.path_points)
        t1 = time.perf_counter()
        for name in per_step:
            per_step[name].append(getattr(tr, name)[:, :, :nb])
        final_preds.append(tr.preds[-1][:, :nb])
        census += _census_rows(tr, yi, nb, snaps, opts.cluster_tol, settle_tol)
        t2 = time.perf_counter()
        # Spectral radius at the final states of the first rc copies of the real rows.
        fin = LatentState(*(np.asarray(a[-1, :rc, :nb]).reshape((rc * nb,) + a.shape[-2:])
                            for a in tr.states))
        x = np.asarray(f32.embed(params, jnp.asarray(xi[:nb])))
        x = np.broadcast_to(x[None], (rc,) + x.shape).reshape((rc * nb,) + x.shape[1:])
        # The Krylov iterations' random start vectors (not the trajectories' keys). One chunk
        # size for every batch (the last, partial one is padded): one compilation.
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(opts.seed), bi), 2)
        rad, lam, res = _radius_rows(model, params, fin, x, min(opts.radius_rows, rc * bs),
                                     opts.krylov, opts.restarts, key)
        for name, value in (("radius", rad), ("eig", lam), ("res", res),
                            ("copy", np.repeat(np.arange(rc), nb)),
                            ("puzzle", np.tile(np.arange(start, start + nb), rc))):
            radius[name].append(value)
        timing["trace_s"] += t1 - t0
        timing["census_s"] += t2 - t1
        timing["radius_s"] += time.perf_counter() - t2
        if progress:
            print(f"[eqr analyze] puzzles {start + nb}/{p} ({time.perf_counter() - t_start:.0f} s)",
                  flush=True)
    S = {name: np.concatenate(v, axis=2) for name, v in per_step.items()}  # (T, K, P)
    preds = np.concatenate(final_preds, axis=1).transpose(1, 0, 2)  # (P, K, N)
    radius = {name: np.concatenate(v) for name, v in radius.items()}
    radius["copies"] = rc
    return S, preds, census, radius, timing


def _stability(radius: dict, final_ok, final_rms, settle_tol: float,
               opts: AnalysisOptions) -> dict[str, Any]:
    """The stability section: spectral-radius quantiles by outcome and settledness."""
    rad, lam, eres = radius["radius"], radius["eig"], radius["res"]
    rp, rk = radius["puzzle"], radius["copy"]
    r_ok = final_ok[rp, rk]
    r_settled = final_rms[rp, rk] <= settle_tol
    stab = {"krylov": opts.krylov, "restarts": opts.restarts,
            "copies_per_puzzle": radius["copies"],
            "unconverged": int((eres > 1e-2).sum()), "settle_tol": settle_tol}
    for name, sel in (("correct", r_ok), ("wrong", ~r_ok),
                      ("correct_settled", r_ok & r_settled), ("correct_moving", r_ok & ~r_settled),
                      ("wrong_settled", ~r_ok & r_settled), ("wrong_moving", ~r_ok & ~r_settled)):
        stab[name] = {**_quantiles(rad[sel]),
                      "frac_below_1": float((rad[sel] < 1).mean()) if sel.any() else None,
                      "frac_complex": float((np.abs(lam[sel].imag) > 1e-6 * rad[sel]).mean())
                      if sel.any() else None}
    stab["rows"] = {"puzzle": rp.tolist(), "copy": rk.tolist(), "radius": rad.tolist(),
                    "eig_real": lam.real.tolist(), "eig_imag": lam.imag.tolist(),
                    "eig_residual": eres.tolist(), "correct": r_ok.tolist(),
                    "final_rms_residual": final_rms[rp, rk].tolist()}
    return stab


def _census_summary(census: list, opts: AnalysisOptions, settle_tol: float) -> dict[str, Any]:
    """The census section: attractor and basin quantiles at each census depth."""
    per_depth = []
    for mi, dm in enumerate(opts.census_depths):
        get = lambda key: np.array([c[mi][key] for c in census])  # noqa: B023 - used at once
        na, basin = get("n_attractors"), get("solution_basin")
        per_depth.append({"depth": dm, "attractors": _quantiles(na),
                          "settled_attractors": _quantiles(get("n_settled")),
                          "grids": _quantiles(get("n_grids")),
                          "solution_attractors": _quantiles(get("n_solution_attractors")),
                          "solution_basin": _quantiles(basin),
                          "largest_basin": _quantiles(get("largest_basin")),
                          "frac_puzzles_all_solved": float((basin == 1).mean()),
                          "frac_puzzles_none_solved": float((basin == 0).mean()),
                          "frac_puzzles_single_attractor": float((na == 1).mean())})
    return {"tol": opts.cluster_tol, "settle_tol": settle_tol, "depths": list(opts.census_depths),
            "per_depth": per_depth}


def _difficulty(S: dict, rms, final_ok, opts: AnalysisOptions, conv_tol: float, ratings,
                blanks):
    """The compute-vs-difficulty section, and the per-puzzle median steps and reached
    fractions it is computed from."""
    if opts.conv_metric == "latents":
        sc, rc_conv = L.steps_to_convergence(rms, conv_tol, opts.window, skip_first=False)
    else:
        sc, rc_conv = L.steps_to_convergence(S["logit_change"], conv_tol, opts.window)
    sh, rc_halt = L.steps_to_halt(S["q_halt"])
    ss, rc_sol = L.steps_to_solution(S["exact"])
    med = lambda a: np.median(a.T, axis=1)  # (K, P) -> per puzzle median over inits
    steps = {"convergence": med(sc), "q_halt": med(sh), "solution": med(ss)}
    reached = {"convergence": rc_conv.T.mean(1), "q_halt": rc_halt.T.mean(1),
               "solution": rc_sol.T.mean(1)}
    diff: dict[str, Any] = {"conv_metric": opts.conv_metric, "conv_tol": conv_tol,
                            "window": opts.window, "censored_at": opts.depth,
                            "reached": {k2: float(v.mean()) for k2, v in reached.items()}}
    for proxy, vals in (("rating", ratings), ("blanks", blanks)):
        if vals is None:
            continue
        v = np.asarray(vals, np.int64)
        diff[proxy] = {"spearman": {name: L.spearman(v, s) for name, s in steps.items()},
                       "range": [int(v.min()), int(v.max())], "distinct": int(len(set(v)))}
    if ratings is not None:
        diff["buckets"] = {name: L.bucket_stats(ratings, s) for name, s in steps.items()}
        diff["solved_by_bucket"] = L.bucket_stats(ratings, final_ok.mean(1))
    else:
        diff["note"] = "no difficulty ratings (not a Sudoku dataset): only blanks are used"
    return diff, steps, reached


def _pca(evaluator, params, inputs, labels, opts: AnalysisOptions, census: list,
         final_ok) -> dict[str, Any]:
    """The PCA section: the chosen puzzle's batch re-run (same keys: the same trajectories)
    with its latent path recorded."""
    p = inputs.shape[0]
    bs = min(opts.batch_size, p)
    pz = opts.pca_puzzle
    if pz < 0:
        # The most mixed landscape at depth D: solution basin nearest 1/2, then the most
        # attractors, then the first puzzle.
        pz = int(min(range(p), key=lambda i: (-min(census[i][-1]["solution_basin"],
                                                   1 - census[i][-1]["solution_basin"]),
                                              -census[i][-1]["n_attractors"], i)))
    start, nb, xi, yi = _padded_batch(inputs, labels, pz // bs, bs)
    tr = trace_trajectories(evaluator, params, xi, yi, start, copies=opts.inits,
                            depth=opts.depth, snapshots=opts.census_depths,
                            path_row=pz - start, path_points=opts.path_points)
    # The random initial latents are far from everything else and would take the first
    # component: the projection is fitted on steps >= 1 and drawn from step 1 on.
    coords, ratio = L.pca_2d(tr.path[1:])
    return {"puzzle": pz, "steps": tr.path_steps[1:].tolist(), "explained": ratio.tolist(),
            "coords": np.round(coords, 5).tolist(), "attractor": census[pz][-1]["ids"].tolist(),
            "correct": final_ok[pz].tolist(),
            "attractor_residual": [e["residual"] for e in census[pz][-1]["attractors"]]}


def _per_puzzle(census: list, steps: dict, reached: dict, ratings, blanks) -> list[dict]:
    out = []
    for i in range(len(census)):
        e = {"index": i, "solution_basin": [c["solution_basin"] for c in census[i]],
             "attractors": [c["n_attractors"] for c in census[i]],
             "settled_attractors": [c["n_settled"] for c in census[i]],
             "solution_attractors": [c["n_solution_attractors"] for c in census[i]],
             "steps_convergence": float(steps["convergence"][i]),
             "steps_q_halt": float(steps["q_halt"][i]),
             "steps_solution": float(steps["solution"][i]),
             "converged": float(reached["convergence"][i])}
        if ratings is not None:
            e["rating"] = int(ratings[i])
        if blanks is not None:
            e["blanks"] = int(blanks[i])
        out.append(e)
    return out


# ----------------------------------------------------------------------------------------------
# Summary


def _fmt(v, spec=".3f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summary_lines(res: Mapping[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    a, s, c = res["accuracy"], res["stability"], res["census"]
    out = [f"{res['num_puzzles']} puzzles x {res['inits']} inits, depth {res['depth']} "
           f"(noise {'on' if res['options']['noise'] else 'off'}), {res['time_s']:.0f} s",
           f"accuracy at depth {res['depth']}: per init {a['per_init']:.3f}, any correct "
           f"{a['any_correct']:.3f}, majority {a['majority_vote']:.3f}, convergence top-1 "
           f"{a['convergence_top1']:.3f}"]
    parts = []
    for name in ("correct", "wrong"):
        e = s[name]
        if e["n"]:
            parts.append(f"{name}: median {e['median']:.3f} [{e['q10']:.3f}, {e['q90']:.3f}], "
                         f"{100 * e['frac_below_1']:.0f}% < 1 (n={e['n']})")
    out.append("spectral radius at end states: " + "; ".join(parts)
               + (f" ({s['unconverged']} estimates unconverged)" if s["unconverged"] else ""))
    out.append(f"settled end states (RMS residual <= {s['settle_tol']:.3g}): "
               f"{s['correct_settled']['n']} of {s['correct']['n']} correct, "
               f"{s['wrong_settled']['n']} of {s['wrong']['n']} wrong")
    out.append(f"census (tol {c['tol']}): " + "; ".join(
        f"D={e['depth']}: {e['attractors']['mean']:.2f} attractors "
        f"({e['settled_attractors']['mean']:.2f} settled), solution basin "
        f"{e['solution_basin']['mean']:.2f}" for e in c["per_depth"]))
    fr = res["convergence"]["final_rms_residual"]
    sel = res["convergence"]["selection_by_residual"]
    out.append(f"final RMS residual: correct median {_fmt(fr['correct'].get('median'), '.2e')}, "
               f"wrong median {_fmt(fr['wrong'].get('median'), '.2e')}; most converged init "
               f"(by residual) {sel['top1']:.3f} vs mean {sel['baseline']:.3f}, oracle "
               f"{sel['oracle']:.3f}")
    diff = res["difficulty"]
    for proxy in ("rating", "blanks"):
        if proxy in diff:
            sp = diff[proxy]["spearman"]
            out.append(f"Spearman({proxy}, steps): {diff['conv_metric']} convergence "
                       f"{_fmt(sp['convergence'])}, "
                       f"q_halt {_fmt(sp['q_halt'])}, solution {_fmt(sp['solution'])} "
                       f"({proxy} {diff[proxy]['range'][0]}..{diff[proxy]['range'][1]})")
    return out


def sudoku_difficulty(inputs: np.ndarray, labels: np.ndarray):
    """(ratings, blanks) when every puzzle is a Sudoku whose label is a valid solution; else
    (None, None). Tokens: 1 = blank, d + 1 = digit d."""
    from eqr_jax.data import sudoku

    n = math.isqrt(inputs.shape[1])
    if n * n != inputs.shape[1] or n < 2:
        return None, None
    ratings, blanks = [], []
    for x, y in zip(inputs, labels):
        if x.min() < 1 or x.max() > n + 1:
            return None, None
        grid, sol = sudoku.grid_from_tokens(x, n), sudoku.grid_from_tokens(y, n)
        try:
            if sudoku.check_givens(grid) or not sudoku.is_valid_solution(grid, sol):
                return None, None
        except sudoku.PuzzleFormatError:
            return None, None
        # A puzzle with many solutions can have a huge search tree: cap it (the rating is then
        # a lower bound); generated and imported puzzles have one solution.
        ratings.append(sudoku.rate(grid, max_solutions=2))
        blanks.append(int((grid == 0).sum()))
    return ratings, blanks
