"""`eqr eval`: evaluate a checkpoint over a depth x breadth grid.

    eqr eval --checkpoint runs/tiny --data data/sudoku4-tiny --depth 4,16,64 --breadth 1,8
    eqr eval --checkpoint runs/sudoku --depth 16,64,256 --breadth 1,8,64 --halt convergence
    eqr eval --reference eqr.pth --data data/sudoku-extreme-1k-aug-1000 --depth 64 --noise 0.5

Prints a depth x breadth table of exact accuracy (and of majority vote, convergence top-k,
any-correct and mean steps used), writes ``results.json`` and ``results.csv`` and, unless
``--no-plots``, ``accuracy_vs_depth.png``, ``residual_vs_step.png`` and ``steps_histogram.png``
into ``--out`` (default ``<checkpoint>/eval``, or ``<reference>-eval`` beside a ``.pth``).
``--reference`` runs an official PyTorch checkpoint directly (read safely, without torch; see
``eqr convert`` to convert it once). Batches are sharded over all local devices.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from typing import Any, Iterable, Mapping, Sequence

from eqr_jax import config as config_lib
from eqr_jax.config import EvalConfig
from eqr_jax.pth import PthError


def load_errors() -> tuple[type[Exception], ...]:
    """What `load_model` raises for bad input (reported as ``eqr <cmd>: message``, status 2)."""
    from eqr_jax.interop import CheckpointMismatchError  # imports JAX: only once it is needed

    return (FileNotFoundError, config_lib.ConfigError, PthError, CheckpointMismatchError)


def int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def add_eval_options(p: argparse.ArgumentParser, depth_help: str, breadth_help: str,
                     depth_type=int_list, breadth_type=int_list) -> None:
    """Options shared by `eqr eval` and `eqr solve`."""
    p.add_argument("--checkpoint", help="run directory, its checkpoints/ or one step directory")
    p.add_argument("--reference", metavar="FILE.pth",
                   help="an official PyTorch checkpoint instead of --checkpoint (read without "
                   "torch; its seq_len/vocab_size come from --data, the flags below or its "
                   "weights)")
    p.add_argument("--seq-len", type=int, help="with --reference: the dataset's sequence length")
    p.add_argument("--vocab-size", type=int, help="with --reference: the dataset's vocabulary")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--no-ema", action="store_true", help="use raw instead of EMA weights")
    p.add_argument("--noise", type=float, help="update-noise std at test time (default: the "
                   "model's training value; the paper uses 0.5 for Sudoku, 0.1 for Maze)")
    p.add_argument("--depth", type=depth_type, help=depth_help)
    p.add_argument("--breadth", type=breadth_type, help=breadth_help)
    p.add_argument("--halt", choices=("fixed", "q_halt", "convergence"),
                   help="per-row halting rule (default: the config's, normally fixed)")
    p.add_argument("--solver", choices=("unroll", "anderson", "fixed_point"),
                   help="noisy unroll (reference) or a jaxopt solve of the noise-free map")
    p.add_argument("--tol", type=float, help="convergence tolerance (halt=convergence, solvers)")
    p.add_argument("--window", type=int,
                   help="consecutive steps below --tol to halt; also the convergence-score window")
    p.add_argument("--convergence-metric", choices=("logits", "latents"))
    p.add_argument("--top-k", type=int, help="convergence top-k selection (0: off)")
    p.add_argument("--max-rows", type=int, help="rows (copies x puzzles) per compiled call")
    p.add_argument("--seed", type=int)


def eval_config_from_args(base: EvalConfig, args: argparse.Namespace) -> EvalConfig:
    upd = {"halt": args.halt, "solver": args.solver, "convergence_tol": args.tol,
           "convergence_window": args.window, "convergence_metric": args.convergence_metric,
           "convergence_top_k": args.top_k, "max_rows": args.max_rows, "seed": args.seed,
           "max_batches": getattr(args, "max_batches", None), "noise_scale": args.noise}
    return dataclasses.replace(base, **{k: v for k, v in upd.items() if v is not None})


def load_model(args: argparse.Namespace):
    """(RunConfig, EqRModel, params) from ``--checkpoint`` or ``--reference``."""
    from eqr_jax.model import EqRModel

    if bool(args.checkpoint) == bool(args.reference):
        raise config_lib.ConfigError("give exactly one of --checkpoint DIR or --reference "
                                     "FILE.pth")
    if args.reference:
        from eqr_jax.interop import load_reference_model

        if args.step is not None:
            raise config_lib.ConfigError("--step applies to --checkpoint, not --reference")
        cfg, params, which = load_reference_model(
            args.reference, use_ema=not args.no_ema, data=getattr(args, "data", None),
            seq_len=args.seq_len, vocab_size=args.vocab_size)
        print(f"[eqr] {args.reference}: {which} weights, seq_len {cfg.model.seq_len}, "
              f"vocab {cfg.model.vocab_size}", file=sys.stderr, flush=True)
    else:
        from eqr_jax.checkpoint import load_for_inference

        for flag in ("seq_len", "vocab_size"):
            if getattr(args, flag) is not None:
                raise config_lib.ConfigError(f"--{flag.replace('_', '-')} applies to "
                                             "--reference; a checkpoint records its sizes")
        cfg, params = load_for_inference(args.checkpoint, step=args.step,
                                         use_ema=not args.no_ema)
    return cfg, EqRModel(cfg.model), params


def write_results(results: Mapping[str, Any], out_dir: str, plots: bool = True) -> list[str]:
    """results.json, results.csv and (optionally) the three plots in ``out_dir``."""
    from eqr_jax.evaluation import results_rows

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.csv")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1, default=float)
    rows = results_rows(results)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    if plots:
        from eqr_jax.analysis import save_all_plots
        paths += save_all_plots(results, out_dir)
    return paths


def report(results: Mapping[str, Any]) -> str:
    """The console tables: every headline metric that any setting reports."""
    from eqr_jax.evaluation import TABLE_KEYS, format_table

    present = {k for s in results["settings"] for k in s["metrics"]}
    return "\n\n".join(format_table(results, k) for k in TABLE_KEYS if k in present)


def run(model, params, loader: Iterable, eval_cfg: EvalConfig, depths: Sequence[int],
        breadths: Sequence[int], out_dir: str | None = None, plots: bool = True,
        progress: bool = False) -> dict[str, Any]:
    """Evaluate, print the tables, write the files; returns the results dict."""
    from eqr_jax.evaluation import evaluate_dataset

    results = evaluate_dataset(model, params, loader, eval_cfg, depths, breadths,
                               progress=progress)
    print(report(results), flush=True)
    if out_dir:
        for p in write_results(results, out_dir, plots):
            print(f"wrote {p}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqr eval", description=__doc__.split("\n\n")[0])
    add_eval_options(p, "depths, e.g. 16,64,256 (default: the config's eval.depth)",
                     "breadths, e.g. 1,8,64 (default: the config's eval.breadth)")
    p.add_argument("--data", help="dataset directory (default: the checkpoint's data.path)")
    p.add_argument("--batch-size", type=int, help="puzzles per batch (default: eval batch size)")
    p.add_argument("--max-batches", type=int, help="evaluate only the first N batches")
    p.add_argument("--out", help="output directory (default: <checkpoint>/eval)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, model, params = load_model(args)
        eval_cfg = eval_config_from_args(cfg.eval, args)
    except load_errors() as e:
        print(f"eqr eval: {e}", file=sys.stderr)
        return 2
    from eqr_jax.data.loader import EvalLoader

    data = args.data or cfg.data.path
    if not data or not os.path.isdir(data):
        print(f"eqr eval: dataset directory {data!r} not found (pass --data DIR)", file=sys.stderr)
        return 2
    bs = args.batch_size or cfg.data.eval_batch_size or cfg.data.global_batch_size
    import jax
    loader = EvalLoader(data, bs, process_index=jax.process_index(),
                        process_count=jax.process_count())
    depths = args.depth or [eval_cfg.depth]
    breadths = args.breadth or [eval_cfg.breadth]
    out = args.out or (os.path.join(args.checkpoint, "eval") if args.checkpoint else
                       os.path.splitext(args.reference)[0] + "-eval")
    from eqr_jax.evaluation import with_eval_noise
    noise = with_eval_noise(model, eval_cfg.noise_scale).cfg.noise_scale
    print(f"[eqr eval] {data}: batch {bs}, depths {depths}, breadths {breadths}, "
          f"halt={eval_cfg.halt}, solver={eval_cfg.solver}, noise={noise:g}, "
          f"{jax.device_count()} device(s)", flush=True)
    run(model, params, loader, eval_cfg, depths, breadths, out, plots=not args.no_plots,
        progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
