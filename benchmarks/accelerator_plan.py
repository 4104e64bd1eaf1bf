"""The table of docs/accelerators.md: the sudoku and maze presets compiled ahead of time for
TPU slices on this CPU machine (`eqr_jax.target_plan`, what ``eqr plan`` runs).

    python benchmarks/accelerator_plan.py [--out benchmarks/results/tpu-plan-cpu-sandbox.json]

A real preset's program takes minutes to compile on 2 cores, so the grid is reduced, and the
JSON says for every figure whether it was compiled or derived:

0. the acceptance commands, run as the CLI: ``eqr plan --preset sudoku --target v5e-8`` and the
   same with ``data.global_batch_size=6144`` (train step only);
1. per preset on v5e-8: the train step at the paper's batch, the paper's evaluation protocol
   (depth 64 x breadth 128, the protocol's noise; 8 copies of a 768-puzzle batch per call) in
   the batched loop and the streaming pool, and ``--max-batch`` searches (compiled);
2. per preset on v4-8, v5p-8, v6e-8 and v5e-64: the train step at the paper's batch and the
   protocol's batched loop (compiled); the largest training batch and copies per call are
   DERIVED from a straight line through that compilation and one far-too-large compilation
   (which fails fast and reports what it needed and the HBM available).

The JSON is rewritten after every step, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = {"sudoku": "paper-sudoku", "maze": "paper-maze"}
COPIES = 8  # copies per call of the protocol's batched loop (max_rows = batch x COPIES)
HUGE = 64  # the far-too-large compilation: this many times the paper's batch / the breadth


def _cli(args: list[str]) -> dict:
    """Run ``eqr ...`` as a user would; keep its stdout (the report) and exit status."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "eqr_jax.cli", *args], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    return {"command": "eqr " + " ".join(args), "exit": p.returncode, "wall_s": time.time() - t0,
            "stdout": p.stdout, "stderr_tail": p.stderr[-2000:]}


def _derive(small_rows: int, small_total: int, big_rows: int, big_need: int | None,
            limit: int, unit: int) -> int | None:
    """The rows where the line through (small_rows, small_total) and (big_rows, big_need)
    meets ``limit``, rounded down to ``unit`` (None without a second point)."""
    if not big_need or big_need <= small_total or big_rows <= small_rows:
        return None
    slope = (big_need - small_total) / (big_rows - small_rows)
    return int((small_rows + (limit - small_total) / slope) // unit * unit)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/tpu-plan-cpu-sandbox.json"))
    p.add_argument("--presets", default="sudoku,maze")
    p.add_argument("--targets", default="v4-8,v5p-8,v6e-8,v5e-64")
    p.add_argument("--skip-acceptance", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT / "src"))
    import jax

    from eqr_jax import aot, config as config_lib
    from eqr_jax.evaluation.protocol import PROTOCOLS
    from eqr_jax.sharding import make_mesh
    from eqr_jax.target_plan import format_report, run_plan
    from eqr_jax.targets import libtpu_version, parse_target, target_devices

    res = {"machine": "2-core CPU sandbox (no accelerator attached)", "jax": jax.__version__,
           "libtpu": libtpu_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "steps": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(step: dict) -> None:
        step["finished"] = time.strftime("%H:%M:%S")
        res["steps"].append(step)
        out.write_text(json.dumps(res, indent=1, default=str))
        print(f"[{step['finished']}] {step['kind']} {step.get('preset', '')} "
              f"{step.get('target', '')} done", flush=True)

    if not a.skip_acceptance:
        for args in (["plan", "--preset", "sudoku", "--target", "v5e-8", "--no-stream"],
                     ["plan", "--preset", "sudoku", "--target", "v5e-8",
                      "data.global_batch_size=6144", "--no-eval", "--no-stream"]):
            save({"kind": "acceptance", **_cli(args)})

    for preset in a.presets.split(","):
        proto = PROTOCOLS[PROTOCOL.get(preset, "paper-sudoku")]  # tiny: a smoke run
        cfg = config_lib.preset(preset)
        B = cfg.data.eval_batch
        ev = dataclasses.replace(cfg.eval, noise_scale=proto.noise_scale, max_rows=B * COPIES)
        common = f"--depth {proto.depth} --breadth {proto.breadth} --noise {proto.noise_scale}"
        rep = run_plan(cfg, parse_target("v5e-8"), eval_cfg=ev, depth=proto.depth,
                       breadth=proto.breadth, max_batch=True, max_compiles=3)
        save({"kind": "compiled", "preset": preset, "target": "v5e-8",
              "command": f"eqr plan --preset {preset} --target v5e-8 {common} "
                         f"eval.max_rows={B * COPIES} --max-batch --max-compiles 3",
              "report": rep, "text": format_report(rep, with_plan=False)})
        for name in a.targets.split(","):
            target = parse_target(name)
            rep = run_plan(cfg, target, eval_cfg=ev, depth=proto.depth, breadth=proto.breadth,
                           stream=False)
            step = {"kind": "compiled+derived", "preset": preset, "target": name,
                    "command": f"eqr plan --preset {preset} --target {name} {common} "
                               f"eval.max_rows={B * COPIES} --no-stream",
                    "report": rep, "text": format_report(rep, with_plan=False)}
            # Far too large: fails fast, and says what it needed and the HBM available.
            mesh = make_mesh(target_devices(target))
            d = mesh.devices.size
            G = cfg.data.global_batch_size
            big = config_lib.apply_overrides(cfg, [f"data.global_batch_size={G * HUGE}"])
            fn, args = aot.train_program(big, mesh, int(rep["plan"]["total_steps"]))
            cb = aot.compile_program(fn, *args)
            limit = cb.reported_hbm() or rep["target"]["memory_per_device"]
            fn, args, kw = aot.eval_program(cfg, ev, mesh, batch=B, depth=proto.depth,
                                            breadth=proto.breadth, copies=proto.breadth)
            ce = aot.compile_program(fn, *args, **kw, memory_limit=limit)
            step["huge"] = {
                "train": {"global_batch": G * HUGE, **dataclasses.asdict(cb), "total": cb.total},
                "eval_all_copies": {"copies": proto.breadth, **dataclasses.asdict(ce),
                                    "total": ce.total}, "hbm_from_compiler": cb.reported_hbm()}
            tr, e = rep["train"], rep["eval"]
            step["derived"] = {
                "memory_limit": limit,
                "train_max_batch": _derive(G, tr["total"], G * HUGE, cb.total if not cb.fits
                                           else None, limit, d),
                "eval_max_copies": (proto.breadth if ce.fits else _derive(
                    e["copies_per_call"], e["total"], proto.breadth, ce.total, limit, 1)),
                "note": "DERIVED: a straight line through the compiled size and the far-too-large "
                        "one (its need from the compiler's message), not compiled at that size"}
            save(step)
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
