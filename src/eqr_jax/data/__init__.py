"""Puzzle data for EqR: Sudoku (any box shape) and Maze-Unique, in the reference on-disk format.

Modules (imported lazily; numba kernels compile on first use and are cached on disk):

* :mod:`.sudoku`     grids, parsing, exact solver/counter, difficulty rating, canonical forms
* :mod:`.generate`   hard-puzzle generator (local search on the rating, multiprocess, resumable)
* :mod:`.augment`    Sudoku symmetry transforms, dihedral maze transforms
* :mod:`.importers`  the puzzle parser; Sudoku-Extreme CSV / hub / plain-text import with
                     line-numbered validation
* :mod:`.maze`       Maze-Unique generation and verification
* :mod:`.format`     ``dataset.json`` + ``all__*.npy`` read/write (:func:`load_split`, ...)
* :mod:`.loader`     :class:`TrainLoader` (group sampling, resumable) and :class:`EvalLoader`
* :mod:`.arrays`     loaders over in-memory NumPy arrays, random 4x4 puzzles
* :mod:`.build`      dataset builders (the ``eqr data sudoku|maze`` command is `eqr_jax.cli.data`)
* :mod:`.prepare`    a run's data: build it from the ``data.build_*`` recipe, check, open loaders
* :mod:`.bucket`     ``gs://`` dataset folders: a checked local copy per host, uploads
"""

from .format import DatasetMetadata, Split, dataset_info, load_split, write_split
from .loader import EvalLoader, TrainLoader

__all__ = ["DatasetMetadata", "Split", "dataset_info", "load_split", "write_split", "TrainLoader",
           "EvalLoader"]
