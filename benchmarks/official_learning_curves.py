"""Learning curves of eqr-jax beside the official PyTorch EqR, same initial weights, same batches.

    # both frameworks (needs torch and a checkout of github.com/locuslab/EqR)
    python benchmarks/official_learning_curves.py --official ~/src/EqR --steps 300 --seeds 0,1 \
        --json benchmarks/results/cpu-sandbox-official-curves.json \
        --plot docs/assets/official_learning_curves-cpu-sandbox.png
    # the JAX half alone (no torch needed)
    python benchmarks/official_learning_curves.py --steps 20

For every (mode, dtype, seed) the official model and its ACT loss head are built with
``torch.manual_seed(seed)``; their state dict is converted with
`eqr_jax.interop.params_from_reference`, so both frameworks start from the same weights. One
`eqr_jax.data.TrainLoader` draws the batches once and both frameworks train on them. The official
side is driven as its ``pretrain.py`` drives it (persistent ACT carry built from the first batch,
``loss / global_batch_size`` back-propagated, the official cosine/warm-up schedule evaluated at the
1-based step, AdamATan2, the official ``EMAHelper`` after every step); its AdamATan2 is a CUDA
extension, so the script carries a few lines of torch with the same rule (``adam-atan2`` 0.0.3).
The JAX side is ``eqr_jax.train_program.make_train_program``'s step, the project's real
training step.

Modes:
  * ``preset``: update noise, exploration and random latent init as the presets have them. The
    random streams of the two frameworks differ, so the JAX-vs-official gap is compared with the
    official code's own run-to-run spread: a second official run from the same weights and batches
    with another torch seed (``official-B``).
  * ``deterministic``: noise 0, exploration 0, latent init std 0; the curves should coincide up
    to float round-off (amplified by the dynamics, and by bf16 rounding in bf16).

Every ``--log-every`` steps the script reports, per run, the window means as the official trainer
logs them: loss = (lm + 0.5 q-halt BCE) summed over rows / global batch; token and exact accuracy
over the rows that halted in the window. It writes a JSON file (per-step losses, windows, gaps,
final parameter / EMA differences, machine) and a matplotlib plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax import interop
from eqr_jax.config import DataConfig, RunConfig, TrainConfig
from eqr_jax.model import EqRModel
from eqr_jax.reporting import format_table
from eqr_jax.train_program import make_train_program
from eqr_jax.warm_start import fit_to_model

REPORT_KEYS = ("loss", "lm_loss", "accuracy", "exact_accuracy", "steps", "grad_norm")


# ----------------------------------------------------------------------------------------------
# Configuration shared by both frameworks


def reference_model_dict(a, seq_len: int, vocab_size: int, dtype: str, mode: str) -> dict:
    """The official EqR model config (its field names) for this run."""
    det = mode == "deterministic"
    return dict(batch_size=a.batch, seq_len=seq_len, vocab_size=vocab_size, H_cycles=a.h_cycles,
                L_cycles=a.l_cycles, H_layers=0, L_layers=a.layers, hidden_size=a.hidden,
                expansion=a.expansion, num_heads=a.heads, pos_encodings="rope",
                halt_max_steps=a.halt_max_steps,
                halt_exploration_prob=0.0 if det else a.exploration,
                forward_dtype=dtype, mlp_t=True, lambda_=0.95,
                noise_scale=0.0 if det else a.noise, H_init_std=0.0 if det else 1.0,
                L_init_std=0.0 if det else 1.0)


def jax_run_config(ref: dict, a, seed: int) -> RunConfig:
    model = interop.config_from_reference(ref)
    train = TrainConfig(seed=seed, lr=a.lr, lr_min_ratio=a.lr_min_ratio,
                        lr_warmup_steps=a.warmup, beta1=0.9, beta2=0.95,
                        weight_decay=a.weight_decay, ema=True, ema_rate=a.ema_rate,
                        steps_per_call=1, max_steps=a.steps)
    return RunConfig(preset="official-curves", model=model,
                     data=DataConfig(global_batch_size=a.batch), train=train)


def ensure_data(a) -> tuple[int, int]:
    """Build the small 9x9 dataset if ``--data`` does not exist; returns (seq_len, vocab_size)."""
    from eqr_jax.data import dataset_info
    path = Path(a.data)
    if not path.exists():
        from eqr_jax.data.build import build_sudoku_dataset
        print(f"[curves] building 9x9 Sudoku data in {path} ...", flush=True)
        build_sudoku_dataset(str(path), size=9, train=a.build_train, test=32, num_aug=100,
                             seed=0, difficulty="any", progress=False, verbose=False)
    info = dataset_info(str(path))
    get = (lambda k: info[k]) if isinstance(info, dict) else (lambda k: getattr(info, k))
    return int(get("seq_len")), int(get("vocab_size"))


def draw_batches(a, seed: int) -> list[dict[str, np.ndarray]]:
    """``--steps`` training batches from one loader (the reference's group sampler)."""
    from eqr_jax.data import TrainLoader
    loader = TrainLoader(a.data, a.batch, seed=seed, prefetch=0)
    keys = ("inputs", "labels", "puzzle_identifiers")
    out = [{k: np.asarray(b[k]) for k in keys} for b, _ in zip(loader, range(a.steps))]
    if hasattr(loader, "close"):
        loader.close()
    return out


# ----------------------------------------------------------------------------------------------
# The official side (benchmarks/_official.py, imported only with --official: it needs torch)


def official_trainer(a, ref: dict, seed: int, **kw):
    from _official import OfficialTrainer
    return OfficialTrainer(a.official, ref, a, seed, **kw)


# ----------------------------------------------------------------------------------------------
# The JAX side


class JaxTrainer:
    """eqr-jax's jitted training step (the `TrainProgram` ``eqr train`` runs, one step per
    call) from given reference weights."""

    def __init__(self, cfg: RunConfig, ref_state: dict[str, np.ndarray], seed: int):
        self.cfg = cfg
        # Its compiled steps are cached per computing config, so seeds share one compilation.
        self.program = make_train_program(cfg, cfg.train.max_steps)
        self.model, self.opt, self.schedule = (self.program.model, self.program.optimizer,
                                               self.program.schedule)
        params = fit_to_model(interop.params_from_reference(ref_state, cfg.model),
                              self.program.abstract_state.params)
        state = self.program.init_state(params)
        # The stream key of the official side's seed, not the one `init_train_state` derives.
        self.state = state._replace(rng=jax.device_put(jax.random.PRNGKey(seed),
                                                       self.program.state_shardings.rng))
        self.fn = self.program.step(1)
        self.step = 0

    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        self.step += 1
        stacked = {k: jnp.asarray(v)[None] for k, v in batch.items()}
        self.state, m = self.fn(self.state, stacked)
        # The sums the official side reports too: not the per-ACT-step vectors (steps_hist,
        # residual_*) nor the extrema min_/max_steps (+-inf while no row halted).
        out = {k: float(v) for k, v in jax.device_get(m).items()
               if k != "num_steps" and np.ndim(v) == 0 and not k.startswith(("min_", "max_"))}
        out["lr"] = float(self.schedule(self.step))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return interop.params_to_reference(self.state.params, self.cfg.model)

    def ema_dict(self) -> dict[str, np.ndarray]:
        return interop.params_to_reference(self.state.ema, self.cfg.model)


# ----------------------------------------------------------------------------------------------
# Running, windows, gaps


def run(trainer, batches, label: str, every: int) -> dict:
    """Train on ``batches``; per-step metric dicts, wall time, and whether all were finite."""
    per_step, t0, G = [], time.perf_counter(), int(batches[0]["inputs"].shape[0])
    for i, batch in enumerate(batches):
        per_step.append(trainer.train_step(batch))
        if (i + 1) % every == 0 or i + 1 == len(batches):
            w = window(per_step[i + 1 - ((i + 1) % every or every):], G)
            acc = "n/a" if w["accuracy"] is None else f"{w['accuracy']:.4f}"
            print(f"[curves] {label} step {i + 1}: loss {w['loss']:.4f} acc {acc}", flush=True)
    wall = time.perf_counter() - t0
    finite = all(math.isfinite(v) for s in per_step for v in s.values())
    return {"per_step": per_step, "wall_s": wall, "finite": finite}


def window(steps: list[dict], G: int) -> dict[str, float | None]:
    """Means over a window as the official trainer logs them (losses / G, the rest / count)."""
    n = len(steps)
    tot = {k: sum(s[k] for s in steps) for k in steps[0]}
    out: dict[str, float | None] = {
        "loss": tot["total_loss"] / (G * n), "lm_loss": tot["lm_loss"] / (G * n),
        "q_halt_loss": tot["q_halt_loss"] / (G * n), "grad_norm": tot["grad_norm"] / n,
        "count": tot["count"]}
    for k in ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps"):
        out[k] = tot[k] / tot["count"] if tot["count"] > 0 else None
    return out


def windows(per_step: list[dict], every: int, G: int) -> dict[str, list]:
    ends = list(range(every, len(per_step) + 1, every))
    ws = [window(per_step[e - every:e], G) for e in ends]
    return {"step": ends, **{k: [w[k] for w in ws] for k in ws[0]}} if ws else {"step": []}


def gaps(x: dict, ref: dict) -> dict[str, Any]:
    """Largest and mean |x - ref| over windows for each reported key (windows where both exist)."""
    out = {}
    for k in REPORT_KEYS:
        d = [(s, abs(a - b)) for s, a, b in zip(ref["step"], x[k], ref[k])
             if a is not None and b is not None]
        if d:
            s, m = max(d, key=lambda t: t[1])
            out[k] = {"max": m, "at_step": s, "mean": sum(v for _, v in d) / len(d)}
    return out


def tree_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    strip = lambda n: n[len("model."):] if n.startswith("model.") else n
    a = {strip(k): v for k, v in a.items()}
    b = {strip(k): v for k, v in b.items()}
    common = sorted(set(a) & set(b))
    mx = max(float(np.max(np.abs(a[k] - b[k]))) for k in common)
    scale = max(float(np.max(np.abs(b[k]))) for k in common)
    return {"max_abs": mx, "max_abs_over_max_param": mx / scale, "tensors": len(common)}


# ----------------------------------------------------------------------------------------------
# Plot


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["mode"], r["dtype"]) for r in result["runs"]},
                    key=lambda g: (g[0] != "preset", g[1] != "float32"))
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, 3.3 * len(groups)), squeeze=False)
    colors = {"official": "tab:blue", "official-B": "tab:gray", "eqr-jax": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    for row, (mode, dtype) in enumerate(groups):
        runs = [r for r in result["runs"] if (r["mode"], r["dtype"]) == (mode, dtype)]
        seeds = sorted({r["seed"] for r in runs})
        for r in runs:
            ls = styles[seeds.index(r["seed"]) % len(styles)]
            w = r["windows"]
            lab = f"{r['framework']} seed {r['seed']}"
            axes[row, 0].plot(w["step"], w["loss"], ls, color=colors[r["framework"]], label=lab)
            acc = [np.nan if v is None else v for v in w["accuracy"]]
            axes[row, 1].plot(w["step"], acc, ls, color=colors[r["framework"]], label=lab)
        for c in result["comparisons"]:
            if (c["mode"], c["dtype"]) != (mode, dtype):
                continue
            ls = styles[seeds.index(c["seed"]) % len(styles)]
            for name, key, col in (("|eqr-jax - official|", "jax_loss_gap", "tab:orange"),
                                   ("|official-B - official|", "official_loss_gap", "tab:gray")):
                if key in c:
                    axes[row, 2].plot(c["window_steps"], c[key], ls, color=col,
                                      label=f"{name} seed {c['seed']}")
        title = f"{mode}, {dtype}"
        axes[row, 0].set_title(f"loss (lm + 0.5 BCE, per row) - {title}")
        axes[row, 1].set_title(f"token accuracy (halted rows) - {title}")
        b_is = "other torch seed" if mode == "preset" else "weights moved 1 ulp"
        axes[row, 2].set_title(f"loss gap - {title} (official-B: {b_is})", fontsize=10)
        axes[row, 2].set_yscale("log")
        for ax in axes[row]:
            ax.set_xlabel("optimiser step")
            ax.grid(alpha=0.3)
        for ax in (axes[row, 0], axes[row, 2]):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"eqr-jax vs official EqR, same initial weights and batches; "
                 f"{m['cpu']} ({m['cores']} cores), torch {m['torch']}, jax {m['jax']}\n"
                 f"{result['config_text']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options both frameworks' runs are built from (also used by official_speed.py)."""
    p.add_argument("--official", help="checkout of locuslab/EqR (omit: run the JAX half only)")
    p.add_argument("--data", default="data/sudoku9-curves",
                   help="9x9 dataset (built with 256 puzzles x 101 if missing)")
    p.add_argument("--build-train", type=int, default=256, help="train puzzles when building")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--h-cycles", type=int, default=2)
    p.add_argument("--l-cycles", type=int, default=2)
    p.add_argument("--expansion", type=float, default=4.0)
    p.add_argument("--halt-max-steps", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--exploration", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lr-min-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1.0)
    p.add_argument("--ema-rate", type=float, default=0.999)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(p)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0,1", help="init / data / stream seeds, comma list")
    p.add_argument("--modes", default="preset,deterministic")
    p.add_argument("--det-seeds", default="",
                   help="seeds of the deterministic mode (default: the first of --seeds)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default; on a shared CPU more than "
                        "one thread can be 10x slower)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write the plot here (PNG)")
    p.add_argument("--replot", metavar="JSON", help="only redraw --plot from a results file")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.replot:
        result = json.loads(Path(a.replot).read_text())
        print_summary(result)
        if a.plot:
            plot(result, a.plot)
            print(f"[curves] wrote {a.plot}")
        return 0
    seeds = [int(s) for s in a.seeds.split(",") if s]
    det_seeds = [int(s) for s in a.det_seeds.split(",") if s] or seeds[:1]
    dtypes = [d for d in a.dtypes.split(",") if d]
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in ("preset", "deterministic"):
            raise SystemExit(f"--modes: unknown mode {m!r} (preset, deterministic)")
    if a.official:
        import torch
        from _official import import_official
        import_official(a.official)  # fails early with a clear message
        if a.torch_threads:
            torch.set_num_threads(a.torch_threads)
    seq_len, vocab = ensure_data(a)
    cfg_text = (f"9x9 Sudoku, mlp_t, hidden {a.hidden}, {a.layers} layers, H_cycles {a.h_cycles}, "
                f"L_cycles {a.l_cycles}, halt_max_steps {a.halt_max_steps}, batch {a.batch}, "
                f"lr {a.lr:g} (warm-up {a.warmup}, cosine to {a.lr_min_ratio:g}), "
                f"wd {a.weight_decay:g}, EMA {a.ema_rate:g}")
    print(f"[curves] {cfg_text}; {a.steps} steps; official: {a.official or 'not run'}", flush=True)
    runs, comparisons = [], []
    t_all = time.perf_counter()
    for mode in modes:
        for dtype in dtypes:
            for seed in (seeds if mode == "preset" else det_seeds):
                ref = reference_model_dict(a, seq_len, vocab, dtype, mode)
                batches = draw_batches(a, seed)
                tag = f"{mode}/{dtype}/seed {seed}"
                group: dict[str, dict] = {}
                if a.official:
                    off = official_trainer(a, ref, seed)
                    init = off.state_dict()
                    group["official"] = run(off, batches, f"official {tag}", a.log_every)
                    group["official"]["final"] = (off.state_dict(), off.ema_dict())
                    if mode == "preset":  # the official run-to-run spread: another stream
                        offb = official_trainer(a, ref, seed, stream_seed=seed + 10_000)
                    else:  # the official round-off spread: weights moved by one ulp
                        offb = official_trainer(a, ref, seed, perturb_ulp=True)
                    group["official-B"] = run(offb, batches, f"official-B {tag}", a.log_every)
                else:  # JAX half alone: weights from eqr-jax's own initialiser
                    cfg0 = jax_run_config(ref, a, seed)
                    init = interop.params_to_reference(
                        EqRModel(cfg0.model).init(jax.random.PRNGKey(seed)), cfg0.model)
                jt = JaxTrainer(jax_run_config(ref, a, seed), init, seed)
                group["eqr-jax"] = run(jt, batches, f"eqr-jax {tag}", a.log_every)
                group["eqr-jax"]["final"] = (jt.state_dict(), jt.ema_dict())
                for fw, r in group.items():
                    final = r.pop("final", None)
                    runs.append({"mode": mode, "dtype": dtype, "seed": seed, "framework": fw,
                                 "wall_s": r["wall_s"], "finite": r["finite"],
                                 "loss_per_step": [s["total_loss"] / a.batch
                                                   for s in r["per_step"]],
                                 "windows": windows(r["per_step"], a.log_every, a.batch)})
                    r["final"] = final
                if "official" in group:
                    comparisons.append(compare(mode, dtype, seed, group, a))
    result = {
        "benchmark": "official_learning_curves", "command": " ".join(sys.argv),
        "config_text": cfg_text, "steps": a.steps, "log_every": a.log_every,
        "args": {k: v for k, v in vars(a).items() if k not in ("json", "plot")},
        "machine": machine(a.official is not None), "total_wall_s": time.perf_counter() - t_all,
        "runs": runs, "comparisons": comparisons, "summary": summary(comparisons, runs),
    }
    print_summary(result)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(round_floats(result), indent=1) + "\n")
        print(f"[curves] wrote {a.json}")
    if a.plot:
        plot(result, a.plot)
        print(f"[curves] wrote {a.plot}")
    return 0 if all(r["finite"] for r in runs) else 1


def compare(mode, dtype, seed, group, a) -> dict:
    G, every = a.batch, a.log_every
    wo = windows(group["official"]["per_step"], every, G)
    wj = windows(group["eqr-jax"]["per_step"], every, G)
    c = {"mode": mode, "dtype": dtype, "seed": seed, "window_steps": wo["step"],
         "jax_vs_official": gaps(wj, wo),
         "jax_loss_gap": [abs(x - y) for x, y in zip(wj["loss"], wo["loss"])]}
    if "official-B" in group:
        wb = windows(group["official-B"]["per_step"], every, G)
        c["official_vs_official"] = gaps(wb, wo)
        c["official_loss_gap"] = [abs(x - y) for x, y in zip(wb["loss"], wo["loss"])]
    lo = [s["total_loss"] / G for s in group["official"]["per_step"]]
    lj = [s["total_loss"] / G for s in group["eqr-jax"]["per_step"]]
    d = [abs(x - y) for x, y in zip(lj, lo)]
    c["per_step_loss_gap_max"] = max(d)
    c["per_step_loss_gap_at"] = int(np.argmax(d)) + 1
    lr_o = [s["lr"] for s in group["official"]["per_step"]]
    lr_j = [s["lr"] for s in group["eqr-jax"]["per_step"]]
    c["lr_max_rel_diff"] = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(lr_j, lr_o))
    (po, eo), (pj, ej) = group["official"]["final"], group["eqr-jax"]["final"]
    c["final_params"] = tree_diff(pj, po)
    c["final_ema"] = tree_diff(ej, eo)
    return c


def summary(comparisons: list[dict], runs: list[dict]) -> dict:
    out = {}
    for mode, dtype in sorted({(c["mode"], c["dtype"]) for c in comparisons}):
        cs = [c for c in comparisons if (c["mode"], c["dtype"]) == (mode, dtype)]
        s: dict[str, Any] = {"seeds": [c["seed"] for c in cs]}
        for k in ("loss", "accuracy", "exact_accuracy"):
            s[f"jax_max_gap_{k}"] = max((c["jax_vs_official"][k]["max"] for c in cs
                                         if k in c["jax_vs_official"]), default=None)
            s[f"jax_mean_gap_{k}"] = _mean([c["jax_vs_official"][k]["mean"] for c in cs
                                            if k in c["jax_vs_official"]])
            if any("official_vs_official" in c for c in cs):
                s[f"official_spread_max_{k}"] = max(
                    (c["official_vs_official"][k]["max"] for c in cs
                     if k in c.get("official_vs_official", {})), default=None)
                s[f"official_spread_mean_{k}"] = _mean(
                    [c["official_vs_official"][k]["mean"] for c in cs
                     if k in c.get("official_vs_official", {})])
        s["per_step_loss_gap_max"] = max(c["per_step_loss_gap_max"] for c in cs)
        s["final_params_max_abs_diff"] = max(c["final_params"]["max_abs"] for c in cs)
        s["final_ema_max_abs_diff"] = max(c["final_ema"]["max_abs"] for c in cs)
        rs = [r for r in runs if (r["mode"], r["dtype"]) == (mode, dtype)]
        s["final_window_loss"] = {f"{r['framework']}/seed {r['seed']}": r["windows"]["loss"][-1]
                                  for r in rs if r["windows"]["step"]}
        s["wall_s"] = {fw: _mean([r["wall_s"] for r in rs if r["framework"] == fw])
                       for fw in sorted({r["framework"] for r in rs})}
        out[f"{mode}/{dtype}"] = s
    out["all_finite"] = all(r["finite"] for r in runs)
    return out


def print_summary(result: dict) -> None:
    s = result["summary"]
    rows = [k for k in s if "/" in k]
    if not rows:
        for r in result["runs"]:
            w = r["windows"]
            if w["step"]:
                print(f"[curves] {r['framework']} {r['mode']}/{r['dtype']}/seed {r['seed']}: "
                      f"final window loss {w['loss'][-1]:.4f}, {r['wall_s']:.1f} s, "
                      f"finite {r['finite']}")
        return
    f = lambda v: "n/a" if v is None else f"{v:.4f}"
    table = [{"mode/dtype": k, "max loss gap jax": f(r["jax_max_gap_loss"]),
              "official spread (loss)": f(r.get("official_spread_max_loss")),
              "max acc gap jax": f(r["jax_max_gap_accuracy"]),
              "official spread (acc)": f(r.get("official_spread_max_accuracy")),
              "per-step loss gap": f"{r['per_step_loss_gap_max']:.2e}",
              "final EMA max diff": f"{r['final_ema_max_abs_diff']:.2e}"}
             for k, r in ((k, s[k]) for k in rows)]
    print(format_table(table, markdown=True))
    print(f"[curves] all finite: {s['all_finite']}; total {result['total_wall_s']:.0f} s")


def machine(with_torch: bool) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    m = {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
         "jax": jax.__version__, "python": platform.python_version(), "torch": None}
    if with_torch:
        import torch
        m["torch"] = torch.__version__
        m["torch_threads"] = torch.get_num_threads()
    return m


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def round_floats(obj):
    """``obj`` (nested dicts/lists) with floats rounded for the JSON results."""
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: round_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
