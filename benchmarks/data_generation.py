"""Benchmark the Sudoku generator: puzzles per second and the rating distribution.

    python benchmarks/data_generation.py --size 9 --count 100            # hard 9x9
    python benchmarks/data_generation.py --size 9 --count 500 --difficulty any
    python benchmarks/data_generation.py --rate-only                     # rater speed

The first run includes numba compilation (cached on disk afterwards); a 1-puzzle warm-up is run
and excluded from the timing.
"""

from __future__ import annotations

import argparse
import os
import time

from eqr_jax.data.build import rating_summary
from eqr_jax.data.generate import generate_chunk, generate_puzzles
from eqr_jax.data.sudoku import rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=9)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--difficulty", default=None, help="hard (default for 9x9) or any")
    p.add_argument("--iters", type=int, default=None, help="local-search moves per puzzle")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate-only", action="store_true", help="time only the rater on generated puzzles")
    a = p.parse_args()
    diff = a.difficulty or ("hard" if a.size >= 9 else "any")
    generate_chunk(a.size, 1, 0, diff, 1)                     # compile / load the numba cache
    t = time.perf_counter()
    puz, _, ratings = generate_puzzles(a.size, a.count, a.seed, diff, iters=a.iters, workers=a.workers)
    dt = time.perf_counter() - t
    workers = a.workers or os.cpu_count()
    if not a.rate_only:
        print(f"{a.count} {a.size}x{a.size} puzzles ({diff}, iters={a.iters or 'default'}) on "
              f"{workers} worker(s): {dt:.1f}s = {a.count / dt:.2f} puzzles/s "
              f"({dt * workers / a.count:.3f} core-s per puzzle)")
        s = rating_summary(ratings)
        print(f"rating: median {s['median']:.1f}  p10 {s['p10']:.1f}  p90 {s['p90']:.1f}  "
              f"mean {s['mean']:.1f}  max {s['max']:.0f}  >=10: {100 * s['frac_ge_10']:.0f}%")
        width = max(s["histogram"].values())
        for k, v in s["histogram"].items():
            print(f"  {k:>6} {v:6d} {'#' * int(round(40 * v / max(1, width)))}")
        print(f"mean clues: {(puz > 0).sum(1).mean():.1f}")
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        for g in puz:
            rate(g)
    dr = (time.perf_counter() - t) / (reps * len(puz))
    print(f"rater: {1e6 * dr:.0f} us per puzzle (mean rating {ratings.mean():.1f})")


if __name__ == "__main__":
    main()
