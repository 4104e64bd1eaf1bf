"""The table of docs/accelerators.md: the sudoku and maze presets compiled ahead of time for
TPU slices on this CPU machine (`eqr_jax.target_plan`, what ``eqr plan`` runs).

    python benchmarks/accelerator_plan.py [--out benchmarks/results/tpu-plan-cpu-sandbox.json]
    python benchmarks/accelerator_plan.py --table     # the table from the JSON, with derivations

A real preset's program takes minutes to compile on 2 shared cores, so the grid is reduced, and
the JSON says for every figure what was compiled; `--table` marks what is derived:

0. the acceptance commands, run as the CLI: ``eqr plan --preset sudoku --target v5e-8`` and the
   same with ``data.global_batch_size=6144`` (train step only);
1. per preset and target (v5e-8, v4-8, v5p-8, v6e-8, v5e-64): the train step at the paper's
   batch, and the same at 64x that batch, which fails fast with the compiler's RESOURCE_EXHAUSTED
   naming what it needed and the HBM available; the largest batch that fits is DERIVED from the
   straight line through the two (memory per chip is close to affine in the rows per chip);
2. per preset on v5e-8: the paper's evaluation protocol (depth 64 x breadth 128, the protocol's
   noise) in the batched loop with 8 copies of a 768-puzzle batch per call, and with all 128
   copies per call (the largest copies per call is derived as above), then the streaming pool;
3. the same evaluation compilations on the other targets, as time allows.

The JSON is rewritten after every step, so an interrupted run keeps what it finished;
``--skip-acceptance`` continues a run in the same JSON.
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


TEST_PUZZLES = {"sudoku": 423_000, "maze": 1_000}  # Sudoku-Extreme: ~423k (README)
MFUS = (0.3, 0.5)


def _line(p0: tuple[int, int], p1: tuple[int, int], limit: int, unit: int) -> int | None:
    """Where the line through (rows, bytes) points p0, p1 meets ``limit``, rounded down to
    ``unit``; None when the points do not rise."""
    (x0, y0), (x1, y1) = sorted([p0, p1])
    if x1 == x0 or y1 <= y0:
        return None
    return int((x0 + (limit - y0) / ((y1 - y0) / (x1 - x0))) // unit * unit)


def table(res: dict) -> str:
    """The markdown tables of docs/accelerators.md from the JSON (derived figures marked)."""
    by, remat = {}, {}
    for st in res["steps"]:
        if st.get("remat_blocks"):  # the per-block rematerialisation rows (`--remat`)
            remat[(st["preset"], st["target"])] = st
            continue
        if st["kind"] == "acceptance" and "6144" not in st["command"]:
            continue
        huge = st["kind"] == "acceptance"  # the other acceptance run: batch 6144
        key = (st.get("preset", "sudoku"), st.get("target", "v5e-8"), st.get("program", "train"),
               "huge" if huge else st["kind"])
        by[key] = st
    rows = ["| preset | target (chips, hosts) | fits at batch 768? | per chip: total (temporaries) "
            "| largest batch that fits | collectives per step | compile | ESTIMATED step / "
            "50k-100k-step run at 30% / 50% MFU |", "|---|---|---|---|---|---|---|---|"]
    erows = ["| preset | target | 8 copies x 768 puzzles per call: per chip | largest copies per "
             "call that fit (x 768 puzzles) | streaming pool (6,144 slots) per chip | ESTIMATED "
             "hours for the whole test set at depth 64 x breadth 128, 30% / 50% MFU |",
             "|---|---|---|---|---|---|"]
    hbm_of = {st["target"]: st["compiled"]["hbm_from_compiler"] for st in res["steps"]
              if st.get("compiled", {}).get("hbm_from_compiler")}
    for preset in ("sudoku", "maze"):
        for name in ("v5e-8", "v4-8", "v5p-8", "v6e-8", "v5e-64"):
            st = by.get((preset, name, "train", "compiled"))
            if st is None and preset == "sudoku" and name == "v5e-8":
                st = next((s for s in res["steps"] if s["kind"] == "acceptance"
                           and "6144" not in s["command"]), None)
                rep = None
            else:
                rep = st and st["report"]
            if st is None:
                rows.append(f"| {preset} | {name} | not compiled (out of time) | | | | | |")
                continue
            if rep is None:  # the acceptance run's printed report
                rep = _parse_acceptance(st["stdout"])
            t, tr, e = rep["target"], rep["train"], rep["train_estimate"]
            dpc = t["devices_per_chip"]
            huge = by.get((preset, name, "train", "compiled (for the derivation)")) or \
                by.get((preset, name, "train", "huge"))
            if huge and "compiled" in huge:
                hc = huge["compiled"]
                need, hbm, Gh = hc["total"], hc["hbm_from_compiler"], huge["global_batch"]
            elif huge:  # the 6144 acceptance run
                need, hbm, Gh = _oom_from_text(huge["stdout"]) + (6144,)
            else:
                need = hbm = Gh = None
            if need and hbm:
                best = _line((768, tr["total"]), (Gh, need), hbm, t["devices"])
                biggest = (f"~{best:,} (DERIVED; {Gh:,} needs {need / 2**30:.1f} GiB of "
                           f"{hbm / 2**30:.2f} GiB: fits: no)")
            else:
                biggest = "not compiled"
            rows.append(f"| {preset} | {name} ({t['chips']}, {t['hosts']}) | "
                        + _train_cells(t, tr, e, biggest))
            if (preset, name) in remat:
                r = remat[(preset, name)]["report"]
                rows.append(f"| {preset} | {name} ({t['chips']}, {t['hosts']}) with "
                            "`model.remat_blocks=true` | "
                            + _train_cells(r["target"], r["train"], r["train_estimate"],
                                           "not searched"))
            ev = by.get((preset, name, "eval", "compiled"))
            if ev is not None:
                erows.append(_eval_row(by, hbm_of, preset, name, ev))
    return "\n".join(rows) + "\n\n" + "\n".join(erows)


def _eval_row(by: dict, hbm_of: dict, preset: str, name: str, ev: dict) -> str:
    """One row of the evaluation table (the batched loop's step ``ev`` and what else was
    compiled for ``preset`` on ``name``)."""
    from eqr_jax import flops
    from eqr_jax.config import preset as preset_cfg

    er, t = ev["report"]["eval"], ev["report"]["target"]
    dpc = t["devices_per_chip"]
    allc = by.get((preset, name, "eval", "compiled (for the derivation)"))
    # The HBM the compiler stated for this chip (in any out-of-memory message).
    hbm = hbm_of.get(name, t["memory_per_device"])
    if allc and allc["compiled"]["fits"] and allc["compiled"]["total"] <= hbm:
        most = f"all 128 ({allc['compiled']['total'] * dpc / 2**30:.2f} GiB per chip)"
    elif allc:
        c = _line((er["copies_per_call"], er["total"]),
                  (allc["copies"], allc["compiled"]["total"]), hbm, 1)
        accepted = (" (the compiler accepted it; its memory analysis exceeds the "
                    "HBM)" if allc["compiled"]["fits"] else "")
        most = (f"~{c} (DERIVED; 128 needs {allc['compiled']['total'] / 2**30:.2f} GiB "
                f"of {hbm / 2**30:.2f}{accepted})")
    else:
        most = "not compiled"
    sp = by.get((preset, name, "stream", "compiled"))
    stream = (f"{sp['report']['stream']['total'] * dpc / 2**30:.2f} GiB"
              if sp else "not compiled")
    cfg = preset_cfg(preset)
    fl = flops.forward_flops(cfg.model, 64, TEST_PUZZLES[preset], 128)
    peak = t["peak_flops_per_device"] * t["devices"]
    hours = " / ".join(f"{fl / (peak * m) / 3600:.1f} h" if fl / (peak * m) >= 3600
                       else f"{fl / (peak * m) / 60:.1f} min" for m in MFUS)
    return (f"| {preset} | {name} | {er['total'] * dpc / 2**30:.2f} GiB "
            f"({'fits' if er['fits'] else 'does not fit'}) | {most} | {stream} | "
            f"{hours} ({TEST_PUZZLES[preset]:,} puzzles) |")


def _train_cells(t: dict, tr: dict, e: dict, biggest: str) -> str:
    """The table's cells after the target of one compiled train step (``tr``, its target
    ``t`` and estimate ``e``), from "fits" on."""
    dpc = t["devices_per_chip"]
    coll = ", ".join(f"{k} x{n} ({b / 1e6:.1f} MB)"
                     for k, (n, b) in sorted(tr["collectives"].items())) or "none"
    est = " / ".join(f"{e[f'step_s@{m:g}'] * 1e3:.0f} ms, {e[f'run_h@{m:g}']:.1f} h"
                     for m in MFUS)
    if tr["fits"]:
        mem = (f"{tr['total'] * dpc / 2**30:.2f} GiB "
               f"({tr['temporaries'] * dpc / 2**30:.2f} GiB)")
    else:
        mem = f"needs {tr['total'] * dpc / 2**30:.2f} GiB (the compiler's figure)"
        coll = "(does not fit)"
    return (f"{'yes' if tr['fits'] else '**no**'} | {mem} | {biggest} | {coll} | "
            f"{tr['compile_s']:.0f} s | {est} |")


def _oom_from_text(text: str) -> tuple[int | None, int | None]:
    from eqr_jax.aot import Compiled

    c = Compiled(False, 0.0, error=text)
    return c.reported_need(), c.reported_hbm()


def _parse_acceptance(text: str) -> dict:
    """The train figures of the acceptance command's printed report (it ran as the CLI)."""
    import re

    num = lambda pat: float(re.search(pat, text).group(1).replace(",", ""))
    mb = lambda what: int(num(what + r" ([\d,.]+) MB") * 1e6)
    tr = {"fits": "fits: yes" in text, "arguments": mb("arguments"),
          "temporaries": mb("temporaries"), "compile_s": num(r"compiled in ([\d.]+) s"),
          "collectives": {"all-reduce": [int(num(r"all-reduce (\d+) op")),
                                         int(num(r"all-reduce \d+ op\(s\) ([\d.]+) MB") * 1e6)]}}
    tr["total"] = int(num(r"total ([\d,.]+) MB") * 1e6)
    step = [float(v) for v in re.findall(r"([\d.]+) s at \d+% MFU", text)]
    hours = [float(v) for v in re.findall(r"([\d.]+) min", text.split("50,000 steps")[1])[:2]]
    return {"target": {"devices_per_chip": 1, "chips": 8, "hosts": 1, "devices": 8},
            "train": tr, "train_estimate": {"step_s@0.3": step[0], "step_s@0.5": step[1],
                                            "run_h@0.3": hours[0] / 60,
                                            "run_h@0.5": hours[1] / 60}}


def remat_rows(spec: str, save) -> None:
    """Compile the train step with ``model.remat_blocks=true`` for each ``PRESET:TARGET`` of
    ``spec`` (comma-separated) and ``save`` each as a step of the JSON."""
    from eqr_jax import config as config_lib
    from eqr_jax.target_plan import format_report, run_plan
    from eqr_jax.targets import parse_target

    for item in spec.split(","):
        preset, name = item.split(":")
        cfg = config_lib.apply_overrides(config_lib.preset(preset), ["model.remat_blocks=true"])
        rep = run_plan(cfg, parse_target(name), evaluate=False, stream=False)
        save({"kind": "compiled", "program": "train", "preset": preset, "target": name,
              "remat_blocks": True,
              "command": f"eqr plan --preset {preset} --target {name} --no-eval --no-stream "
                         "model.remat_blocks=true",
              "report": rep, "text": format_report(rep, with_plan=False)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/tpu-plan-cpu-sandbox.json"))
    p.add_argument("--presets", default="sudoku,maze")
    p.add_argument("--targets", default="v4-8,v5p-8,v6e-8,v5e-64")
    p.add_argument("--skip-acceptance", action="store_true")
    p.add_argument("--remat", metavar="PRESET:TARGET,...",
                   help="only compile the train step with model.remat_blocks=true for these "
                   "(e.g. maze:v5e-8,maze:v4-8) and add them to --out's JSON")
    p.add_argument("--table", action="store_true", help="print the tables from --out, exit")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(Path(a.out).read_text())))
        return 0
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
    if (a.skip_acceptance or a.remat) and out.exists():  # continue a run: keep its steps
        res["steps"] = json.loads(out.read_text())["steps"]

    def save(step: dict) -> None:
        step["finished"] = time.strftime("%H:%M:%S")
        res["steps"].append(step)
        out.write_text(json.dumps(res, indent=1, default=str))
        print(f"[{step['finished']}] {step['kind']} {step.get('preset', '')} "
              f"{step.get('target', '')} done", flush=True)

    if a.remat:  # the per-block rematerialisation rows (what `eqr plan` now tries itself)
        remat_rows(a.remat, save)
        return 0
    if not a.skip_acceptance:
        for args in (["plan", "--preset", "sudoku", "--target", "v5e-8", "--no-stream"],
                     ["plan", "--preset", "sudoku", "--target", "v5e-8",
                      "data.global_batch_size=6144", "--no-eval", "--no-stream"]):
            save({"kind": "acceptance", **_cli(args)})

    targets = ["v5e-8"] + a.targets.split(",")
    protos = {p: PROTOCOLS[PROTOCOL.get(p, "paper-sudoku")] for p in a.presets.split(",")}
    cfgs = {p: config_lib.preset(p) for p in protos}
    evs = {p: dataclasses.replace(cfgs[p].eval, noise_scale=protos[p].noise_scale,
                                  max_rows=cfgs[p].data.eval_batch * COPIES) for p in protos}
    meshes: dict = {}

    def mesh_of(name):
        if name not in meshes:
            meshes[name] = make_mesh(target_devices(parse_target(name)))
        return meshes[name]

    def train_job(preset, name):
        cfg = cfgs[preset]
        if preset == "sudoku" and name == "v5e-8" and any(
                s["kind"] == "acceptance" and s["exit"] == 0 for s in res["steps"]):
            return  # the acceptance command compiled it
        rep = run_plan(cfg, parse_target(name), evaluate=False, stream=False)
        save({"kind": "compiled", "program": "train", "preset": preset, "target": name,
              "command": f"eqr plan --preset {preset} --target {name} --no-eval --no-stream",
              "report": rep, "text": format_report(rep, with_plan=False)})

    def huge_train_job(preset, name):
        # Far too large: fails fast, and says what it needed and the HBM available.
        cfg = cfgs[preset]
        G = cfg.data.global_batch_size * HUGE
        big = config_lib.apply_overrides(cfg, [f"data.global_batch_size={G}"])
        fn, args = aot.train_program(big, mesh_of(name), 50_000)
        c = aot.compile_program(fn, *args)
        save({"kind": "compiled (for the derivation)", "program": "train", "preset": preset,
              "target": name, "global_batch": G,
              "command": f"eqr plan --preset {preset} --target {name} --no-eval --no-stream "
                         f"data.global_batch_size={G}",
              "compiled": {**dataclasses.asdict(c), "total": c.total,
                           "hbm_from_compiler": c.reported_hbm()}})

    def eval_job(preset, name, copies=None, stream=False):
        cfg, proto, ev = cfgs[preset], protos[preset], evs[preset]
        B = cfg.data.eval_batch
        common = (f"--depth {proto.depth} --breadth {proto.breadth} --noise "
                  f"{proto.noise_scale}")
        if copies is None:
            rep = run_plan(cfg, parse_target(name), train=False, evaluate=not stream,
                           stream=stream, eval_cfg=ev, depth=proto.depth, breadth=proto.breadth)
            flags = "--no-train --no-eval" if stream else "--no-train --no-stream"
            save({"kind": "compiled", "program": "stream" if stream else "eval",
                  "preset": preset, "target": name,
                  "command": f"eqr plan --preset {preset} --target {name} {common} "
                             f"eval.max_rows={B * COPIES} {flags}",
                  "report": rep, "text": format_report(rep, with_plan=False)})
            return
        fn, args, kw = aot.eval_program(cfg, ev, mesh_of(name), batch=B, depth=proto.depth,
                                        breadth=proto.breadth, copies=copies)
        c = aot.compile_program(fn, *args, **kw)
        save({"kind": "compiled (for the derivation)", "program": "eval", "preset": preset,
              "target": name, "copies": copies, "batch": B,
              "command": f"eqr plan --preset {preset} --target {name} {common} "
                         f"eval.max_rows={B * copies} --no-train --no-stream",
              "compiled": {**dataclasses.asdict(c), "total": c.total,
                           "hbm_from_compiler": c.reported_hbm()}})

    # Most important first: the sudoku rows (train, then the paper's evaluation protocol on
    # v5e-8), then maze's, then the rest of the evaluation columns.
    jobs = []
    for preset in protos:
        for name in targets:
            jobs.append((train_job, preset, name))
            if not (preset == "sudoku" and name == "v5e-8" and not a.skip_acceptance) and \
                    not (preset == "sudoku" and name == "v5e-8" and any(
                        s.get("exit") == 0 and "6144" in s.get("command", "")
                        for s in res["steps"])):
                jobs.append((huge_train_job, preset, name))  # (the 6144 run is sudoku's)
        jobs += [(eval_job, preset, "v5e-8"), (eval_job, preset, "v5e-8", protos[preset].breadth)]
    for preset in protos:
        jobs.append((lambda p, n: eval_job(p, n, stream=True), preset, "v5e-8"))
    for preset in protos:
        for name in a.targets.split(","):
            jobs += [(eval_job, preset, name), (eval_job, preset, name, protos[preset].breadth)]
    for fn, *job_args in jobs:
        fn(*job_args)
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
