"""Hard Sudoku generator: random unique puzzles improved by local search on the difficulty rating.

Method (per puzzle, all inside one numba kernel):

1. A random complete grid: depth-first search with singles propagation and a random candidate
   order (so every valid grid can come out, not only relabellings of one base grid).
2. A random *minimal* puzzle: visit the cells in random order and blank each one whose removal
   keeps the solution unique.
3. Local search that keeps the solution fixed and uniqueness true.  A move blanks a random
   given ``a``; if the puzzle is still unique that is the move (a removal), otherwise a second
   solution is found and a clue is added at a random blank cell where that solution differs
   from ours (only such a clue can restore uniqueness).  The move is accepted when the puzzle is
   unique and the rating (``sudoku.rate``) does not drop; a small annealing term (``TEMP``)
   sometimes accepts a small drop.  ``difficulty="hard"`` runs up to ``iters`` moves (stopping
   after ``patience`` moves without a new best) and keeps the best puzzle seen; ``"any"``
   stops after step 2 (fast, rating median ~0-1).

Random minimal puzzles rate around median 1, so step 3 is what makes the set hard.  The kernels
live in :mod:`.sudoku` beside the solver they call (numba's disk cache tracks one file only).  Each chunk of
puzzles is generated from its own seed ``(seed, chunk)`` (numba's generator is seeded in the
kernel), chunks run in a process pool, and each finished chunk is saved as ``chunk_*.npz``
in a cache folder so an interrupted build resumes where it stopped: results are identical for a
seed whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np

from .sudoku import _gen_chunk, box_shape, geometry

__all__ = ["DIFFICULTIES", "generate_chunk", "generate_puzzles", "chunk_seed"]

#: ``hard``: local search for high ratings (default for 9x9); ``any``: random minimal unique puzzles.
DIFFICULTIES = ("hard", "any")
#: Local-search moves per puzzle by board side for ``hard`` (tuned on 9x9 for the
#: Sudoku-Extreme-grade target: median rating >= 10, p90 >= 40).
DEFAULT_ITERS = {9: 4000}
#: Stop a puzzle's search after this many moves without a new best rating (0 = never); this
#: spends the budget on puzzles that are still climbing.
DEFAULT_PATIENCE = {9: 1000}
#: Bumped whenever the kernels' output changes, so stale chunk caches are not reused.
GENERATOR_VERSION = 3
#: Annealing temperature: a move losing dr is accepted with probability exp(dr / (TEMP*(1+r))).
TEMP = 0.05


def chunk_seed(seed: int, chunk: int, salt: str = "") -> int:
    """A 31-bit seed for chunk ``chunk`` of a build seeded ``seed`` (stable across processes)."""
    h = hashlib.sha256(f"eqr-sudoku/{salt}/{seed}/{chunk}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def generate_chunk(n: int, count: int, seed: int, difficulty: str = "hard", iters: int | None = None,
                   temp: float = TEMP, patience: int | None = None):
    """``count`` puzzles of side ``n`` from one seed.

    Returns ``(puzzles, solutions, ratings)``: (count, n*n) uint8 grids (0 = blank) and (count,)
    int32 ratings.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    box_shape(n)
    g = geometry(n)
    it = int(iters if iters is not None else DEFAULT_ITERS.get(n, 300))
    pat = int(patience if patience is not None else DEFAULT_PATIENCE.get(n, 0))
    puz = np.zeros((count, n * n), np.int32)
    sol = np.zeros((count, n * n), np.int32)
    rat = np.zeros(count, np.int32)
    _gen_chunk(int(seed), int(count), g.units, g.peers, g.full, n * n, it, difficulty == "hard",
               float(temp), pat, puz, sol, rat)
    return puz.astype(np.uint8), sol.astype(np.uint8), rat


def _chunk_job(args):
    n, count, seed, difficulty, iters, patience, path = args
    p, s, r = generate_chunk(n, count, seed, difficulty, iters, patience=patience)
    if path is not None:
        tmp = str(path) + ".tmp.npz"
        np.savez(tmp, puzzles=p, solutions=s, ratings=r)
        os.replace(tmp, path)
    return p, s, r


def generate_puzzles(n: int, count: int, seed: int, difficulty: str = "hard", *,
                     iters: int | None = None, chunk_size: int = 25, workers: int | None = None,
                     cache_dir: str | os.PathLike | None = None, salt: str = "",
                     progress: Callable[[int], None] | None = None, patience: int | None = None):
    """Generate ``count`` unique-solution puzzles, deterministic for ``(seed, salt)``.

    Work is split into chunks of ``chunk_size`` puzzles, chunk ``k`` seeded by
    ``chunk_seed(seed, k, salt)``, run on ``workers`` processes (default: all cores).  With
    ``cache_dir`` every finished chunk is stored there and reused on the next call (resume).
    ``progress(k)`` is called with the number of puzzles finished by each completed chunk.
    ``iters``/``patience``: local-search budget per puzzle (defaults per board size).

    Returns ``(puzzles, solutions, ratings)`` as in :func:`generate_chunk`, in chunk order.
    """
    nchunks = (count + chunk_size - 1) // chunk_size
    sizes = [min(chunk_size, count - k * chunk_size) for k in range(nchunks)]
    it = iters if iters is not None else DEFAULT_ITERS.get(n, 300)
    pat = patience if patience is not None else DEFAULT_PATIENCE.get(n, 0)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    results: list = [None] * nchunks
    jobs = []
    for k in range(nchunks):
        path = None
        if cache is not None:
            tag = f"v{GENERATOR_VERSION}_n{n}_{difficulty}_it{it}_p{pat}_s{seed}_{salt or 'x'}_c{chunk_size}_{k:05d}_{sizes[k]}"
            path = cache / f"chunk_{tag}.npz"
            if path.exists():
                try:
                    with np.load(path) as z:
                        results[k] = (z["puzzles"], z["solutions"], z["ratings"])
                    if progress:
                        progress(sizes[k])
                    continue
                except Exception:  # a corrupt cache file is regenerated, not trusted
                    path.unlink(missing_ok=True)
        jobs.append((k, (n, sizes[k], chunk_seed(seed, k, salt), difficulty, it, pat, path)))
    if workers is None:
        # "any" puzzles take milliseconds: a process pool would cost more than it saves
        workers = 1 if difficulty == "any" else (os.cpu_count() or 1)
    if jobs:
        if workers == 1 or len(jobs) == 1:
            for k, a in jobs:
                results[k] = _chunk_job(a)
                if progress:
                    progress(sizes[k])
        else:
            # warm the numba cache in the parent so workers load compiled code instead of compiling
            generate_chunk(n, 1, 0, difficulty, 1)
            # fork is fastest, but forking a process that runs JAX (multithreaded) can deadlock
            ctx = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
                futs = {ex.submit(_chunk_job, a): k for k, a in jobs}
                for f in as_completed(futs):
                    k = futs[f]
                    results[k] = f.result()
                    if progress:
                        progress(sizes[k])
    if not results:
        e = np.zeros((0, n * n), np.uint8)
        return e, e.copy(), np.zeros(0, np.int32)
    return (np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]),
            np.concatenate([r[2] for r in results]))

