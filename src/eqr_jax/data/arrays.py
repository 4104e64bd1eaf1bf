"""In-memory datasets: loaders over NumPy arrays, and random 4x4 Sudoku puzzles.

For experiments, tests and benchmarks that do not need a dataset on disk. `ArrayTrainLoader`
has the interface `eqr_jax.training.train` expects of a training loader (iterator of batches,
``steps_per_epoch``, JSON ``state()`` / ``restore()``), and `eval_batches` yields evaluation
batches with a row mask like `EvalLoader`. Tokens follow the Sudoku datasets: 1 = blank,
digit d -> d + 1 (vocabulary 6 for 4x4 boards), labels -100 on padding rows.
"""

from __future__ import annotations

import itertools

import numpy as np


def sudoku4_solutions() -> np.ndarray:
    """All 288 valid 4x4 Sudoku grids, (288, 16) with digits 1..4."""
    rows = list(itertools.permutations(range(1, 5)))
    out = []

    def ok(grid):
        g = np.array(grid)
        if any(len(set(g[:, c])) < len(g) for c in range(4)):
            return False
        if len(g) % 2 == 0:
            for r0 in range(0, len(g), 2):
                for c0 in (0, 2):
                    if len(set(g[r0:r0 + 2, c0:c0 + 2].ravel())) < 4:
                        return False
        return True

    def rec(grid):
        if len(grid) == 4:
            out.append(np.array(grid).ravel())
            return
        for r in rows:
            if ok(grid + [r]):
                rec(grid + [r])

    rec([])
    return np.array(out, np.int32)


def make_puzzles(n: int, seed: int, blanks=(4, 9)) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) int32 (n, 16): tokens 1 = blank, digit d -> d + 1 (vocab 6)."""
    rng = np.random.default_rng(seed)
    sols = sudoku4_solutions()
    pick = sols[rng.integers(0, len(sols), n)]
    labels = pick + 1
    inputs = labels.copy()
    for i in range(n):
        k = rng.integers(blanks[0], blanks[1] + 1)
        inputs[i, rng.choice(16, k, replace=False)] = 1
    return inputs.astype(np.int32), labels.astype(np.int32)


class ArrayTrainLoader:
    """Infinite shuffled batches of (inputs, labels) (E, N) arrays with a JSON state (epoch,
    cursor), like `TrainLoader`: epoch e is the permutation drawn from ``(seed, e)``, the last
    partial batch of an epoch is dropped. ``batch_size`` is the global batch; with several
    processes each yields its contiguous slice (``process_index`` of ``process_count``)."""

    def __init__(self, inputs, labels, batch_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of "
                             f"process_count {process_count}")
        self.inputs, self.labels, self.bs, self.seed = inputs, labels, batch_size, seed
        local = batch_size // process_count
        self._rows = slice(process_index * local, (process_index + 1) * local)
        self.steps_per_epoch = max(1, len(inputs) // batch_size)
        self.epoch, self.cursor = 0, 0

    def _perm(self):
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.inputs))

    def __iter__(self):
        return self

    def __next__(self):
        if self.cursor >= self.steps_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        idx = self._perm()[self.cursor * self.bs:(self.cursor + 1) * self.bs][self._rows]
        self.cursor += 1
        return {"inputs": self.inputs[idx], "labels": self.labels[idx],
                "puzzle_identifiers": np.zeros(len(idx), np.int32)}

    def state(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state):
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_batches(inputs, labels, batch_size: int):
    """Every row once, in batches of ``batch_size`` (B, N); the last batch is padded (inputs 0,
    labels -100) and ``mask`` (B,) marks the real rows."""
    for s in range(0, len(inputs), batch_size):
        x, y = inputs[s:s + batch_size], labels[s:s + batch_size]
        pad = batch_size - len(x)
        mask = np.r_[np.ones(len(x), bool), np.zeros(pad, bool)]
        yield {"inputs": np.pad(x, ((0, pad), (0, 0))),
               "labels": np.pad(y, ((0, pad), (0, 0)), constant_values=-100),
               "puzzle_identifiers": np.zeros(batch_size, np.int32), "mask": mask}
