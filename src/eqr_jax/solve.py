"""Solving Sudoku puzzles with a trained model (``eqr solve``, `eqr_jax.cli.solve`).

Puzzles are parsed by the data module's parser (`eqr_jax.data.importers.parse_puzzle_line`) and
tokenised by its codec (`eqr_jax.data.sudoku.tokens_from_grid`); the model runs through the
`Evaluator`, so ``eqr solve`` and ``eqr eval`` share keys, halting rules and noise settings.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import numpy as np

from eqr_jax.data.importers import parse_puzzle_lines
from eqr_jax.data.sudoku import grid_from_tokens, is_valid_solution, tokens_from_grid
from eqr_jax.data.loader import IGNORE_LABEL_ID as IGNORE_LABEL


class PuzzleError(ValueError):
    """A puzzle line is malformed; the message starts with ``line N:`` when it has a line."""


class Puzzle(NamedTuple):
    line: int  # 1-based line number (0 for a puzzle given on the command line)
    grid: np.ndarray  # (n, n) int, 0 = blank
    solution: np.ndarray | None  # (n, n) int or None


class Solved(NamedTuple):
    grid: np.ndarray  # (n, n) predicted digits
    copy: int  # the chosen copy
    steps: int
    residual: float
    valid: bool  # complete, rules and givens respected
    correct: bool | None  # None without a solution


def is_solution(puzzle: np.ndarray, grid: np.ndarray) -> bool:
    """Complete, obeys the rules, and keeps every given of ``puzzle``."""
    return bool(is_valid_solution(puzzle, grid))


def read_puzzles(lines: Sequence[str], skip_invalid: bool = False
                 ) -> tuple[list[Puzzle], list[str]]:
    """Parse lines (1-based numbering; blank and '#' lines skipped) -> (puzzles, error messages).

    Any n x n board with a box shape (4, 6, 8, 9, 12, 16, ...); '.', '0', '_' or '-' for blanks;
    an optional solution after the puzzle. Raises `PuzzleError` listing every bad line
    (``line N: ...``) unless ``skip_invalid``.
    """
    rows, issues = parse_puzzle_lines(lines)
    errors = [f"line {i.line}: {i.message}" for i in issues]
    if errors and not skip_invalid:
        raise PuzzleError("\n".join(errors))
    return [Puzzle(*r) for r in rows], errors


def parse_line(text: str, line: int = 0) -> Puzzle:
    """One puzzle (and optional solution) from a line; raises `PuzzleError` with the line."""
    rows, issues = parse_puzzle_lines([text])
    if issues:
        raise PuzzleError(f"line {line}: {issues[0].message}" if line else issues[0].message)
    return Puzzle(line, rows[0][1], rows[0][2])


def puzzle_batches(puzzles: Sequence[Puzzle], batch_size: int) -> Iterator[dict]:
    """Evaluation batches of ``batch_size`` rows (``inputs``, ``labels`` with `IGNORE_LABEL` for
    puzzles without a solution, ``mask``); fewer puzzles than a batch make one unpadded batch."""
    for s in range(0, len(puzzles), batch_size):
        chunk = puzzles[s:s + batch_size]
        pad = batch_size - len(chunk) if len(puzzles) > batch_size else 0
        inputs = np.stack([tokens_from_grid(p.grid) for p in chunk]).astype(np.int32)
        inputs = np.pad(inputs, ((0, pad), (0, 0)), constant_values=1)
        labels = np.full(inputs.shape, IGNORE_LABEL, np.int32)
        for i, p in enumerate(chunk):
            if p.solution is not None:
                labels[i] = tokens_from_grid(p.solution)
        yield {"inputs": inputs, "labels": labels,
               "mask": np.r_[np.ones(len(chunk), bool), np.zeros(pad, bool)]}


def solve_puzzles(evaluator, params, puzzles: Sequence[Puzzle], *, depth: int | None = None,
                  breadth: int | None = None, select: str = "convergence",
                  batch_size: int = 64) -> list[Solved]:
    """Run ``evaluator`` (an `eqr_jax.evaluation.Evaluator`) on ``puzzles`` (all of the model's
    board size) and pick one copy each.

    Puzzle ``i`` of ``puzzles`` is job index ``i`` of the evaluator's key rule (so the keys do
    not depend on ``batch_size``). ``select``: ``convergence`` (lowest
    convergence score), ``majority`` (most frequent grid) or ``valid`` (first copy that is a
    valid solution, else the most converged one).
    """
    from eqr_jax.evaluation import majority_vote

    n = puzzles[0].grid.shape[0]
    out: list[Solved] = []
    for bi, batch in enumerate(puzzle_batches(puzzles, batch_size)):
        chunk = puzzles[bi * batch_size:(bi + 1) * batch_size]
        r = evaluator.evaluate_batch(params, batch, bi * batch_size, depth=depth,
                                     breadth=breadth)
        mv = majority_vote(r.preds, batch["labels"]) if select == "majority" else None
        for i, p in enumerate(chunk):
            cand = grid_from_tokens(r.preds[i], n)  # (breadth, n, n)
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


def trajectory(evaluator, params, puzzles: Sequence[Puzzle], *, depth: int, batch_size: int,
               copy: int = 0, max_frames: int = 60) -> tuple[list[int], list[np.ndarray]]:
    """Predicted grids of the first puzzle's copy ``copy`` after each of ``depth`` steps.

    The first puzzle is keyed as in `solve_puzzles`, so this is the trajectory that solving it
    followed (with fixed halting). Returns (steps, grids), subsampled to at most
    ``max_frames`` log-spaced steps.
    """
    import jax.numpy as jnp

    n = puzzles[0].grid.shape[0]
    batch = next(puzzle_batches(puzzles, batch_size))
    row0 = lambda params, z: jnp.argmax(
        evaluator.model.readout(params, z).logits[0], -1).astype(jnp.int32)
    preds = np.asarray(evaluator.trajectory(params, batch["inputs"], 0, depth=depth,
                                            trace=row0, copies=[copy]))[0]  # (depth, N)
    steps = np.unique(np.round(np.geomspace(1, depth, min(depth, max_frames))).astype(int))
    return steps.tolist(), [grid_from_tokens(preds[t - 1], n) for t in steps]
