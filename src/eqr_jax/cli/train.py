"""`eqr train`: train a preset (with ``section.key=value`` overrides).

    eqr train --preset tiny                         # builds small data if missing, trains on CPU
    eqr train --preset sudoku --dry-run             # the plan only: ... total_steps: 50000
    eqr train --preset sudoku --data DIR train.lr=3e-4 --resume

Builds ``data.path`` from the preset's ``data.build_*`` recipe when it is missing
(`eqr_jax.data.prepare`), checks it against the model, then runs `eqr_jax.training.train`. The
last line is ``exact_accuracy: <fraction>``, the final evaluation's ``all/exact_accuracy``
(``eqr eval --checkpoint OUT --breadth 1`` reproduces it).
"""

from __future__ import annotations

import argparse
import sys

from eqr_jax import config as config_lib
from eqr_jax.cli import common

PROG = "eqr train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Train EqR (presets: " + ", ".join(config_lib.PRESETS) + ")")
    common.add_config_options(p)
    p.add_argument("--data", help="dataset directory (built with data.build_* if missing)")
    p.add_argument("--out", help="run directory (config, TensorBoard logs, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, FLOPs, data, steps, schedule, devices) and "
                        "exit without building data, training or writing anything")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = common.config_from_args(args, **{"data.path": args.data,
                                               "train.out_dir": args.out})
    except config_lib.ConfigError as e:
        return common.fail(PROG, e)
    import jax

    from eqr_jax.data import prepare
    from eqr_jax.data.format import DataFormatError
    from eqr_jax.data.importers import HubUnavailableError
    from eqr_jax.sharding import maybe_initialize_distributed
    from eqr_jax.training import NonFiniteError, train

    maybe_initialize_distributed()
    try:
        if args.dry_run:
            from eqr_jax.plan import format_plan, plan
            print(format_plan(plan(cfg)), flush=True)
            return 0
        prepare.ensure_dataset(cfg, progress=not args.no_progress,
                               process_index=jax.process_index())
        prepare.check_matches_model(cfg)
        loaders = prepare.make_loaders(cfg, jax.process_index(), jax.process_count())
        _, result = train(cfg, loaders, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("[eqr] stopped; resume with --resume", file=sys.stderr)
        return 130
    except config_lib.ConfigError as e:
        return common.fail(PROG, e)
    except (NonFiniteError, HubUnavailableError, DataFormatError) as e:
        return common.fail(PROG, f"error: {e}", status=1)
    if "all/exact_accuracy" in result:
        print(common.exact_accuracy_line(result["all/exact_accuracy"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
