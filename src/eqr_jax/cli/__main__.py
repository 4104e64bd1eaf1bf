"""``python -m eqr_jax.cli <command> ...``: the same as the ``eqr`` command."""

import sys

from eqr_jax.cli import main

sys.exit(main())
