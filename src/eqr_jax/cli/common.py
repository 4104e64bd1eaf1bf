"""Options and helpers the ``eqr`` sub-commands share.

* `add_model_options` / `load_model`: ``--checkpoint`` (this project's) or ``--reference``
  (an official ``.pth``), for ``eqr eval`` and ``eqr solve``;
* `add_eval_options` / `eval_config_from_args`: the `EvalConfig` flags (halting rule, solver,
  noise, seed, ...), whose choices come from the `eqr_jax.modes` registry;
* `add_config_options` / `config_from_args`: ``--preset`` plus ``section.key=value`` overrides;
* `fail`: a user error as one line ``eqr <cmd>: message`` on stderr, and its exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from eqr_jax import config as config_lib
from eqr_jax import modes
from eqr_jax.config import EvalConfig, RunConfig
from eqr_jax.pth import PthError


def fail(prog: str, message: str, status: int = 2) -> int:
    """Print ``prog: message`` (one line per line of ``message``) to stderr; return ``status``."""
    for line in str(message).splitlines() or [""]:
        print(f"{prog}: {line}", file=sys.stderr)
    return status


def exact_accuracy_line(value: float) -> str:
    """The last line of ``eqr train`` / ``eqr eval`` / ``eqr solve``."""
    return f"exact_accuracy: {value:.6g}"


def int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


# ----------------------------------------------------------------------------------------------
# A run config from --preset and overrides


def add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(config_lib.PRESETS))
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4")


def config_from_args(args: argparse.Namespace, **flags: str | None) -> RunConfig:
    """The preset with the positional overrides, then ``flags`` (``{"data.path": args.data}``,
    None values skipped) on top. Raises `ConfigError`."""
    cfg = config_lib.apply_overrides(config_lib.preset(args.preset), args.overrides)
    extra = [f"{k}={v}" for k, v in flags.items() if v is not None]
    return config_lib.apply_overrides(cfg, extra)


# ----------------------------------------------------------------------------------------------
# A model to evaluate: --checkpoint or --reference


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="run directory, its checkpoints/ or one step directory")
    p.add_argument("--reference", metavar="FILE.pth",
                   help="an official PyTorch checkpoint instead of --checkpoint (read without "
                   "torch; its seq_len/vocab_size come from --data, the flags below or its "
                   "weights)")
    p.add_argument("--seq-len", type=int, help="with --reference: the dataset's sequence length")
    p.add_argument("--vocab-size", type=int, help="with --reference: the dataset's vocabulary")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--no-ema", action="store_true", help="use raw instead of EMA weights")


def load_errors() -> tuple[type[Exception], ...]:
    """What `load_model` raises for bad input (reported as ``eqr <cmd>: message``, status 2)."""
    from eqr_jax.interop import CheckpointMismatchError  # imports JAX: only once it is needed

    return (FileNotFoundError, config_lib.ConfigError, PthError, CheckpointMismatchError)


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


# ----------------------------------------------------------------------------------------------
# Evaluation settings


def add_eval_options(p: argparse.ArgumentParser, depth_help: str, breadth_help: str,
                     depth_type=int_list, breadth_type=int_list, streaming: bool = False) -> None:
    """The `EvalConfig` flags of ``eqr eval`` and ``eqr solve`` (default: the checkpoint's);
    ``streaming`` adds ``--stream`` / ``--slots`` (commands that evaluate whole datasets)."""
    p.add_argument("--noise", type=float, help="update-noise std at test time (default: the "
                   "model's training value; the paper uses 0.5 for Sudoku, 0.1 for Maze)")
    p.add_argument("--depth", type=depth_type, help=depth_help)
    p.add_argument("--breadth", type=breadth_type, help=breadth_help)
    p.add_argument("--halt", choices=modes.HALT_RULES,
                   help="per-row halting rule (default: the config's, normally fixed)")
    p.add_argument("--solver", choices=modes.SOLVERS,
                   help="noisy unroll (reference) or a jaxopt solve of the noise-free map")
    p.add_argument("--tol", type=float, help="convergence tolerance (halt=convergence, solvers)")
    p.add_argument("--window", type=int,
                   help="consecutive steps below --tol to halt; also the convergence-score window")
    p.add_argument("--convergence-metric", choices=modes.CONVERGENCE_METRICS)
    p.add_argument("--top-k", type=int, help="convergence top-k selection (0: off)")
    p.add_argument("--max-rows", type=int, help="rows (copies x puzzles) per compiled call")
    p.add_argument("--seed", type=int)
    if not streaming:
        return
    p.add_argument("--stream", action="store_true", default=None,
                   help="streaming evaluation: a pool of slots on device; a (puzzle, copy) job "
                   "that halts hands its slot to the next job (same results, less idle work "
                   "with q_halt / convergence halting)")
    p.add_argument("--slots", type=int, help="with --stream: slots in the pool (default: batch "
                   "x breadth, at most --max-rows)")


def eval_config_from_args(base: EvalConfig, args: argparse.Namespace) -> EvalConfig:
    """``base`` with the flags of `add_eval_options` that were given (validated: `ConfigError`)."""
    upd = {"halt": args.halt, "solver": args.solver, "convergence_tol": args.tol,
           "convergence_window": args.window, "convergence_metric": args.convergence_metric,
           "convergence_top_k": args.top_k, "max_rows": args.max_rows, "seed": args.seed,
           "max_batches": getattr(args, "max_batches", None), "noise_scale": args.noise,
           "stream": getattr(args, "stream", None), "stream_slots": getattr(args, "slots", None)}
    if upd["stream_slots"] is not None and not (upd["stream"] or base.stream):
        raise config_lib.ConfigError("--slots applies to --stream")
    return dataclasses.replace(base, **{k: v for k, v in upd.items() if v is not None})
