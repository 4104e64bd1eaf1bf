"""Options and helpers the ``eqr`` sub-commands share.

* `add_model_options` / `load_model`: ``--checkpoint`` (this project's) or ``--reference``
  (an official ``.pth``), for ``eqr eval`` and ``eqr solve``;
* `add_eval_options` / `eval_config_from_args`: the `EvalConfig` flags (halting rule, solver,
  noise, seed, ...), whose choices come from the `eqr_jax.modes` registry;
* `add_config_options` / `config_from_args`: ``--preset`` plus ``section.key=value`` overrides;
* `fail`: a user error as one line ``eqr <cmd>: message`` on stderr, and its exit status;
  `guarded`: the decorator every sub-command's ``main`` wears, mapping user errors to that
  line and exit status 2 (tracebacks only for bugs, or with ``--debug``);
* `add_distributed_options` / `init_distributed`: joining a multi-process run.

Exit statuses of every ``eqr`` command: 0 success; 1 a failure of the run itself (non-finite
loss, dataset hub unreachable); 2 bad input (options, config values, paths, permissions,
mismatched or unreadable checkpoints or data); 75 preempted (SIGTERM) after saving a
checkpoint, continue with ``--resume``; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys

from eqr_jax import config as config_lib
from eqr_jax import modes
from eqr_jax.config import EvalConfig, RunConfig
from eqr_jax.pth import PthError


# 75 is EX_TEMPFAIL of sysexits.h ("try again later"): what a scheduler should do after a
# preemption.
EXIT_FAILURE, EXIT_USAGE, EXIT_PREEMPTED, EXIT_INTERRUPTED = 1, 2, 75, 130

# Exceptions that mean bad input, by (module, class): an exception can only be raised once its
# module is imported, so they are looked up in sys.modules and nothing heavy is imported here.
_USER_ERRORS = (("eqr_jax.config", "ConfigError"), ("eqr_jax.data.format", "DataFormatError"),
                ("eqr_jax.checkpoint", "CheckpointError"), ("eqr_jax.pth.standins", "PthError"),
                ("eqr_jax.interop", "CheckpointMismatchError"),
                ("eqr_jax.data.importers", "ValidationError"), ("eqr_jax.solve", "PuzzleError"))
# Failures of the run itself (one line, exit status 1).
_RUN_FAILURES = (("eqr_jax.training", "NonFiniteError"),
                 ("eqr_jax.data.importers", "HubUnavailableError"))


def _classes(names) -> tuple[type, ...]:
    return tuple(getattr(sys.modules[m], c) for m, c in names if m in sys.modules)


def error_status(e: BaseException) -> int | None:
    """The exit status for an exception that is not a bug (None: a bug, show the traceback)."""
    preempted = _classes([("eqr_jax.preemption", "Preempted")])
    if preempted and isinstance(e, preempted):
        return EXIT_PREEMPTED
    if isinstance(e, _classes(_RUN_FAILURES)):
        return EXIT_FAILURE
    if isinstance(e, _classes(_USER_ERRORS)):
        return EXIT_USAGE
    # Paths and permissions: a missing input, an unwritable --out, a full disk.
    if isinstance(e, FileNotFoundError) or (isinstance(e, OSError) and e.filename is not None):
        return EXIT_USAGE
    return None


def error_message(e: BaseException) -> str:
    """The one line (or few, for the offline-build instructions) reported for ``e``."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return f"{e.strerror}: {where}"
    text = str(e).strip() or type(e).__name__
    return f"error: {text}" if error_status(e) == EXIT_FAILURE else text


def fail(prog: str, message: str, status: int = 2) -> int:
    """Print ``prog: message`` (one line per line of ``message``) to stderr; return ``status``."""
    for line in str(message).splitlines() or [""]:
        print(f"{prog}: {line}", file=sys.stderr)
    return status


def check_writable(path, flag: str = "--out"):
    """Create directory ``path`` (with parents) and check a file can be written in it, before
    any work is done. Returns it as an absolute `pathlib.Path` (an `etils.epath.Path` for a
    ``gs://`` URL, where a probe object is written and deleted instead); raises `ConfigError`
    naming ``flag`` and the reason."""
    import os
    import tempfile
    from pathlib import Path

    from eqr_jax import storage

    if storage.is_remote(path):
        p = storage.path(path, name=flag)
        probe = p / f".eqr-write-check-{os.getpid()}"
        try:
            storage.write_bytes(probe, b"")
            probe.unlink()
        except Exception as e:  # noqa: BLE001 (the client's errors: permissions, no bucket)
            why = (str(e).splitlines() or [""])[0]
            raise config_lib.ConfigError(f"{flag} {path}: cannot write there "
                                         f"({type(e).__name__}: {why})") from None
        return p
    p = Path(path).absolute()
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".eqr-write-check-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise config_lib.ConfigError(f"{flag} {path}: cannot write there "
                                     f"({e.strerror or e})") from None
    return p


def add_compile_cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="persistent compilation cache, so a restart does not compile again "
                   "(default: $EQR_COMPILE_CACHE, else ~/.cache/eqr-jax/xla; off: none)")


def enable_compile_cache(args: argparse.Namespace) -> None:
    """Switch on the persistent compilation cache ``--compile-cache`` names
    (`eqr_jax.compile_cache`)."""
    from eqr_jax import compile_cache

    compile_cache.enable(getattr(args, "compile_cache", None))


def add_debug_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true",
                   help="show Python tracebacks and library log messages on errors")


def _quiet_closed_loop(hook):
    if getattr(hook, "_eqr_quiet", False):
        return hook

    def quiet(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and "Event loop is closed" in str(e)):
            hook(unraisable)

    quiet._eqr_quiet = True
    return quiet


def _first_url(argv: list[str]) -> str | None:
    """The one-line refusal of the first argument that is a URL of an unsupported scheme
    (``--out s3://b/run``, ``train.out_dir=s3://b/run``), or None: a path is local or gs://."""
    for i, arg in enumerate(argv):
        if "=" in arg:  # --out=URL, or a key=value override
            key, value = arg.split("=", 1)
            where = f"{key} " if arg.startswith("-") else f"{key}="
        else:
            value = arg
            where = f"{argv[i - 1]} " if i and argv[i - 1].startswith("-") else ""
        message = config_lib.url_refusal(where, value)
        if message:
            return message
    return None


def guarded(prog: str):
    """Decorator for a sub-command's ``main(argv)``: user errors (`error_status` 2) and the run's
    own failures become ``prog: message`` on stderr and their exit status; Ctrl-C exits 130;
    anything else is a bug and keeps its traceback. ``--debug`` in argv re-raises everything
    and keeps library warnings (Orbax's, through absl) on stderr."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            argv = sys.argv[1:] if argv is None else list(argv)
            debug = "--debug" in argv
            if not debug:
                logging.getLogger("absl").setLevel(logging.ERROR)
                # A failed TensorStore read (a damaged checkpoint) leaves its sibling reads'
                # errors unretrieved and their callbacks hitting a closed event loop; the
                # one-line report names the checkpoint already.
                logging.getLogger("asyncio").setLevel(logging.CRITICAL)
                sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
            url = _first_url(argv)
            if url is not None:  # before anything could create a local "s3:" folder
                return fail(prog, url, 2)
            try:
                return int(main(argv) or 0)
            except KeyboardInterrupt:
                if debug:
                    raise
                print(f"{prog}: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
            except Exception as e:
                status = error_status(e)
                if status is None or debug:
                    raise
                return fail(prog, error_message(e), status)
        return run
    return wrap


# ----------------------------------------------------------------------------------------------
# Several processes


def add_distributed_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-process runs (docs/training.md, \"Several hosts\"); without them JAX detects "
        "SLURM, Open MPI and TPU slices itself")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address (default: $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, metavar="N",
                   help="processes in the run (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="this process, 0..N-1 (default: $JAX_PROCESS_ID)")
    g.add_argument("--distributed-timeout", metavar="SECONDS",
                   help="how long a process waits for the others: to join, at start-up checks "
                        "and barriers; also the heartbeat and shutdown timeouts when longer "
                        "than JAX's (default: $EQR_DISTRIBUTED_TIMEOUT, else 300)")


def init_distributed(args: argparse.Namespace, prog: str = "eqr") -> bool:
    """Join the multi-process run the flags / environment describe (before JAX touches a
    device); see `eqr_jax.sharding.initialize_distributed`. A peer that does not join within
    the timeout ends this process with one line ``PROG: ...`` and status 2."""
    from eqr_jax.sharding import initialize_distributed

    return initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                  timeout_s=getattr(args, "distributed_timeout", None),
                                  prog=prog)


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


OVERRIDES_HELP = (
    "Overrides: any config key as section.key=value (sections: model, data, train, eval), e.g. "
    "train.lr=3e-4 model.hidden_size=128 data.global_batch_size=256 eval.noise_scale=0.5; an "
    "unknown key is an error. `--show-config` lists every key of the preset with its value.")


def add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(config_lib.PRESETS))
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4 "
                   "(see below)")
    p.add_argument("--show-config", action="store_true",
                   help="print every config key (section.key=value) after the overrides, exit")


def config_lines(cfg: RunConfig) -> list[str]:
    """``section.key=value`` for every key of ``cfg`` (what ``--show-config`` prints)."""
    out = [f"preset={cfg.preset}"]
    for section, values in config_lib.to_dict(cfg).items():
        if isinstance(values, dict):
            out += [f"{section}.{k}={v}" for k, v in values.items()]
    return out


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
    from eqr_jax.checkpoint import CheckpointError  # imports JAX: only once it is needed
    from eqr_jax.interop import CheckpointMismatchError

    return (FileNotFoundError, config_lib.ConfigError, PthError, CheckpointMismatchError,
            CheckpointError)


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
                   help="noisy unroll (reference) or a per-row solve of the noise-free map")
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
