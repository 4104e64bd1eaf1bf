"""Puzzle data for EqR: Sudoku (any box shape) and Maze-Unique, in the reference on-disk format.

Modules (imported lazily; numba kernels compile on first use and are cached on disk):

* :mod:`.sudoku`     grids, parsing, exact solver/counter, difficulty rating, canonical forms
* :mod:`.generate`   hard-puzzle generator (local search on the rating, multiprocess, resumable)
* :mod:`.augment`    Sudoku symmetry transforms, dihedral maze transforms
* :mod:`.importers`  Sudoku-Extreme CSV / hub / plain-text import with line-numbered validation
* :mod:`.maze`       Maze-Unique generation and verification
* :mod:`.format`     ``dataset.json`` + ``all__*.npy`` read/write (:func:`load_split`, ...)
* :mod:`.loader`     :class:`TrainLoader` (group sampling, resumable) and :class:`EvalLoader`
* :mod:`.build`      the ``eqr data sudoku|maze`` command
"""

from .format import DatasetMetadata, Split, dataset_info, load_split, write_split
from .loader import EvalLoader, TrainLoader

__all__ = ["DatasetMetadata", "Split", "dataset_info", "load_split", "write_split", "TrainLoader",
           "EvalLoader"]
