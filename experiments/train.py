"""Train EqR: ``python experiments/train.py --preset sudoku --data DIR [key=value ...]``.

The same as ``eqr train`` (`eqr_jax.cli.train`).
"""

import sys

from eqr_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
