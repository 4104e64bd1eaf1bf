"""The `eqr` command: one entry point, one sub-command per stage of the pipeline.

    eqr data sudoku|maze ...     build or import datasets        (eqr_jax.cli.data)
    eqr train --preset P ...     train with the Optax loop       (eqr_jax.cli.train)
    eqr eval --checkpoint ...    depth x breadth evaluation      (eqr_jax.cli.eval)
    eqr plan --preset P --target T  fit / time on a TPU slice    (eqr_jax.cli.plan)
    eqr solve --checkpoint ...   solve puzzles from the shell    (eqr_jax.cli.solve)
    eqr convert FILE.pth --out D official checkpoint -> ours     (eqr_jax.cli.convert)
    eqr analyze --checkpoint ... attractor landscape analysis    (eqr_jax.cli.analyze)

Each sub-command is a module of this package with ``build_parser()`` and ``main(argv)``; the
options they share live in `eqr_jax.cli.common`. Sub-commands are imported lazily so `eqr data`
does not pay for importing JAX models.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "data": ("eqr_jax.cli.data", "build or import Sudoku / Maze datasets"),
    "train": ("eqr_jax.cli.train", "train a model (presets: sudoku, maze, tiny)"),
    "eval": ("eqr_jax.cli.eval", "evaluate a checkpoint over depth x breadth"),
    "plan": ("eqr_jax.cli.plan", "compile a preset for a TPU slice: memory, fit, estimates"),
    "solve": ("eqr_jax.cli.solve", "solve puzzles given on the command line or in a file"),
    "convert": ("eqr_jax.cli.convert", "convert an official PyTorch .pth checkpoint"),
    "analyze": ("eqr_jax.cli.analyze", "attractor landscape: stability, census, difficulty"),
}


def _usage() -> str:
    lines = ["usage: eqr <command> [options]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `eqr <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"eqr: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
