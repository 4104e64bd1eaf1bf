"""Memory and time of one training step as the number of unrolled steps grows, per gradient mode.

A "training step" here is the loss and parameter gradient (`jax.value_and_grad`) of one ACT
supervision segment: embed the puzzle, apply the step map ``n`` times from a given latent state,
read out logits, stablemax cross-entropy against the labels. Modes:

* ``full``        backprop through all ``n`` steps (`dynamics.Full`);
* ``full+remat``  the same with each step rematerialised in the backward pass
  (``dynamics.Full(remat=True)``);
* ``truncated``   the reference's gradient: only the last recursion of the last step;
* ``one_step``    all recursions of the last step (phantom gradient);
* ``implicit``    `dynamics.fixed_point(maxiter=n, tol=0, implicit_diff=True)`: n solver
  iterations on the noise-free map, gradient by the implicit function theorem.

Memory is XLA's compiled buffer assignment for the jitted step (`common.compiled_memory`):
``temp`` is the scratch/activation memory (what autodiff residuals occupy), ``peak`` is
``argument + output + temp - alias`` bytes.
Time is the median wall-clock of a few calls after a warm-up. ``full`` should grow linearly with
``n`` and ``full+remat`` more slowly, while ``truncated``, ``one_step`` and ``implicit`` stay flat.

    python benchmarks/gradient_memory.py                       # tiny preset, CPU-sized
    python benchmarks/gradient_memory.py --preset sudoku --batch 768 --dtype bfloat16  # GPU/TPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

import common as bm
from eqr_jax import dynamics, losses, modes
from eqr_jax.model import EqRModel

# The registry's gradient modes, with `full` also measured rematerialised.
MODES = ("full", "full+remat") + tuple(m for m in modes.GRAD_MODES if m != "full")


def segment_value_and_grad(model: EqRModel, mode: str, n: int, *,
                           implicit_method: str = "anderson"):
    """jit(params, state, inputs, labels, key) -> (loss, grads) of one latent segment of ``n``
    steps (not a training step: no ACT, optimiser or EMA, so the gradient's own memory is
    what is measured), from the library's `dynamics.unroll` / `dynamics.fixed_point`."""

    def loss_fn(params, state, inputs, labels, key):
        x = model.embed(params, inputs)
        if mode == "implicit":
            # tol=0: always run exactly n solver iterations, so n means the same as for unroll.
            z = dynamics.fixed_point(model.step, params, state, x, method=implicit_method,
                                     tol=0.0, maxiter=n, implicit_diff=True).state
        else:
            adjoint = (dynamics.Full(remat=mode == "full+remat") if mode.startswith("full")
                       else dynamics.adjoint(mode))
            z, _ = dynamics.unroll(model.step, params, state, x, key, n, adjoint=adjoint)
        logits = model.readout(params, z).logits
        return losses.stablemax_cross_entropy(logits, labels).mean()

    return jax.jit(jax.value_and_grad(loss_fn))


def measure(model: EqRModel, batch: int, modes, ns, repeats: int, implicit_method: str):
    cfg = model.cfg
    params = model.init(jax.random.PRNGKey(0))
    inputs = jax.random.randint(jax.random.PRNGKey(1), (batch, cfg.seq_len), 1, cfg.vocab_size)
    labels = jax.random.randint(jax.random.PRNGKey(2), (batch, cfg.seq_len), 1, cfg.vocab_size)
    state = model.init_latents(jax.random.PRNGKey(3), batch)
    args = (params, state, inputs, labels, jax.random.PRNGKey(4))
    rows = []
    for mode in modes:
        for n in ns:
            fn = segment_value_and_grad(model, mode, n, implicit_method=implicit_method)
            row = {"mode": mode, "n": n}
            try:
                t0 = time.perf_counter()
                compiled = fn.lower(*args).compile()
                compile_s = time.perf_counter() - t0
                mem = bm.memory_of(compiled)
                t = bm.time_fn(compiled, *args, warmup=1, repeats=repeats)
            except Exception as err:  # noqa: BLE001
                if not bm.is_oom(err):
                    raise
                rows.append({**row, "status": "oom"})
                continue
            rows.append({**row, "status": "ok", "peak_MiB": mem["peak_bytes"] / bm.MiB,
                         "temp_MiB": mem["temp_bytes"] / bm.MiB,
                         "argument_MiB": mem["argument_bytes"] / bm.MiB,
                         "output_MiB": mem["output_bytes"] / bm.MiB,
                         "peak_source": mem["peak_source"], "time_ms": t.median_s * 1e3,
                         "compile_s": compile_s})
            print(f"  {mode:10s} n={n:<3d} peak {rows[-1]['peak_MiB']:9.2f} MiB  temp "
                  f"{rows[-1]['temp_MiB']:9.2f} MiB  {rows[-1]['time_ms']:9.2f} ms", flush=True)
    return rows


def growth(rows, mode):
    """temp memory at the largest n over temp at the smallest n (1.0 = flat)."""
    pts = sorted((r["n"], r["temp_MiB"]) for r in rows if r["mode"] == mode and r["status"] == "ok")
    if len(pts) < 2 or pts[0][1] == 0:
        return None
    return pts[-1][1] / pts[0][1]


def plot(rows, path: Path, title: str) -> Path:
    plt = bm.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["n"], r["peak_MiB"], r["time_ms"]) for r in rows
                     if r["mode"] == mode and r["status"] == "ok")
        if not pts:
            continue
        ns, mem, ms = zip(*pts)
        a1.plot(ns, mem, marker="o", label=mode)
        a2.plot(ns, ms, marker="o", label=mode)
    for ax, lab in ((a1, "peak memory of one step (MiB)"), (a2, "time of one step (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("unrolled steps n")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return bm.save_figure(fig, path, dpi=80)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n in 1, 4, 16 (tiny preset)")
    ap.add_argument("--preset", default="tiny", choices=bm.BENCH_PRESETS)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="compute dtype (default: the preset's)")
    ap.add_argument("--batch", type=int, default=None,
                    help="default 16 on CPU, 768 on an accelerator")
    ap.add_argument("--ns", type=int, nargs="+", default=None,
                    help="unrolled steps (default 1 2 4 ... 64)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--implicit-method", default="anderson", choices=["anderson", "iteration"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/"
                    "<backend>-gradient-memory[-quick].json)")
    ap.add_argument("--plot", default=None,
                    help="PNG (default docs/assets/gradient_memory-<backend>.png); 'none' skips")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    ns = args.ns or ([1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64])
    batch = args.batch or bm.by_backend(16, 768)
    over = {"forward_dtype": args.dtype} if args.dtype else {}
    cfg = bm.model_preset(args.preset, **over)
    model = EqRModel(cfg)
    info = bm.machine_info()
    title = (f"{args.preset} ({cfg.forward_dtype}), batch {batch}, "
             f"{cfg.blocks_per_step} blocks/step - {bm.describe_machine(info)}")
    print(f"gradient memory: {title}", flush=True)
    t0 = time.perf_counter()
    rows = measure(model, batch, args.modes, ns, args.repeats, args.implicit_method)
    cols = ["mode", "n", "peak_MiB", "temp_MiB", "time_ms", "compile_s", "status"]
    bm.print_table(rows, cols, title="one training step vs unrolled steps n")
    growth_rows = [{"mode": m, f"temp(n={max(ns)})/temp(n={min(ns)})": growth(rows, m)}
                   for m in args.modes]
    bm.print_table(growth_rows, title="memory growth (1.0 = flat)")
    suffix = "-quick" if args.quick else ""
    out = Path(args.out) if args.out else bm.default_out(f"gradient-memory{suffix}")
    result = {"benchmark": "gradient_memory", "preset": args.preset,
              "dtype": cfg.forward_dtype, "batch": batch, "ns": ns, "modes": args.modes,
              "implicit_method": args.implicit_method, "machine": info, "rows": rows,
              "growth": {m: growth(rows, m) for m in args.modes},
              "memory_definition": "peak = argument + output + temp - alias bytes of the compiled "
                                   "value_and_grad (XLA buffer assignment), or XLA's "
                                   "peak_memory_in_bytes when > 0; temp = scratch/activations",
              "wall_s": time.perf_counter() - t0}
    bm.write_json(out, result)
    print(f"\nwrote {out}")
    if args.plot != "none":
        png = (Path(args.plot) if args.plot
               else Path("docs/assets") / f"gradient_memory-{bm.backend()}.png")
        result["plot"] = str(plot(rows, png, title))
        print(f"wrote {result['plot']}")
    result["out"] = str(out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
