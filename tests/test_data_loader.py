"""On-disk format round trip and errors; TrainLoader sampling/determinism/resume; EvalLoader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eqr_jax.data.format import DataFormatError, dataset_info, load_split, write_split
from eqr_jax.data.loader import EvalLoader, TrainLoader


def _write(root, groups=20, per_group=3, N=16, seed=0, test=13):
    rng = np.random.default_rng(seed)
    E = groups * per_group
    x = rng.integers(1, 6, (E, N)).astype(np.uint8)
    y = rng.integers(0, 6, (E, N)).astype(np.uint8)      # 0 = ignore label in this format
    write_split(root, "train", x, y, group_sizes=[per_group] * groups, vocab_size=6)
    tx = rng.integers(1, 6, (test, N)).astype(np.uint8)
    write_split(root, "test", tx, tx, vocab_size=6)
    return x, y, tx


def test_format_roundtrip(tmp_path):
    x, y, tx = _write(tmp_path)
    s = load_split(tmp_path, "train")
    assert s.inputs.dtype == np.uint8 and (s.inputs == x).all() and (s.labels == y).all()
    assert s.group_indices.tolist() == list(range(0, 61, 3))
    assert s.puzzle_indices.tolist() == list(range(61))
    assert s.puzzle_identifiers.dtype == np.int32 and (s.puzzle_identifiers == 0).all()
    assert s.meta.total_groups == 20 and s.meta.total_samples == 60 and s.meta.seq_len == 16
    info = dataset_info(tmp_path)
    assert info.vocab_size == 6 and info["seq_len"] == 16
    assert json.loads((tmp_path / "identifiers.json").read_text()) == ["<blank>"]
    raw = json.loads((tmp_path / "train" / "dataset.json").read_text())
    assert set(raw) == {"pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len",
                        "num_puzzle_identifiers", "total_groups", "mean_puzzle_examples", "sets",
                        "total_samples"}


def test_format_reference_writer_extra_fields_and_errors(tmp_path):
    _write(tmp_path)
    f = tmp_path / "train" / "dataset.json"
    raw = json.loads(f.read_text())
    raw["some_future_field"] = [1, 2]
    raw.pop("total_samples")                      # optional in the reference's metadata
    f.write_text(json.dumps(raw))
    s = load_split(tmp_path, "train")
    assert s.meta.extra == {"some_future_field": [1, 2]}
    raw.pop("seq_len")
    f.write_text(json.dumps(raw))
    with pytest.raises(DataFormatError, match=r"dataset\.json.*seq_len"):
        load_split(tmp_path, "train")
    f.write_text("{not json")
    with pytest.raises(DataFormatError, match="dataset.json"):
        load_split(tmp_path, "train")
    with pytest.raises(DataFormatError, match="dataset.json: not found"):
        load_split(tmp_path, "validation")
    (tmp_path / "test" / "all__labels.npy").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="all__labels.npy"):
        load_split(tmp_path, "test")
    np.save(tmp_path / "test" / "all__labels.npy", np.zeros((3, 16), np.uint8))
    with pytest.raises(DataFormatError, match="all__labels.npy.*differs"):
        load_split(tmp_path, "test")
    (tmp_path / "test" / "all__labels.npy").unlink()
    with pytest.raises(DataFormatError, match="all__labels.npy: not found"):
        load_split(tmp_path, "test")


def _reference_batches(split, B, seed, passes=1, epochs=1):
    """The reference sampler written out plainly (global batches of example rows)."""
    gi, pi = split.group_indices, split.puzzle_indices
    out = []
    for k in range(1, passes + 1):
        rng = np.random.Generator(np.random.Philox(seed=seed + k))
        for _ in range(epochs):
            order = rng.permutation(len(gi) - 1)
            cur = 0
            while cur < len(order):
                rows = []
                while cur < len(order) and len(rows) < B:
                    g = order[cur]
                    p = rng.integers(gi[g], gi[g + 1])
                    cur += 1
                    cnt = pi[p + 1] - pi[p]
                    rows += list(pi[p] + rng.choice(cnt, min(cnt, B - len(rows)), replace=False))
                if len(rows) < B:
                    break
                out.append(np.array(rows))
    return out


def test_train_loader_matches_reference_sampler_and_labels(tmp_path):
    x, y, _ = _write(tmp_path)
    split = load_split(tmp_path, "train")
    ld = TrainLoader(tmp_path, 8, seed=5, prefetch=0)
    # An epoch takes one puzzle per group: 20 groups x 1 example per puzzle -> 2 batches of 8
    # (not 60 examples // 8 = 7).
    assert ld.steps_per_epoch == 20 // 8
    ref = _reference_batches(split, 8, 5, passes=3)
    assert len(ref) == 3 * 2                       # 20 groups -> 2 full batches of 8 per epoch
    for rows in ref:
        b = ld.__next__()
        assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (8, 16)
        assert (b["inputs"] == x[rows]).all()
        exp = y[rows].astype(np.int32)
        exp[exp == 0] = -100
        assert (b["labels"] == exp).all()
        assert b["puzzle_identifiers"].shape == (8,)
        groups = rows // 3
        assert len(set(groups.tolist())) == 8      # one puzzle per group per batch
    ld.close()


def test_steps_per_epoch_reference_formula():
    from eqr_jax.data.loader import steps_per_epoch
    # Sudoku-Extreme 1k with 1000 augmentations: 1,001,000 examples in 1000 groups.
    sudoku = {"total_groups": 1000, "mean_puzzle_examples": 1, "total_samples": 1_001_000}
    assert steps_per_epoch(sudoku, 768) == 1          # 50,000 epochs -> 50,000 steps
    assert steps_per_epoch(sudoku, 100) == 10
    assert steps_per_epoch(sudoku, 4096) == 1         # at least one step
    assert steps_per_epoch({"total_groups": 15, "mean_puzzle_examples": 2.4}, 6) == 6  # floor(36/6)


def test_train_loader_passes_reseed_every_epochs_per_iter(tmp_path):
    # Pass k of `epochs_per_iter` epochs draws from Philox(seed + k), as the reference's
    # `train_epochs_per_iter` loader passes; one pass of all epochs would continue the stream.
    _write(tmp_path)
    split = load_split(tmp_path, "train")
    ref = _reference_batches(split, 8, 3, passes=2, epochs=3)
    ld = TrainLoader(tmp_path, 8, seed=3, epochs_per_iter=3, prefetch=0)
    assert len(ref) == 12
    for rows in ref:
        assert (next(ld)["inputs"] == split.inputs[rows]).all()
    one_pass = TrainLoader(tmp_path, 8, seed=3, epochs_per_iter=6, prefetch=0)
    got = [next(one_pass)["inputs"] for _ in range(12)]
    assert all((g == split.inputs[r]).all() for g, r in zip(got[:6], ref[:6]))
    assert not all((g == split.inputs[r]).all() for g, r in zip(got[6:], ref[6:]))


def test_train_loader_general_path_multi_example_puzzles():
    # puzzles owning several examples (HRM datasets can) take the draw-by-draw path
    from eqr_jax.data.format import DatasetMetadata, Split
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 4, 30)                       # 30 puzzles, 1..3 examples each
    pi = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    gi = np.arange(0, 31, 2, dtype=np.int32)              # 15 groups of 2 puzzles
    E = int(pi[-1])
    x = rng.integers(1, 6, (E, 4)).astype(np.uint8)
    meta = DatasetMetadata(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=6,
                           seq_len=4, num_puzzle_identifiers=1, total_groups=15,
                           mean_puzzle_examples=float(E) / 30, sets=["all"], total_samples=E)
    split = Split(x, x, np.zeros(30, np.int32), pi, gi, meta)
    ld = TrainLoader(split, 6, seed=4, prefetch=0)
    ref = _reference_batches(split, 6, 4, passes=2)
    assert len(ref) >= 2
    for rows in ref:
        assert (next(ld)["inputs"] == x[rows]).all()


def test_train_loader_deterministic_resume_and_shards(tmp_path):
    _write(tmp_path)
    a = TrainLoader(tmp_path, 8, seed=1, prefetch=3)
    first = [next(a) for _ in range(5)]
    st = a.state()
    json.dumps(st)                                  # JSON-serialisable
    nxt = [next(a) for _ in range(7)]
    a.close()
    b = TrainLoader(tmp_path, 8, seed=1, prefetch=3, state=json.loads(json.dumps(st)))
    for u, v in zip(nxt, [next(b) for _ in range(7)]):
        assert (u["inputs"] == v["inputs"]).all() and (u["labels"] == v["labels"]).all()
    b.restore(st)                                   # restore on a live loader as well
    assert (next(b)["inputs"] == nxt[0]["inputs"]).all()
    b.close()
    c = TrainLoader(tmp_path, 8, seed=1, prefetch=0)
    for u in first:
        assert (u["inputs"] == next(c)["inputs"]).all()
    d = TrainLoader(tmp_path, 8, seed=2, prefetch=0)
    assert not all((u["inputs"] == next(d)["inputs"]).all() for u in first)
    # process slices concatenate to the global batch
    shards = [TrainLoader(tmp_path, 8, seed=1, process_index=i, process_count=2, prefetch=0)
              for i in range(2)]
    for u in first[:3]:
        parts = [next(s) for s in shards]
        assert parts[0]["inputs"].shape == (4, 16)
        assert (np.concatenate([p["inputs"] for p in parts]) == u["inputs"]).all()
    with pytest.raises(ValueError):
        TrainLoader(tmp_path, 7, seed=0, process_count=2)


def test_train_loader_too_few_groups(tmp_path):
    _write(tmp_path, groups=3)
    ld = TrainLoader(tmp_path, 8, seed=0, prefetch=0)
    with pytest.raises(RuntimeError, match="no full batch"):
        next(ld)


def test_eval_loader_every_example_once_with_mask(tmp_path):
    _, _, tx = _write(tmp_path, test=13)
    ev = EvalLoader(tmp_path, 4)
    assert len(ev) == 4 and ev.num_examples == 13
    batches = list(ev)
    assert len(batches) == 4
    got = np.concatenate([b["inputs"][b["mask"]] for b in batches])
    assert (got == tx).all()
    last = batches[-1]
    assert last["mask"].tolist() == [True, False, False, False]
    assert (last["inputs"][1:] == 0).all() and (last["labels"][1:] == -100).all()
    assert (last["puzzle_identifiers"][1:] == 0).all()
    # two processes: each takes its contiguous half of every global batch
    halves = [list(EvalLoader(tmp_path, 4, process_index=i, process_count=2)) for i in range(2)]
    for k in range(4):
        joined = np.concatenate([halves[0][k]["inputs"], halves[1][k]["inputs"]])
        assert (joined == batches[k]["inputs"]).all()
        assert (np.concatenate([halves[0][k]["mask"], halves[1][k]["mask"]]) == batches[k]["mask"]).all()
    # examples [5, 11): batches of 4 from example 5, the last padded
    part = list(EvalLoader(tmp_path, 4, start=5, stop=11))
    assert len(part) == 2 and EvalLoader(tmp_path, 4, start=5, stop=11).num_examples == 6
    assert (np.concatenate([b["inputs"][b["mask"]] for b in part]) == tx[5:11]).all()
    assert part[-1]["mask"].tolist() == [True, True, False, False]
    assert list(EvalLoader(tmp_path, 4, start=13)) == []
    with pytest.raises(ValueError, match=r"examples \[14, None\) outside the split's 13"):
        EvalLoader(tmp_path, 4, start=14)
