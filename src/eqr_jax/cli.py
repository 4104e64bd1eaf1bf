"""The `eqr` command: one entry point, one sub-command per stage of the pipeline.

    eqr data sudoku|maze ...     build or import datasets        (eqr_jax.data.build)
    eqr train --preset P ...     train with the Optax loop       (eqr_jax.train)
    eqr eval --checkpoint ...    depth x breadth evaluation      (eqr_jax.evaluation_cli)
    eqr solve --checkpoint ...   solve puzzles from the shell    (eqr_jax.solve)
    eqr convert FILE.pth --out D official checkpoint -> ours     (eqr_jax.convert_cli)
    eqr analyze --checkpoint ... attractor landscape analysis    (eqr_jax.analysis_cli)

Sub-commands are imported lazily so `eqr data` does not pay for importing JAX models.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "data": ("eqr_jax.data.build", "build or import Sudoku / Maze datasets"),
    "train": ("eqr_jax.train", "train a model (presets: sudoku, maze, tiny)"),
    "eval": ("eqr_jax.evaluation_cli", "evaluate a checkpoint over depth x breadth"),
    "solve": ("eqr_jax.solve", "solve puzzles given on the command line or in a file"),
    "convert": ("eqr_jax.convert_cli", "convert an official PyTorch .pth checkpoint"),
    "analyze": ("eqr_jax.analysis_cli", "attractor landscape: stability, census, difficulty"),
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
