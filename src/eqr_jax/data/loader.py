"""Batch loaders: group-sampled training batches (as the reference) and exhaustive evaluation.

Training (:class:`TrainLoader`) follows the reference sampler draw for draw: loader pass ``k``
(k = 1, 2, ...) uses ``np.random.Generator(np.random.Philox(seed + k))``; each of its
``epochs_per_iter`` epochs draws a permutation of the groups and walks it, taking for every group
one puzzle uniformly inside the group (``rng.integers``) and that puzzle's examples
(``rng.choice`` without replacement) until the global batch is full; an under-filled batch ends
the epoch and is dropped.  Each process keeps its contiguous slice of the global batch.

Batches are produced by a background thread (``prefetch`` batches ahead) so the accelerator does
not wait on the host.  ``state()`` describes the position of the *next batch to be returned*
(not the prefetch thread's), so ``TrainLoader(..., state=s)`` resumes with exactly the batches a
non-interrupted run would have seen.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
from typing import Iterator

import numpy as np

from .format import Split, load_split

__all__ = ["TrainLoader", "EvalLoader", "IGNORE_LABEL_ID", "steps_per_epoch"]

#: Label value ignored by the loss (the reference's IGNORE_LABEL_ID).
IGNORE_LABEL_ID = -100


def steps_per_epoch(meta, global_batch_size: int) -> int:
    """max(floor(total_groups * mean_puzzle_examples / global_batch_size), 1).

    ``meta``: the training split's metadata (`DatasetMetadata` or a mapping). An epoch is one
    permutation of the *groups* with one puzzle drawn per group, so it yields about
    ``total_groups * mean_puzzle_examples`` rows however many augmentations each group holds
    (Sudoku-Extreme 1k: 1000 groups of 1001 puzzles -> 1 step per epoch at batch 768).
    """
    total = int(float(meta["total_groups"]) * float(meta["mean_puzzle_examples"]))
    return max(total // max(int(global_batch_size), 1), 1)


def _as_split(root_or_split, split_name: str) -> Split:
    if isinstance(root_or_split, Split):
        return root_or_split
    return load_split(root_or_split, split_name, mmap=True)


def _collate(split: Split, idx: np.ndarray, pids: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """int32 arrays of rows ``idx``; ignore labels -> -100; pad up to ``batch`` rows."""
    m = split.meta
    x = np.asarray(split.inputs[idx], np.int32)
    y = np.asarray(split.labels[idx], np.int32)
    if m.ignore_label_id is not None:
        y[y == m.ignore_label_id] = IGNORE_LABEL_ID
    p = np.asarray(split.puzzle_identifiers[pids], np.int32)
    pad = batch - len(idx)
    mask = np.ones(batch, bool)
    if pad > 0:
        x = np.concatenate([x, np.full((pad, x.shape[1]), m.pad_id, np.int32)])
        y = np.concatenate([y, np.full((pad, y.shape[1]), IGNORE_LABEL_ID, np.int32)])
        p = np.concatenate([p, np.full(pad, m.blank_identifier_id, np.int32)])
        mask[len(idx):] = False
    return {"inputs": x, "labels": y, "puzzle_identifiers": p, "mask": mask}


def _to_json(obj):
    """Bit-generator state (nested dict with numpy arrays/ints) -> plain JSON types."""
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__uint64__": [int(v) for v in obj.ravel()]} if obj.dtype == np.uint64 else obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _from_json(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__uint64__"}:
            return np.array(obj["__uint64__"], dtype=np.uint64)
        return {k: _from_json(v) for k, v in obj.items()}
    return obj


class TrainLoader:
    """Infinite iterator of training batches (numpy dicts), sampled by group as the reference.

    Args:
      root_or_split: dataset root (its ``train`` split is used) or a loaded :class:`Split`.
      global_batch_size: rows per global batch; must be divisible by ``process_count``.
      seed: sampler seed (pass ``k`` uses ``Philox(seed + k)``).
      epochs_per_iter: epochs per loader pass (the reference's ``train_epochs_per_iter``: pass
        ``k`` reseeds with ``Philox(seed + k)``); None = 1.
      process_index, process_count: this process's contiguous slice of every global batch.
      prefetch: batches produced ahead by a background thread (0 = synchronous).
      state: a dict from :meth:`state` to resume from.

    Each batch: ``inputs`` int32 (B_local, N), ``labels`` int32 (B_local, N) with ignored labels
    as -100, ``puzzle_identifiers`` int32 (B_local,), where ``B_local = global / process_count``.
    """

    def __init__(self, root_or_split, global_batch_size: int, seed: int,
                 epochs_per_iter: int | None = None, process_index: int = 0, process_count: int = 1,
                 prefetch: int = 4, state: dict | None = None, split_name: str = "train"):
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple "
                             f"of process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
        self.split = _as_split(root_or_split, split_name)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed = int(seed)
        self.epochs_per_iter = int(epochs_per_iter or 1)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.prefetch = int(prefetch)
        self._gi = np.asarray(self.split.group_indices, np.int64)
        self._pi = np.asarray(self.split.puzzle_indices, np.int64)
        self._one_example_per_puzzle = bool(len(self._pi) == self.split.num_examples + 1 and
                                            (np.diff(self._pi) == 1).all())
        if self.split.num_groups == 0:
            raise ValueError("training split has no groups")
        self._state = self._initial_state() if state is None else self._check_state(state)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # -- state ----------------------------------------------------------------------------------

    @staticmethod
    def _initial_state() -> dict:
        return {"pass": 0, "epoch": 0, "cursor": 0, "group_order": None, "rng_state": None}

    @staticmethod
    def _check_state(state: dict) -> dict:
        need = {"pass", "epoch", "cursor", "group_order", "rng_state"}
        if not need <= set(state):
            raise ValueError(f"loader state lacks {sorted(need - set(state))}")
        return copy.deepcopy(dict(state))

    def state(self) -> dict:
        """JSON-serialisable position of the next batch this iterator will return."""
        return copy.deepcopy(self._state)

    def restore(self, state: dict) -> None:
        """Continue from a :meth:`state` dict (drops anything already prefetched)."""
        self._shutdown()
        self._state = self._check_state(state)

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch as the reference counts them (`steps_per_epoch`)."""
        return steps_per_epoch(self.split.meta, self.global_batch_size)

    @property
    def num_groups(self) -> int:
        return self.split.num_groups

    # -- production -----------------------------------------------------------------------------

    def _produce(self, st: dict) -> Iterator[tuple[dict, dict]]:
        """Yield (local batch, state after it) forever, starting from state ``st``."""
        st = copy.deepcopy(st)
        G = self.split.num_groups
        B = self.global_batch_size
        while True:
            if st["rng_state"] is None:  # a new loader pass
                st["pass"] += 1
                st["epoch"] = 0
                rng = np.random.Generator(np.random.Philox(seed=self.seed + st["pass"]))
                order = None
                cursor = 0
            else:
                rng = np.random.Generator(np.random.Philox())
                rng.bit_generator.state = _from_json(st["rng_state"])
                order = None if st["group_order"] is None else np.asarray(st["group_order"], np.int64)
                cursor = int(st["cursor"])
            epoch = int(st["epoch"])
            yielded = False
            while True:
                if order is None or cursor >= len(order):
                    if epoch >= self.epochs_per_iter:
                        break
                    order = rng.permutation(G)
                    cursor = 0
                    epoch += 1
                if self._one_example_per_puzzle:
                    # Fast path, same draws: every puzzle has one example, so the reference takes
                    # one group per row, and its rng.choice(1, 1) consumes no randomness; a
                    # vectorised rng.integers equals the sequential scalar calls (tests check).
                    take = order[cursor:cursor + B]
                    rows = rng.integers(self._gi[take], self._gi[take + 1])
                    cursor += len(take)
                    if len(take) < B:
                        continue  # under-filled tail: dropped, the epoch ends
                    batch = self._emit(rows, rows)
                    st = {"pass": st["pass"], "epoch": epoch, "cursor": int(cursor),
                          "group_order": [int(v) for v in order],
                          "rng_state": _to_json(rng.bit_generator.state)}
                    yielded = True
                    yield batch, copy.deepcopy(st)
                    continue
                idx, pids = [], []
                size = 0
                while cursor < len(order) and size < B:
                    g = order[cursor]
                    p = rng.integers(self._gi[g], self._gi[g + 1])
                    cursor += 1
                    start = self._pi[p]
                    count = int(self._pi[p + 1] - start)
                    take = min(count, B - size)
                    idx.append(start + rng.choice(count, take, replace=False))
                    pids.append(np.full(take, p, np.int64))
                    size += take
                if size < B:  # under-filled tail: dropped, the epoch ends
                    cursor = len(order)
                    continue
                batch = self._emit(np.concatenate(idx), np.concatenate(pids))
                st = {"pass": st["pass"], "epoch": epoch, "cursor": int(cursor),
                      "group_order": [int(v) for v in order],
                      "rng_state": _to_json(rng.bit_generator.state)}
                yielded = True
                yield batch, copy.deepcopy(st)
            if not yielded and not self.full_batch_possible():
                raise RuntimeError(f"no full batch of {B} rows can be formed from {G} groups; "
                                   f"lower the global batch size")
            st = {"pass": st["pass"], "epoch": 0, "cursor": 0, "group_order": None, "rng_state": None}

    def _emit(self, rows: np.ndarray, prow: np.ndarray) -> dict:
        """This process's slice of a global batch of example ``rows`` (puzzle ids ``prow``)."""
        lo = self.process_index * self.local_batch_size
        sl = slice(lo, lo + self.local_batch_size)
        batch = _collate(self.split, rows[sl], prow[sl], self.local_batch_size)
        del batch["mask"]
        return batch

    def full_batch_possible(self) -> bool:
        """Whether one global batch can be filled (each group gives at most one puzzle)."""
        sizes = self._pi[1:] - self._pi[:-1]
        best = np.array([sizes[self._gi[g]:self._gi[g + 1]].max(initial=0) for g in range(self.split.num_groups)])
        return int(best.sum()) >= self.global_batch_size

    def _worker(self, gen, q: queue.Queue, stop: threading.Event):
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # surface producer errors in the consumer
            q.put(e)

    def _shutdown(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread, self._queue = None, None
        self._stop = threading.Event()
        self._gen = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.prefetch <= 0:
            if getattr(self, "_gen", None) is None:
                self._gen = self._produce(self._state)
            batch, st = next(self._gen)
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(
                    target=self._worker, args=(self._produce(self._state), self._queue, self._stop),
                    daemon=True)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._shutdown()
                raise item
            batch, st = item
        self._state = st
        return batch

    def close(self) -> None:
        """Stop the prefetch thread."""
        self._shutdown()

    def __del__(self):
        try:
            self._shutdown()
        except Exception:
            pass


class EvalLoader:
    """Every test example exactly once, in file order, in global batches of ``batch_size``.

    Each process gets its contiguous slice of every global batch (``batch_size`` must be a
    multiple of ``process_count``).  Rows past the end are padding: inputs 0, labels -100,
    puzzle_identifiers 0, ``mask`` False.  ``len()`` is the number of batches. ``start`` /
    ``stop`` restrict it to examples ``[start, stop)`` (a resumed or shortened evaluation;
    batch ``i`` then starts at example ``start + i * batch_size``).
    """

    def __init__(self, root_or_split, batch_size: int, process_index: int = 0, process_count: int = 1,
                 split_name: str = "test", start: int = 0, stop: int | None = None):
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count "
                             f"{process_count}")
        self.split = _as_split(root_or_split, split_name)
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // process_count
        self.process_index, self.process_count = int(process_index), int(process_count)
        total = self.split.num_examples
        self.start, self.stop = int(start), total if stop is None else min(int(stop), total)
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"examples [{start}, {stop}) outside the split's {total}")
        # example -> puzzle id (every example belongs to one puzzle)
        pi = np.asarray(self.split.puzzle_indices, np.int64)
        self._puzzle_of = np.repeat(np.arange(len(pi) - 1), np.diff(pi))

    @property
    def num_examples(self) -> int:
        """Examples this loader yields (``stop - start``)."""
        return self.stop - self.start

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        E = self.stop
        for start in range(self.start, E, self.batch_size):
            lo = min(E, start + self.process_index * self.local_batch_size)
            hi = min(E, start + (self.process_index + 1) * self.local_batch_size)
            rows = np.arange(lo, hi)
            yield _collate(self.split, rows, self._puzzle_of[rows], self.local_batch_size)
