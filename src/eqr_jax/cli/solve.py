"""`eqr solve`: solve Sudoku puzzles given on the command line or in a file.

    eqr solve --checkpoint runs/sudoku 53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79
    eqr solve --checkpoint runs/sudoku --puzzles puzzles.txt --depth 64 --breadth 8
    eqr solve --checkpoint runs/tiny --puzzles p.txt --trajectory traj.gif
    eqr solve --reference eqr.pth --noise 0.5 --depth 64 --breadth 16 --puzzles puzzles.txt

A puzzle is n*n characters for an n x n board (81 for 9x9, 16 for 4x4, 36 for 6x6, ...): digits
1..n (A..G for 10..16), with '.' or '0' for blanks. In a file, each non-empty line (not starting
with '#') holds one puzzle, optionally followed by whitespace and its full solution. Malformed
puzzles (wrong length, bad characters, contradictory givens, a solution that breaks the rules or
the givens, a board size the model was not trained for) are reported with their line number and
make the command exit with status 2, unless ``--skip-invalid`` is given.

For each puzzle it prints the predicted grid, whether it satisfies the rules (and the givens),
the steps used and the final latent residual; with solutions, the last line is
``exact_accuracy: <fraction>``.
"""

from __future__ import annotations

import argparse
import math
import sys

from eqr_jax.cli import common
from eqr_jax.solve import PuzzleError, parse_line, read_puzzles

PROG = "eqr solve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_options(p)
    common.add_eval_options(p, "reasoning steps (default: the config's eval.depth)",
                            "random initialisations per puzzle (default 1)", depth_type=int,
                            breadth_type=int)
    p.add_argument("--data", help="with --reference: a dataset directory whose metadata gives "
                   "seq_len / vocab_size")
    p.add_argument("puzzle", nargs="?", help="one puzzle string (or use --puzzles FILE)")
    p.add_argument("--puzzles", help="file with one puzzle per line, optional solution after it")
    p.add_argument("--select", choices=("convergence", "majority", "valid"),
                   default="convergence", help="which of the breadth copies to report")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-invalid", action="store_true",
                   help="report bad lines but solve the others (exit status 0)")
    p.add_argument("--trajectory", help="render the first puzzle's predictions over steps: "
                   "a .gif, or .png for numbered frames")
    p.add_argument("--quiet", action="store_true", help="only the summary lines")
    common.add_debug_option(p)
    return p


@common.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if (args.puzzle is None) == (args.puzzles is None):
        return common.fail(PROG, "give exactly one of a puzzle string or --puzzles FILE")
    for name in ("depth", "breadth", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return common.fail(PROG, f"--{name.replace('_', '-')} must be >= 1")
    try:
        if args.puzzles:
            from eqr_jax import storage

            text = storage.read_text(storage.path(args.puzzles, name="--puzzles"))
            puzzles, errors = read_puzzles(text.splitlines(), args.skip_invalid)
        else:
            puzzles, errors = [parse_line(args.puzzle.strip(), 0)], []
    except OSError as e:
        return common.fail(PROG, f"cannot read {args.puzzles}: {e.strerror}")
    except PuzzleError as e:
        return common.fail(PROG, e)
    try:
        cfg, model, params = common.load_model(args)
        eval_cfg = common.eval_config_from_args(cfg.eval, args)
    except common.load_errors() as e:
        return common.fail(PROG, e)
    n_model = math.isqrt(cfg.model.seq_len)
    keep = []
    for p in puzzles:
        if p.grid.size != cfg.model.seq_len:
            where = f"line {p.line}: " if p.line else ""
            errors.append(f"{where}a {p.grid.shape[0]}x{p.grid.shape[0]} puzzle, but the model "
                          f"solves {n_model}x{n_model} boards (seq_len {cfg.model.seq_len})")
        else:
            keep.append(p)
    if errors:
        common.fail(PROG, "\n".join(errors))
        if not args.skip_invalid:
            return 2
    if not keep:
        return common.fail(PROG, "no valid puzzles to solve")
    return _solve(args, cfg, model, params, eval_cfg, keep)


def _solve(args, cfg, model, params, eval_cfg, keep) -> int:
    from eqr_jax.data.sudoku import format_grid
    from eqr_jax.evaluation import Evaluator
    from eqr_jax.solve import solve_puzzles, trajectory

    evaluator = Evaluator(model, eval_cfg)
    depth = args.depth or evaluator.depth
    breadth = args.breadth or 1
    results = solve_puzzles(evaluator, params, keep, depth=depth, breadth=breadth,
                            select=args.select, batch_size=args.batch_size)
    for i, (p, r) in enumerate(zip(keep, results), start=1):
        where = f" (line {p.line})" if p.line else ""
        status = f"valid: {'yes' if r.valid else 'no'}"
        if r.correct is not None:
            status += f", correct: {'yes' if r.correct else 'no'}"
        if not args.quiet:
            print(f"puzzle {i}{where}: steps {r.steps}, residual {r.residual:.3e}, {status}"
                  + (f", copy {r.copy}" if breadth > 1 else ""))
            print(format_grid(r.grid, pretty=True))
            print()
    if args.trajectory:
        from eqr_jax.analysis import save_trajectory
        steps, grids = trajectory(evaluator, params, keep, depth=depth,
                                  batch_size=args.batch_size, copy=results[0].copy)
        for path in save_trajectory(grids, args.trajectory, givens=keep[0].grid,
                                    solution=keep[0].solution, steps=steps)[:1]:
            print(f"wrote {path}" + (f" (+{len(steps) - 1} more frames)"
                                     if not path.endswith(".gif") else ""))
    valid = sum(r.valid for r in results)
    print(f"valid: {valid}/{len(results)}")
    scored = [r.correct for r in results if r.correct is not None]
    if scored:
        print(common.exact_accuracy_line(sum(scored) / len(scored)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
