"""`eqr plan`: will this run fit, and how long will it take, on a machine you do not have?

    eqr plan --preset sudoku --target v5e-8
    eqr plan --preset maze --target v4-8 --max-batch
    eqr plan --preset sudoku --target v5e-64 data.global_batch_size=1536 --depth 64 --breadth 128

Prints `eqr train --dry-run`'s plan, then compiles ahead of time, for the target's devices and
without them, the programs the run executes: the train step `eqr train` runs (its shardings,
donation, steps per call and dtype, over the mesh of every host of the slice), the batched
depth x breadth evaluation loop and the streaming slot pool. For each: memory per device
(arguments, outputs, aliased, temporaries, code, total, HBM, headroom), the collectives, the
compile time; analytic FLOPs and ESTIMATED step / run times at 30% and 50% of the chip's peak.
``--max-batch`` searches the largest training batch and evaluation copies per call that fit
by compiling. When the train step does not fit (or with ``--max-batch``) it is also compiled
with each memory switch of the model (per-block rematerialisation, ``model.remat_blocks``;
with the full gradient ``train.remat``), each reported with its memory, ``fits`` and the
extra FLOPs the recomputation costs. The last lines are ``peak_bytes_per_chip: <int>`` and
``fits: yes|no`` (the configuration as given), then, when options were compiled, ``cheapest
configuration that fits at global batch G: ...``; a program that does not fit is reported
(exit 0), not an error. TPU targets need libtpu
(``pip install -e ".[tpu]"``); docs/accelerators.md has the numbers for the presets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from eqr_jax import config as config_lib
from eqr_jax.cli import common

PROG = "eqr plan"


def add_target_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    """``--target`` and the options of the ahead-of-time plan (`eqr_jax.target_plan`)."""
    g = p.add_argument_group("ahead-of-time plan for a target (docs/accelerators.md)")
    g.add_argument("--target", required=required,
                   help="TPU slice (v4-8, v5e-8, v5p-8, v6e-8, v5e-64, ...), topology "
                   "(v5e:2x4) or cpu:N; compiles the run's programs for it (needs libtpu: "
                   "pip install -e \".[tpu]\")")
    g.add_argument("--max-batch", action="store_true",
                   help="also find the largest training batch and evaluation copies per call "
                   "that fit (by compiling: a few compilations each)")
    g.add_argument("--max-compiles", type=int, default=6, metavar="N",
                   help="compilations per --max-batch search (default 6)")
    g.add_argument("--eval-batch", type=int, metavar="B",
                   help="puzzles per evaluation batch (default: data.eval_batch_size)")
    g.add_argument("--no-train", action="store_true", help="skip the train step")
    g.add_argument("--no-eval", action="store_true", help="skip the batched evaluation loop")
    g.add_argument("--no-stream", action="store_true", help="skip the streaming pool")
    g.add_argument("--json", metavar="FILE",
                   help="also write the report as JSON (a path or gs:// URL)")


def prepare_target(argv: list[str]):
    """Parse ``--target`` from raw ``argv`` before JAX starts: a ``cpu:N`` target needs N host
    devices, which XLA creates only at start-up. Returns the `Target` or None."""
    from eqr_jax.targets import parse_target

    text = None
    for i, a in enumerate(argv):
        if a == "--target" and i + 1 < len(argv):
            text = argv[i + 1]
        elif a.startswith("--target="):
            text = a.split("=", 1)[1]
    if text is None:
        return None
    target = parse_target(text)
    if "jax" not in sys.modules:
        # The programs are only compiled: a plan on a TPU VM must not take its chips from a run.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if target.platform == "cpu":
            flag = f"--xla_force_host_platform_device_count={target.cpu_devices}"
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    return target


def run_target_plan(cfg, target, args, *, train: bool = True, evaluate: bool = True,
                    eval_cfg=None, depth=None, breadth=None) -> int:
    """Print the target plan of ``cfg`` (and write ``--json``); shared by ``eqr plan``,
    ``eqr train --dry-run --target`` and ``eqr eval --dry-run --target``."""
    from eqr_jax.target_plan import format_report, run_plan

    for name in ("eval_batch", "max_compiles"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise config_lib.ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    rep = run_plan(cfg, target, train=train and not args.no_train,
                   evaluate=evaluate and not args.no_eval, stream=not args.no_stream,
                   eval_cfg=eval_cfg, depth=depth, breadth=breadth, eval_batch=args.eval_batch,
                   max_batch=args.max_batch, max_compiles=args.max_compiles,
                   verbose=args.debug)
    if args.json:  # a local file or a gs:// URL, written whole
        from eqr_jax import storage
        storage.write_text(storage.path(args.json, name="--json"),
                           json.dumps(rep, indent=1, default=str))
    print(format_report(rep), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog=common.OVERRIDES_HELP + "\n\nExit status: 0 planned "
                                "(whether or not it fits); 2 bad input (target, options, "
                                "config values, libtpu missing).")
    common.add_config_options(p)
    p.add_argument("--data", help="dataset directory whose metadata the plan reads (default: "
                   "the preset's; its build recipe when missing)")
    p.add_argument("--depth", type=int, help="evaluation depth (default: the config's)")
    p.add_argument("--breadth", type=int, help="evaluation breadth (default: the config's)")
    p.add_argument("--noise", type=float, help="test-time noise (default: the config's)")
    add_target_options(p, required=True)
    common.add_debug_option(p)
    return p


@common.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_intermixed_args(argv)
    cfg = common.config_from_args(args, **{"data.path": args.data})
    if args.show_config:
        print("\n".join(common.config_lines(cfg)))
        return 0
    for name in ("depth", "breadth"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise config_lib.ConfigError(f"--{name} must be >= 1, got {v}")
    target = prepare_target(argv)
    eval_cfg = cfg.eval
    if args.noise is not None:
        import dataclasses

        eval_cfg = dataclasses.replace(eval_cfg, noise_scale=args.noise)
    return run_target_plan(cfg, target, args, eval_cfg=eval_cfg, depth=args.depth,
                           breadth=args.breadth)


if __name__ == "__main__":
    sys.exit(main())
