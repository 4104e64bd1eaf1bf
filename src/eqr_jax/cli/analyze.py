"""`eqr analyze`: the attractor landscape of a trained model (docs/analysis.md).

    eqr analyze --checkpoint runs/tiny --data data/sudoku4-tiny --puzzles 64 --inits 16 --depth 64
    eqr analyze --reference official.pth --data data/sudoku-extreme --puzzles 32 --inits 32

Writes ``analysis.json`` and the plots (spectral radius, attractor census vs depth, convergence
curves, selection vs threshold, compute vs difficulty, PCA of latent paths) into ``--out``
(default ``<checkpoint>/analysis``, or ``analysis`` beside a ``--reference`` file; a ``gs://``
URL writes each file as one object), and prints a short summary.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from eqr_jax import modes, storage
from eqr_jax.cli import common

PROG = "eqr analyze"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    common.add_model_options(p)
    p.add_argument("--data", required=True, help="dataset directory (its test split is used)")
    p.add_argument("--puzzles", type=int, default=64, help="first N test puzzles (default 64)")
    p.add_argument("--inits", type=int, default=16, help="initialisations per puzzle (K)")
    p.add_argument("--depth", type=int, default=64, help="reasoning steps (D)")
    p.add_argument("--snapshots", type=common.int_list,
                   help="census depths, e.g. 4,16,64 (default D/16, D/4, D)")
    p.add_argument("--batch-size", type=int, default=32, help="puzzles per compiled call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-noise", action="store_true", help="run the noise-free step map")
    p.add_argument("--cluster-tol", type=float, default=0.05,
                   help="RMS latent distance per element joining two final states")
    p.add_argument("--convergence-metric", choices=modes.CONVERGENCE_METRICS,
                   default="latents", help="what steps-to-convergence watches (as eqr eval's)")
    p.add_argument("--tol", type=float, default=0.0,
                   help="convergence tolerance (default: 3 x noise_scale for latents with noise, "
                        "else 1e-3)")
    p.add_argument("--window", type=int, default=3, help="consecutive steps below --tol")
    p.add_argument("--krylov", type=int, default=32, help="Arnoldi Krylov dimension")
    p.add_argument("--restarts", type=int, default=2, help="Arnoldi restarts")
    p.add_argument("--radius-copies", type=int, default=0,
                   help="inits per puzzle whose end state gets a spectral radius (0: all)")
    p.add_argument("--pca-puzzle", type=int, default=-1,
                   help="puzzle drawn in the PCA plot (default: the most mixed one)")
    p.add_argument("--out", help="output directory or gs:// URL")
    p.add_argument("--no-plots", action="store_true")
    common.add_debug_option(p)
    return p


@common.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from eqr_jax.data.bucket import dataset_dir
    from eqr_jax.data.format import DataFormatError
    from eqr_jax.data.loader import EvalLoader

    if not dataset_dir(args.data).is_dir():
        return common.fail(PROG, f"dataset directory {args.data!r} not found")
    if args.puzzles < 1:
        return common.fail(PROG, f"--puzzles must be >= 1, got {args.puzzles}")
    try:
        loader = EvalLoader(args.data, min(args.puzzles, 256))
    except (DataFormatError, FileNotFoundError, ValueError) as e:
        return common.fail(PROG, e)
    xs, ys = [], []
    for batch in loader:
        m = batch["mask"]
        xs.append(batch["inputs"][m])
        ys.append(batch["labels"][m])
        if sum(len(x) for x in xs) >= args.puzzles:
            break
    inputs = np.concatenate(xs)[:args.puzzles]
    labels = np.concatenate(ys)[:args.puzzles]
    meta = loader.split.meta
    try:
        cfg, model, params = common.load_model(args)
    except common.load_errors() as e:
        return common.fail(PROG, e)
    weights = "raw" if args.no_ema else "EMA when saved, else raw"
    source = f"{args.checkpoint or args.reference} ({weights} weights)"
    out = args.out or (os.path.join(args.checkpoint, "analysis") if args.checkpoint else
                       os.path.join(os.path.dirname(args.reference if storage.is_remote(
                           args.reference) else os.path.abspath(args.reference)), "analysis"))
    if model.cfg.seq_len != inputs.shape[1] or model.cfg.vocab_size < meta.vocab_size:
        return common.fail(PROG, f"the model (seq_len {model.cfg.seq_len}, vocab "
                           f"{model.cfg.vocab_size}) does not fit the dataset {args.data} "
                           f"(seq_len {inputs.shape[1]}, vocab {meta.vocab_size})")
    from eqr_jax.analysis import (AnalysisOptions, analyze, save_landscape_plots,
                                  sudoku_difficulty, summary_lines)
    from eqr_jax.reporting import write_json
    try:
        opts = AnalysisOptions(inits=args.inits, depth=args.depth,
                               snapshots=tuple(args.snapshots or ()),
                               batch_size=args.batch_size, seed=args.seed,
                               noise=not args.no_noise, cluster_tol=args.cluster_tol,
                               conv_metric=args.convergence_metric, conv_tol=args.tol,
                               window=args.window, krylov=args.krylov,
                               restarts=args.restarts, radius_copies=args.radius_copies,
                               pca_puzzle=args.pca_puzzle)
        if args.pca_puzzle >= len(inputs):
            raise ValueError(f"--pca-puzzle {args.pca_puzzle} outside the {len(inputs)} puzzles")
    except ValueError as e:
        return common.fail(PROG, e)
    ratings, blanks = sudoku_difficulty(inputs, labels)
    out = str(common.check_writable(out))
    print(f"[eqr analyze] {source}; {args.data}: {len(inputs)} puzzles x {opts.inits} inits, "
          f"depth {opts.depth}, census at {list(opts.census_depths)}; writing to {out}",
          flush=True)
    res = analyze(model, params, inputs, labels, opts, ratings=ratings, blanks=blanks,
                  progress=True)
    res["source"] = source
    res["data"] = args.data if "://" in args.data else os.path.abspath(args.data)
    path = str(write_json(os.path.join(out, "analysis.json"), res))
    written = [path] + ([] if args.no_plots else save_landscape_plots(res, out))
    print("\n".join(summary_lines(res)))
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
