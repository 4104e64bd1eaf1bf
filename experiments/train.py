"""Train EqR: ``python experiments/train.py --preset sudoku --data DIR [key=value ...]``.

A thin wrapper over `eqr_jax.train.main` (the same as ``eqr train``).
"""

import sys

from eqr_jax.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
