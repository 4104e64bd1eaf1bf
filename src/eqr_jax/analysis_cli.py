"""`eqr analyze`: the attractor landscape of a trained model (docs/analysis.md).

    eqr analyze --checkpoint runs/tiny --data data/sudoku4-tiny --puzzles 64 --inits 16 --depth 64
    eqr analyze --reference official.pth --data data/sudoku-extreme --puzzles 32 --inits 32

Writes ``analysis.json`` and the plots (spectral radius, attractor census vs depth, convergence
curves, selection vs threshold, compute vs difficulty, PCA of latent paths) into ``--out``
(default ``<checkpoint>/analysis``, or ``analysis`` beside a ``--reference`` file), and prints a
short summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import numpy as np

from eqr_jax.evaluation_cli import int_list


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqr analyze", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory, its checkpoints/ or one step directory")
    src.add_argument("--reference", help="an official PyTorch .pth checkpoint")
    p.add_argument("--data", required=True, help="dataset directory (its test split is used)")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--no-ema", action="store_true", help="use raw instead of EMA weights")
    p.add_argument("--puzzles", type=int, default=64, help="first N test puzzles (default 64)")
    p.add_argument("--inits", type=int, default=16, help="initialisations per puzzle (K)")
    p.add_argument("--depth", type=int, default=64, help="reasoning steps (D)")
    p.add_argument("--snapshots", type=int_list,
                   help="census depths, e.g. 4,16,64 (default D/16, D/4, D)")
    p.add_argument("--batch-size", type=int, default=32, help="puzzles per compiled call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-noise", action="store_true", help="run the noise-free step map")
    p.add_argument("--cluster-tol", type=float, default=0.05,
                   help="RMS latent distance per element joining two final states")
    p.add_argument("--convergence-metric", choices=("latents", "logits"), default="latents",
                   help="what steps-to-convergence watches (as eqr eval's option)")
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
    p.add_argument("--out", help="output directory")
    p.add_argument("--no-plots", action="store_true")
    return p


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, NumPy scalars/arrays -> Python."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def load_reference_model(path: str, seq_len: int, vocab_size: int, use_ema: bool = True):
    """(EqRModel, params, description) from an official ``.pth``; sizes from the dataset."""
    from eqr_jax.interop import config_from_reference, load_reference_checkpoint, \
        params_from_reference
    from eqr_jax.model import EqRModel

    ck = load_reference_checkpoint(path)
    if not ck.get("config"):
        raise ValueError(f"{path}: the checkpoint carries no config, so the model cannot be built")
    cfg = config_from_reference(ck["config"], seq_len=seq_len, vocab_size=vocab_size)
    sd = ck["ema_state_dict"] if (use_ema and ck.get("ema_state_dict")) else ck["state_dict"]
    weights = "ema" if sd is ck.get("ema_state_dict") else "raw"
    return EqRModel(cfg), params_from_reference(sd, cfg), f"{path} (step {ck.get('step')}, " \
                                                          f"{weights} weights)"


def sudoku_difficulty(inputs: np.ndarray, labels: np.ndarray):
    """(ratings, blanks) when every puzzle is a Sudoku whose label is a valid solution; else
    (None, None). Tokens: 1 = blank, d + 1 = digit d."""
    from eqr_jax.data import sudoku

    n = math.isqrt(inputs.shape[1])
    if n * n != inputs.shape[1] or n < 2:
        return None, None
    ratings, blanks = [], []
    for x, y in zip(inputs, labels):
        if x.min() < 1 or x.max() > n + 1:
            return None, None
        grid, sol = sudoku.grid_from_tokens(x, n), sudoku.grid_from_tokens(y, n)
        try:
            if sudoku.check_givens(grid) or not sudoku.is_valid_solution(grid, sol):
                return None, None
        except sudoku.PuzzleFormatError:
            return None, None
        # A puzzle with many solutions can have a huge search tree: cap it (the rating is then
        # a lower bound); generated and imported puzzles have one solution.
        ratings.append(sudoku.rate(grid, max_solutions=2))
        blanks.append(int((grid == 0).sum()))
    return ratings, blanks


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from eqr_jax import config as config_lib
    from eqr_jax.data.format import DataFormatError
    from eqr_jax.data.loader import EvalLoader

    if not os.path.isdir(args.data):
        print(f"eqr analyze: dataset directory {args.data!r} not found", file=sys.stderr)
        return 2
    if args.puzzles < 1:
        print(f"eqr analyze: --puzzles must be >= 1, got {args.puzzles}", file=sys.stderr)
        return 2
    try:
        loader = EvalLoader(args.data, min(args.puzzles, 256))
    except (DataFormatError, FileNotFoundError, ValueError) as e:
        print(f"eqr analyze: {e}", file=sys.stderr)
        return 2
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
        if args.checkpoint:
            from eqr_jax.evaluation_cli import load_model
            cfg, model, params = load_model(args)
            source = f"{args.checkpoint} ({'raw' if args.no_ema else 'EMA when saved, else raw'} " \
                     "weights)"
            out = args.out or os.path.join(args.checkpoint, "analysis")
        else:
            model, params, source = load_reference_model(args.reference, meta.seq_len,
                                                          meta.vocab_size, not args.no_ema)
            out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.reference)),
                                           "analysis")
    except (FileNotFoundError, ValueError, ImportError, config_lib.ConfigError) as e:
        print(f"eqr analyze: {e}", file=sys.stderr)
        return 2
    if model.cfg.seq_len != inputs.shape[1] or model.cfg.vocab_size < meta.vocab_size:
        print(f"eqr analyze: the model (seq_len {model.cfg.seq_len}, vocab "
              f"{model.cfg.vocab_size}) does not fit the dataset {args.data} (seq_len "
              f"{inputs.shape[1]}, vocab {meta.vocab_size})", file=sys.stderr)
        return 2
    from eqr_jax.analysis.report import AnalysisOptions, analyze, save_plots, summary_lines
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
        print(f"eqr analyze: {e}", file=sys.stderr)
        return 2
    ratings, blanks = sudoku_difficulty(inputs, labels)
    print(f"[eqr analyze] {source}; {args.data}: {len(inputs)} puzzles x {opts.inits} inits, "
          f"depth {opts.depth}, census at {list(opts.census_depths)}", flush=True)
    res = analyze(model, params, inputs, labels, opts, ratings=ratings, blanks=blanks,
                  progress=True)
    res["source"], res["data"] = source, os.path.abspath(args.data)
    res = _clean(res)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "analysis.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, allow_nan=False)
    os.replace(tmp, path)
    written = [path] + ([] if args.no_plots else save_plots(res, out))
    print("\n".join(summary_lines(res)))
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
