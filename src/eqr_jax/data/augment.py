"""Validity-preserving augmentation: Sudoku symmetry transforms and dihedral maze transforms.

A Sudoku transform (as the reference builder, generalised to any box shape) is: a digit
permutation (blank stays blank), a transpose with probability 1/2 (square boxes only), a band
order and a row order inside each band, a stack order and a column order inside each stack.  New
cell ``(i, j)`` takes the (possibly transposed) old cell ``(row_order[i], col_order[j])``.  The
same transform is applied to puzzle and solution, so every pair stays a valid puzzle/solution and
the difficulty rating is unchanged.
"""

from __future__ import annotations

import numpy as np

from .sudoku import box_shape

__all__ = ["sudoku_transforms", "reference_sudoku_transforms", "apply_sudoku_transform",
           "augment_sudoku", "dihedral", "inverse_dihedral"]


def _grouped_orders(rng: np.random.Generator, k: int, n: int, group: int) -> np.ndarray:
    """(k, n) line orders keeping groups of ``group`` consecutive lines together."""
    ng = n // group
    gorder = rng.random((k, ng)).argsort(axis=1)                   # which group goes where
    inner = rng.random((k, ng, group)).argsort(axis=2)             # order inside each group
    base = gorder[:, :, None] * group                              # (k, ng, 1)
    inner_for_slot = np.take_along_axis(inner, gorder[:, :, None], axis=1)
    return (base + inner_for_slot).reshape(k, n)


def sudoku_transforms(rng: np.random.Generator, k: int, n: int) -> dict[str, np.ndarray]:
    """``k`` random transforms of an ``n x n`` board.

    Returns ``digit_map`` (k, n+1) (index 0 -> 0), ``transpose`` (k,) bool, ``rows`` (k, n),
    ``cols`` (k, n).
    """
    br, bc = box_shape(n)
    dm = np.zeros((k, n + 1), np.int64)
    dm[:, 1:] = rng.random((k, n)).argsort(axis=1) + 1
    tr = (rng.random(k) < 0.5) if br == bc else np.zeros(k, bool)
    rows = _grouped_orders(rng, k, n, br)
    cols = _grouped_orders(rng, k, n, bc)
    return {"digit_map": dm, "transpose": tr, "rows": rows, "cols": cols}


def reference_sudoku_transforms(rng: np.random.RandomState, k: int, n: int = 9
                                ) -> dict[str, np.ndarray]:
    """``k`` transforms drawn one after another in the reference builder's order.

    ``rng`` is a legacy `np.random.RandomState` (the reference seeds NumPy's global legacy
    stream, which is the same generator). Per transform: the digit permutation
    (``permutation(arange(1, n + 1))``), the transpose coin (``rand() < 0.5``), the band order,
    one row order per band (in the band order), the stack order, one column order per stack.
    Square boxes only (the reference handles 9x9). Same output layout as `sudoku_transforms`.
    """
    br, bc = box_shape(n)
    if br != bc:
        raise ValueError(f"the reference transform needs square boxes, got {br}x{bc} for n={n}")
    dm = np.zeros((k, n + 1), np.int64)
    tr = np.zeros(k, bool)
    rows = np.zeros((k, n), np.int64)
    cols = np.zeros((k, n), np.int64)
    digits = np.arange(1, n + 1)
    for i in range(k):
        dm[i, 1:] = rng.permutation(digits)
        tr[i] = rng.rand() < 0.5
        bands = rng.permutation(br)
        rows[i] = np.concatenate([b * br + rng.permutation(br) for b in bands])
        stacks = rng.permutation(br)
        cols[i] = np.concatenate([c * br + rng.permutation(br) for c in stacks])
    return {"digit_map": dm, "transpose": tr, "rows": rows, "cols": cols}


def apply_sudoku_transform(grids: np.ndarray, t: dict[str, np.ndarray]) -> np.ndarray:
    """Apply transforms ``t`` (from :func:`sudoku_transforms`, k of them) to grids.

    ``grids``: (n*n,) or (n, n) (one grid, broadcast to all k transforms) or (k, n*n)/(k, n, n)
    digit grids (0 = blank).  Returns (k, n*n) of the input dtype.
    """
    g = np.asarray(grids)
    k, n = t["rows"].shape
    g = g.reshape(-1, n, n)
    if g.shape[0] == 1:
        g = np.broadcast_to(g, (k, n, n))
    g = np.where(t["transpose"][:, None, None], g.transpose(0, 2, 1), g)
    ar = np.arange(k)[:, None, None]
    out = g[ar, t["rows"][:, :, None], t["cols"][:, None, :]]
    out = t["digit_map"][ar, out]
    return out.reshape(k, n * n).astype(np.asarray(grids).dtype)


def augment_sudoku(puzzle: np.ndarray, solution: np.ndarray, k: int, rng: np.random.Generator):
    """``k`` augmented copies of one (puzzle, solution) pair: two (k, n*n) arrays."""
    n = int(round(np.sqrt(np.asarray(puzzle).size)))
    t = sudoku_transforms(rng, k, n)
    return apply_sudoku_transform(puzzle, t), apply_sudoku_transform(solution, t)


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of a square (n, n) grid: rotate by 90*(k % 4), then flip if k >= 4."""
    if not 0 <= k < 8:
        raise ValueError("dihedral index must be in 0..7")
    out = np.rot90(np.asarray(grid), k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def inverse_dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """Undo :func:`dihedral` with the same ``k``."""
    g = np.asarray(grid)
    if k >= 4:
        g = g[:, ::-1]
    return np.ascontiguousarray(np.rot90(g, -(k % 4)))
