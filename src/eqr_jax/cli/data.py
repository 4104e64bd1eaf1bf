"""`eqr data sudoku|maze`: build or import datasets in the reference on-disk format.

Examples::

    eqr data sudoku --out data/sudoku9 --size 9 --train 1000 --test 1000 --num-aug 1000
    eqr data sudoku --out data/sudoku-extreme-1k --source csv path/to/sudoku-extreme --seed 42
    eqr data sudoku --out data/sudoku4 --size 4 --train 2000 --test 200 --num-aug 8 --difficulty any
    eqr data maze --out data/maze30 --grid 30 --train 1000 --test 1000

Also ``python -m eqr_jax.data.build sudoku ...``.
"""

from __future__ import annotations

import argparse
import sys

from eqr_jax.cli import common
from eqr_jax.data.build import REFERENCE_SEED, build_maze_dataset, build_sudoku_dataset
from eqr_jax.data.generate import DIFFICULTIES
from eqr_jax.data.importers import ValidationError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqr data", description="Build or import puzzle datasets.")
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("sudoku", help="Sudoku (generated or Sudoku-Extreme CSV/hub)")
    s.add_argument("--out", required=True, help="output dataset folder")
    s.add_argument("--source", nargs="+", default=["generate"], metavar="SRC",
                   help="generate | csv DIR | hub (default generate)")
    s.add_argument("--size", type=int, default=9, help="board side: 4, 6, 9, ... (default 9)")
    s.add_argument("--train", type=int, default=None, help="train puzzles (default 1000; csv: subsample)")
    s.add_argument("--test", type=int, default=None, help="test puzzles (default 1000; csv: all rows)")
    s.add_argument("--num-aug", type=int, default=1000, help="augmentations per train puzzle")
    s.add_argument("--seed", type=int, default=None,
                   help="default 42 for csv/hub (the reference's subsample), 0 for generate")
    s.add_argument("--difficulty", choices=DIFFICULTIES, default=None,
                   help="hard: local search for high ratings (default for 9x9); any: random minimal")
    s.add_argument("--iters", type=int, default=None, help="local-search moves per puzzle (hard)")
    s.add_argument("--patience", type=int, default=None,
                   help="stop a puzzle's search after this many moves without improvement (hard)")
    s.add_argument("--min-rating", type=float, default=None, help="keep puzzles rated at least this")
    s.add_argument("--distinct", choices=("canonical", "exact", "none"), default=None,
                   help="puzzle distinctness across and within splits (default canonical for n >= 6)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--skip-invalid", action="store_true", help="skip and count invalid CSV rows")
    s.add_argument("--no-check-unique", action="store_true", help="skip the uniqueness check on import")
    s.add_argument("--no-progress", action="store_true")
    m = sub.add_parser("maze", help="Maze-Unique")
    m.add_argument("--out", required=True)
    m.add_argument("--grid", type=int, default=30)
    m.add_argument("--train", type=int, default=1000)
    m.add_argument("--test", type=int, default=1000)
    m.add_argument("--min-len", type=int, default=100)
    m.add_argument("--max-len", type=int, default=140)
    m.add_argument("--seed", type=int, default=REFERENCE_SEED, help="default 42 (the reference's)")
    m.add_argument("--maze-mode", choices=("perfect", "random"), default="perfect")
    m.add_argument("--wall-prob", type=float, default=0.37)
    m.add_argument("--no-require-unique", action="store_true")
    m.add_argument("--no-dedupe", action="store_true")
    m.add_argument("--num-aug", type=int, default=0, help="dihedral copies per train maze (0..7)")
    m.add_argument("--max-length-resamples", type=int, default=50)
    m.add_argument("--max-grid-attempts", type=int, default=200)
    m.add_argument("--max-start-attempts", type=int, default=200)
    m.add_argument("--no-strict", action="store_true", help="resample lengths instead of failing")
    m.add_argument("--no-verify", action="store_true")
    m.add_argument("--no-progress", action="store_true")
    for sp in (s, m):
        common.add_debug_option(sp)
    return p


@common.guarded("eqr data")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("train", "test", "num_aug"):
        value = getattr(args, name)
        least = 0 if name == "num_aug" else 1
        if value is not None and value < least:
            return common.fail("eqr data", f"--{name.replace('_', '-')} must be >= {least}, "
                               f"got {value}")
    print(f"[eqr data] writing to {args.out}", flush=True)
    try:
        if args.kind == "sudoku":
            src = args.source
            if src[0] == "csv" and len(src) == 2:
                source, csv_dir = "csv", src[1]
            elif src in (["generate"], ["hub"]):
                source, csv_dir = src[0], None
            else:
                return common.fail("eqr data", f"bad --source {' '.join(src)} (generate | csv DIR | hub)")
            train = args.train if args.train is not None else (1000 if source == "generate" else None)
            test = args.test if args.test is not None else (1000 if source == "generate" else None)
            if source != "generate" and args.train is None:
                train = 1000  # the published preset subsamples 1000 training puzzles
            build_sudoku_dataset(args.out, size=args.size, train=train, test=test,
                                 num_aug=args.num_aug, seed=args.seed, source=source, csv_dir=csv_dir,
                                 min_rating=args.min_rating, workers=args.workers,
                                 progress=not args.no_progress, difficulty=args.difficulty,
                                 iters=args.iters, patience=args.patience, distinct=args.distinct,
                                 skip_invalid=args.skip_invalid, check_unique=not args.no_check_unique)
        else:
            build_maze_dataset(args.out, grid=args.grid, train=args.train, test=args.test,
                               min_len=args.min_len, max_len=args.max_len, seed=args.seed,
                               maze_mode=args.maze_mode, wall_prob=args.wall_prob,
                               require_unique=not args.no_require_unique, dedupe=not args.no_dedupe,
                               num_aug=args.num_aug, max_length_resamples=args.max_length_resamples,
                               max_grid_attempts=args.max_grid_attempts,
                               max_start_attempts=args.max_start_attempts, strict=not args.no_strict,
                               verify=not args.no_verify, progress=not args.no_progress)
    except (ValidationError, FileNotFoundError, ValueError) as e:
        # bad input (options, CSV rows, an output name): one clear line, not a traceback
        return common.fail("eqr data", e)
    except RuntimeError as e:  # the recipe cannot be met (e.g. too few distinct puzzles)
        return common.fail("eqr data", f"error: {e}", status=common.EXIT_FAILURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
