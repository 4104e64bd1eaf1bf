"""The whole landscape analysis of one model on a set of puzzles: numbers, plots, summary.

`analyze` runs `landscape.trace_trajectories` batch by batch (puzzle batch ``i`` uses key
``fold_in(PRNGKey(seed), i)``, as `eqr_jax.evaluation.evaluate_dataset` does, so the
trajectories are those ``eqr eval --halt fixed`` scores with the same seed and batch size) and
returns one JSON-ready dict; `save_plots` draws every figure from that dict alone, and
`summary_lines` condenses it for the terminal. What each number means is documented in
``docs/analysis.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax.analysis import landscape as L
from eqr_jax.analysis.plots import _plain_ticks, _plt, _save
from eqr_jax.analysis.stability import float32_model, jacobian_spectral_radius
from eqr_jax.evaluation import convergence_top_k, majority_vote
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


def _census_rows(tr: L.Trajectories, labels, nb: int, snaps, tol: float, settle: float):
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
    if inputs.ndim != 2 or inputs.shape != labels.shape:
        raise ValueError(f"inputs and labels must both be (puzzles, seq), got {inputs.shape} and "
                         f"{labels.shape}")
    p, n_tok = inputs.shape
    if p == 0:
        raise ValueError("no puzzles to analyse")
    if opts.pca_puzzle >= p:
        raise ValueError(f"pca_puzzle {opts.pca_puzzle} outside the {p} puzzles analysed")
    for name, arr in (("ratings", ratings), ("blanks", blanks)):
        if arr is not None and len(arr) != p:
            raise ValueError(f"{len(arr)} {name} for {p} puzzles")
    t_start = time.perf_counter()
    timing = {"trace_s": 0.0, "census_s": 0.0, "radius_s": 0.0, "pca_s": 0.0}
    k, d, snaps = opts.inits, opts.depth, opts.census_depths
    conv_tol = opts.convergence_tol(model.cfg.noise_scale)
    # "Settled" (at a fixed point up to the injected noise) is judged on the latent residual.
    settle_tol = conv_tol if opts.conv_metric == "latents" else dataclasses.replace(
        opts, conv_metric="latents", conv_tol=0.0).convergence_tol(model.cfg.noise_scale)
    bs = min(opts.batch_size, p)
    rc = opts.inits if opts.radius_copies == 0 else min(opts.radius_copies, opts.inits)
    f32 = float32_model(model)
    root = jax.random.PRNGKey(opts.seed)

    def batch(bi):
        start = bi * bs
        nb = min(bs, p - start)
        xi = np.zeros((bs, n_tok), np.int32)
        yi = np.full((bs, n_tok), IGNORE_LABEL, np.int32)
        xi[:nb], yi[:nb] = inputs[start:start + nb], labels[start:start + nb]
        return start, nb, xi, yi, jax.random.fold_in(root, bi)

    per_step = {name: [] for name in ("residual", "logit_change", "q_halt", "exact")}
    final_preds, census = [], []
    radius = {"radius": [], "eig": [], "res": [], "puzzle": [], "copy": []}
    for bi in range(math.ceil(p / bs)):
        start, nb, xi, yi, key = batch(bi)
        t0 = time.perf_counter()
        # Row 0's path is recorded and dropped: the PCA re-run below then reuses this
        # compilation with another (traced) row.
        tr = L.trace_trajectories(model, params, xi, yi, key, copies=k, depth=d, snapshots=snaps,
                                  noise=opts.noise, path_row=0, path_points=opts.path_points)
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
        # One chunk size for every batch (the last, partial one is padded): one compilation.
        rad, lam, res = _radius_rows(model, params, fin, x, min(opts.radius_rows, rc * bs),
                                     opts.krylov, opts.restarts, jax.random.fold_in(key, 2))
        radius["radius"].append(rad)
        radius["eig"].append(lam)
        radius["res"].append(res)
        radius["copy"].append(np.repeat(np.arange(rc), nb))
        radius["puzzle"].append(np.tile(np.arange(start, start + nb), rc))
        timing["trace_s"] += t1 - t0
        timing["census_s"] += t2 - t1
        timing["radius_s"] += time.perf_counter() - t2
        if progress:
            print(f"[eqr analyze] puzzles {start + nb}/{p} ({time.perf_counter() - t_start:.0f} s)",
                  flush=True)

    S = {name: np.concatenate(v, axis=2) for name, v in per_step.items()}  # (T, K, P)
    rms = S["residual"] / math.sqrt(2 * n_tok * model.cfg.hidden_size)
    exact_tk = S["exact"]
    final_ok = exact_tk[-1].T  # (P, K)
    preds = np.concatenate(final_preds, axis=1).transpose(1, 0, 2)  # (P, K, N)
    score = L.convergence_score(S["logit_change"], opts.window).T  # (P, K)
    final_rms = rms[-1].T

    # -- accuracy --------------------------------------------------------------------------
    mv = majority_vote(preds, labels)
    accuracy = {"per_init": float(final_ok.mean()), "any_correct": float(final_ok.any(1).mean()),
                "majority_vote": float(mv.exact.mean()),
                "convergence_top1": convergence_top_k(score, final_ok, 1)["exact_accuracy"]}

    # -- stability -------------------------------------------------------------------------
    rad = np.concatenate(radius["radius"])
    lam = np.concatenate(radius["eig"])
    eres = np.concatenate(radius["res"])
    rp, rk = np.concatenate(radius["puzzle"]), np.concatenate(radius["copy"])
    r_ok = final_ok[rp, rk]
    r_settled = final_rms[rp, rk] <= settle_tol
    stab = {"krylov": opts.krylov, "restarts": opts.restarts, "copies_per_puzzle": rc,
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

    # -- census ----------------------------------------------------------------------------
    per_depth = []
    for mi, dm in enumerate(snaps):
        get = lambda key: np.array([c[mi][key] for c in census])
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
    census_out = {"tol": opts.cluster_tol, "settle_tol": settle_tol, "depths": list(snaps),
                  "per_depth": per_depth}

    # -- convergence vs correctness ---------------------------------------------------------
    conv = {"residual_rms": L.curves_by_outcome(rms, exact_tk[-1]),
            "logit_change": L.curves_by_outcome(S["logit_change"], exact_tk[-1]),
            "selection_by_residual": L.selection_vs_threshold(final_rms, final_ok),
            "selection_by_logit_score": L.selection_vs_threshold(score, final_ok),
            "final_rms_residual": {"correct": _quantiles(final_rms[final_ok]),
                                   "wrong": _quantiles(final_rms[~final_ok])}}

    # -- compute vs difficulty --------------------------------------------------------------
    if opts.conv_metric == "latents":
        sc, rc_conv = L.steps_to_convergence(rms, conv_tol, opts.window, skip_first=False)
    else:
        sc, rc_conv = L.steps_to_convergence(S["logit_change"], conv_tol, opts.window)
    sh, rc_halt = L.steps_to_halt(S["q_halt"])
    ss, rc_sol = L.steps_to_solution(exact_tk)
    med = lambda a: np.median(a.T, axis=1)  # (K, P) -> per puzzle median over inits
    steps = {"convergence": med(sc), "q_halt": med(sh), "solution": med(ss)}
    reached = {"convergence": rc_conv.T.mean(1), "q_halt": rc_halt.T.mean(1),
               "solution": rc_sol.T.mean(1)}
    diff: dict[str, Any] = {"conv_metric": opts.conv_metric, "conv_tol": conv_tol,
                            "window": opts.window, "censored_at": d,
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

    # -- PCA: re-run the chosen puzzle's batch (same key: the same trajectories) with its path --
    t0 = time.perf_counter()
    pz = opts.pca_puzzle
    if pz < 0:
        # The most mixed landscape at depth D: solution basin nearest 1/2, then the most
        # attractors, then the first puzzle.
        pz = int(min(range(p), key=lambda i: (-min(census[i][-1]["solution_basin"],
                                                   1 - census[i][-1]["solution_basin"]),
                                              -census[i][-1]["n_attractors"], i)))
    start, nb, xi, yi, key = batch(pz // bs)
    tr = L.trace_trajectories(model, params, xi, yi, key, copies=k, depth=d, snapshots=snaps,
                              noise=opts.noise, path_row=pz - start, path_points=opts.path_points)
    # The random initial latents are far from everything else and would take the first
    # component: the projection is fitted on steps >= 1 and drawn from step 1 on.
    coords, ratio = L.pca_2d(tr.path[1:])
    pca = {"puzzle": pz, "steps": tr.path_steps[1:].tolist(), "explained": ratio.tolist(),
           "coords": np.round(coords, 5).tolist(), "attractor": census[pz][-1]["ids"].tolist(),
           "correct": final_ok[pz].tolist(),
           "attractor_residual": [e["residual"] for e in census[pz][-1]["attractors"]]}
    timing["pca_s"] = time.perf_counter() - t0

    per_puzzle = []
    for i in range(p):
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
        per_puzzle.append(e)
    timing["total_s"] = time.perf_counter() - t_start
    return {"num_puzzles": p, "inits": k, "depth": d, "options": dataclasses.asdict(opts),
            "model": dataclasses.asdict(model.cfg), "accuracy": accuracy, "stability": stab,
            "census": census_out, "convergence": conv, "difficulty": diff, "pca": pca,
            "per_puzzle": per_puzzle, "timing": timing, "time_s": timing["total_s"],
            "platform": jax.devices()[0].platform}


# ----------------------------------------------------------------------------------------------
# Summary and plots


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


def _arr(values) -> np.ndarray:
    """float array from a JSON list (None -> NaN)."""
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _band(ax, steps, entry, color, label):
    if not entry["n"]:
        return
    ax.plot(steps, _arr(entry["median"]), "-", color=color, label=f"{label} (n={entry['n']})")
    ax.fill_between(steps, _arr(entry["q25"]), _arr(entry["q75"]), color=color, alpha=0.2, lw=0)


def plot_stability(res, path):
    plt = _plt()
    rows = res["stability"]["rows"]
    r, ok = np.asarray(rows["radius"]), np.asarray(rows["correct"], bool)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    hi = max(1.5, float(r.max()) * 1.05) if r.size else 1.5
    bins = np.linspace(0, hi, 40)
    for sel, color, name in ((ok, "tab:green", "correct"), (~ok, "tab:red", "wrong")):
        if sel.any():
            ax.hist(r[sel], bins=bins, color=color, alpha=0.6, label=f"{name} (n={sel.sum()})",
                    weights=np.full(sel.sum(), 1.0 / sel.sum()))
    ax.axvline(1.0, color="k", ls="--", lw=1)
    ax.set_xlabel("spectral radius of the step map's Jacobian at the end state")
    ax.set_ylabel("fraction of the class's end states")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_census(res, path):
    plt = _plt()
    per = res["census"]["per_depth"]
    depths = [e["depth"] for e in per]
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    pp = res["per_puzzle"]
    for e in pp[:64]:  # thin per-puzzle lines behind the means
        axes[0].plot(depths, e["attractors"], "-", color="0.8", lw=0.6)
        axes[1].plot(depths, e["solution_basin"], "-", color="0.8", lw=0.6)
    axes[0].plot(depths, [e["attractors"]["mean"] for e in per], "o-", label="all")
    axes[0].plot(depths, [e["solution_attractors"]["mean"] for e in per], "s--",
                 label="decoding to the solution")
    axes[0].set_ylabel("attractors per puzzle (mean)")
    axes[0].legend(fontsize=8)
    axes[1].plot(depths, [e["solution_basin"]["mean"] for e in per], "o-", color="tab:green")
    axes[1].set_ylabel("solution basin share")
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths)
        ax.set_xticklabels([str(x) for x in depths])
        ax.set_xlabel("depth")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{res['inits']} inits per puzzle, {res['num_puzzles']} puzzles", fontsize=9)
    return _save(fig, path)


def plot_convergence(res, path):
    plt = _plt()
    conv = res["convergence"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, ylab in ((axes[0], "residual_rms", "RMS latent residual per element"),
                          (axes[1], "logit_change", "mean logit change per token")):
        c = conv[key]
        _band(ax, c["steps"], c["correct"], "tab:green", "end correct")
        _band(ax, c["steps"], c["wrong"], "tab:red", "end wrong")
        ax.set_yscale("log")
        if len(c["steps"]) > 1 and c["steps"][-1] > 64:
            ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_selection(res, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, xlab in ((axes[0], "selection_by_residual", "final RMS residual threshold"),
                          (axes[1], "selection_by_logit_score", "logit-change score threshold")):
        s = res["convergence"][key]
        tau = _arr(s["threshold"])
        ax.plot(tau, _arr(s["top1_answered"]), "o-", ms=3, label="top-1 accuracy (answered)")
        ax.plot(tau, _arr(s["coverage"]), "s--", ms=3, label="puzzles answered")
        ax.plot(tau, _arr(s["precision"]), "^:", ms=3, label="precision of all inits kept")
        ax.axhline(s["baseline"], color="0.5", lw=1, ls="-.", label="mean accuracy")
        if tau.size and tau.min() > 0:
            ax.set_xscale("log")
            from matplotlib.ticker import NullFormatter
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlab)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_difficulty(res, path):
    plt = _plt()
    diff, pp = res["difficulty"], res["per_puzzle"]
    proxy = "rating" if "rating" in diff else ("blanks" if "blanks" in diff else None)
    if proxy is None:
        return None
    x = np.asarray([e[proxy] for e in pp], np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    rng = np.random.default_rng(0)
    for ax, key, name in ((axes[0], "steps_convergence", "convergence"),
                          (axes[1], "steps_q_halt", "q_halt")):
        y = np.asarray([e[key] for e in pp], np.float64)
        ax.scatter(x + rng.uniform(-0.15, 0.15, x.size), y, s=8, alpha=0.5)
        if proxy == "rating":
            b = diff["buckets"]["convergence" if name == "convergence" else "q_halt"]
            mids = [(e["lo"] + e["hi"]) / 2 for e in b]
            ax.plot(mids, [e["median"] for e in b], "o-", color="tab:red",
                    label="median per bucket")
            ax.legend(fontsize=8)
        ax.axhline(res["depth"], color="0.6", ls=":", lw=1)
        if res["depth"] >= 32:
            ax.set_yscale("log")
            _plain_ticks(ax.yaxis)
        ax.set_xlabel(f"difficulty ({proxy})")
        ax.set_ylabel(f"steps to {name} (median over inits)" if name == "q_halt" else
                      f"steps to {diff['conv_metric']} convergence (median)")
        ax.set_title(f"Spearman {_fmt(diff[proxy]['spearman'][name], '.2f')}", fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_pca(res, path):
    pca = res.get("pca")
    if not pca:
        return None
    plt = _plt()
    coords = np.asarray(pca["coords"])  # (P, C, 2)
    ids = np.asarray(pca["attractor"])
    ok = np.asarray(pca["correct"], bool)
    settle = res["census"]["settle_tol"]
    fig, ax = plt.subplots(figsize=(5.5, 4.4))
    # Groups that settled get their own colour; states still moving at depth D (not at a
    # fixed point, usually one init per group) share one colour and one legend entry each for
    # right and wrong.
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i not in (3, 7)]
    moving_color = {True: "tab:olive", False: "tab:red"}
    labelled = set()
    for c in range(coords.shape[1]):
        a = int(ids[c])
        moving = pca["attractor_residual"][a] > settle
        if moving:
            color, tag = moving_color[bool(ok[c])], ("moving", bool(ok[c]))
            n_in = int(sum(pca["attractor_residual"][int(i)] > settle and ok[j] == ok[c]
                           for j, i in enumerate(ids)))
            text = f"{'right' if ok[c] else 'wrong'} grid, still moving ({n_in} inits)"
        else:
            color, tag = palette[a % len(palette)], a
            text = (f"attractor {a}: {'solution' if ok[c] else 'wrong'} "
                    f"({int((ids == a).sum())} inits)")
        lab = None if tag in labelled else text
        labelled.add(tag)
        ax.plot(coords[:, c, 0], coords[:, c, 1], "-", color=color, lw=0.8,
                alpha=0.5 if moving else 0.9, label=lab)
        ax.plot(coords[0, c, 0], coords[0, c, 1], "o", color=color, ms=3)
        ax.plot(coords[-1, c, 0], coords[-1, c, 1], "*", color=color, ms=9, mec="k", mew=0.4)
    ev = pca["explained"]
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% var.)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}% var.)")
    ax.set_title(f"puzzle {pca['puzzle']}: {coords.shape[1]} inits, o step {pca['steps'][0]}, "
                 f"* step {pca['steps'][-1]}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def save_plots(res: Mapping[str, Any], out_dir: str) -> list[str]:
    """Every figure of the analysis as a PNG in ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    made = [plot_stability(res, os.path.join(out_dir, "spectral_radius.png")),
            plot_census(res, os.path.join(out_dir, "census_vs_depth.png")),
            plot_convergence(res, os.path.join(out_dir, "convergence_curves.png")),
            plot_selection(res, os.path.join(out_dir, "selection_vs_threshold.png")),
            plot_difficulty(res, os.path.join(out_dir, "compute_vs_difficulty.png")),
            plot_pca(res, os.path.join(out_dir, "pca_trajectories.png"))]
    return [m for m in made if m]
