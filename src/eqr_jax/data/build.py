"""Build datasets in the reference on-disk format: Sudoku (generated, or Sudoku-Extreme from a
CSV folder or the hub, as the reference builds it) and Maze-Unique (docs/data.md).

The command line is ``eqr data sudoku|maze`` (`eqr_jax.cli.data`; also
``python -m eqr_jax.data.build``). ``out`` may be a ``gs://`` folder: the dataset is built in a
local folder and uploaded (`eqr_jax.data.bucket.building_into`).
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import format as fmt
from .augment import (apply_sudoku_transform, augment_sudoku, dihedral,
                      reference_sudoku_transforms)
from .generate import DIFFICULTIES, generate_puzzles
from .sudoku import box_shape, canonical_form, rate

__all__ = ["build_sudoku_dataset", "build_maze_dataset", "rating_summary",
           "check_generated_name", "REFERENCE_SEED"]

#: The seed of the reference's published datasets (Sudoku-Extreme subsample, Maze-Unique).
REFERENCE_SEED = 42


def check_generated_name(out) -> None:
    """Refuse to write generated puzzles under a ``sudoku-extreme`` name: that name means the
    real Sudoku-Extreme data (hub or CSV import), and results on the two are not comparable."""
    if "sudoku-extreme" in Path(out).name.lower():
        from eqr_jax.config import ConfigError

        raise ConfigError(
            f"{out}: generated puzzles are not Sudoku-Extreme; choose another folder name, or "
            f"import the real data with --source hub or --source csv DIR")


def _bucket_out(build):
    """Let ``build(out, ...)`` take a ``gs://`` ``out``: it builds in a local folder, which is
    then uploaded (never a local folder named ``gs:``)."""

    @functools.wraps(build)
    def wrapper(out, *args, **kwargs):
        if "://" not in str(out):
            return build(out, *args, **kwargs)
        from eqr_jax.data.bucket import building_into

        bound = inspect.signature(build).bind(out, *args, **kwargs)
        if build.__name__ == "build_sudoku_dataset" and \
                bound.arguments.get("source", "generate") == "generate":
            check_generated_name(out)  # before anything is built, naming the URL
        with building_into(str(out)) as stage:
            return build(stage, *args, **kwargs)

    return wrapper


def rating_summary(ratings) -> dict:
    """Percentiles and a histogram (bins 0, 1-4, 5-9, 10-19, 20-39, 40-79, 80+) of ratings."""
    r = np.asarray(ratings, np.float64)
    if r.size == 0:
        return {"count": 0}
    edges = [0, 1, 5, 10, 20, 40, 80, np.inf]
    names = ["0", "1-4", "5-9", "10-19", "20-39", "40-79", "80+"]
    hist = np.histogram(r, bins=edges)[0]
    return {"count": int(r.size), "mean": float(r.mean()), "median": float(np.median(r)),
            "p10": float(np.percentile(r, 10)), "p90": float(np.percentile(r, 90)),
            "max": float(r.max()), "frac_ge_10": float((r >= 10).mean()),
            "histogram": dict(zip(names, hist.tolist()))}


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        class _Null:
            def update(self, k=1): pass
            def close(self): pass
        return _Null()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="puzzle", file=sys.stderr, dynamic_ncols=True)


def _canon_key(grid: np.ndarray) -> bytes:
    return canonical_form(grid).astype(np.uint8).tobytes()


def _generate_split(name, n, count, seed, difficulty, iters, workers, cache, min_rating, distinct,
                    seen: set, bar, patience=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Generate ``count`` puzzles whose keys are not in ``seen`` (updated); returns the arrays and
    the number of candidates rejected (equivalent/duplicate or below ``min_rating``)."""
    P, S, R = [], [], []
    rejected = 0
    rnd = 0
    while sum(len(p) for p in P) < count:
        need = count - sum(len(p) for p in P)
        ask = need if rnd == 0 else max(need + need // 2, 8)
        p, s, r = generate_puzzles(n, ask, seed, difficulty, iters=iters, workers=workers,
                                   cache_dir=cache, salt=f"{name}{rnd}",
                                   progress=bar.update if rnd == 0 else None, patience=patience)
        keep = []
        for i in range(len(p)):
            if len(keep) >= need:
                break
            if min_rating is not None and r[i] < min_rating:
                rejected += 1
                continue
            if distinct != "none":
                key = _canon_key(p[i].reshape(n, n)) if distinct == "canonical" else p[i].tobytes()
                if key in seen:
                    rejected += 1
                    continue
                seen.add(key)
            keep.append(i)
        if rnd > 0:
            bar.update(len(keep))
        P.append(p[keep]); S.append(s[keep]); R.append(r[keep])
        rnd += 1
        if rnd > 50:
            raise RuntimeError(f"could not find {count} distinct {name} puzzles of size {n} "
                               f"(distinct={distinct!r}, min_rating={min_rating}); small boards "
                               f"have few inequivalent puzzles — use --distinct exact or none")
    return np.concatenate(P), np.concatenate(S), np.concatenate(R), rejected


def _augment_groups_reference(puzzles, solutions, num_aug, rng: np.random.RandomState,
                              progress: bool = False):
    """As `_augment_groups`, with the reference builder's transforms and draw order from the
    legacy stream ``rng`` (puzzle by puzzle, transform by transform)."""
    G, N = len(puzzles), puzzles.shape[1]
    bar = _bar(G, f"augmenting ({num_aug} per puzzle)", progress and num_aug > 0)
    n = int(round(np.sqrt(N)))
    xs = np.empty((G * (1 + num_aug), N), np.uint8)
    ys = np.empty_like(xs)
    for g in range(G):
        base = g * (1 + num_aug)
        xs[base], ys[base] = puzzles[g], solutions[g]
        if num_aug:
            t = reference_sudoku_transforms(rng, num_aug, n)
            xs[base + 1: base + 1 + num_aug] = apply_sudoku_transform(puzzles[g], t)
            ys[base + 1: base + 1 + num_aug] = apply_sudoku_transform(solutions[g], t)
        bar.update(1)
    bar.close()
    return xs + 1, ys + 1, np.full(G, 1 + num_aug)


def _read_extreme_split(path: Path, want: int | None, rng, min_rating, skip_invalid: bool,
                        check_unique: bool, subsample: bool, progress: bool = False):
    """Rows of one Sudoku-Extreme CSV as the reference builder selects them.

    ``subsample`` (train): when ``want`` < rows, ``rng.choice(rows, want, replace=False)`` in the
    drawn order (no draw otherwise); else (test) the first ``want`` rows, or all when None.
    Only the selected rows are validated (`validate_pair`). Returns (puzzles, solutions) uint8
    digit grids (k, 81) and the issues of skipped rows.
    """
    from .importers import ValidationError, ValidationIssue, scan_sudoku_csv, validate_pair
    from .sudoku import PuzzleFormatError
    count = scan_sudoku_csv(path, min_rating, select=(), skip_invalid=skip_invalid).count
    if want is not None and want < count:
        idx = rng.choice(count, int(want), replace=False) if subsample else np.arange(int(want))
    else:
        idx = np.arange(count)
    scan = scan_sudoku_csv(path, min_rating, select=idx, skip_invalid=skip_invalid)
    issues = list(scan.issues)
    P, S = [], []
    bar = _bar(len(idx), f"validating {path.name}", progress and len(idx) > 10_000)
    for i in idx:
        bar.update(1)
        q, a, _, _, line = scan.rows[int(i)]
        try:
            p, sol = validate_pair(q, a, 9, check_unique)
        except PuzzleFormatError as e:
            issues.append(ValidationIssue(str(path), line, str(e)))
            continue
        P.append(p)
        S.append(sol)
    bar.close()
    bad = issues[len(scan.issues):]
    if bad and not skip_invalid:
        raise ValidationError(bad)
    shape = (len(P), 81)
    P = np.asarray(P, np.uint8).reshape(shape)
    S = np.asarray(S, np.uint8).reshape(shape)
    return P, S, issues


def _augment_groups(puzzles, solutions, num_aug, seed, n):
    """Inputs/labels tokens (G*(1+num_aug), n*n) uint8 and group sizes: original then copies."""
    G = len(puzzles)
    N = n * n
    xs = np.empty((G * (1 + num_aug), N), np.uint8)
    ys = np.empty_like(xs)
    rng = np.random.default_rng([int(seed), 0xA06])
    for g in range(G):
        base = g * (1 + num_aug)
        xs[base], ys[base] = puzzles[g], solutions[g]
        if num_aug:
            ap, asol = augment_sudoku(puzzles[g], solutions[g], num_aug, rng)
            xs[base + 1: base + 1 + num_aug], ys[base + 1: base + 1 + num_aug] = ap, asol
    return xs + 1, ys + 1, np.full(G, 1 + num_aug)


def _generated_puzzles(out: Path, n: int, ntrain: int, ntest: int, seed: int, difficulty: str,
                       iters, workers, min_rating, distinct: str, progress: bool, patience):
    """Our generator's train and test puzzles ((puzzles, solutions, ratings) each, 0-based) and
    the summary entries of how they were made."""
    cache = out / ".cache"
    bar = _bar(ntrain + ntest, f"generating {n}x{n} ({difficulty})", progress)
    seen: set = set()
    trp, trs, trr, rej1 = _generate_split("train", n, ntrain, seed, difficulty, iters, workers,
                                          cache, min_rating, distinct, seen, bar, patience)
    tep, tes, ter, rej2 = _generate_split("test", n, ntest, seed, difficulty, iters, workers,
                                          cache, min_rating, distinct, seen, bar, patience)
    bar.close()
    return ((trp, trs, trr), (tep, tes, ter),
            {"difficulty": difficulty, "distinct": distinct, "rejected_candidates": rej1 + rej2})


def _imported_puzzles(source: str, csv_dir, train, test, num_aug: int, seed: int, min_rating,
                      skip_invalid: bool, check_unique: bool, progress: bool):
    """Sudoku-Extreme's splits as the reference builder makes them (``source`` csv or hub):
    train (puzzles, solutions, our ratings of a sample), its augmented groups (1-based tokens,
    group sizes), test (puzzles, solutions, ratings), the skipped rows, and summary entries."""
    from .importers import download_sudoku_extreme
    n = 9
    folder = download_sudoku_extreme() if source == "hub" else csv_dir
    if folder is None:
        raise ValueError("--source csv needs a folder (--source csv DIR)")
    folder = Path(folder)
    for split in ("train", "test"):
        if not (folder / f"{split}.csv").is_file():
            raise FileNotFoundError(
                f"{folder / (split + '.csv')}: not found (expected train.csv and test.csv in "
                f"{folder}, laid out as the hub dataset sapientinc/sudoku-extreme)")
    rng = np.random.RandomState(seed)  # the reference seeds NumPy's global legacy stream
    trp, trs, iss_tr = _read_extreme_split(folder / "train.csv", train, rng, min_rating,
                                           skip_invalid, check_unique, True, progress)
    groups = _augment_groups_reference(trp, trs, num_aug, rng, progress)
    tep, tes, iss_te = _read_extreme_split(folder / "test.csv", test, rng, min_rating,
                                           skip_invalid, check_unique, False, progress)
    skipped = {"train": [str(i) for i in iss_tr], "test": [str(i) for i in iss_te]}
    # our rating of what was imported (a sample when the split is very large)
    sel = np.random.default_rng(seed).permutation(len(tep))[:5000]
    ter = np.array([rate(tep[i].reshape(n, n), 2) for i in np.sort(sel)], np.int32)
    trr = np.array([rate(p.reshape(n, n), 2) for p in trp[:5000]], np.int32)
    extra = {"csv_dir": str(folder), "skipped_rows": {k: len(v) for k, v in skipped.items()}}
    return (trp, trs, trr), groups, (tep, tes, ter), skipped, extra


@_bucket_out
def build_sudoku_dataset(out, size: int = 9, train: int | None = 1000, test: int | None = 1000,
                         num_aug: int = 1000, seed: int | None = None, source: str = "generate",
                         csv_dir=None, min_rating: float | None = None, workers: int | None = None,
                         progress: bool = True, difficulty: str | None = None,
                         iters: int | None = None, distinct: str | None = None,
                         skip_invalid: bool = False, check_unique: bool = True,
                         verbose: bool = True, patience: int | None = None) -> dict:
    """Build a Sudoku dataset in ``out`` (train with ``num_aug`` augmentations per puzzle, test plain).

    Args:
      source: ``generate`` (our generator), ``csv`` (``csv_dir`` holding train.csv/test.csv in the
        Sudoku-Extreme format) or ``hub`` (download ``sapientinc/sudoku-extreme``).
      train, test: number of original puzzles.  For csv/hub, ``train`` rows are subsampled
        uniformly (None = all) and ``test`` = None keeps every test row (the reference's choice).
      seed: default 42 for csv/hub (the reference's), 0 for generate. csv/hub builds are the
        reference builder's, array for array: one legacy NumPy stream seeded with ``seed``
        draws the train subsample (in drawn order, not sorted), then each puzzle's
        ``num_aug`` transforms in the reference's draw order; the original comes first in its
        group. The test split is every row, unaugmented.
      difficulty: generator mode, ``hard`` (local search; default for 9x9 and up) or ``any``
        (random minimal unique puzzles, fast; default for smaller boards).
      min_rating: keep only puzzles rated at least this (csv/hub: the file's rating column, as
        the reference's ``--min-difficulty``; generate: our rating, regenerating rejects).
      distinct: ``canonical`` (no two puzzles equivalent, so test is inequivalent to train;
        default for boards >= 6), ``exact`` (no identical puzzles; default below 6, where few
        inequivalent puzzles exist) or ``none``.
      iters, patience: local-search moves per puzzle for ``hard``, and the number of moves
        without a new best after which a puzzle's search stops (defaults tuned per size).
    Returns a summary dict (also written to ``out/build_info.json``).
    """
    t0 = time.time()
    out = Path(out)
    if seed is None:
        seed = 0 if source == "generate" else REFERENCE_SEED
    if source == "generate":
        check_generated_name(out)
    box_shape(size)
    difficulty = difficulty or ("hard" if size >= 9 else "any")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}")
    distinct = distinct or ("canonical" if size >= 6 else "exact")
    if distinct not in ("canonical", "exact", "none"):
        raise ValueError("distinct must be canonical, exact or none")
    n = size
    summary: dict = {"kind": "sudoku", "size": n, "source": source, "seed": seed, "num_aug": num_aug}
    skipped = {}
    if source == "generate":
        ntrain = 1000 if train is None else int(train)
        ntest = 1000 if test is None else int(test)
        (trp, trs, trr), (tep, tes, ter), extra = _generated_puzzles(
            out, n, ntrain, ntest, seed, difficulty, iters, workers, min_rating, distinct,
            progress, patience)
        xs, ys, gsz = _augment_groups(trp, trs, int(num_aug), seed, n)
    elif source in ("csv", "hub"):
        if n != 9:
            raise ValueError("Sudoku-Extreme CSV files hold 9x9 puzzles; use --size 9")
        (trp, trs, trr), (xs, ys, gsz), (tep, tes, ter), skipped, extra = _imported_puzzles(
            source, csv_dir, train, test, int(num_aug), seed, min_rating, skip_invalid,
            check_unique, progress)
    else:
        raise ValueError(f"source must be generate, csv or hub, got {source!r}")
    summary.update(extra)
    vocab = n + 2
    out.mkdir(parents=True, exist_ok=True)
    fmt.write_split(out, "train", xs, ys, group_sizes=gsz, vocab_size=vocab)
    fmt.write_split(out, "test", tep + 1, tes + 1, vocab_size=vocab)
    fmt.write_identifiers(out)
    summary.update(
        train_puzzles=int(len(trp)), train_examples=int(len(xs)), test_puzzles=int(len(tep)),
        seq_len=n * n, vocab_size=vocab,
        rating_train=rating_summary(trr), rating_test=rating_summary(ter),
        seconds=round(time.time() - t0, 2))
    info = dict(summary, skipped_row_details={k: v[:100] for k, v in skipped.items()},
                ratings_test=ter.tolist()[:5000], ratings_train=trr.tolist()[:5000])
    (out / "build_info.json").write_text(json.dumps(info, indent=1))
    if verbose:
        _print_summary(summary, out)
    return summary


@_bucket_out
def build_maze_dataset(out, grid: int = 30, train: int = 1000, test: int = 1000, min_len: int = 100,
                       max_len: int = 140, seed: int = REFERENCE_SEED, maze_mode: str = "perfect",
                       wall_prob: float = 0.37, require_unique: bool = True, dedupe: bool = True,
                       num_aug: int = 0, max_length_resamples: int = 50, max_grid_attempts: int = 200,
                       max_start_attempts: int = 200, strict: bool = True, verify: bool = True,
                       progress: bool = True, verbose: bool = True) -> dict:
    """Build a Maze-Unique dataset in ``out``, draw for draw the reference builder's (one
    ``default_rng(seed)`` stream for train then test; seed 42 and the defaults here are the
    published preset's, so the default build equals the reference's byte for byte).

    ``num_aug`` > 0 adds up to 7 dihedral transforms of every train maze to its group (the
    reference does not augment mazes).  ``verify`` checks every label is the unique shortest path.
    """
    from .maze import MazeConfig, generate_mazes, verify_maze
    t0 = time.time()
    cfg = MazeConfig(grid=grid, min_len=min_len, max_len=max_len, maze_mode=maze_mode,
                     wall_prob=wall_prob, require_unique=require_unique, dedupe=dedupe,
                     max_length_resamples=max_length_resamples, max_grid_attempts=max_grid_attempts,
                     max_start_attempts=max_start_attempts, strict=strict)
    if not 0 <= num_aug <= 7:
        raise ValueError("maze --num-aug must be 0..7 (dihedral transforms)")
    bar = _bar(train + test, f"generating {grid}x{grid} mazes", progress)
    (trx, try_, trl), (tex, tey, tel) = generate_mazes(cfg, [train, test], seed, progress=bar.update)
    bar.close()
    if verify:
        for name, X, Y in (("train", trx, try_), ("test", tex, tey)):
            for i in range(len(X)):
                err = verify_maze(X[i], Y[i])
                if err:
                    raise RuntimeError(f"{name} maze {i} failed verification: {err}")
    if num_aug:
        ks = np.arange(1, 1 + num_aug)
        gx, gy = [], []
        for i in range(len(trx)):
            a, b = trx[i].reshape(grid, grid), try_[i].reshape(grid, grid)
            gx += [a.ravel()] + [dihedral(a, k).ravel() for k in ks]
            gy += [b.ravel()] + [dihedral(b, k).ravel() for k in ks]
        trx, try_ = np.array(gx, np.uint8), np.array(gy, np.uint8)
        gsz = np.full(train, 1 + num_aug)
    else:
        gsz = None
    out = Path(out)
    fmt.write_split(out, "train", trx, try_, group_sizes=gsz, vocab_size=6)
    fmt.write_split(out, "test", tex, tey, vocab_size=6)
    fmt.write_identifiers(out)
    lens = np.concatenate([trl, tel])
    summary = {"kind": "maze", "grid": grid, "maze_mode": maze_mode, "seed": seed,
               "train_mazes": int(train), "train_examples": int(len(trx)), "test_mazes": int(test),
               "seq_len": grid * grid, "vocab_size": 6, "num_aug": num_aug,
               "path_length": {"min": int(lens.min()), "max": int(lens.max()),
                               "mean": round(float(lens.mean()), 2)},
               "verified": bool(verify), "seconds": round(time.time() - t0, 2)}
    (out / "build_info.json").write_text(json.dumps(summary, indent=1))
    if verbose:
        _print_summary(summary, out)
    return summary


def _print_summary(s: dict, out) -> None:
    print(f"[eqr data] wrote {out} in {s['seconds']:.1f}s")
    if s["kind"] == "sudoku":
        print(f"  train: {s['train_puzzles']} puzzles -> {s['train_examples']} examples "
              f"(1 + {s['num_aug']} augmentations each); test: {s['test_puzzles']} puzzles")
        for split in ("train", "test"):
            r = s[f"rating_{split}"]
            if r.get("count"):
                print(f"  {split} rating: median {r['median']:.1f}, p90 {r['p90']:.1f}, "
                      f"mean {r['mean']:.1f}, max {r['max']:.0f}, >=10: {100 * r['frac_ge_10']:.0f}%"
                      f"  histogram {r['histogram']}")
        if s.get("skipped_rows"):
            print(f"  skipped invalid rows: {s['skipped_rows']}")
    else:
        print(f"  train: {s['train_mazes']} mazes ({s['train_examples']} examples); test: "
              f"{s['test_mazes']}; path length {s['path_length']}")


if __name__ == "__main__":  # `python -m eqr_jax.data.build ...`: an alias of `eqr data`
    from eqr_jax.cli.data import main

    sys.exit(main())
