"""`eqr eval`: evaluate a checkpoint over a depth x breadth grid.

    eqr eval --checkpoint runs/tiny --data data/sudoku4-tiny --depth 4,16,64 --breadth 1,8
    eqr eval --checkpoint runs/sudoku --depth 16,64,256 --breadth 1,8,64 --halt convergence
    eqr eval --reference eqr.pth --data data/sudoku-extreme-1k-aug-1000 --depth 64 --noise 0.5
    eqr eval --checkpoint runs/sudoku --depth 1024 --halt convergence --stream

Prints a depth x breadth table of exact accuracy (and of majority vote, convergence top-k,
any-correct and mean steps used), writes ``results.json`` and ``results.csv`` and, unless
``--no-plots``, ``accuracy_vs_depth.png``, ``residual_vs_step.png`` and ``steps_histogram.png``
into ``--out`` (default ``<checkpoint>/eval``, or ``<reference>-eval`` beside a ``.pth``; a
``gs://`` URL writes each file as one object).
``--reference`` runs an official PyTorch checkpoint directly (read safely, without torch; see
``eqr convert`` to convert it once). Batches are split over all devices. ``--stream`` runs a
pool of slots that hands a halted job's slot to the next (puzzle, copy) job at once (the same
per-job results; less idle work when rows halt at different steps).

It is the evaluator training runs: with the checkpoint's own settings (no flags, or
``--breadth 1``) it reproduces the ``all/exact_accuracy`` training logged for that step. The
last line is ``exact_accuracy: <fraction>`` of the last setting of the grid (the last depth at
the last breadth listed).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Iterable, Sequence

from eqr_jax import config as config_lib
from eqr_jax.cli import common
from eqr_jax.config import EvalConfig


def run(model, params, batches: Iterable, eval_cfg: EvalConfig, depths: Sequence[int] | None,
        breadths: Sequence[int] | None, out_dir: str | None = None, plots: bool = True,
        progress: bool = False, profile_dir: str | None = None) -> dict[str, Any]:
    """Evaluate, print the tables and the ``exact_accuracy:`` line, write the files; returns
    the results dict of `eqr_jax.evaluation.Evaluator.evaluate`. ``profile_dir``: trace one
    batch into it (`eqr_jax.profiling.profile_batches`; process 0 only)."""
    from eqr_jax.evaluation import Evaluator
    from eqr_jax.reporting import eval_report, write_results

    import jax

    if profile_dir:
        from eqr_jax.profiling import profile_batches
        batches = profile_batches(batches, profile_dir, enabled=jax.process_index() == 0)
    results = Evaluator(model, eval_cfg).evaluate(params, batches, depths=depths,
                                                  breadths=breadths, progress=progress)
    if not results["settings"]:
        raise ValueError("the evaluation data holds no batches")
    print(eval_report(results), flush=True)
    warn_no_convergence(results, eval_cfg)
    from eqr_jax.perf import eval_lines  # puzzle-steps/s and TFLOP/s per setting
    for line in eval_lines(results):
        print(f"[eqr eval] {line}", flush=True)
    if out_dir and jax.process_index() == 0:  # every process holds the same gathered results
        for p in write_results(results, out_dir, plots):
            print(f"wrote {p}")
    print(common.exact_accuracy_line(results["settings"][-1]["metrics"]["all/exact_accuracy"]),
          flush=True)
    return results


def warn_no_convergence(results: dict[str, Any], eval_cfg: EvalConfig) -> None:
    """With ``--halt convergence``, say so when no row stopped before the depth cap: the
    per-step change under test-time noise may never fall below the tolerance, and the run then
    silently equals ``--halt fixed``."""
    if eval_cfg.halt != "convergence":
        return
    capped = [s for s in results["settings"] if s["metrics"].get("halting/compute_saved") == 0]
    if capped:
        depths = sorted({s["depth"] for s in capped})
        print(f"[eqr eval] warning: --halt convergence stopped no row before the depth cap "
              f"(depths {', '.join(map(str, depths))}; --tol {eval_cfg.convergence_tol:g} on the "
              f"{eval_cfg.convergence_metric} change, test-time noise "
              f"{capped[0]['noise_scale']:g}): under noise the change may never fall below "
              f"--tol; try a larger one (docs/evaluation.md, halting)", file=sys.stderr,
              flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqr eval", description=__doc__.split("\n\n")[0])
    common.add_model_options(p)
    common.add_eval_options(p, "depths, e.g. 16,64,256 (default: the config's eval.depth)",
                            "breadths, e.g. 1,8,64 (default: the config's eval.breadth)",
                            streaming=True)
    p.add_argument("--data", help="dataset directory (default: the checkpoint's data.path)")
    p.add_argument("--batch-size", type=int, help="puzzles per batch (default: eval batch size)")
    p.add_argument("--max-batches", type=int, help="evaluate only the first N batches")
    p.add_argument("--out", help="output directory or gs:// URL (default: <checkpoint>/eval)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="trace one evaluation batch (the second; the first compiles) with "
                        "jax.profiler into OUT/tb/plugins/profile (TensorBoard's profile "
                        "plugin / XProf); process 0 only")
    p.add_argument("--dry-run", action="store_true",
                   help="with --target: compile the evaluation programs for a target and "
                   "print their memory and estimated time (docs/accelerators.md); evaluates "
                   "nothing")
    p.add_argument("--preset", choices=sorted(config_lib.PRESETS),
                   help="with --dry-run: plan a preset's model instead of a checkpoint's")
    from eqr_jax.cli.plan import add_target_options
    add_target_options(p)
    common.add_compile_cache_option(p)
    common.add_distributed_options(p)
    common.add_debug_option(p)
    return p


@common.guarded("eqr eval")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("batch_size", "max_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return common.fail("eqr eval", f"--{name.replace('_', '-')} must be >= 1, got "
                               f"{getattr(args, name)}")
    if args.dry_run or args.target or args.preset:
        return _dry_run(args, sys.argv[1:] if argv is None else argv)
    common.init_distributed(args, "eqr eval")
    common.enable_compile_cache(args)
    cfg, model, params = common.load_model(args)
    eval_cfg = common.eval_config_from_args(cfg.eval, args)
    import jax

    from eqr_jax.data.bucket import dataset_dir
    from eqr_jax.data.loader import EvalLoader
    from eqr_jax.data.prepare import check_split_fits_model
    from eqr_jax.evaluation import with_eval_noise

    data = args.data or cfg.data.path
    if not data or not dataset_dir(data).is_dir():
        return common.fail("eqr eval", f"dataset directory {data!r} not found (pass --data DIR)")
    bs = args.batch_size or cfg.data.eval_batch
    if bs % jax.process_count():
        return common.fail("eqr eval", f"--batch-size {bs} is not divisible by the "
                           f"{jax.process_count()} processes")
    loader = EvalLoader(data, bs, process_index=jax.process_index(),
                        process_count=jax.process_count())
    check_split_fits_model(loader.split.meta, cfg.model, f"{data}/test")
    depths = args.depth or [eval_cfg.depth_for(cfg.model.halt_max_steps)]
    breadths = args.breadth or [eval_cfg.breadth]
    out = args.out or (os.path.join(args.checkpoint, "eval") if args.checkpoint else
                       os.path.splitext(args.reference)[0] + "-eval")
    if jax.process_index() == 0:
        out = str(common.check_writable(out))
        print(f"[eqr eval] writing to {out}", flush=True)
    noise = with_eval_noise(model, eval_cfg.noise_scale).cfg.noise_scale
    print(f"[eqr eval] {data}: batch {bs}, depths {depths}, breadths {breadths}, "
          f"halt={eval_cfg.halt}, solver={eval_cfg.solver}, noise={noise:g}, seed="
          f"{eval_cfg.seed}{', streaming' if eval_cfg.stream else ''}, "
          f"{jax.device_count()} device(s)", flush=True)
    try:
        run(model, params, loader, eval_cfg, depths, breadths, out, plots=not args.no_plots,
            progress=not args.no_progress,
            profile_dir=os.path.join(out, "tb") if args.profile else None)
    except ValueError as e:
        return common.fail("eqr eval", f"{data}: {e}")
    return 0


def _dry_run(args, argv: list[str]) -> int:
    """``--dry-run --target T``: the evaluation programs compiled for T (`eqr_jax.target_plan`)
    at the largest depth and breadth asked for."""
    if not (args.dry_run and args.target):
        raise config_lib.ConfigError("--dry-run, --target and --preset go together: "
                                     "eqr eval --dry-run --target T (--preset P | --checkpoint "
                                     "DIR | --reference FILE.pth)")
    from eqr_jax.cli.plan import prepare_target, run_target_plan

    target = prepare_target(argv)
    if args.preset:
        if args.checkpoint or args.reference:
            raise config_lib.ConfigError("give --preset or a model (--checkpoint/--reference), "
                                         "not both")
        cfg = config_lib.preset(args.preset)
    else:
        cfg = common.load_model(args)[0]
    if args.data:
        cfg = config_lib.apply_overrides(cfg, [f"data.path={args.data}"])
    eval_cfg = common.eval_config_from_args(cfg.eval, args)
    args.eval_batch = args.eval_batch or args.batch_size
    return run_target_plan(cfg, target, args, train=False, eval_cfg=eval_cfg,
                           depth=max(args.depth) if args.depth else None,
                           breadth=max(args.breadth) if args.breadth else None)


if __name__ == "__main__":
    sys.exit(main())
