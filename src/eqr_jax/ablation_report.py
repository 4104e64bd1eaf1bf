"""The gradient-mode ablation's report: the markdown tables of docs/ablation.md and the
accuracy curves, from a study's report dict (`eqr_jax.ablation.run`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from eqr_jax import reporting


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The per-run table (scalars only; curves and per-anchor cosines stay in the JSON)."""
    flat = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]
    return reporting.format_table(flat, markdown=True)


def study_tables(report: dict[str, Any]) -> str:
    """The markdown tables of docs/ablation.md from a report: accuracy and cost per run, the
    solve and the end states per run, and the gradient cosines at the fixed checkpoints (a
    study run with ``--anchors 0`` has no cosine table)."""
    depths, rows = report["depths"], report["rows"]
    fmt = lambda v, spec=".3f": "n/a" if v is None or (isinstance(v, float) and v != v) \
        else format(v, spec)
    acc = ["| run | " + " | ".join(f"exact@{d}" for d in depths) + " | "
           + " | ".join(f"token@{d}" for d in depths)
           + " | final train loss | step time (ms) | compiled peak (MiB) | run wall (s) |",
           "|---" * (5 + 2 * len(depths)) + "|"]
    for r in rows:
        acc.append(f"| {r['mode']} | " + " | ".join(fmt(r.get(f"exact@D{d}")) for d in depths)
                   + " | " + " | ".join(fmt(r.get(f"token@D{d}")) for d in depths)
                   + f" | {fmt(r['final_train_loss'])} | {fmt(r.get('step_time_ms'), '.0f')} | "
                   f"{fmt(r.get('peak_mem_MiB'), '.0f')} | {fmt(r['train_wall_s'], '.0f')} |")
    dyn = ["| run | implicit solve converged (training, last chunk) | mean solver iterations "
           "(training) | converged from fresh latents (end) | "
           "jac_fro: Frobenius^2 / dim (training) | "
           "depth-64 end states correct: n, radius median, radius < 1 | wrong: n, median, < 1 |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ends = [f"{r.get(f'radius_{k}_n', 0)}, {fmt(r.get(f'radius_{k}_median'), '.2f')}, "
                f"{fmt(r.get(f'radius_{k}_lt1'), '.2f')}" for k in ("correct", "wrong")]
        dyn.append(f"| {r['mode']} | {fmt(r.get('implicit_converged'))} | "
                   f"{fmt(r.get('implicit_iters'), '.2f')} | "
                   f"{fmt(r.get('implicit_converged_frac'))} | {fmt(r.get('jac_fro'), '.4f')} | "
                   f"{ends[0]} | {ends[1]} |")
    steps = report.get("grad_cos_steps", [])
    cos = ["| run | " + " | ".join(f"cosine at step {s}" for s in steps) + " |",
           "|---" * (1 + len(steps)) + "|"]
    for r in rows:
        if "grad_cos" in r:
            cos.append(f"| {r['mode']} | " + " | ".join(fmt(c, ".3f") for c in r["grad_cos"])
                       + " |")
    return ("\n".join(acc) + "\n\n" + "\n".join(dyn) + "\n"
            + ("\n" + "\n".join(cos) + "\n" if steps else "") + implicit_table(rows, steps))


def implicit_table(rows: Sequence[dict], steps: Sequence[int]) -> str:
    """The implicit runs' backward solve: training's mean backward residual, iterations and
    fallback fraction (rows whose backward was non-finite), and per fixed checkpoint the cosine
    with the exact implicit gradient (`eqr_jax.losses.implicit_gradient_check`); empty when no
    run has them."""
    out = [(f"| {r['mode']} | {r.get('implicit_backward_residual', float('nan')):.1e} | "
            f"{r.get('implicit_backward_iters', float('nan')):.1f} | "
            f"{r.get('implicit_backward_fallback', float('nan')):.3f} | "
            + "".join(f"{c['cos_vs_exact']:.4f} (exact residual {c['exact_residual']:.0e}) | "
                      for c in r.get("implicit_check", []))).rstrip()
           for r in rows if "implicit_backward_residual" in r or "implicit_check" in r]
    if not out:
        return ""
    head = ("| run | backward residual (training) | backward iterations (training) | "
            "backward fallback (training) | "
            + "".join(f"cosine vs exact implicit at step {s} | " for s in steps)).rstrip()
    return "\n" + "\n".join([head, "|---" * (4 + len(steps)) + "|"] + out) + "\n"


def plot_curves(report: dict[str, Any], path: str, x: str = "step",
                metric: str = "exact") -> str:
    """Test accuracy (``metric``: ``exact`` or ``token``) at each depth (one panel per depth)
    over ``x`` (``step`` or ``train_wall_s``), one line per run; written to ``path`` (PNG)."""
    from eqr_jax.analysis.plots import pyplot, save_figure

    plt = pyplot()
    depths = report["depths"]
    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, d in zip(axes, depths):
        for row in report["rows"]:
            pts = [p for p in row.get("curve") or [] if f"{metric}@D{d}" in p]
            if pts:
                ax.plot([p[x] for p in pts], [p[f"{metric}@D{d}"] for p in pts],
                        marker=".", label=row["mode"])
        ax.set_title(f"test {metric} accuracy, depth {d}")
        ax.set_xlabel("optimiser steps" if x == "step" else "training wall-clock (s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)
