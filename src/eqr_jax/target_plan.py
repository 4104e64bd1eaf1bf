"""The dry-run plan on a target (``eqr plan``, ``eqr train --dry-run --target``,
``eqr eval --dry-run --target``; docs/accelerators.md): `eqr_jax.plan`'s plan, then the memory,
collectives and compile time of the run's programs compiled ahead of time for the target
(`eqr_jax.aot`), analytic-FLOP time estimates, and optionally the largest sizes that fit.

Every time figure here is an *estimate* from `eqr_jax.flops` and the chip's peak FLOP/s at a
stated MFU; the memory figures are the compiler's own for the target.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from eqr_jax import aot, flops
from eqr_jax import plan as plan_lib
from eqr_jax.config import EvalConfig, RunConfig
from eqr_jax.sharding import make_mesh
from eqr_jax.targets import (Target, describe, libtpu_version, memory_per_device,
                             peak_flops_per_device, target_devices)

MFUS = (0.3, 0.5)
DEPTH_CHECK = (64, 4096)


def _train_cfg(cfg: RunConfig, batch: int) -> RunConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, global_batch_size=batch))


def _entry(c: aot.Compiled, **extra) -> dict[str, Any]:
    return {**dataclasses.asdict(c), "total": c.total, **extra}


def run_plan(cfg: RunConfig, target: Target, *, train: bool = True, evaluate: bool = True,
             stream: bool = True, eval_cfg: EvalConfig | None = None, depth: int | None = None,
             breadth: int | None = None, eval_batch: int | None = None, max_batch: bool = False,
             max_compiles: int = 8, verbose: bool = False) -> dict[str, Any]:
    """Compile the run's programs for ``target`` and collect what they say.

    Args:
      cfg: the run config (`eqr train`'s); eval_cfg: the evaluation settings (default
        ``cfg.eval``); depth / breadth / eval_batch: of the evaluation programs (default the
        config's: ``cfg.eval_depth``, ``eval.breadth``, ``data.eval_batch``).
      train / evaluate / stream: which programs to compile (the train step; the batched
        depth x breadth loop; the streaming slot pool).
      max_batch: also search the largest global training batch and the largest copies x rows
        per evaluation call that fit (each by up to ``max_compiles`` compilations).
    Returns:
      A JSON-able dict: ``plan`` (`eqr_jax.plan.plan`), ``target``, ``train`` / ``eval`` /
      ``stream`` (a `Compiled` as a dict with its ``total``), ``estimates``, ``max_batch``,
      ``peak_bytes_per_chip`` and ``fits``; when the train step does not fit (or with
      ``max_batch``), ``memory_options`` (the train step compiled under each memory switch,
      `memory_options`) and ``cheapest_fit`` (the one with the fewest FLOPs that fits, or
      None); `format_report` prints it.
    """
    p = _Planner(cfg, target, verbose)
    if train:
        p.plan_train(max_batch, max_compiles)
    if evaluate or stream:
        eval_cfg = cfg.eval if eval_cfg is None else eval_cfg
        p.plan_eval(eval_cfg, depth, breadth, eval_batch, evaluate, stream, max_batch,
                    max_compiles)
    return p.finish()


def memory_options(cfg: RunConfig) -> list[tuple[str, list[str]]]:
    """The train step's memory switches worth compiling for ``cfg``: ``(name, overrides)``,
    the configuration as given first. Per-block rematerialisation (``model.remat_blocks``,
    the reference's gradient checkpointing) recomputes each taped block's forward in the
    backward pass; with the full gradient, rematerialising whole steps (``train.remat``) too."""
    opts = [("as configured", [])]
    if not cfg.model.remat_blocks:
        opts.append(("model.remat_blocks=true", ["model.remat_blocks=true"]))
    if cfg.train.grad_mode == "full" and not cfg.train.remat:
        opts.append(("train.remat=true", ["train.remat=true"]))
        if not cfg.model.remat_blocks:
            opts.append(("model.remat_blocks=true train.remat=true",
                         ["model.remat_blocks=true", "train.remat=true"]))
    return opts


class _Planner:
    """The state `run_plan` builds up: the target's devices, mesh and memory limit (updated
    from the compiler's own figure), and the report dict."""

    def __init__(self, cfg: RunConfig, target: Target, verbose: bool):
        self.cfg, self.target, self.verbose = cfg, target, verbose
        devices = target_devices(target, verbose=verbose)
        self.info = info = describe(devices)
        self.mesh = make_mesh(devices)
        self.d = d = info["devices"]
        self.peak = peak_flops_per_device(target, info)
        base = plan_lib.plan(cfg, self.mesh)
        base.update(processes=info["hosts"], devices=f"{d} x {info['platform']} "
                    f"({info['device_kind']})")
        self.total_steps = int(base["total_steps"])
        self.out: dict[str, Any] = {
            "plan": base, "programs": [],
            "target": {"name": target.name, "topology": target.topology or f"cpu:{d}", **info,
                       "memory_per_device": memory_per_device(target, info),
                       "peak_flops_per_device": self.peak,
                       "libtpu": libtpu_version() if target.platform == "tpu" else None,
                       "jax": jax.__version__}}
        source = (f"usable, as libtpu 0.0.42.1 states it, of {target.chip.hbm_bytes / 2**30:g} "
                  "GiB per chip" if target.chip else "host RAM / devices")
        self.mem = {"limit": self.out["target"]["memory_per_device"], "source": source}

    def compile_(self, fn, *args, **kw) -> aot.Compiled:
        c = aot.compile_program(fn, *args, memory_limit=self.mem["limit"], verbose=self.verbose,
                                **kw)
        if c.reported_hbm() and c.reported_hbm() != self.mem["limit"]:  # this libtpu's figure
            self.mem.update(limit=c.reported_hbm(), source=f"usable, as libtpu "
                            f"{self.out['target']['libtpu']} states it")
        return c

    def train_at(self, batch: int, cfg: RunConfig | None = None) -> aot.Compiled:
        fn, args = aot.train_program(_train_cfg(cfg or self.cfg, batch), self.mesh,
                                     self.total_steps)
        return self.compile_(fn, *args)

    def estimate(self, flops_per_step: int) -> dict[str, float]:
        """ESTIMATED step and run times of ``flops_per_step`` at each of `MFUS`."""
        est = {}
        if self.peak:
            for mfu in MFUS:
                step_s = flops_per_step / (self.d * self.peak * mfu)
                est[f"step_s@{mfu:g}"] = step_s
                est[f"run_h@{mfu:g}"] = step_s * self.total_steps / 3600
        return est

    def plan_train(self, max_batch: bool, max_compiles: int) -> None:
        cfg, out, info, d = self.cfg, self.out, self.info, self.d
        G = cfg.data.global_batch_size
        c = self.train_at(G)
        out["train"] = _entry(c, global_batch=G, rows_per_device=G // d,
                              rows_per_host=G // info["hosts"],
                              steps_per_call=min(max(1, cfg.train.steps_per_call),
                                                 self.total_steps or 1))
        out["programs"].append("train")
        fl = int(out["plan"]["flops_per_step"])
        out["train_estimate"] = {"flops_per_step": fl, "flops_per_device": fl / d,
                                 "total_steps": self.total_steps, **self.estimate(fl)}
        if not c.fits or max_batch:
            self.plan_memory_options(c)
        if max_batch:
            out["train_max"] = _summary(aot.max_rows_that_fit(
                self.train_at, d, G, first=c, limit=self.mem["limit"],
                max_compiles=max_compiles))

    def plan_memory_options(self, first: aot.Compiled) -> None:
        """The train step at the configured batch under each of `memory_options`: memory per
        chip, fits, FLOPs (rematerialisation's recomputed forwards counted) and estimates."""
        from eqr_jax.config import apply_overrides

        dpc, base_flops = self.info["devices_per_chip"], None
        rows = []
        for name, overrides in memory_options(self.cfg):
            cfg = apply_overrides(self.cfg, overrides)
            c = first if not overrides else self.train_at(cfg.data.global_batch_size, cfg)
            fl = plan_lib.flops_per_step(cfg)[0]
            base_flops = fl if base_flops is None else base_flops
            rows.append({"name": name, "overrides": overrides, "fits": c.fits,
                         "total": c.total, "bytes_per_chip": int(c.total * dpc),
                         "compile_s": c.compile_s, "flops_per_step": fl,
                         "extra_flops": fl - base_flops, **self.estimate(fl)})
        fitting = [r for r in rows if r["fits"]]
        self.out["memory_options"] = rows
        self.out["cheapest_fit"] = (min(fitting, key=lambda r: r["flops_per_step"])["name"]
                                    if fitting else None)

    def plan_eval(self, eval_cfg: EvalConfig, depth, breadth, eval_batch, evaluate: bool,
                  stream: bool, max_batch: bool, max_compiles: int) -> None:
        cfg, out, d = self.cfg, self.out, self.d
        depth = int(depth or cfg.eval_depth)
        breadth = int(breadth or eval_cfg.breadth)
        B = int(eval_batch or cfg.data.eval_batch)
        noise = eval_cfg.noise_scale if eval_cfg.noise_scale is not None \
            else cfg.model.noise_scale
        ev = {"depth": depth, "breadth": breadth, "batch": B, "noise": noise,
              "halt": eval_cfg.halt}
        from eqr_jax.evaluation.evaluator import copies_per_call

        C = copies_per_call(breadth, B, eval_cfg.max_rows)

        def eval_at(copies: int, batch: int = B) -> aot.Compiled:
            fn, args, kw = aot.eval_program(cfg, eval_cfg, self.mesh, batch=batch, depth=depth,
                                            breadth=breadth, copies=copies)
            return self.compile_(fn, *args, **kw)

        if evaluate:
            c = eval_at(C)
            shas = {}
            for dd in DEPTH_CHECK:
                fn, args, kw = aot.eval_program(cfg, eval_cfg, self.mesh, batch=B, depth=dd,
                                                breadth=breadth, copies=C)
                shas[dd] = aot.lowered_sha(fn, *args, **kw)
            out["eval"] = _entry(c, **ev, copies_per_call=C, rows_per_call=C * B,
                                 rows_per_device=-(-C * B // d),
                                 depth_check={str(k): v for k, v in shas.items()},
                                 same_program_at_depths=len(set(shas.values())) == 1)
            out["programs"].append("eval")
            fwd = flops.forward_flops(cfg.model, depth, 1, breadth)
            e = {"flops_per_puzzle": fwd}
            if self.peak:
                for mfu in MFUS:
                    e[f"h_per_1000@{mfu:g}"] = 1000 * fwd / (d * self.peak * mfu) / 3600
            out["eval_estimate"] = e
            if max_batch:
                out["eval_max"] = self._eval_max(eval_at, c, C, B, breadth, max_compiles)
        if stream:
            fn, args, kw = aot.eval_program(cfg, eval_cfg, self.mesh, batch=B, depth=depth,
                                            breadth=breadth, stream=True)
            c = self.compile_(fn, *args, **kw)
            slots = args[3].rows.steps.shape[0]
            out["stream"] = _entry(c, **ev, slots=slots, slots_per_device=slots // d)
            out["programs"].append("stream")

    def _eval_max(self, eval_at, c, C: int, B: int, breadth: int, max_compiles: int) -> dict:
        if breadth > 1:  # copies per call of a B-puzzle batch
            found = aot.max_rows_that_fit(eval_at, 1, C, first=c, limit=self.mem["limit"],
                                          max_compiles=max_compiles, upper=breadth)
            return {**_summary(found), "what": "copies", "batch": B,
                    "largest_rows": found["largest"] * B}
        found = aot.max_rows_that_fit(lambda b: eval_at(1, b), self.d, B, first=c,
                                      limit=self.mem["limit"], max_compiles=max_compiles)
        return {**_summary(found), "what": "puzzles", "batch": B,
                "largest_rows": found["largest"]}

    def finish(self) -> dict[str, Any]:
        out = self.out
        out["target"].update(memory_per_device=self.mem["limit"],
                             memory_source=self.mem["source"])
        ran = [out[k] for k in out["programs"]]
        per_dev = max((r["total"] for r in ran), default=0)
        out["peak_bytes_per_chip"] = int(per_dev * self.info["devices_per_chip"])
        out["fits"] = bool(ran) and all(r["fits"] for r in ran)
        return out


def _summary(found: dict) -> dict[str, Any]:
    c = found["largest_compiled"]
    return {"largest": found["largest"], "smallest_failing": found["smallest_failing"],
            "exact": found["exact"], "total": c.total if c else None,
            "compiles": found["compiles"]}


# ----------------------------------------------------------------------------------------------
# The printed report


def _mb(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:,.1f} MB" if abs(n) >= 1e5 else f"{n / 1e3:,.1f} kB"


def _hours(h: float) -> str:
    s = h * 3600
    return (f"{s:.3g} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{h:,.1f} h")


def _memory_lines(r: dict, limit: int) -> list[str]:
    if not r["fits"] and r["error"]:
        need = r["total"]
        return [f"  DOES NOT FIT: the compiler needs {_mb(need)} per device: {r['error'][:300]}"]
    lines = [f"  per device: arguments {_mb(r['arguments'])}, outputs {_mb(r['outputs'])}, "
             f"aliased {_mb(r['aliased'])} (donated), temporaries {_mb(r['temporaries'])}, "
             f"generated code {_mb(r['code'])}; total {_mb(r['total'])} of {_mb(limit)} "
             f"({'headroom ' + _mb(limit - r['total']) if r['fits'] else 'DOES NOT FIT'})"]
    coll = r["collectives"]
    if coll:
        lines.append("  collectives (in the compiled program; a loop body counted once): "
                     + ", ".join(f"{k} {n} op(s) {_mb(b)}" for k, (n, b) in sorted(coll.items())))
    else:
        lines.append("  collectives: none")
    return lines


def format_report(rep: dict[str, Any], *, with_plan: bool = True) -> str:
    """The report of `run_plan`; its last lines are ``peak_bytes_per_chip: <int>`` and
    ``fits: yes`` / ``fits: no`` (the configuration as given), then, when memory options were
    compiled, one line naming the cheapest configuration that fits (`cheapest_line`)."""
    t = rep["target"]
    limit = t["memory_per_device"]
    lines = plan_lib.format_plan(rep["plan"]).splitlines() if with_plan else []
    per_chip = f", {t['devices_per_chip']} devices per chip" if t["devices_per_chip"] > 1 else ""
    lines.append(f"target: {t['name']} = topology {t['topology']}: {t['devices']} x "
                 f"{t['device_kind']}{per_chip}, {t['hosts']} host(s); {_mb(limit)} memory per "
                 f"device ({t['memory_source']}); compiled ahead of time with jax {t['jax']}"
                 + (f", libtpu {t['libtpu']}" if t["libtpu"] else ""))
    if "train" in rep:
        r = rep["train"]
        lines.append(f"train step ({r['steps_per_call']} step(s) per call, global batch "
                     f"{r['global_batch']}: {r['rows_per_device']} rows per device, "
                     f"{r['rows_per_host']} per host): compiled in {r['compile_s']:.1f} s")
        lines += _memory_lines(r, limit)
        e = rep["train_estimate"]
        est = f"  FLOPs per optimiser step {e['flops_per_step']:.4g} (analytic, flops.py)"
        if t["peak_flops_per_device"]:
            peak = t["peak_flops_per_device"] * t["devices_per_chip"] / 1e12
            est += (f"; ESTIMATED at the chip's peak {peak:g} TFLOP/s bf16: step "
                    + ", ".join(f"{_hours(e[f'step_s@{m:g}'] / 3600)} at {m:.0%} MFU" for m in MFUS)
                    + f"; {e['total_steps']:,} steps "
                    + " / ".join(_hours(e[f"run_h@{m:g}"]) for m in MFUS))
        lines.append(est)
        lines += _options_lines(rep, t)
        if "train_max" in rep:
            lines.append(_max_line("largest global training batch that fits", rep["train_max"],
                                   t["devices"]))
    if "eval" in rep:
        r = rep["eval"]
        lines.append(f"evaluation, batched loop (depth {r['depth']}, breadth {r['breadth']}, "
                     f"batch {r['batch']}, {r['copies_per_call']} copies per call = "
                     f"{r['rows_per_call']} rows, {r['rows_per_device']} per device, noise "
                     f"{r['noise']:g}, halt {r['halt']}): compiled in {r['compile_s']:.1f} s")
        lines += _memory_lines(r, limit)
        same = ("the same program (the depth is a traced loop bound: memory does not grow "
                "with depth)" if r["same_program_at_depths"] else "DIFFERENT programs")
        lines.append(f"  depth {DEPTH_CHECK[0]} vs {DEPTH_CHECK[1]}: {same}")
        e = rep["eval_estimate"]
        if t["peak_flops_per_device"]:
            lines.append(f"  ESTIMATED evaluation time per 1,000 puzzles (depth {r['depth']} x "
                         f"breadth {r['breadth']}, {e['flops_per_puzzle']:.4g} FLOP per "
                         "puzzle): " + ", ".join(f"{_hours(e[f'h_per_1000@{m:g}'])} at "
                                                 f"{m:.0%} MFU" for m in MFUS))
        if "eval_max" in rep:
            m = rep["eval_max"]
            what = (f"largest copies per call that fit at batch {m['batch']}"
                    if m["what"] == "copies" else "largest evaluation batch that fits")
            lines.append(_max_line(what, m, 1 if m["what"] == "copies" else t["devices"])
                         + f" = {m['largest_rows']:,} rows per call")
    if "stream" in rep:
        r = rep["stream"]
        lines.append(f"evaluation, streaming pool ({r['slots']} slots, {r['slots_per_device']} "
                     f"per device, depth {r['depth']}): compiled in {r['compile_s']:.1f} s")
        lines += _memory_lines(r, limit)
    lines.append(f"peak_bytes_per_chip: {rep['peak_bytes_per_chip']}")
    lines.append(f"fits: {'yes' if rep['fits'] else 'no'}")
    if "memory_options" in rep:
        lines.append(cheapest_line(rep))
    return "\n".join(lines)


def _step_estimate(r: dict, t: dict) -> str:
    if not t["peak_flops_per_device"]:
        return ""
    return "; ESTIMATED step " + ", ".join(
        f"{_hours(r[f'step_s@{m:g}'] / 3600)} at {m:.0%} MFU" for m in MFUS)


def _options_lines(rep: dict, t: dict) -> list[str]:
    if "memory_options" not in rep:
        return []
    G = rep["train"]["global_batch"]
    lines = [f"  memory options for the train step at global batch {G} (each compiled; "
             "rematerialisation recomputes the forward of the blocks on the gradient tape, "
             "counted in the FLOPs):"]
    for r in rep["memory_options"]:
        share = r["extra_flops"] / (r["flops_per_step"] - r["extra_flops"])
        extra = f" (+{r['extra_flops']:.4g}, +{share:.0%})" if r["extra_flops"] else ""
        lines.append(f"    {r['name']}: {_mb(r['bytes_per_chip'])} per chip, fits: "
                     f"{'yes' if r['fits'] else 'no'}; FLOPs per step {r['flops_per_step']:.4g}"
                     f"{extra}{_step_estimate(r, t)}")
    return lines


def cheapest_line(rep: dict[str, Any]) -> str:
    """``cheapest configuration that fits at global batch G: NAME (...)``, or the line saying
    that none of the memory options fits."""
    G = rep["train"]["global_batch"]
    name = rep.get("cheapest_fit")
    if name is None:
        tried = ", ".join(r["name"] for r in rep["memory_options"])
        return (f"no configuration tried fits at global batch {G} (tried: {tried}); use "
                "--max-batch for the largest batch that fits, or more chips")
    r = next(r for r in rep["memory_options"] if r["name"] == name)
    extra = (f"+{r['extra_flops'] / (r['flops_per_step'] - r['extra_flops']):.0%} FLOPs"
             if r["extra_flops"] else "no extra FLOPs")
    return (f"cheapest configuration that fits at global batch {G}: {name} "
            f"({_mb(r['bytes_per_chip'])} per chip, {extra}{_step_estimate(r, rep['target'])})")


def _max_line(what: str, m: dict, unit: int) -> str:
    tried = ", ".join(f"{s}{'' if ok else ' (no)'}" for s, ok, _ in m["compiles"])
    if not m["largest"]:
        return f"  {what}: none of the sizes tried fits (compiled: {tried})"
    if m["exact"]:
        bracket = ""
    elif m["smallest_failing"] is None:
        bracket = "; no larger size tried (the cap: the breadth, or --max-compiles)"
    else:
        bracket = (f"; not bracketed to {unit}: the smallest that failed is "
                   f"{m['smallest_failing']:,} (more --max-compiles narrow it)")
    return (f"  {what}: {m['largest']:,} ({_mb(m['total'])} per device){bracket} "
            f"(compiled: {tried})")
