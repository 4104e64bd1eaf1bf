"""`eqr train --dry-run` (`eqr_jax.plan`): the reference's step count from the data's metadata,
nothing written, mismatched data refused."""

from __future__ import annotations

import json

import numpy as np

from eqr_jax.data import format as fmt
from eqr_jax.cli.train import main


def _reference_layout(root, groups: int, per_group: int, seq_len: int = 81, vocab: int = 11,
                      test: int = 1000):
    """A dataset in the reference layout with real metadata and arrays of the right shapes.

    The token arrays are created as (sparse) memory-mapped .npy files, so the 1,001,000 x 81
    Sudoku-sized train split costs no time; the index arrays are real.
    """
    for split, g, k in (("train", groups, per_group), ("test", test, 1)):
        d = root / split
        d.mkdir(parents=True)
        E = g * k
        for name in ("inputs", "labels"):
            a = np.lib.format.open_memmap(d / f"all__{name}.npy", "w+", np.uint8, (E, seq_len))
            a.flush()
            del a
        np.save(d / "all__puzzle_identifiers.npy", np.zeros(E, np.int32))
        np.save(d / "all__puzzle_indices.npy", np.arange(E + 1, dtype=np.int32))
        np.save(d / "all__group_indices.npy", np.arange(0, E + 1, k, dtype=np.int32))
        meta = fmt.DatasetMetadata(pad_id=0, ignore_label_id=0, blank_identifier_id=0,
                                   vocab_size=vocab, seq_len=seq_len, num_puzzle_identifiers=1,
                                   total_groups=g, mean_puzzle_examples=1.0, sets=["all"],
                                   total_samples=E)
        (d / "dataset.json").write_text(json.dumps(meta.to_dict()))
    (root / "identifiers.json").write_text(json.dumps(["<blank>"]))


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def test_dry_run_sudoku_plans_reference_steps_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "sudoku-extreme-1k-aug-1000"
    _reference_layout(data, 1000, 1001)
    split = fmt.load_split(data, "train", mmap=True)      # the layout is a loadable dataset
    assert split.num_examples == 1_001_000 and split.num_groups == 1000
    before = _listing(tmp_path)
    out = tmp_path / "run"
    assert main(["--preset", "sudoku", "--dry-run", "--data", str(data), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert lines[-1] == "total_steps: 50000"
    assert "steps per epoch: 1 " in text                 # floor(1000 x 1 / 768), not 1,001,000 / 768
    assert "parameters: 4,855,298" in text               # the reference's logged count
    assert "train examples: 1,001,000 in 1,000 groups" in text
    assert "10 loader pass(es) of 5,000 epochs" in text
    assert "evaluation: every 5,000 steps (10 in all)" in text
    assert "FLOPs per optimiser step: " in text and "devices: " in text
    assert not out.exists() and _listing(tmp_path) == before
    # max_steps caps the plan
    assert main(["--preset", "sudoku", "--dry-run", "--data", str(data), "--out", str(out),
                 "train.max_steps=1234"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "total_steps: 1234"


def test_dry_run_without_data_plans_from_the_recipe(tmp_path, capsys):
    for preset, steps, cmd in (("sudoku", 50_000, "eqr data sudoku"),
                               ("maze", 100_000, "eqr data maze")):
        data = tmp_path / f"missing-{preset}"
        # A --data that does not exist is a typo unless --build says to build it there.
        assert main(["--preset", preset, "--dry-run", "--data", str(data),
                     "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "does not exist; pass --build" in err
        assert main(["--preset", preset, "--dry-run", "--data", str(data), "--build",
                     "--out", str(tmp_path / "run")]) == 0
        text = capsys.readouterr().out
        assert text.strip().splitlines()[-1] == f"total_steps: {steps}"
        assert f"built on first `eqr train` by: {cmd}" in text and "--seed 42" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dry_run_rejects_mismatched_data(tmp_path, capsys):
    data = tmp_path / "d"
    _reference_layout(data, 10, 1, seq_len=16, vocab=6, test=4)
    assert main(["--preset", "sudoku", "--dry-run", "--data", str(data)]) == 2
    assert "model.seq_len=81 does not match" in capsys.readouterr().err


def test_dry_run_sudoku6_preset_plans_its_own_data_folder(tmp_path, capsys, monkeypatch):
    # From a fresh checkout: the preset's own folder (data/sudoku6) is missing and is planned to
    # be built on first `eqr train` (no --build needed for a preset's own folder).
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "sudoku6", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.strip().splitlines()[-1] == "total_steps: 3000"
    assert ("eqr data sudoku --out data/sudoku6 --source generate --size 6 --difficulty hard "
            "--train 2000 --test 256 --num-aug 8") in text
    assert "parameters: 77,954" in text
    assert list(tmp_path.iterdir()) == []
    # The phantom gradient's plan counts its k damped steps.
    assert main(["--preset", "sudoku6", "--dry-run", "train.grad_mode=phantom",
                 "train.phantom_k=3"]) == 0
    assert "total_steps: 3000" in capsys.readouterr().out
