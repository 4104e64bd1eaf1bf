"""Plots of evaluation results and of the landscape analysis, Sudoku trajectory GIFs, and
convergence statistics.

Everything here works on host data (NumPy, results dicts from `eqr_jax.evaluation`) and uses the
non-interactive Agg backend, so it runs on headless machines.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _plain_ticks(axis) -> None:
    """Plain numbers (16, 64, 256) instead of powers on a log axis."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(NullFormatter())


def save_figure(fig, path: str, dpi: int = 90) -> str:
    """Lay out ``fig``, write it to ``path`` (local, folders created, or a ``gs://`` URL:
    drawn into a local file, then uploaded whole) and close it; returns ``path``."""
    from eqr_jax import storage

    fig.tight_layout()
    try:
        with storage.local_file(storage.path(path, name="figure")) as local:
            fig.savefig(local, dpi=dpi)
    finally:
        pyplot().close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Evaluation plots


def plot_accuracy_vs_depth(results: Mapping[str, Any], path: str,
                           keys: Sequence[str] = ("all/exact_accuracy",
                                                  "majority_vote/exact_accuracy",
                                                  "convergence_top_k/exact_accuracy")) -> str:
    """Exact accuracy against depth (log x axis), one colour per breadth, one style per metric."""
    plt = pyplot()
    settings = results["settings"]
    breadths = sorted({s["breadth"] for s in settings})
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = {"all/exact_accuracy": "-o", "majority_vote/exact_accuracy": "--s",
              "convergence_top_k/exact_accuracy": ":^"}
    names = {"all/exact_accuracy": "single", "majority_vote/exact_accuracy": "majority",
             "convergence_top_k/exact_accuracy": "conv. top-k"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(breadths):
        rows = sorted((s for s in settings if s["breadth"] == n), key=lambda s: s["depth"])
        for key in keys:
            pts = [(s["depth"], s["metrics"][key]) for s in rows if key in s["metrics"]]
            if not pts:
                continue
            d, a = zip(*pts)
            ax.plot(d, a, styles.get(key, "-"), color=colors[i % len(colors)],
                    label=f"B={n} {names.get(key, key)}", ms=4)
    ax.set_xscale("log", base=2)
    depths = sorted({s["depth"] for s in settings})
    ax.set_xticks(depths)
    _plain_ticks(ax.xaxis)
    ax.set_xlabel("depth D (reasoning steps)")
    ax.set_ylabel("exact accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_residuals(results: Mapping[str, Any], path: str) -> str:
    """Mean latent residual ‖S_t − S_{t−1}‖ of the rows still running, against step t."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    best = {}
    for s in results["settings"]:  # the deepest run of each breadth has the longest record
        if s["residual_trace"]["steps"] and s["depth"] >= best.get(s["breadth"], {"depth": 0})[
                "depth"]:
            best[s["breadth"]] = s
    for n, s in sorted(best.items()):
        tr = s["residual_trace"]
        ax.plot(tr["steps"], tr["mean"], "-", label=f"B={n}, D={s['depth']}")
    from matplotlib.ticker import FormatStrFormatter
    if max((s["depth"] for s in best.values()), default=1) > 64:
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("step t")
    ax.set_ylabel("mean ||S_t - S_{t-1}||")
    ax.grid(alpha=0.3, which="both")
    if best:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_steps_histogram(results: Mapping[str, Any], path: str) -> str:
    """Histogram of steps used per row (interesting with q_halt / convergence halting)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for s in results["settings"]:
        h = s["steps_histogram"]
        if not h["steps"]:
            continue
        total = max(1, sum(h["count"]))
        ax.step(h["steps"], np.asarray(h["count"]) / total, where="mid",
                label=f"D={s['depth']} B={s['breadth']} (mean {s['metrics']['halting/mean_steps']:.1f})")
    ax.set_xlabel("steps used")
    ax.set_ylabel("fraction of rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_all_plots(results: Mapping[str, Any], out_dir: str) -> list[str]:
    """The three evaluation plots as PNGs in ``out_dir`` (a folder or a ``gs://`` URL);
    returns their paths."""
    return [plot_accuracy_vs_depth(results, os.path.join(out_dir, "accuracy_vs_depth.png")),
            plot_residuals(results, os.path.join(out_dir, "residual_vs_step.png")),
            plot_steps_histogram(results, os.path.join(out_dir, "steps_histogram.png"))]


# ----------------------------------------------------------------------------------------------
# Sudoku trajectories


def render_grid(grid: np.ndarray, givens: np.ndarray | None = None,
                solution: np.ndarray | None = None, prev: np.ndarray | None = None,
                cell: int = 32, title: str = ""):
    """A PIL image of a square Sudoku grid (digits 1..n, 0 = unknown).

    Givens are black, predictions blue, wrong predictions red (a changed given, or a cell that
    differs from ``solution`` when it is known) and cells that changed since ``prev`` are shaded
    yellow.
    """
    from PIL import Image, ImageDraw, ImageFont

    grid = np.asarray(grid)
    n = grid.shape[0]
    box = math.isqrt(n)
    top = 18 if title else 0
    size = n * cell
    img = Image.new("RGB", (size + 2, size + 2 + top), "white")
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=int(cell * 0.6))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    if title:
        draw.text((3, 2), title, fill="black", font=ImageFont.load_default())
    for r in range(n):
        for c in range(n):
            x0, y0 = 1 + c * cell, 1 + top + r * cell
            if prev is not None and prev[r, c] != grid[r, c]:
                draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=(255, 240, 150))
            v = int(grid[r, c])
            if v <= 0:
                continue
            given = givens is not None and givens[r, c] > 0
            wrong = (given and givens[r, c] != v) or (
                solution is not None and solution[r, c] != v)
            color = "red" if wrong else ("black" if given else (30, 80, 200))
            s = str(v) if v < 10 else chr(ord("A") + v - 10)
            draw.text((x0 + cell / 2, y0 + cell / 2), s, fill=color, font=font, anchor="mm")
    for i in range(n + 1):
        w = 2 if i % max(box, 1) == 0 else 1
        p = 1 + i * cell
        draw.line([(p, 1 + top), (p, 1 + top + size)], fill="black", width=w)
        draw.line([(1, p + top), (1 + size, p + top)], fill="black", width=w)
    return img


def save_trajectory(grids: Sequence[np.ndarray], path: str, givens: np.ndarray | None = None,
                    solution: np.ndarray | None = None, steps: Sequence[int] | None = None,
                    duration_ms: int = 300) -> list[str]:
    """Render predicted grids over steps: a GIF (``.gif``) or numbered PNG frames (``.png``).

    Returns the written paths (one GIF, or ``stem_000.png``, ...).
    """
    from eqr_jax import storage

    steps = list(range(1, len(grids) + 1)) if steps is None else list(steps)
    frames, prev = [], None
    for g, t in zip(grids, steps):
        frames.append(render_grid(g, givens, solution, prev, title=f"step {t}"))
        prev = g
    if path.lower().endswith(".gif"):
        with storage.local_file(storage.path(path, name="--trajectory")) as local:
            frames[0].save(local, save_all=True, append_images=frames[1:],
                           duration=duration_ms, loop=0)
        return [path]
    stem, _ = os.path.splitext(path)
    out = []
    for i, f in enumerate(frames):
        out.append(f"{stem}_{i:03d}.png")
        with storage.local_file(storage.path(out[-1], name="--trajectory")) as local:
            f.save(local)
    return out


# ----------------------------------------------------------------------------------------------
# Convergence statistics over per-step logits of one or more samples


def logit_delta_norms(logits: np.ndarray, last_k: int = 3) -> np.ndarray:
    """‖ℓ_t − ℓ_{t−1}‖ over the vocabulary for the last ``last_k`` deltas (0: all).

    Args:
      logits: (T, M, N, V) per-step logits of M samples.
    Returns:
      (K, M, N) float64 delta norms, K = min(last_k, T - 1) (T - 1 when last_k <= 0).
    """
    lg = np.asarray(logits, np.float64)
    d = np.linalg.norm(np.diff(lg, axis=0), axis=-1)
    return d[-last_k:] if 0 < last_k < d.shape[0] else d


def convergence_statistics(logits: np.ndarray, last_k: int = 3,
                           discount: float = 0.95) -> dict[str, np.ndarray]:
    """Per-sample statistics of the logit-delta norms over the kept steps and tokens.

    Returns arrays of shape (M,): ``score`` (mean, the convergence score of top-k selection),
    ``std`` (unbiased), ``max``, ``p95``, ``mad`` (median absolute deviation), ``skew``,
    ``final_residual`` (mean over tokens of the last delta), ``discounted_residual``
    (Σ_k discount^k r_k), ``rate_mean`` / ``rate_std`` (of r_k / r_{k−1}; 1 and 0 for one step).
    """
    d = logit_delta_norms(logits, last_k)  # (K, M, N)
    k, m, _ = d.shape
    flat = np.moveaxis(d, 1, 0).reshape(m, -1)
    mean = flat.mean(1)
    std = flat.std(1, ddof=1) if flat.shape[1] > 1 else np.zeros(m)
    med = np.median(flat, axis=1, keepdims=True)
    dev = np.abs(flat - med)
    mad = np.sort(dev, axis=1)[:, (dev.shape[1] - 1) // 2]  # lower median
    cen = flat - mean[:, None]
    skew = np.where(std > 1e-8, np.mean(cen ** 3, 1) / np.maximum(std, 1e-8) ** 3, 0.0)
    r = d.mean(axis=2)  # (K, M) per-step residual series
    if k > 1:
        rates = r[1:] / (r[:-1] + 1e-9)
        rate_mean, rate_std = rates.mean(0), (rates.std(0, ddof=1) if k > 2 else np.zeros(m))
    else:
        rate_mean, rate_std = np.ones(m), np.zeros(m)
    return {"score": mean, "std": std, "max": flat.max(1),
            "p95": np.percentile(flat, 95, axis=1), "mad": mad, "skew": skew,
            "final_residual": r[-1], "discounted_residual": (discount ** np.arange(k)) @ r,
            "rate_mean": rate_mean, "rate_std": rate_std}


# ----------------------------------------------------------------------------------------------
# The landscape analysis (`eqr_jax.analysis.report`): every figure from its result dict alone


def _arr(values) -> np.ndarray:
    """float array from a JSON list (None -> NaN)."""
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _band(ax, steps, entry, color, label):
    if not entry["n"]:
        return
    ax.plot(steps, _arr(entry["median"]), "-", color=color, label=f"{label} (n={entry['n']})")
    ax.fill_between(steps, _arr(entry["q25"]), _arr(entry["q75"]), color=color, alpha=0.2, lw=0)


def plot_stability(res, path):
    plt = pyplot()
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
    return save_figure(fig, path)


def plot_census(res, path):
    plt = pyplot()
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
    return save_figure(fig, path)


def plot_convergence(res, path):
    plt = pyplot()
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
    return save_figure(fig, path)


def plot_selection(res, path):
    plt = pyplot()
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
    return save_figure(fig, path)


def plot_difficulty(res, path):
    plt = pyplot()
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
        rho = diff[proxy]["spearman"][name]
        ax.set_title("Spearman " + ("n/a" if rho is None or (isinstance(rho, float) and
                                                            math.isnan(rho)) else f"{rho:.2f}"),
                     fontsize=9)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_pca(res, path):
    pca = res.get("pca")
    if not pca:
        return None
    plt = pyplot()
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
    return save_figure(fig, path)


def save_landscape_plots(res: Mapping[str, Any], out_dir: str) -> list[str]:
    """Every figure of the analysis as a PNG in ``out_dir`` (a folder or a ``gs://`` URL);
    returns the paths written."""
    from eqr_jax import storage

    storage.makedirs(storage.path(out_dir, name="--out"))
    made = [plot_stability(res, os.path.join(out_dir, "spectral_radius.png")),
            plot_census(res, os.path.join(out_dir, "census_vs_depth.png")),
            plot_convergence(res, os.path.join(out_dir, "convergence_curves.png")),
            plot_selection(res, os.path.join(out_dir, "selection_vs_threshold.png")),
            plot_difficulty(res, os.path.join(out_dir, "compute_vs_difficulty.png")),
            plot_pca(res, os.path.join(out_dir, "pca_trajectories.png"))]
    return [m for m in made if m]
