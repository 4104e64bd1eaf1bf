"""What each preset builds when its data folder is missing (`eqr_jax.data.prepare`): the hub
recipe names its offline command, generated data never takes Sudoku-Extreme's name, the maze
preset draws the reference's seed-42 mazes."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from eqr_jax import config as config_lib
from eqr_jax.cli import data as data_cli
from eqr_jax.data import format as fmt
from eqr_jax.data.prepare import ensure_dataset


def test_sudoku_preset_without_hub_names_the_offline_command(tmp_path, monkeypatch):
    class OfflineHub:
        @staticmethod
        def hf_hub_download(*a, **k):
            raise OSError("Network is unreachable")
    monkeypatch.setitem(sys.modules, "huggingface_hub", OfflineHub)
    from eqr_jax.data.importers import HubUnavailableError
    data = tmp_path / "sudoku-extreme-1k-aug-1000"
    cfg = config_lib.apply_overrides(config_lib.preset("sudoku"), [f"data.path={data}"])
    with pytest.raises(HubUnavailableError, match=r"(?s)Network is unreachable.*"
                       r"eqr data sudoku --out .*sudoku-extreme-1k-aug-1000 --source csv DIR "
                       r"--train 1000 --num-aug 1000 --seed 42"):
        ensure_dataset(cfg, progress=False)
    assert not data.exists()


def test_generated_data_never_named_sudoku_extreme(tmp_path):
    cfg = config_lib.apply_overrides(config_lib.preset("tiny"),
                                     [f"data.path={tmp_path / 'sudoku-extreme-tiny'}"])
    with pytest.raises(ValueError, match="not Sudoku-Extreme"):
        ensure_dataset(cfg, progress=False)
    assert data_cli.main(["sudoku", "--out", str(tmp_path / "my-Sudoku-Extreme"), "--size", "4",
                       "--train", "4", "--test", "2", "--num-aug", "1", "--no-progress"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_maze_preset_builds_maze_data_with_seed_42(tmp_path):
    data = tmp_path / "maze"
    cfg = config_lib.apply_overrides(config_lib.preset("maze"), [
        f"data.path={data}", "data.build_train=3", "data.build_test=2"])
    ensure_dataset(cfg, progress=False)
    info = fmt.dataset_info(data)
    assert (info.seq_len, info.vocab_size, info.total_groups) == (900, 6, 3)
    built = json.loads((data / "build_info.json").read_text())
    assert built["kind"] == "maze" and built["seed"] == 42 and built["grid"] == 30
    # the same draws as the reference builder: the first mazes of its seed-42 stream
    from eqr_jax.data.maze import MazeConfig, generate_mazes
    (x, _, _), _ = generate_mazes(MazeConfig(), [3, 2], 42)
    np.testing.assert_array_equal(fmt.load_split(data, "train").inputs, x)


def test_auto_build_is_atomic_and_resumable(tmp_path, monkeypatch):
    """The build writes into `.<name>.partial` and renames it when complete: an interrupted
    build leaves no `data.path` (and keeps the partial folder only for the generator's cache,
    which the next build resumes from); a complete one leaves only `data.path`."""
    from conftest import write_array_dataset
    from eqr_jax.data import build as build_lib
    from eqr_jax.data.arrays import make_puzzles

    data = tmp_path / "sudoku4"
    cfg = config_lib.apply_overrides(config_lib.preset("tiny"), [f"data.path={data}"])
    seen = []

    def interrupted(out, **kw):
        seen.append(out)
        write_array_dataset(out, make_puzzles(8, 0), make_puzzles(4, 1))   # half written...
        raise KeyboardInterrupt                                             # ...then Ctrl-C
    monkeypatch.setattr(build_lib, "build_sudoku_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_dataset(cfg, progress=False)
    assert seen == [str(tmp_path / ".sudoku4.partial")] and list(tmp_path.iterdir()) == []

    def with_cache(out, **kw):
        (tmp_path / ".sudoku4.partial" / ".cache").mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt
    monkeypatch.setattr(build_lib, "build_sudoku_dataset", with_cache)
    with pytest.raises(KeyboardInterrupt):
        ensure_dataset(cfg, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [".sudoku4.partial"]   # kept: resumable

    def complete(out, **kw):
        assert (tmp_path / ".sudoku4.partial" / ".cache").is_dir()   # the same folder again
        write_array_dataset(out, make_puzzles(32, 0), make_puzzles(8, 1))
    monkeypatch.setattr(build_lib, "build_sudoku_dataset", complete)
    ensure_dataset(cfg, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["sudoku4"]
    assert fmt.load_split(data, "test").num_examples == 8


def test_check_dataset_before_the_first_step(tmp_path):
    """Both splits load and fit the model; a batch larger than the groups and batch sizes that
    do not split over the processes are refused up front, naming the key."""
    from conftest import write_array_dataset
    from eqr_jax.data.arrays import make_puzzles
    from eqr_jax.data.prepare import check_dataset

    data = write_array_dataset(tmp_path / "d", make_puzzles(64, 0), make_puzzles(10, 1))
    cfg = config_lib.apply_overrides(config_lib.preset("tiny"), [
        f"data.path={data}", "data.global_batch_size=16", "data.eval_batch_size=5"])
    splits = check_dataset(cfg)
    assert splits["train"].num_examples == 64 and splits["test"].num_examples == 10
    with pytest.raises(config_lib.ConfigError, match=r"data.eval_batch_size, 0: the global "
                                                     r"batch\)=5 is not divisible by the 2"):
        check_dataset(cfg, process_count=2)
    big = config_lib.apply_overrides(cfg, ["data.global_batch_size=128"])
    with pytest.raises(config_lib.ConfigError, match=r"global_batch_size=128 is larger than a "
                                                     r"batch .* can fill \(64 groups"):
        check_dataset(big)
    # A test split whose tokens exceed the model's vocabulary (e.g. another board size's data).
    x, y = make_puzzles(10, 1)
    fmt.write_split(data, "test", x, y, vocab_size=11)
    with pytest.raises(config_lib.ConfigError, match=r"d/test holds 4x4 boards, seq_len 16, "
                                                     r"vocab 11, but the model takes"):
        check_dataset(cfg)
