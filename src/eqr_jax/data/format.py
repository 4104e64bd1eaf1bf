"""On-disk dataset format, identical to the reference (HRM) layout so datasets move both ways.

::

    ROOT/identifiers.json                 ["<blank>"]
    ROOT/<split>/dataset.json             metadata (:class:`DatasetMetadata`)
    ROOT/<split>/all__inputs.npy          (E, N) uint8   input tokens
    ROOT/<split>/all__labels.npy          (E, N) uint8   label tokens
    ROOT/<split>/all__puzzle_identifiers.npy  (P,) int32  all 0 (no puzzle embedding)
    ROOT/<split>/all__puzzle_indices.npy  (P+1,) int32   puzzle p owns examples [pi[p], pi[p+1])
    ROOT/<split>/all__group_indices.npy   (G+1,) int32   group g owns puzzles [gi[g], gi[g+1])

Every puzzle has one example (E = P); a group is an original puzzle and its augmentations.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DatasetMetadata", "Split", "DataFormatError", "write_split", "load_split",
           "dataset_info", "write_identifiers", "SET_NAME"]

SET_NAME = "all"
_ARRAYS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")


class DataFormatError(ValueError):
    """A dataset folder with a missing, corrupt or inconsistent file (the message names it)."""


@dataclass
class DatasetMetadata:
    """Contents of ``dataset.json``.  Unknown keys from other writers are kept in ``extra``."""

    pad_id: int
    ignore_label_id: int | None
    blank_identifier_id: int
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    sets: list[str]
    total_samples: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _REQUIRED = ("pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len",
                 "num_puzzle_identifiers", "total_groups", "mean_puzzle_examples", "sets")

    @classmethod
    def from_dict(cls, d: dict, source: str = "dataset.json") -> "DatasetMetadata":
        missing = [k for k in cls._REQUIRED if k not in d]
        if missing:
            raise DataFormatError(f"{source}: missing required field(s) {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: d[k] for k in known if k in d}
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d

    def __getitem__(self, key):  # dict-style access for callers that treat it as a mapping
        if key in self.extra:
            return self.extra[key]
        return getattr(self, key)


@dataclass
class Split:
    """One loaded split: arrays as stored (see module doc) plus its metadata."""

    inputs: np.ndarray
    labels: np.ndarray
    puzzle_identifiers: np.ndarray
    puzzle_indices: np.ndarray
    group_indices: np.ndarray
    meta: DatasetMetadata
    path: Path | None = None

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_indices.shape[0] - 1)


def write_identifiers(root: str | os.PathLike) -> None:
    """``identifiers.json`` = ["<blank>"] (EqR uses no puzzle identifiers)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "identifiers.json").write_text(json.dumps(["<blank>"]))


def write_split(root: str | os.PathLike, split_name: str, inputs: np.ndarray, labels: np.ndarray,
                group_sizes=None, extra_meta: dict | None = None, vocab_size: int | None = None,
                ) -> DatasetMetadata:
    """Write one split.

    Args:
      inputs, labels: (E, N) integer tokens (stored as uint8; values must be < 256).
      group_sizes: puzzles per group, summing to E (default: every example its own group).
      extra_meta: extra dataset.json keys (kept by our reader, ignored by the reference's).
      vocab_size: default ``max token + 1`` over inputs and labels.
    Returns the written metadata.
    """
    if "://" in str(root):
        # Path("gs://b/x") would be a local folder "gs:/b/x".
        raise ValueError(f"{root}: write_split writes a local folder; build there and upload it "
                         "(eqr_jax.data.bucket.upload_dataset)")
    inputs = np.asarray(inputs)
    labels = np.asarray(labels)
    if inputs.ndim != 2 or inputs.shape != labels.shape:
        raise ValueError(f"inputs {inputs.shape} and labels {labels.shape} must be equal (E, N)")
    for name, a in (("inputs", inputs), ("labels", labels)):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{name} tokens must be in 0..255")
    E, N = inputs.shape
    sizes = np.ones(E, np.int64) if group_sizes is None else np.asarray(group_sizes, np.int64)
    if sizes.sum() != E or (sizes <= 0).any():
        raise ValueError(f"group_sizes must be positive and sum to {E}, got sum {sizes.sum()}")
    group_indices = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    puzzle_indices = np.arange(E + 1, dtype=np.int32)
    vs = int(vocab_size) if vocab_size is not None else int(max(inputs.max(initial=0), labels.max(initial=0)) + 1)
    meta = DatasetMetadata(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=vs,
                           seq_len=int(N), num_puzzle_identifiers=1, total_groups=int(len(sizes)),
                           mean_puzzle_examples=1.0, sets=[SET_NAME], total_samples=int(E),
                           extra=dict(extra_meta or {}))
    d = Path(root) / split_name
    d.mkdir(parents=True, exist_ok=True)
    arrays = {"inputs": inputs.astype(np.uint8), "labels": labels.astype(np.uint8),
              "puzzle_identifiers": np.zeros(E, np.int32), "puzzle_indices": puzzle_indices,
              "group_indices": group_indices}
    for k, a in arrays.items():
        np.save(d / f"{SET_NAME}__{k}.npy", a)
    # Compact, in the reference's key order: the file is byte-identical to the reference builders'.
    (d / "dataset.json").write_text(json.dumps(meta.to_dict()))
    if not (Path(root) / "identifiers.json").exists():
        write_identifiers(root)
    return meta


def _read_meta(d: Path) -> DatasetMetadata:
    f = d / "dataset.json"
    if not f.is_file():
        raise DataFormatError(f"{f}: not found (is {d.parent} a dataset folder built by `eqr data`?)")
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataFormatError(f"{f}: cannot parse JSON ({e})") from e
    if not isinstance(raw, dict):
        raise DataFormatError(f"{f}: expected a JSON object")
    return DatasetMetadata.from_dict(raw, str(f))


def load_split(root: str | os.PathLike, split_name: str, mmap: bool = False) -> Split:
    """Load and check one split (set ``all``).  ``mmap`` memory-maps the token arrays.

    ``root``: a local folder, or a ``gs://`` folder read through this host's checked copy of it
    (`eqr_jax.data.bucket.local_dataset`).

    Raises :class:`DataFormatError` naming the file for a missing, unreadable or inconsistent one.
    """
    if "://" in str(root):
        from eqr_jax.data.bucket import local_dataset

        root = local_dataset(root)
    d = Path(root) / split_name
    meta = _read_meta(d)
    if SET_NAME not in meta.sets:
        raise DataFormatError(f"{d / 'dataset.json'}: sets {meta.sets} lack {SET_NAME!r}")
    arrs = {}
    for k in _ARRAYS:
        f = d / f"{SET_NAME}__{k}.npy"
        if not f.is_file():
            raise DataFormatError(f"{f}: not found")
        try:
            arrs[k] = np.load(f, mmap_mode="r" if mmap and k in ("inputs", "labels") else None,
                              allow_pickle=False)
        except Exception as e:  # numpy raises several types for truncated/garbage files
            raise DataFormatError(f"{f}: cannot read ({e})") from e
    x, y = arrs["inputs"], arrs["labels"]
    pi, gi = arrs["puzzle_indices"], arrs["group_indices"]

    def bad(name, msg):
        return DataFormatError(f"{d / (SET_NAME + '__' + name + '.npy')}: {msg}")

    if x.ndim != 2:
        raise bad("inputs", f"expected (E, N), got shape {x.shape}")
    if y.shape != x.shape:
        raise bad("labels", f"shape {y.shape} differs from inputs {x.shape}")
    if x.shape[1] != meta.seq_len:
        raise bad("inputs", f"seq_len {x.shape[1]} differs from dataset.json seq_len {meta.seq_len}")
    if pi.ndim != 1 or len(pi) < 1 or pi[0] != 0 or pi[-1] != x.shape[0] or (np.diff(pi) < 0).any():
        raise bad("puzzle_indices", f"must rise from 0 to {x.shape[0]}")
    P = len(pi) - 1
    if arrs["puzzle_identifiers"].shape != (P,):
        raise bad("puzzle_identifiers", f"expected shape ({P},), got {arrs['puzzle_identifiers'].shape}")
    if gi.ndim != 1 or len(gi) < 1 or gi[0] != 0 or gi[-1] != P or (np.diff(gi) < 0).any():
        raise bad("group_indices", f"must rise from 0 to {P}")
    if meta.total_samples is not None and int(meta.total_samples) != x.shape[0]:
        raise bad("inputs", f"holds {x.shape[0]} examples but dataset.json says total_samples "
                            f"{meta.total_samples} (truncated or replaced?)")
    if meta.total_groups != len(gi) - 1:
        raise DataFormatError(f"{d / 'dataset.json'}: total_groups {meta.total_groups} but "
                              f"group_indices holds {len(gi) - 1}")
    if x.size and max(int(x.max()), int(y.max())) >= meta.vocab_size:
        raise bad("inputs", f"tokens reach {max(int(x.max()), int(y.max()))} >= vocab_size {meta.vocab_size}")
    return Split(inputs=x, labels=y, puzzle_identifiers=arrs["puzzle_identifiers"],
                 puzzle_indices=pi, group_indices=gi, meta=meta, path=d)


def dataset_info(root: str | os.PathLike, split_name: str = "train") -> DatasetMetadata:
    """Metadata of a split (default ``train``), e.g. ``seq_len`` and ``vocab_size`` for the model.
    A ``gs://`` folder's ``dataset.json`` is read in the bucket (nothing is copied)."""
    if "://" in str(root):
        from eqr_jax.data.bucket import dataset_dir

        return _read_meta(dataset_dir(root) / split_name)
    return _read_meta(Path(root) / split_name)
