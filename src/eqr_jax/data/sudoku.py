"""Sudoku core: board geometry, parsing, an exact solver/counter, the difficulty rating, canonical forms.

Boards are ``n x n`` with boxes of ``box_shape(n) = (rows, cols)`` cells (4 -> 2x2, 6 -> 2x3,
8 -> 2x4, 9 -> 3x3, 12 -> 3x4, 16 -> 4x4).  A grid is an integer array, either ``(n, n)`` or flat
``(n*n,)`` in row-major order, with ``0`` for a blank and ``1..n`` for digits.

The difficulty rating (the project's yardstick)
------------------------------------------------
``rate(grid)`` is the number of *branching nodes* of the following exhaustive depth-first search:

1. At every node, propagate to the fixpoint: *naked singles* (a cell with one candidate takes it
   and the digit is removed from its peers) and *hidden singles* (a digit with exactly one
   possible cell in a row, column or box goes there).  The fixpoint does not depend on the order
   the rules are applied.
2. The node is *dead* if a cell has no candidate, a digit has no possible cell in some unit, or
   two givens clash.  It is a *solution* if every cell holds one digit.
3. Otherwise the node *branches* on the first cell in row-major order having the fewest
   candidates (>= 2), one child per candidate.
4. The whole tree is explored (this proves uniqueness); the rating is the number of branching
   nodes.  Because every child is visited, the count does not depend on the order candidates are
   tried.  Puzzles solved by singles alone rate 0.

Everything runs in numba-compiled bitmask kernels (``cache=True``), a few microseconds per node.
The file is longer than the project's other modules on purpose: numba's on-disk cache of a
kernel is invalidated only by changes to the kernel's own source file, not to the files of the
kernels it calls, and these kernels call each other (`_gen_chunk` -> `_one_puzzle` -> `_search`
-> `_propagate_inc` ...). Kept in one file, an edit to any of them invalidates every cached
caller.
"""

from __future__ import annotations

import functools
import itertools
import math

import numba as nb
import numpy as np

__all__ = [
    "PuzzleFormatError", "Geometry", "box_shape", "geometry", "parse_grid", "format_grid",
    "count_solutions", "solve", "rate", "rate_and_count", "is_valid_solution", "check_givens",
    "canonical_form", "tokens_from_grid", "grid_from_tokens", "DIGIT_CHARS",
]

#: Characters for digits 1..16 in text form ('1'..'9', then 'A'..'G'); blanks are '.' or '0'.
DIGIT_CHARS = "123456789ABCDEFG"


class PuzzleFormatError(ValueError):
    """A puzzle string or array that is not a well-formed grid (length, characters, values)."""


# ----------------------------------------------------------------------------------------------
# Geometry


def box_shape(n: int) -> tuple[int, int]:
    """Box shape ``(rows, cols)`` of an ``n x n`` board: the most square factorisation, rows <= cols."""
    if n < 1 or n > 16:
        raise PuzzleFormatError(f"board size {n} not supported (1..16)")
    r = int(math.isqrt(n))
    while r > 1 and n % r:
        r -= 1
    if r == 1 and n > 1:
        raise PuzzleFormatError(f"board size {n} has no box shape (prime sizes are not Sudoku)")
    return r, n // r


class Geometry:
    """Precomputed index tables of one board size (all int32 so numba kernels can take them).

    Attributes:
      n, br, bc: board side and box rows/cols.  ncell = n*n.
      units: (3n, n) cells of each row, column, box.
      peers: (ncell, npeer) the distinct cells sharing a unit with each cell.
    """

    def __init__(self, n: int):
        self.n = n
        self.br, self.bc = box_shape(n)
        self.ncell = n * n
        rows = [[r * n + c for c in range(n)] for r in range(n)]
        cols = [[r * n + c for r in range(n)] for c in range(n)]
        boxes = []
        for b0 in range(0, n, self.br):
            for s0 in range(0, n, self.bc):
                boxes.append([(b0 + i) * n + s0 + j for i in range(self.br) for j in range(self.bc)])
        self.units = np.array(rows + cols + boxes, np.int32)
        peers = []
        for c in range(self.ncell):
            s = set()
            for u in self.units:
                if c in u:
                    s.update(int(x) for x in u)
            s.discard(c)
            peers.append(sorted(s))
        self.peers = np.array(peers, np.int32)
        self.full = (1 << n) - 1

    @functools.cached_property
    def row_perms(self) -> np.ndarray:
        """(K, n) every row order that keeps bands: band order x row order inside each band."""
        return _line_perms(self.n, self.br)

    @functools.cached_property
    def col_perms(self) -> np.ndarray:
        """(K, n) every column order that keeps stacks."""
        return _line_perms(self.n, self.bc)


def _line_perms(n: int, group: int) -> np.ndarray:
    ngroups = n // group
    inner = list(itertools.permutations(range(group)))
    out = []
    for gorder in itertools.permutations(range(ngroups)):
        for inners in itertools.product(inner, repeat=ngroups):
            out.append([g * group + inners[k][i] for k, g in enumerate(gorder) for i in range(group)])
    return np.array(out, np.int32)


@functools.lru_cache(maxsize=None)
def geometry(n: int) -> Geometry:
    """Cached :class:`Geometry` for board side ``n``."""
    return Geometry(n)


# ----------------------------------------------------------------------------------------------
# Parsing and formatting


def _side_from_len(length: int) -> int:
    n = int(math.isqrt(length))
    if n * n != length or n < 2:
        raise PuzzleFormatError(f"length {length} is not a square board size (16, 36, 81, ...)")
    box_shape(n)
    return n


def parse_grid(s: str, size: int | None = None) -> np.ndarray:
    """Parse a one-line puzzle string into an ``(n, n)`` int32 grid (0 = blank).

    '.', '0', '_' and '-' are blanks; digits are '1'..'9' then 'A'..'G' (case-insensitive) for
    boards above 9.  Whitespace and '|' / '+' separators are ignored.  ``size`` (the board side)
    is inferred from the length when None.  Raises :class:`PuzzleFormatError` naming the bad
    character (and its position) or the bad length.
    """
    chars = [ch for ch in s.strip() if not ch.isspace() and ch not in "|+"]
    n = size if size is not None else _side_from_len(len(chars))
    if size is not None:
        box_shape(n)
        if len(chars) != n * n:
            raise PuzzleFormatError(f"expected {n * n} characters for a {n}x{n} board, got {len(chars)}")
    out = np.zeros(n * n, np.int32)
    for i, ch in enumerate(chars):
        if ch in ".0_-":
            continue
        v = DIGIT_CHARS.find(ch.upper()) + 1
        if v <= 0 or v > n:
            raise PuzzleFormatError(f"bad character {ch!r} at position {i + 1} (a {n}x{n} board takes "
                                    f"'.', '0' or {DIGIT_CHARS[0]}..{DIGIT_CHARS[n - 1]})")
        out[i] = v
    return out.reshape(n, n)


def _as_flat(grid) -> tuple[np.ndarray, int]:
    a = np.asarray(grid)
    if a.ndim == 2:
        if a.shape[0] != a.shape[1]:
            raise PuzzleFormatError(f"grid shape {a.shape} is not square")
        n = a.shape[0]
    elif a.ndim == 1:
        n = _side_from_len(a.size)
    else:
        raise PuzzleFormatError(f"grid must be (n, n) or (n*n,), got shape {a.shape}")
    box_shape(n)
    flat = a.reshape(-1).astype(np.int32)
    if flat.size and (flat.min() < 0 or flat.max() > n):
        raise PuzzleFormatError(f"grid values must lie in 0..{n}")
    return flat, n


def format_grid(grid, blank: str = ".", pretty: bool = False) -> str:
    """One-line string of a grid ('.' blanks); ``pretty`` gives a boxed multi-line layout."""
    flat, n = _as_flat(grid)
    chars = [blank if v == 0 else DIGIT_CHARS[v - 1] for v in flat]
    if not pretty:
        return "".join(chars)
    br, bc = box_shape(n)
    lines = []
    for r in range(n):
        if r and r % br == 0:
            lines.append("-+-".join(["-" * (2 * bc - 1)] * (n // bc)))
        row = chars[r * n:(r + 1) * n]
        lines.append(" | ".join(" ".join(row[s:s + bc]) for s in range(0, n, bc)))
    return "\n".join(lines)


def tokens_from_grid(grid) -> np.ndarray:
    """The one token codec: model tokens ``(n*n,)`` uint8 of a grid: blank -> 1, digit d -> d + 1
    (0 is PAD)."""
    flat, _ = _as_flat(grid)
    return (flat + 1).astype(np.uint8)


def grid_from_tokens(tokens, size: int | None = None) -> np.ndarray:
    """Inverse of :func:`tokens_from_grid`: ``(..., n*n)`` tokens -> ``(..., n, n)`` int32 digits;
    tokens that are not a digit (PAD 0, blank 1, anything above n + 1 a model may predict) ->
    blank 0."""
    t = np.asarray(tokens).astype(np.int32)
    n = size if size is not None else _side_from_len(t.shape[-1] if t.ndim else t.size)
    d = np.where((t >= 2) & (t <= n + 1), t - 1, 0)
    return d.reshape(t.shape[:-1] + (n, n)).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# numba kernels: candidates are bitmasks (bit d-1 <=> digit d), one int32 per cell.


@nb.njit(cache=True, inline="always")
def _popcount(x):
    c = 0
    while x:
        x &= x - 1
        c += 1
    return c


@nb.njit(cache=True)
def _propagate(cand, placed, units, peers, full):
    """Naked + hidden singles to the fixpoint, in place.  Returns False on a contradiction."""
    ncell = cand.shape[0]
    n = units.shape[1]
    changed = True
    while changed:
        changed = False
        for c in range(ncell):
            if placed[c]:
                continue
            m = cand[c]
            if m == 0:
                return False
            if (m & (m - 1)) == 0:
                placed[c] = True
                changed = True
                for k in range(peers.shape[1]):
                    p = peers[c, k]
                    if cand[p] & m:
                        cand[p] &= ~m
                        if cand[p] == 0:
                            return False
        for u in range(units.shape[0]):
            once = 0
            twice = 0
            for k in range(n):
                m = cand[units[u, k]]
                twice |= once & m
                once |= m
            if once != full:
                return False  # some digit has no place in this unit
            singles = once & ~twice
            if singles == 0:
                continue
            for k in range(n):
                c = units[u, k]
                x = cand[c] & singles
                if x:
                    if x & (x - 1):
                        return False  # one cell is the only place of two digits
                    if cand[c] != x:
                        cand[c] = x
                        changed = True
    return True


@nb.njit(cache=True)
def _propagate_inc(cand, placed, units, peers, cell_units, full, dirty, stack, sp):
    """Incremental :func:`_propagate`: the same fixpoint, doing work only where things changed.

    The caller pushed the newly decided cells on ``stack[:sp]`` and flagged their units in
    ``dirty``.  Decided cells are eliminated from their peers; only units flagged dirty are
    re-checked for hidden singles / missing digits.  Valid because the parent node was at a
    contradiction-free fixpoint, so untouched units need no re-check, and because the singles
    fixpoint does not depend on the processing order.
    """
    n = units.shape[1]
    nunits = units.shape[0]
    while True:
        while sp > 0:
            sp -= 1
            c = stack[sp]
            if placed[c]:
                continue
            placed[c] = True
            m = cand[c]
            for k in range(peers.shape[1]):
                p = peers[c, k]
                x = cand[p]
                if x & m:
                    x &= ~m
                    cand[p] = x
                    if x == 0:
                        return False
                    dirty[cell_units[p, 0]] = True
                    dirty[cell_units[p, 1]] = True
                    dirty[cell_units[p, 2]] = True
                    if (x & (x - 1)) == 0:
                        stack[sp] = p
                        sp += 1
        any_dirty = False
        for u in range(nunits):
            if not dirty[u]:
                continue
            any_dirty = True
            dirty[u] = False
            once = 0
            twice = 0
            for k in range(n):
                m = cand[units[u, k]]
                twice |= once & m
                once |= m
            if once != full:
                return False
            singles = once & ~twice
            if singles == 0:
                continue
            for k in range(n):
                c = units[u, k]
                x = cand[c] & singles
                if x:
                    if x & (x - 1):
                        return False
                    if cand[c] != x:
                        cand[c] = x
                        dirty[cell_units[c, 0]] = True
                        dirty[cell_units[c, 1]] = True
                        dirty[cell_units[c, 2]] = True
                        stack[sp] = c
                        sp += 1
        if not any_dirty and sp == 0:
            return True


@nb.njit(cache=True)
def _cell_units(units, ncell):
    cu = np.empty((ncell, 3), np.int64)
    cnt = np.zeros(ncell, np.int64)
    for u in range(units.shape[0]):
        for k in range(units.shape[1]):
            c = units[u, k]
            cu[c, cnt[c]] = u
            cnt[c] += 1
    return cu


@nb.njit(cache=True)
def _init_cand(givens, full):
    ncell = givens.shape[0]
    cand = np.empty(ncell, np.int32)
    for c in range(ncell):
        cand[c] = full if givens[c] == 0 else (1 << (givens[c] - 1))
    return cand


@nb.njit(cache=True)
def _pick_cell(cand):
    """First cell (row-major) with the fewest candidates >= 2; -1 when every cell is decided."""
    best = -1
    bestc = 1 << 30
    for c in range(cand.shape[0]):
        pc = _popcount(cand[c])
        if pc >= 2 and pc < bestc:
            bestc = pc
            best = c
            if pc == 2:
                break
    return best


@nb.njit(cache=True)
def _search(givens, units, peers, full, limit, order, out_solution, out_second):
    """Exhaustive DFS (see module doc).  Stops once ``limit`` solutions were found (limit <= 0:
    never).  ``order`` = 0 tries candidates low digit first, 1 high first (for tests).
    Writes the first solution found into ``out_solution`` and the second into ``out_second``.
    Returns (solutions, branch_nodes).
    """
    ncell = givens.shape[0]
    cand_stack = np.empty((ncell + 2, ncell), np.int32)
    placed_stack = np.zeros((ncell + 2, ncell), np.bool_)
    cell_at = np.empty(ncell + 2, np.int64)
    rem_at = np.empty(ncell + 2, np.int32)
    cand_stack[0] = _init_cand(givens, full)
    cell_units = _cell_units(units, ncell)
    dirty = np.zeros(units.shape[0], np.bool_)
    stack = np.empty(ncell, np.int64)
    nsol = 0
    branches = 0
    sp = 0
    for i in range(ncell):
        if givens[i] != 0:
            stack[sp] = i
            sp += 1
    dirty[:] = True
    if not _propagate_inc(cand_stack[0], placed_stack[0], units, peers, cell_units, full, dirty,
                          stack, sp):
        return 0, 0
    c = _pick_cell(cand_stack[0])
    if c < 0:
        for i in range(ncell):
            out_solution[i] = _popcount(cand_stack[0, i] - 1) + 1
        return 1, 0
    branches = 1
    depth = 0
    cell_at[0] = c
    rem_at[0] = cand_stack[0, c]
    while depth >= 0:
        rem = rem_at[depth]
        if rem == 0:
            depth -= 1
            continue
        if order == 0:
            b = rem & (-rem)
        else:
            b = 1 << (31 - _clz(rem))
        rem_at[depth] = rem & ~b
        nxt = depth + 1
        cand_stack[nxt] = cand_stack[depth]
        placed_stack[nxt] = placed_stack[depth]
        c = cell_at[depth]
        cand_stack[nxt, c] = b
        dirty[:] = False
        dirty[cell_units[c, 0]] = True
        dirty[cell_units[c, 1]] = True
        dirty[cell_units[c, 2]] = True
        stack[0] = c
        if not _propagate_inc(cand_stack[nxt], placed_stack[nxt], units, peers, cell_units, full,
                              dirty, stack, 1):
            continue
        c = _pick_cell(cand_stack[nxt])
        if c < 0:
            if nsol == 0:
                for i in range(ncell):
                    out_solution[i] = _popcount(cand_stack[nxt, i] - 1) + 1
            elif nsol == 1:
                for i in range(ncell):
                    out_second[i] = _popcount(cand_stack[nxt, i] - 1) + 1
            nsol += 1
            if limit > 0 and nsol >= limit:
                return nsol, branches
            continue
        branches += 1
        depth = nxt
        cell_at[depth] = c
        rem_at[depth] = cand_stack[depth, c]
    return nsol, branches


@nb.njit(cache=True, inline="always")
def _clz(x):
    # leading zeros of a positive int32
    n = 0
    y = 1 << 31
    while (x & y) == 0 and n < 32:
        y >>= 1
        n += 1
    return n


# Generator kernels (driven by eqr_jax.data.generate).  They live in this file on purpose: numba's
# on-disk cache tracks only the defining file, so kernels calling the solver must sit beside it
# or an edit here would leave stale compiled copies elsewhere.


@nb.njit(cache=True)
def _random_solution(units, peers, full, ncell, out):
    """Random complete grid into ``out`` (ncell,) via DFS with a random candidate order."""
    cand_stack = np.empty((ncell + 2, ncell), np.int32)
    placed_stack = np.zeros((ncell + 2, ncell), np.bool_)
    cell_at = np.empty(ncell + 2, np.int64)
    rem_at = np.empty(ncell + 2, np.int32)
    cand_stack[0, :] = full
    _propagate(cand_stack[0], placed_stack[0], units, peers, full)
    depth = 0
    cell_at[0] = _pick_cell(cand_stack[0])
    rem_at[0] = cand_stack[0, cell_at[0]]
    while depth >= 0:
        rem = rem_at[depth]
        if rem == 0:
            depth -= 1
            continue
        k = np.random.randint(0, _popcount(rem))
        b = rem
        for _ in range(k):
            b &= b - 1
        b = b & (-b)
        rem_at[depth] = rem & ~b
        nxt = depth + 1
        cand_stack[nxt] = cand_stack[depth]
        placed_stack[nxt] = placed_stack[depth]
        cand_stack[nxt, cell_at[depth]] = b
        if not _propagate(cand_stack[nxt], placed_stack[nxt], units, peers, full):
            continue
        c = _pick_cell(cand_stack[nxt])
        if c < 0:
            for i in range(ncell):
                out[i] = _popcount(cand_stack[nxt, i] - 1) + 1
            return True
        depth = nxt
        cell_at[depth] = c
        rem_at[depth] = cand_stack[depth, c]
    return False


@nb.njit(cache=True)
def _check(puz, units, peers, full, scratch, scratch2):
    """(unique?, rating) with one search capped at 2 solutions."""
    nsol, br = _search(puz, units, peers, full, 2, 0, scratch, scratch2)
    return nsol == 1, br


@nb.njit(cache=True)
def _one_puzzle(units, peers, full, ncell, iters, hard, temp, patience, out_puz, out_sol):
    """Generate one puzzle into out_puz/out_sol; returns its rating."""
    scratch = np.empty(ncell, np.int32)
    scratch2 = np.empty(ncell, np.int32)
    while not _random_solution(units, peers, full, ncell, out_sol):
        pass
    puz = out_sol.copy()
    order = np.random.permutation(ncell)
    for i in range(ncell):
        c = order[i]
        v = puz[c]
        puz[c] = 0
        ok, _ = _check(puz, units, peers, full, scratch, scratch2)
        if not ok:
            puz[c] = v
    ok, cur = _check(puz, units, peers, full, scratch, scratch2)
    best = puz.copy()
    best_r = cur
    if hard:
        givens = np.empty(ncell, np.int64)
        blanks = np.empty(ncell, np.int64)
        sol = out_sol.copy()
        alt = np.empty(ncell, np.int32)
        best_sol = out_sol.copy()
        n = units.shape[1]
        last_gain = 0
        for it in range(iters):
            if patience > 0 and it - last_gain > patience:
                break  # no new best for `patience` moves: stop early
            ng = 0
            nb_ = 0
            for c in range(ncell):
                if puz[c] != 0:
                    givens[ng] = c
                    ng += 1
                else:
                    blanks[nb_] = c
                    nb_ += 1
            a = givens[np.random.randint(0, ng)]
            va = puz[a]
            # Another solution of the puzzle without `a` (if any) shows where a new clue must go
            # for uniqueness to return: a cell where that solution differs from ours.
            puz[a] = 0
            ns, r = _search(puz, units, peers, full, 2, 0, scratch, alt)
            b = -1
            ok = ns == 1  # `a` was redundant: a pure removal, already rated by this search
            if ns >= 2:
                other = alt
                for c in range(ncell):
                    if scratch[c] != sol[c]:
                        other = scratch
                        break
                nd = 0
                for c in range(ncell):
                    if c != a and puz[c] == 0 and other[c] != sol[c]:
                        blanks[nd] = c
                        nd += 1
                if nd == 0:
                    puz[a] = va
                    continue
                b = blanks[np.random.randint(0, nd)]
                puz[b] = sol[b]
                ok, r = _check(puz, units, peers, full, scratch, scratch2)
            accept = ok and (r >= cur or (temp > 0 and np.random.random() < np.exp((r - cur) / (temp * (1.0 + cur)))))
            if accept:
                cur = r
                sol[:] = scratch
                if r > best_r:
                    best_r = r
                    last_gain = it
                    best[:] = puz
                    best_sol[:] = sol
            else:
                puz[a] = va
                if b >= 0:
                    puz[b] = 0
        out_sol[:] = best_sol
    out_puz[:] = best
    return best_r


@nb.njit(cache=True)
def _gen_chunk(seed, count, units, peers, full, ncell, iters, hard, temp, patience, puzzles, solutions,
               ratings):
    np.random.seed(seed)
    for i in range(count):
        ratings[i] = _one_puzzle(units, peers, full, ncell, iters, hard, temp, patience, puzzles[i],
                                 solutions[i])



def _run_search(grid, limit: int, order: int = 0):
    flat, n = _as_flat(grid)
    g = geometry(n)
    sol = np.zeros(n * n, np.int32)
    nsol, br = _search(flat, g.units, g.peers, g.full, limit, order, sol, np.zeros(n * n, np.int32))
    return int(nsol), int(br), sol, n


def count_solutions(grid, limit: int = 2) -> int:
    """Number of solutions, counting stops at ``limit`` (``limit <= 0``: count them all)."""
    return _run_search(grid, limit)[0]


def solve(grid) -> np.ndarray | None:
    """The first solution found (same shape as ``grid``) or None when there is none."""
    nsol, _, sol, n = _run_search(grid, 1)
    if nsol == 0:
        return None
    return sol.reshape(np.asarray(grid).shape)


def rate_and_count(grid, order: int = 0, max_solutions: int = 0) -> tuple[int, int]:
    """``(rating, number_of_solutions)`` from one exhaustive search (see the module doc).

    ``max_solutions`` > 0 stops the search at that many solutions (then both numbers are lower
    bounds); use it on input that may have many solutions, whose full tree can be astronomically
    large.  For a puzzle with a unique solution any ``max_solutions >= 2`` gives the exact rating.
    """
    nsol, br, _, _ = _run_search(grid, max_solutions, order)
    return br, nsol


def rate(grid, max_solutions: int = 0) -> int:
    """Difficulty rating: branching nodes of the exhaustive singles+DFS search (module doc)."""
    return rate_and_count(grid, max_solutions=max_solutions)[0]


# ----------------------------------------------------------------------------------------------
# Validation


def check_givens(grid) -> str | None:
    """None when no two givens clash, else a description of the first clash."""
    flat, n = _as_flat(grid)
    g = geometry(n)
    names = ["row"] * n + ["column"] * n + ["box"] * n
    for u, cells in enumerate(g.units):
        vals = flat[cells]
        vals = vals[vals > 0]
        if len(set(vals.tolist())) != len(vals):
            d = np.bincount(vals).argmax()
            return f"digit {DIGIT_CHARS[d - 1]} repeated in {names[u]} {u % n + 1}"
    return None


def is_valid_solution(puzzle, solution) -> bool:
    """True when ``solution`` is a complete valid grid that keeps every given of ``puzzle``."""
    try:
        p, n = _as_flat(puzzle)
        s, m = _as_flat(solution)
    except PuzzleFormatError:
        return False
    if n != m or (s == 0).any():
        return False
    if ((p != 0) & (p != s)).any():
        return False
    g = geometry(n)
    vals = s[g.units]
    vals.sort(axis=1)
    return bool((vals == np.arange(1, n + 1)).all())


# ----------------------------------------------------------------------------------------------
# Canonical form: lexicographic minimum over every validity-preserving transform (band/row and
# stack/column permutations, transpose when boxes are square) of the grid relabelled by order of
# first appearance.  Two grids are equivalent iff their canonical forms are equal.


@nb.njit(cache=True)
def _relabel_row(g, row, colp, dmap, nxt, out):
    """Relabelled row ``row`` of grid ``g`` (n,n) under column order ``colp``, extending ``dmap``."""
    n = colp.shape[0]
    for j in range(n):
        v = g[row, colp[j]]
        if v == 0:
            out[j] = 0
        else:
            if dmap[v] == 0:
                dmap[v] = nxt
                nxt += 1
            out[j] = dmap[v]
    return nxt


@nb.njit(cache=True)
def _cmp(a, b):
    for i in range(a.shape[0]):
        if a[i] != b[i]:
            return -1 if a[i] < b[i] else 1
    return 0


@nb.njit(cache=True)
def _canon(grids, col_perms, br, max_cand):
    """Canonical form of the stacked grids ``grids`` (T, n, n) (one per allowed transpose).

    Level-wise search: each candidate is (grid index, column order, rows used, digit map).  At
    level k every candidate is extended by each allowed next row; only extensions whose
    relabelled row equals the minimum over all extensions survive.
    """
    T, n, _ = grids.shape
    K = col_perms.shape[0]
    best = np.empty(n, np.int32)
    tmp = np.empty(n, np.int32)
    dmap = np.zeros(n + 1, np.int32)
    result = np.zeros((n, n), np.int32)
    # level 0: any row may come first (its band becomes band 0)
    first = True
    for t in range(T):
        for r in range(n):
            for k in range(K):
                dmap[:] = 0
                _relabel_row(grids[t], r, col_perms[k], dmap, 1, tmp)
                if first or _cmp(tmp, best) < 0:
                    best[:] = tmp
                    first = False
    cnt = 0
    for t in range(T):
        for r in range(n):
            for k in range(K):
                dmap[:] = 0
                _relabel_row(grids[t], r, col_perms[k], dmap, 1, tmp)
                if _cmp(tmp, best) == 0:
                    cnt += 1
    if cnt > max_cand:
        return result, False
    c_t = np.empty(cnt, np.int32)
    c_k = np.empty(cnt, np.int32)
    c_rows = np.empty((cnt, n), np.int32)
    c_map = np.zeros((cnt, n + 1), np.int32)
    c_nxt = np.empty(cnt, np.int32)
    i = 0
    for t in range(T):
        for r in range(n):
            for k in range(K):
                dmap[:] = 0
                nx = _relabel_row(grids[t], r, col_perms[k], dmap, 1, tmp)
                if _cmp(tmp, best) == 0:
                    c_t[i] = t
                    c_k[i] = k
                    c_rows[i, 0] = r
                    c_map[i] = dmap
                    c_nxt[i] = nx
                    i += 1
    result[0] = best
    used = np.zeros(n, np.bool_)
    for lvl in range(1, n):
        first = True
        # pass 1: the minimum extension
        for i in range(cnt):
            used[:] = False
            for q in range(lvl):
                used[c_rows[i, q]] = True
            band0 = c_rows[i, lvl - 1] // br
            for r in range(n):
                if used[r]:
                    continue
                if lvl % br != 0 and r // br != band0:
                    continue
                dmap[:] = c_map[i]
                _relabel_row(grids[c_t[i]], r, col_perms[c_k[i]], dmap, c_nxt[i], tmp)
                if first or _cmp(tmp, best) < 0:
                    best[:] = tmp
                    first = False
        # pass 2: count then keep the ties
        m = 0
        for i in range(cnt):
            used[:] = False
            for q in range(lvl):
                used[c_rows[i, q]] = True
            band0 = c_rows[i, lvl - 1] // br
            for r in range(n):
                if used[r] or (lvl % br != 0 and r // br != band0):
                    continue
                dmap[:] = c_map[i]
                _relabel_row(grids[c_t[i]], r, col_perms[c_k[i]], dmap, c_nxt[i], tmp)
                if _cmp(tmp, best) == 0:
                    m += 1
        if m > max_cand:
            return result, False
        n_t = np.empty(m, np.int32)
        n_k = np.empty(m, np.int32)
        n_rows = np.empty((m, n), np.int32)
        n_map = np.zeros((m, n + 1), np.int32)
        n_nxt = np.empty(m, np.int32)
        j = 0
        for i in range(cnt):
            used[:] = False
            for q in range(lvl):
                used[c_rows[i, q]] = True
            band0 = c_rows[i, lvl - 1] // br
            for r in range(n):
                if used[r] or (lvl % br != 0 and r // br != band0):
                    continue
                dmap[:] = c_map[i]
                nx = _relabel_row(grids[c_t[i]], r, col_perms[c_k[i]], dmap, c_nxt[i], tmp)
                if _cmp(tmp, best) == 0:
                    n_t[j] = c_t[i]
                    n_k[j] = c_k[i]
                    n_rows[j] = c_rows[i]
                    n_rows[j, lvl] = r
                    n_map[j] = dmap
                    n_nxt[j] = nx
                    j += 1
        c_t, c_k, c_rows, c_map, c_nxt, cnt = n_t, n_k, n_rows, n_map, n_nxt, m
        result[lvl] = best
    return result, True


def canonical_form(grid, max_candidates: int = 4_000_000) -> np.ndarray:
    """Canonical representative ``(n, n)`` int32 of the grid's equivalence class.

    The class is generated by digit relabelling, band and stack permutations, row/column
    permutations inside bands/stacks and (for square boxes) transposition.  Grids with very many
    symmetric partial placements (e.g. an almost empty grid) can exceed ``max_candidates``
    search states; that raises ``ValueError`` rather than using unbounded memory.
    """
    flat, n = _as_flat(grid)
    g = geometry(n)
    a = flat.reshape(n, n)
    grids = np.stack([a, a.T]) if g.br == g.bc else a[None]
    res, ok = _canon(np.ascontiguousarray(grids), g.col_perms, g.br, max_candidates)
    if not ok:
        raise ValueError("canonical_form: too many symmetric candidates (grid nearly empty?)")
    return res
