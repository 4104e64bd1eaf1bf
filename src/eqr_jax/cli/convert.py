"""`eqr convert`: an official PyTorch checkpoint (``.pth``) to this project's checkpoint.

    eqr convert downloaded_checkpoints/sudoku-extreme/eqr.pth --out runs/eqr-sudoku
    eqr convert maze.pth --out runs/eqr-maze --data data/maze-30x30-unique-1k

The file is read without PyTorch and without running its pickle (a pickle naming anything but
tensors, plain data and the reference's own data classes is refused). The output holds the
raw and EMA weights and the resolved config; ``eqr eval --checkpoint OUT`` and ``eqr solve
--checkpoint OUT`` read it (EMA weights unless ``--no-ema``). The reference takes ``seq_len``
and ``vocab_size`` from its dataset: they come from ``--data`` (a dataset folder), the flags,
or the weights where they determine them (vocabulary always, ``seq_len`` for ``mlp_t`` models).
"""

from __future__ import annotations

import argparse
import sys

from eqr_jax.cli import common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqr convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", metavar="FILE.pth", help="the official checkpoint")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--data", help="dataset directory whose metadata gives seq_len / vocab_size")
    p.add_argument("--seq-len", type=int, help="the dataset's sequence length")
    p.add_argument("--vocab-size", type=int, help="the dataset's vocabulary size")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint in --out")
    common.add_debug_option(p)
    return p


@common.guarded("eqr convert")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from eqr_jax.interop import convert_reference_checkpoint

    try:
        path = convert_reference_checkpoint(args.reference, args.out, data=args.data,
                                            seq_len=args.seq_len, vocab_size=args.vocab_size,
                                            overwrite=args.overwrite)
    except common.load_errors() + (FileExistsError,) as e:
        return common.fail("eqr convert", e)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
