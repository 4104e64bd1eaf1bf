"""The paper's evaluation protocol in one command, resumable.

    python experiments/paper_eval.py --reference eqr.pth --data data/sudoku-extreme-1k-aug-1000
    python experiments/paper_eval.py --checkpoint runs/maze --data data/maze-30x30-unique-1k \\
        --protocol paper-maze
    python experiments/paper_eval.py --reference eqr.pth --data DIR --max-puzzles 64   # smoke run

``--protocol paper-sudoku`` (default): depth 64, breadth 128, convergence top-4, test-time noise
0.5, every copy runs the full depth; ``paper-maze``: the same with noise 0.1 (what is assumed is
in docs/evaluation.md). It reports top-1 by convergence, convergence top-k, majority vote,
any-correct and pass@k. Each finished chunk of puzzles is appended to ``<out>/chunks/``
atomically; a killed run restarted with the same command continues after the last chunk and
ends with the same table. ``--out`` may be a ``gs://`` URL (chunks, manifest and results are
then objects). A progress bar shows puzzles/s and the ETA. The flags after ``--protocol``
override its settings (a cheaper smoke run, or a variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from eqr_jax import modes
from eqr_jax.cli import common


def build_parser() -> argparse.ArgumentParser:
    from eqr_jax.evaluation.protocol import PROTOCOLS

    p = argparse.ArgumentParser(prog="paper_eval", description=__doc__.split("\n\n")[0])
    common.add_model_options(p)
    p.add_argument("--data", required=True, help="dataset directory (its test split)")
    p.add_argument("--protocol", default="paper-sudoku", choices=sorted(PROTOCOLS))
    p.add_argument("--depth", type=int, help="override the protocol's depth")
    p.add_argument("--breadth", type=int, help="override the protocol's breadth")
    p.add_argument("--top-k", type=int, help="override the protocol's convergence top-k")
    p.add_argument("--noise", type=float, help="override the protocol's test-time noise")
    p.add_argument("--halt", choices=modes.HALT_RULES, help="override the halting rule (fixed)")
    p.add_argument("--stream", action="store_true", help="streaming evaluation (eqr eval --stream)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="puzzles per batch (16)")
    p.add_argument("--max-rows", type=int, default=0,
                   help="rows (copies x puzzles) per compiled call (default: all copies)")
    p.add_argument("--chunk", type=int, default=1024,
                   help="puzzles per appended chunk file, a multiple of --batch-size (1024)")
    p.add_argument("--max-puzzles", type=int, help="only the first N puzzles (a smoke run)")
    p.add_argument("--out", help="output directory or gs:// URL (default: "
                   "<checkpoint>/<protocol>, or <name>-<protocol> beside a --reference file)")
    p.add_argument("--no-progress", action="store_true")
    common.add_compile_cache_option(p)
    return p


def weights_digest(params) -> str:
    """SHA-256 of every parameter array (path order), to recognise the weights of a run."""
    import hashlib

    import jax
    import numpy as np

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from eqr_jax.config import ConfigError
    from eqr_jax.evaluation.protocol import PROTOCOLS, ResumeError

    prog = "paper_eval"
    proto = PROTOCOLS[args.protocol]
    from eqr_jax.data.bucket import dataset_dir

    if not dataset_dir(args.data).is_dir():
        return common.fail(prog, f"dataset directory {args.data!r} not found")
    try:
        common.enable_compile_cache(args)
        cfg, model, params = common.load_model(args)
        eval_cfg = dataclasses.replace(
            cfg.eval, depth=args.depth or proto.depth, breadth=args.breadth or proto.breadth,
            halt=args.halt or proto.halt, convergence_top_k=(
                proto.top_k if args.top_k is None else args.top_k),
            convergence_window=proto.window, noise_scale=(
                proto.noise_scale if args.noise is None else args.noise),
            seed=args.seed, stream=args.stream, max_rows=args.max_rows, max_batches=0)
    except common.load_errors() as e:
        return common.fail(prog, e)
    from eqr_jax.evaluation import Evaluator
    from eqr_jax.evaluation.protocol import run_protocol
    from eqr_jax.reporting import format_table

    from eqr_jax import storage

    where = lambda p: p if storage.is_remote(p) else os.path.abspath(p)  # a URL stays a URL
    model_path = where(args.checkpoint or args.reference)
    out = args.out or (os.path.join(args.checkpoint, args.protocol) if args.checkpoint else
                       os.path.splitext(args.reference)[0] + f"-{args.protocol}")
    manifest = {"protocol": proto.name, "model": model_path,
                "kind": "checkpoint" if args.checkpoint else "reference",
                "step": args.step, "weights": "raw" if args.no_ema else "ema",
                # The weights themselves: a checkpoint's "latest" step may move between runs.
                "weights_sha256": weights_digest(params),
                "data": where(args.data), "max_puzzles": args.max_puzzles,
                "batch_size": args.batch_size, "chunk_puzzles": args.chunk,
                **{f"eval.{k}": v for k, v in dataclasses.asdict(eval_cfg).items()}}
    try:
        evaluator = Evaluator(model, eval_cfg)
        print(f"[paper_eval] {proto.name}: depth {eval_cfg.depth}, breadth {eval_cfg.breadth}, "
              f"convergence top-{eval_cfg.convergence_top_k}, noise {evaluator.noise_scale:g}, "
              f"halt={eval_cfg.halt}{', streaming' if eval_cfg.stream else ''}; {args.data} "
              f"-> {out}", flush=True)
        res = run_protocol(evaluator, params, args.data, out, manifest, depth=eval_cfg.depth,
                           breadth=eval_cfg.breadth, batch_size=args.batch_size,
                           chunk_puzzles=args.chunk, max_puzzles=args.max_puzzles,
                           progress=not args.no_progress)
    except (ResumeError, ConfigError, ValueError) as e:
        return common.fail(prog, e)
    print(format_table(res["table"], floatfmt=".4f"))
    c = res["cost"]
    print(f"{c['session_puzzles']} puzzles in this session, {c['session_s']:.1f} s "
          f"({(c['session_puzzles_per_s'] or 0):.3g} puzzles/s); results in "
          f"{os.path.join(out, 'results.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
