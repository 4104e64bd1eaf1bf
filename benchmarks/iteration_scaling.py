"""Inference throughput of the EqR step map as depth, batch and breadth grow.

For each preset (``sudoku``, ``maze``) and compute dtype (bfloat16, float32) three sweeps run:

* depth:   reasoning steps 1 ... 4096 at a fixed batch (breadth 1);
* batch:   puzzles 64 ... 8192 at a fixed depth (breadth 1);
* breadth: parallel random initial latents 1 ... 256 for a fixed set of puzzles.

Every point reports puzzle-steps/s (rows x steps per second; a row is one puzzle copy),
layer-equivalents/s (puzzle-steps/s x blocks per step), achieved TFLOP/s and MFU (analytic FLOPs
from `eqr_jax.flops` over the device kind's datasheet bf16 peak from `eqr_jax.perf`'s table on an
accelerator, as training logs it; on a CPU, which has no such peak, over the square-matmul rate
measured at the start of the same run, per dtype),
latency per reasoning step, and peak device memory (XLA's compiled estimate; the allocator's
high-water mark too on GPU/TPU).

Each point runs the evaluator's own program (`eqr_jax.evaluation.core.evaluate_copies`, fixed
halting): the depth is a *runtime* argument of its ``lax.while_loop``, so one compiled program
serves a whole depth sweep, and the numbers are those of ``eqr eval``. (Results measured before
this script used the evaluator, with a bare ``fori_loop`` of the step map and one read-out per
call, are marked as such in docs/performance.md.)

Sizes adapt to the backend: full sweeps on GPU/TPU, small ones on CPU; ``--quick`` is smaller
still (under a minute on a 2-core CPU for the sudoku preset). Examples::

    python benchmarks/iteration_scaling.py --quick
    python benchmarks/iteration_scaling.py --presets sudoku maze --dtypes bfloat16 float32 \
        --out benchmarks/results/h200-iteration-scaling.json
    python benchmarks/iteration_scaling.py --presets sudoku --dtypes bfloat16 \
        --profile /tmp/is-profile --profile-point depth:64   # one point under jax.profiler

The JSON and the plot name the device kind and the MFU denominator used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import common as bm
from eqr_jax import flops, perf
from eqr_jax.config import EvalConfig
from eqr_jax.evaluation import core
from eqr_jax.model import EqRModel

# (depths, depth-sweep batch), (batches, batch-sweep depth), (breadths, puzzles, breadth depth)
SIZES = {
    "accelerator": dict(depths=[1, 4, 16, 64, 256, 1024, 4096], depth_batch=256,
                        batches=[64, 128, 256, 512, 768, 1024, 2048, 4096, 8192], batch_depth=16,
                        breadths=[1, 4, 16, 64, 256], breadth_puzzles=32, breadth_depth=16),
    "accelerator-quick": dict(depths=[1, 4, 16], depth_batch=256, batches=[64, 768],
                              batch_depth=4, breadths=[1, 16], breadth_puzzles=32,
                              breadth_depth=4),
    "cpu": dict(depths=[1, 2, 4, 8], depth_batch=1, batches=[1, 2, 4, 8], batch_depth=1,
                breadths=[1, 2, 4], breadth_puzzles=1, breadth_depth=1),
    "cpu-quick": dict(depths=[1, 2], depth_batch=1, batches=[1, 2], batch_depth=1,
                      breadths=[1, 2], breadth_puzzles=1, breadth_depth=1),
}
# Rows (batch x breadth) above which a preset is skipped on an accelerator: the maze's XLA attention
# materialises (rows, heads, 900, 900) scores.
MAX_ROWS = {"maze": 2048}
# The maze step is ~6x slower than sudoku's per FLOP on CPU (900x900 attention): halve CPU sweeps.
CPU_SLOW = {"maze"}


def make_runner(model: EqRModel, breadth: int):
    """jit(params, inputs, labels, mask, seed, depth) -> `CopyResults` of ``depth`` steps.

    The evaluator's own program (`eqr_jax.evaluation.core.evaluate_copies`, fixed halting, its
    default window and residual record), so the numbers are those of ``eqr eval``; the depth is
    traced. Job (puzzle, copy) and step ``t`` draw their keys as every evaluation does
    (`core.job_keys`; ``seed`` is an int32 scalar).
    """
    ids = jnp.arange(breadth, dtype=jnp.int32)
    cfg = EvalConfig()

    def run(params, inputs, labels, mask, seed, depth):
        return core.evaluate_copies(model, params, inputs, labels, mask, seed, jnp.int32(0), ids,
                                    breadth, depth, core.stopping("fixed"),
                                    window=cfg.convergence_window,
                                    trace_points=cfg.trace_points)

    return jax.jit(run)


def sizes_for(preset: str, quick: bool) -> dict:
    kind = ("accelerator" if bm.on_accelerator() else "cpu") + ("-quick" if quick else "")
    s = {k: (list(v) if isinstance(v, list) else v) for k, v in SIZES[kind].items()}
    if not bm.on_accelerator() and preset in CPU_SLOW:
        for k in ("depths", "batches", "breadths"):
            s[k] = s[k][: max(2, len(s[k]) // 2)]
    return s


def mfu_peaks(dtypes, measured: dict) -> dict:
    """The MFU denominator per dtype: the device kind's datasheet peak (`eqr_jax.perf`; one
    bf16 figure for every dtype, as MFU is conventionally stated) where known, else the
    square-matmul rate measured in this run (a CPU)."""
    kind = perf.device_kind()
    table = perf.peak_flops(kind)
    return {dt: ({"tflops": table / 1e12, "source": f"datasheet bf16 peak of {kind} "
                  "(eqr_jax.perf)"} if table else
                 {"tflops": measured[dt]["tflops"], "source": f"measured {dt} square matmul "
                  f"(n={measured[dt]['n']}) on {kind}"}) for dt in dtypes}


def profile_once(run, log_dir: str, label: str) -> None:
    """One more call of ``run`` under `jax.profiler` (outside the timed repeats), written where
    TensorBoard's profile plugin looks (``log_dir/plugins/profile/``)."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(log_dir)
    try:
        with jax.profiler.StepTraceAnnotation(label, step_num=0):
            bm.block(run())
    finally:
        jax.profiler.stop_trace()
    print(f"  profile of {label} written under {log_dir}/plugins/profile", flush=True)


def measure_point(compiled, args, depth: int, quick: bool) -> bm.Timing:
    d = jnp.asarray(depth, jnp.int32)
    run = lambda: compiled(*args, d)
    # Long points run once; short ones repeat (at least 0.2 s of work, or 0.05 s in quick mode).
    return bm.time_fn(run, warmup=0, repeats=1 if depth >= 256 else 3,
                      min_total_s=0.05 if quick else 0.2, max_repeats=20)


def run_preset(name: str, dtype: str, sizes: dict, peak: dict, quick: bool, args) -> list[dict]:
    cfg = bm.model_preset(name, forward_dtype=dtype)
    if args.attention_impl and not cfg.mlp_t:
        import dataclasses  # noqa: PLC0415
        cfg = dataclasses.replace(cfg, attention_impl=args.attention_impl)
    model = EqRModel(cfg)
    params = model.init(jax.random.PRNGKey(0))
    step_fl = flops.step_flops(cfg)
    rows: list[dict] = []
    cache: dict = {}

    def compiled_for(batch: int, breadth: int):
        if (batch, breadth) not in cache:
            inputs = jax.random.randint(jax.random.PRNGKey(1), (batch, cfg.seq_len), 1,
                                        cfg.vocab_size)
            mask = jnp.ones((batch,), bool)
            runner = make_runner(model, breadth)
            call_args = (params, inputs, inputs, mask, jnp.int32(3))
            t0 = time.perf_counter()
            compiled = runner.lower(*call_args, jnp.asarray(1, jnp.int32)).compile()
            mem = bm.memory_of(compiled)
            mem["compile_s"] = time.perf_counter() - t0
            bm.block(compiled(*call_args, jnp.asarray(1, jnp.int32)))  # warm-up
            cache[(batch, breadth)] = (compiled, call_args, mem)
        return cache[(batch, breadth)]

    points = ([("depth", d, sizes["depth_batch"], 1) for d in sizes["depths"]]
              + [("batch", sizes["batch_depth"], b, 1) for b in sizes["batches"]]
              + [("breadth", sizes["breadth_depth"], sizes["breadth_puzzles"], n)
                 for n in sizes["breadths"]])
    for sweep, depth, batch, breadth in points:
        n_rows = batch * breadth
        row = {"preset": name, "dtype": dtype, "sweep": sweep, "depth": depth, "batch": batch,
               "breadth": breadth, "rows": n_rows}
        if bm.on_accelerator() and n_rows > MAX_ROWS.get(name, 1 << 30):
            rows.append({**row, "status": f"skipped (rows > {MAX_ROWS[name]})"})
            continue
        try:
            compiled, call_args, mem = compiled_for(batch, breadth)
            t = measure_point(compiled, call_args, depth, quick)
            if args.profile and not args.profiled and _is_profile_point(args, row):
                profile_once(lambda: compiled(*call_args, jnp.asarray(depth, jnp.int32)),
                             args.profile, f"{name}-{dtype}-{sweep}-{depth}x{batch}x{breadth}")
                args.profiled = row
        except Exception as err:  # noqa: BLE001
            if not bm.is_oom(err):
                raise
            rows.append({**row, "status": "oom"})
            continue
        # The evaluator reads out every step (and the initial latents).
        fl = flops.forward_flops(cfg, depth, batch, breadth) + (
            n_rows * depth * flops.readout_flops(cfg))
        tflops = fl / t.median_s / 1e12
        peak_tf = peak[dtype]["tflops"]
        runtime_peak = bm.runtime_peak_bytes()
        rows.append({
            **row, "status": "ok",
            "time_s": t.median_s,
            "latency_ms_per_step": t.median_s / depth * 1e3,
            "puzzle_steps_per_s": n_rows * depth / t.median_s,
            "layer_equiv_per_s": n_rows * depth * cfg.blocks_per_step / t.median_s,
            "tflops": tflops,
            "mfu": tflops / peak_tf if peak_tf else None,
            "compiled_peak_MiB": mem["peak_bytes"] / bm.MiB,
            "compiled_temp_MiB": mem["temp_bytes"] / bm.MiB,
            "runtime_peak_MiB": None if runtime_peak is None else runtime_peak / bm.MiB,
            "compile_s": mem["compile_s"],
            "repeats": t.repeats,
            "flops_per_puzzle_step": step_fl,
        })
        print(f"  {name:7s} {dtype:8s} {sweep:7s} depth={depth:<5d} batch={batch:<5d} "
              f"breadth={breadth:<4d} {rows[-1]['puzzle_steps_per_s']:10.1f} puzzle-steps/s "
              f"{tflops:8.4f} TFLOP/s  mfu={rows[-1]['mfu'] or 0:.3f}", flush=True)
    return rows


COLUMNS = ["preset", "dtype", "sweep", "depth", "batch", "breadth", "puzzle_steps_per_s",
           "layer_equiv_per_s", "tflops", "mfu", "latency_ms_per_step", "compiled_peak_MiB",
           "runtime_peak_MiB"]


def _is_profile_point(args, row: dict) -> bool:
    """``--profile-point SWEEP:VALUE`` (the sweep's own variable), default the first point."""
    if not args.profile_point:
        return True
    sweep, _, value = args.profile_point.partition(":")
    return row["sweep"] == sweep and str(row[sweep]) == value


def plot(rows: list[dict], path: Path, title: str = "") -> Path:
    plt = bm.pyplot()
    ok = [r for r in rows if r.get("status") == "ok"]
    presets = sorted({r["preset"] for r in ok})
    fig, axes = plt.subplots(len(presets), 3, figsize=(11, 3.0 * len(presets)), squeeze=False)
    for i, p in enumerate(presets):
        for j, (sweep, xkey) in enumerate([("depth", "depth"), ("batch", "batch"),
                                           ("breadth", "breadth")]):
            ax = axes[i][j]
            for dt in sorted({r["dtype"] for r in ok}):
                pts = [(r[xkey], r["puzzle_steps_per_s"]) for r in ok
                       if r["preset"] == p and r["sweep"] == sweep and r["dtype"] == dt]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=dt)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xkey)
            ax.set_ylabel("puzzle-steps/s")
            ax.set_title(f"{p}: {sweep} sweep", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(bm.describe_machine() + (f"\n{title}" if title else ""), fontsize=8)
    fig.tight_layout()
    return bm.save_figure(fig, path)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smallest sweeps (< 1 min on CPU)")
    ap.add_argument("--presets", nargs="+", default=None, choices=bm.BENCH_PRESETS,
                    help="default: sudoku maze (quick on CPU: sudoku)")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                    choices=["bfloat16", "float32"])
    ap.add_argument("--attention-impl", default=None, choices=["xla", "cudnn"],
                    help="attention implementation for the maze preset (default: backend default)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                    "<backend>-iteration-scaling[-quick].json)")
    ap.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png); "
                    "'none' to skip")
    ap.add_argument("--matmul-n", type=int, default=None, help="peak-matmul size")
    ap.add_argument("--depths", type=int, nargs="+", default=None, help="override depth sweep")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="override batch sweep")
    ap.add_argument("--breadths", type=int, nargs="+", default=None,
                    help="override breadth sweep")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="trace one configuration with jax.profiler into DIR/plugins/profile "
                    "(TensorBoard / XProf: tensorboard --logdir DIR)")
    ap.add_argument("--profile-point", metavar="SWEEP:VALUE", default=None,
                    help="the configuration --profile traces, e.g. depth:64 or breadth:16 "
                    "(default: the first point measured)")
    args = ap.parse_args(argv)
    if args.profile_point and (args.profile_point.partition(":")[0]
                               not in ("depth", "batch", "breadth")
                               or not args.profile_point.partition(":")[2].isdigit()):
        ap.error(f"--profile-point must be depth|batch|breadth:VALUE, got {args.profile_point!r}")
    args.profiled = None
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    presets = args.presets or (["sudoku"] if args.quick and not bm.on_accelerator()
                               else ["sudoku", "maze"])
    info = bm.machine_info()
    print(f"iteration scaling on {bm.describe_machine(info)}", flush=True)
    n_mm = args.matmul_n or (512 if args.quick and not bm.on_accelerator() else None)
    measured = {dt: bm.peak_matmul_tflops(dt, n_mm) for dt in args.dtypes}
    bm.print_table(list(measured.values()), title="peak square matmul (measured)")
    peak = mfu_peaks(args.dtypes, measured)
    bm.print_table([{"dtype": dt, **v} for dt, v in peak.items()], title="MFU denominator")
    flop_rows = []
    for p in presets:
        cfg = bm.model_preset(p)
        fb = flops.block_flops(cfg)
        flop_rows.append({"preset": p, "blocks_per_step": cfg.blocks_per_step,
                          "token_mixing_flops": fb.token_mixing,
                          "channel_mlp_flops": fb.channel_mlp,
                          "block_flops": fb.total, "step_gflops": flops.step_flops(cfg) / 1e9,
                          "readout_flops": flops.readout_flops(cfg)})
    bm.print_table(flop_rows, title="analytic FLOPs per puzzle (eqr_jax.flops)")
    rows: list[dict] = []
    t0 = time.perf_counter()
    for p in presets:
        sizes = sizes_for(p, args.quick)
        for key in ("depths", "batches", "breadths"):
            if getattr(args, key):
                sizes[key] = getattr(args, key)
        for dt in args.dtypes:
            rows += run_preset(p, dt, sizes, peak, args.quick, args)
    wall = time.perf_counter() - t0
    ok = [r for r in rows if r.get("status") == "ok"]
    for sweep in ("depth", "batch", "breadth"):
        bm.print_table([r for r in ok if r["sweep"] == sweep], COLUMNS, title=f"{sweep} sweep")
    skipped = [r for r in rows if r.get("status") != "ok"]
    if skipped:
        bm.print_table(skipped, ["preset", "dtype", "sweep", "depth", "batch", "breadth",
                                 "status"], title="skipped points")
    # bf16 / f32 throughput ratios at matching points.
    ratios = []
    for r in ok:
        if r["dtype"] != "bfloat16":
            continue
        twin = [q for q in ok if q["dtype"] == "float32" and all(
            q[k] == r[k] for k in ("preset", "sweep", "depth", "batch", "breadth"))]
        if twin:
            speedup = r["puzzle_steps_per_s"] / twin[0]["puzzle_steps_per_s"]
            ratios.append({k: r[k] for k in ("preset", "sweep", "depth", "batch", "breadth")}
                          | {"bf16_over_f32": speedup})
    if ratios:
        bm.print_table(ratios, title="bfloat16 / float32 throughput (same run)")
    suffix = "-quick" if args.quick else ""
    out = Path(args.out) if args.out else bm.default_out(f"iteration-scaling{suffix}")
    result = {"benchmark": "iteration_scaling", "quick": args.quick, "presets": presets,
              "dtypes": args.dtypes, "machine": info, "device_kind": info["device_kind"],
              "peak_matmul": measured, "mfu_peak": peak,
              "profile": ({"dir": args.profile, "point": args.profiled} if args.profile
                          else None),
              "flops": flop_rows, "rows": rows, "bf16_over_f32": ratios, "wall_s": wall,
              "flop_formula": "eqr_jax.flops: per block mlp_t 2HN(2I_N)+2HI_N N or attention "
                              "2NH(3H)+4N^2H+2NH^2, plus channel SwiGLU 2NH(2I_H)+2NI_H H; "
                              "x blocks_per_step per step; read-out every step (the evaluator's program)"}
    bm.write_json(out, result)
    print(f"\nwrote {out}")
    if args.plot != "none":
        den = "; ".join(f"{dt}: {v['tflops']:.4g} TFLOP/s ({v['source']})"
                        for dt, v in peak.items())
        png = plot(rows, Path(args.plot) if args.plot else out.with_suffix(".png"),
                   f"device kind {info['device_kind']}; MFU denominator {den}")
        print(f"wrote {png}")
        result["plot"] = str(png)
    result["out"] = str(out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
