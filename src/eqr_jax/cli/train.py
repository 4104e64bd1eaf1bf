"""`eqr train`: train a preset (with ``section.key=value`` overrides).

    eqr train --preset tiny                         # builds small data if missing, trains on CPU
    eqr train --preset sudoku --dry-run             # the plan only: ... total_steps: 50000
    eqr train --preset sudoku --data DIR train.lr=3e-4 --resume
    eqr train --preset tiny --resume train.max_steps=700   # train a finished run longer
    eqr train --preset tiny --init-from runs/tiny --out runs/ft   # fine-tune from its weights

Builds ``data.path`` from the preset's ``data.build_*`` recipe when it is missing and it is the
preset's own folder (or ``--build`` is given) (`eqr_jax.data.prepare`), checks both splits
against the model, then runs `eqr_jax.training.train`. The last line is
``exact_accuracy: <fraction>``, the final evaluation's ``all/exact_accuracy``
(``eqr eval --checkpoint OUT --breadth 1`` reproduces it).
"""

from __future__ import annotations

import argparse
import sys

from eqr_jax import config as config_lib
from eqr_jax import storage
from eqr_jax.cli import common

PROG = "eqr train"

EPILOG = common.OVERRIDES_HELP + """

Exit status: 0 done; 1 the run failed (non-finite loss, hub unreachable); 2 bad input (options,
config values, paths, data, checkpoints); 75 preempted by SIGTERM after saving a checkpoint at
the next step boundary (run the same command with --resume); 130 Ctrl-C."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Train EqR (presets: " + ", ".join(config_lib.PRESETS) + ")",
        epilog=EPILOG)
    common.add_config_options(p)
    p.add_argument("--data", help="dataset directory (default: the preset's data.path, built "
                   "there from data.build_* when missing)")
    p.add_argument("--build", action="store_true",
                   help="build --data from the data.build_* recipe when it does not exist (the "
                        "preset's own data folder is built without it)")
    p.add_argument("--out", help="run directory (config, TensorBoard logs, checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint that restores (a damaged one is "
                        "reported and skipped); with no checkpoint yet, start at step 0 with a "
                        "warning")
    p.add_argument("--resume-step", type=int, metavar="N",
                   help="continue from the checkpoint of step N (implies --resume)")
    p.add_argument("--init-from", metavar="SOURCE",
                   help="start a new run from existing weights: a run directory (or its "
                        "checkpoints/ or one step directory) or an official .pth; parameters "
                        "and EMA start there, optimiser, schedule and step start fresh "
                        "(train.init_from)")
    p.add_argument("--init-step", type=int, metavar="N",
                   help="with --init-from RUN: the checkpoint of step N (default: the newest)")
    p.add_argument("--init-weights", choices=("ema", "raw"),
                   help="with --init-from: start from the EMA (default) or the raw weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The profiler window (train.profile, train.profile_all_processes).
    p.add_argument("--profile", metavar="START[:CALLS]",
                   help="trace CALLS jitted calls (default 1) from optimiser step START with "
                        "jax.profiler into OUT/tb/plugins/profile (TensorBoard's profile "
                        "plugin / XProf); process 0 only (train.profile)")
    p.add_argument("--profile-all-processes", action="store_true",
                   help="with --profile: every process writes its own trace")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, FLOPs, data, steps, schedule, devices) and "
                        "exit without building data, training or writing anything")
    from eqr_jax.cli.plan import add_target_options
    add_target_options(p)
    common.add_compile_cache_option(p)
    common.add_distributed_options(p)
    common.add_debug_option(p)
    return p


def _listing(directory) -> list:
    return list(directory.iterdir()) if directory.is_dir() else []


def _initial_weights(cfg):
    """The ``--init-from`` weights, loaded and fitted to the model once (a `WarmStart` that
    `eqr_jax.startup.start_run` starts from as they are)."""
    import jax

    from eqr_jax.warm_start import initial_params

    warm = initial_params(cfg)
    if jax.process_index() == 0:
        print(f"[eqr train] initial weights: {warm.source}", flush=True)
    return warm


@common.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    # Intermixed: overrides may come before or after options (`... train.lr=1e-3 --resume`).
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    cfg = common.config_from_args(args, **{
        "data.path": args.data, "train.out_dir": args.out,
        # Absolute, so that config.json records where the run started from wherever it is read.
        "train.init_from": args.init_from and str(storage.absolute(args.init_from,
                                                                   name="--init-from")),
        "train.init_step": args.init_step, "train.init_weights": args.init_weights,
        "train.profile": args.profile,
        "train.profile_all_processes": args.profile_all_processes or None})
    if (args.init_step is not None or args.init_weights) and not cfg.train.init_from:
        raise config_lib.ConfigError("--init-step and --init-weights apply to --init-from")
    if args.show_config:
        print("\n".join(common.config_lines(cfg)))
        return 0
    if args.resume_step is not None and args.resume_step < 1:
        raise config_lib.ConfigError(f"--resume-step must be >= 1, got {args.resume_step}")
    if args.target and not args.dry_run:
        raise config_lib.ConfigError("--target applies to --dry-run (a plan for another "
                                     "machine)")
    if args.target:
        from eqr_jax.cli.plan import prepare_target, run_target_plan
        target = prepare_target(sys.argv[1:] if argv is None else argv)
    common.init_distributed(args, PROG)
    import jax

    if jax.process_count() > 1 and not args.dry_run:
        from eqr_jax.shared_storage import check_shared_storage

        # Before anything below reads or writes them: separate disks would otherwise hang the
        # run at its first checkpoint, or split it on which data exists.
        check_shared_storage(cfg.train.out_dir, cfg.data.path, cfg.train.init_from)
    from eqr_jax.data import prepare
    from eqr_jax.preemption import Preempted
    from eqr_jax.training import train

    data_exists = prepare.check_data_path(cfg, config_lib.preset(args.preset).data.path,
                                          build=args.build)
    # Loaded before any data is built, so a missing or misfitting source is reported at once;
    # not when a --resume will restore a checkpoint instead (the source may be gone by then).
    resuming = (args.resume or args.resume_step is not None) and any(
        p.name.isdigit() for p in _listing(storage.path(cfg.train.out_dir) / "checkpoints"))
    init_params = (_initial_weights(cfg) if cfg.train.init_from and not args.dry_run
                   and not resuming else None)
    if args.dry_run and args.target:
        return run_target_plan(cfg, target, args)
    if args.dry_run:
        from eqr_jax.plan import format_plan, plan
        print(format_plan(plan(cfg)), flush=True)
        return 0
    common.enable_compile_cache(args)
    pi, pc = jax.process_index(), jax.process_count()
    out = common.check_writable(cfg.train.out_dir, "--out")
    if pi == 0:
        print(f"[eqr train] writing to {out} (config.json, tb/, checkpoints/)"
              + (f"; {pc} processes, {jax.device_count()} devices" if pc > 1 else ""),
              flush=True)
    if not data_exists:
        prepare.ensure_dataset(cfg, progress=not args.no_progress, process_index=pi,
                               process_count=pc)
    splits = prepare.check_dataset(cfg, process_count=pc)
    loaders = prepare.make_loaders(cfg, pi, pc, splits=splits)
    try:
        _, result = train(cfg, loaders, resume=args.resume, resume_step=args.resume_step,
                          init_params=init_params, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("[eqr] stopped; resume with --resume", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except Preempted as e:
        print(f"[eqr] {e}", file=sys.stderr, flush=True)
        return common.EXIT_PREEMPTED
    if "all/exact_accuracy" in result:
        print(common.exact_accuracy_line(result["all/exact_accuracy"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
