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
from typing import NamedTuple, Sequence

import numpy as np

from eqr_jax.evaluation_cli import add_eval_options, eval_config_from_args

class PuzzleError(ValueError):
    """A puzzle line is malformed; the message starts with ``line N:`` when it has a line."""


class Puzzle(NamedTuple):
    line: int  # 1-based line number (0 for a puzzle given on the command line)
    grid: np.ndarray  # (n, n) int, 0 = blank
    solution: np.ndarray | None  # (n, n) int or None


def is_solution(puzzle: np.ndarray, grid: np.ndarray) -> bool:
    """Complete, obeys the rules, and keeps every given of ``puzzle``."""
    from eqr_jax.data.sudoku import is_valid_solution
    return bool(is_valid_solution(puzzle, grid))


def parse_line(text: str, line: int = 0) -> Puzzle:
    """One puzzle (and optional solution) from a line; raises `PuzzleError` with the line.

    Board parsing and the rules are the data module's (`eqr_jax.data.sudoku`): any n x n board
    with a box shape (4, 6, 8, 9, 12, 16, ...), '.', '0', '_' or '-' for blanks.
    """
    from eqr_jax.data.sudoku import PuzzleFormatError, check_givens, parse_grid

    where = f"line {line}: " if line else ""
    parts = text.split()
    try:
        if len(parts) not in (1, 2):
            raise PuzzleFormatError(f"expected a puzzle and an optional solution, got "
                                    f"{len(parts)} fields")
        try:
            grid = parse_grid(parts[0])
        except PuzzleFormatError as e:
            raise PuzzleFormatError(f"puzzle: {e}") from None
        clash = check_givens(grid)
        if clash:
            raise PuzzleFormatError(f"contradictory givens: {clash}")
        solution = None
        if len(parts) == 2:
            try:
                solution = parse_grid(parts[1], grid.shape[0])
            except PuzzleFormatError as e:
                raise PuzzleFormatError(f"solution: {e}") from None
            if np.any(solution == 0):
                raise PuzzleFormatError("solution has blanks")
            clash = check_givens(solution)
            if clash:
                raise PuzzleFormatError(f"solution breaks the rules: {clash}")
            if not is_solution(grid, solution):
                raise PuzzleFormatError("solution does not keep the puzzle's givens")
    except PuzzleFormatError as e:
        raise PuzzleError(f"{where}{e}") from None
    return Puzzle(line, grid, solution)


def read_puzzles(lines: Sequence[str], skip_invalid: bool = False
                 ) -> tuple[list[Puzzle], list[str]]:
    """Parse lines (1-based numbering; blank and '#' lines skipped) -> (puzzles, error messages).

    Raises `PuzzleError` listing every bad line unless ``skip_invalid``.
    """
    puzzles, errors = [], []
    for i, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            puzzles.append(parse_line(text, i))
        except PuzzleError as e:
            errors.append(str(e))
    if errors and not skip_invalid:
        raise PuzzleError("\n".join(errors))
    return puzzles, errors


def format_grid(grid: np.ndarray) -> str:
    """Boxed multi-line layout ('.' for blanks or non-digit predictions)."""
    from eqr_jax.data.sudoku import format_grid as fmt
    return fmt(np.asarray(grid), pretty=True)


def to_tokens(grids: np.ndarray) -> np.ndarray:
    """(P, n, n) digits (0 blank) -> (P, n*n) token ids: digit + 1, blank -> 1."""
    g = np.asarray(grids).reshape(len(grids), -1)
    return np.where(g > 0, g + 1, 1).astype(np.int32)


def from_tokens(tokens: np.ndarray, n: int) -> np.ndarray:
    """(P, n*n) predicted token ids -> (P, n, n) digits (0 for a non-digit token)."""
    t = np.asarray(tokens)
    d = np.where((t >= 2) & (t <= n + 1), t - 1, 0)
    return d.reshape(len(t), n, n)


class Solved(NamedTuple):
    grid: np.ndarray  # (n, n) predicted digits
    copy: int  # the chosen copy
    steps: int
    residual: float
    valid: bool  # complete, rules and givens respected
    correct: bool | None  # None without a solution


def solve_puzzles(model, params, puzzles: Sequence[Puzzle], eval_cfg, *, depth: int,
                  breadth: int, select: str = "convergence", batch_size: int = 64,
                  seed: int = 0) -> list[Solved]:
    """Run the model on ``puzzles`` (all of the model's board size) and pick one copy each.

    ``select``: ``convergence`` (lowest convergence score), ``majority`` (most frequent grid) or
    ``valid`` (first copy that is a valid solution, else the most converged one).
    """
    import jax

    from eqr_jax.evaluation import evaluate_batch, majority_vote

    n = puzzles[0].grid.shape[0]
    out: list[Solved] = []
    root = jax.random.PRNGKey(seed)
    for bi, s in enumerate(range(0, len(puzzles), batch_size)):
        chunk = puzzles[s:s + batch_size]
        grids = np.stack([p.grid for p in chunk])
        pad = batch_size - len(chunk) if len(puzzles) > batch_size else 0
        inputs = np.pad(to_tokens(grids), ((0, pad), (0, 0)), constant_values=1)
        labels = np.full(inputs.shape, -100, np.int32)
        for i, p in enumerate(chunk):
            if p.solution is not None:
                labels[i] = to_tokens(p.solution[None])[0]
        mask = np.r_[np.ones(len(chunk), bool), np.zeros(pad, bool)]
        r = evaluate_batch(model, params, inputs, labels, mask, jax.random.fold_in(root, bi),
                           depth=depth, breadth=breadth, halt=eval_cfg.halt,
                           tol=eval_cfg.convergence_tol, window=eval_cfg.convergence_window,
                           solver=eval_cfg.solver, convergence_metric=eval_cfg.convergence_metric,
                           max_rows=eval_cfg.max_rows, trace_points=eval_cfg.trace_points,
                           noise_scale=eval_cfg.noise_scale)
        mv = majority_vote(r.preds, labels) if select == "majority" else None
        for i, p in enumerate(chunk):
            cand = from_tokens(r.preds[i], n)  # (breadth, n, n)
            order = np.argsort(r.score[i], kind="stable")
            if select == "majority":
                c = int(np.nonzero(np.all(r.preds[i] == mv.winner[i], axis=1))[0][0])
            elif select == "valid":
                ok = [j for j in order if is_solution(p.grid, cand[j])]
                c = int(ok[0] if ok else order[0])
            else:
                c = int(order[0])
            g = cand[c]
            out.append(Solved(g, c, int(r.steps[i, c]), float(r.residual[i, c]),
                              is_solution(p.grid, g),
                              None if p.solution is None else bool(np.all(g == p.solution))))
    return out


def trajectory(model, params, puzzle: Puzzle, depth: int, seed: int = 0,
               max_frames: int = 60, noise_scale: float | None = None
               ) -> tuple[list[int], list[np.ndarray]]:
    """Predicted grids of one noisy trajectory (copy 0) after each of ``depth`` steps.

    ``noise_scale``: test-time update noise (None: the model's). Returns (steps, grids),
    subsampled to at most ``max_frames`` log-spaced steps.
    """
    import jax
    import jax.numpy as jnp

    from eqr_jax import dynamics
    from eqr_jax.evaluation import with_eval_noise

    model = with_eval_noise(model, noise_scale)

    n = puzzle.grid.shape[0]
    key = jax.random.PRNGKey(seed)
    inputs = jnp.asarray(to_tokens(puzzle.grid[None]))

    @jax.jit
    def run(params, inputs):
        x = model.embed(params, inputs)
        s0 = model.init_state(jax.random.fold_in(jax.random.fold_in(key, 0), 0), 1)
        trace = lambda s: jnp.argmax(model.readout(params, s).logits[0], -1).astype(jnp.int32)
        _, preds = dynamics.unroll(model.step, params, s0, x,
                                   jax.random.fold_in(jax.random.fold_in(key, 1), 0), depth,
                                   grad="none", trace=trace)
        return preds

    preds = np.asarray(run(params, inputs))  # (depth, N)
    steps = np.unique(np.round(np.geomspace(1, depth, min(depth, max_frames))).astype(int))
    return steps.tolist(), [from_tokens(preds[t - 1][None], n)[0] for t in steps]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqr solve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_options(p, "reasoning steps (default: the config's eval.depth)",
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    err = lambda msg: print(f"eqr solve: {msg}", file=sys.stderr)
    if (args.puzzle is None) == (args.puzzles is None):
        err("give exactly one of a puzzle string or --puzzles FILE")
        return 2
    for name in ("depth", "breadth", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            err(f"--{name.replace('_', '-')} must be >= 1")
            return 2
    try:
        if args.puzzles:
            with open(args.puzzles) as f:
                puzzles, errors = read_puzzles(f.read().splitlines(), args.skip_invalid)
        else:
            puzzles, errors = [parse_line(args.puzzle.strip(), 0)], []
    except OSError as e:
        err(f"cannot read {args.puzzles}: {e.strerror}")
        return 2
    except PuzzleError as e:
        for line in str(e).splitlines():
            err(line)
        return 2
    try:
        from eqr_jax.evaluation_cli import load_errors, load_model
        cfg, model, params = load_model(args)
        eval_cfg = eval_config_from_args(cfg.eval, args)
    except load_errors() as e:
        err(str(e))
        return 2
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
        for e in errors:
            err(e)
        if not args.skip_invalid:
            return 2
    if not keep:
        err("no valid puzzles to solve")
        return 2
    depth = args.depth or eval_cfg.depth
    breadth = args.breadth or 1
    results = solve_puzzles(model, params, keep, eval_cfg, depth=depth, breadth=breadth,
                            select=args.select, batch_size=args.batch_size, seed=eval_cfg.seed)
    for i, (p, r) in enumerate(zip(keep, results), start=1):
        where = f" (line {p.line})" if p.line else ""
        status = f"valid: {'yes' if r.valid else 'no'}"
        if r.correct is not None:
            status += f", correct: {'yes' if r.correct else 'no'}"
        if not args.quiet:
            print(f"puzzle {i}{where}: steps {r.steps}, residual {r.residual:.3e}, {status}"
                  + (f", copy {r.copy}" if breadth > 1 else ""))
            print(format_grid(r.grid))
            print()
    if args.trajectory:
        from eqr_jax.analysis import save_trajectory
        steps, grids = trajectory(model, params, keep[0], depth, seed=eval_cfg.seed,
                                  noise_scale=eval_cfg.noise_scale)
        for path in save_trajectory(grids, args.trajectory, givens=keep[0].grid,
                                    solution=keep[0].solution, steps=steps)[:1]:
            print(f"wrote {path}" + (f" (+{len(steps) - 1} more frames)"
                                     if not path.endswith(".gif") else ""))
    valid = sum(r.valid for r in results)
    print(f"valid: {valid}/{len(results)}")
    scored = [r.correct for r in results if r.correct is not None]
    if scored:
        print(f"exact_accuracy: {sum(scored) / len(scored):.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
