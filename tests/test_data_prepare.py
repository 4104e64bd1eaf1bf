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
                       "--train", "4", "--test", "2", "--num-aug", "1", "--no-progress"]) == 1
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
