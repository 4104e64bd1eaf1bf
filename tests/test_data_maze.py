"""Maze-Unique: generation semantics, unique shortest paths, verification, dihedral transforms."""

from __future__ import annotations

import numpy as np
import pytest

from eqr_jax.data.augment import dihedral, inverse_dihedral
from eqr_jax.data.build import build_maze_dataset
from eqr_jax.data.format import load_split
from eqr_jax.data.maze import (GOAL, OPEN, PATH, START, WALL, MazeConfig, _bfs, count_shortest_paths,
                               generate_mazes, maze_to_text, verify_maze)

CFG = MazeConfig(grid=12, min_len=10, max_len=20)


def test_perfect_mazes_have_unique_shortest_paths():
    (x, y, L), (tx, ty, tL) = generate_mazes(CFG, [15, 10], seed=3)
    assert x.shape == (15, 144) and tx.shape == (10, 144) and x.dtype == np.uint8
    assert set(np.unique(np.concatenate([x, tx]))) <= {WALL, OPEN, START, GOAL}
    assert set(np.unique(y)) <= {WALL, OPEN, START, GOAL, PATH}
    assert L.min() >= 10 and L.max() <= 20
    for a, b, length in zip(np.concatenate([x, tx]), np.concatenate([y, ty]), np.concatenate([L, tL])):
        assert verify_maze(a, b) is None
        g = a.reshape(12, 12)
        assert (g[11] == WALL).all() and (g[:, 11] == WALL).all()     # even grid: last row/col walls
        assert (b == PATH).sum() == length - 1
        s, goal = tuple(np.argwhere(g == START)[0]), tuple(np.argwhere(g == GOAL)[0])
        assert _bfs(g != WALL, s)[0][goal] == length
        # perfect maze = spanning tree over the odd cells: open cells = 2 * cells - 1
        assert (g != WALL).sum() == 2 * 25 - 1
    keys = {a.tobytes() for a in np.concatenate([x, tx])}
    assert len(keys) == 25                                              # deduplicated
    (x2, _, _), _ = generate_mazes(CFG, [15, 10], seed=3)
    assert (x2 == x).all()                                              # deterministic


def test_random_mode_requires_unique_paths():
    cfg = MazeConfig(grid=9, min_len=4, max_len=8, maze_mode="random", wall_prob=0.3)
    (x, y, _), = generate_mazes(cfg, [12], seed=0)
    for a, b in zip(x, y):
        g = a.reshape(9, 9)
        s, goal = tuple(np.argwhere(g == START)[0]), tuple(np.argwhere(g == GOAL)[0])
        assert count_shortest_paths(g != WALL, s, goal) == 1
        assert verify_maze(a, b) is None


def test_count_shortest_paths_and_verify_rejections():
    open_ = np.ones((3, 3), bool)
    assert count_shortest_paths(open_, (0, 0), (2, 2), cap=100) == 6
    assert count_shortest_paths(open_, (0, 0), (2, 2)) == 2             # capped
    open_[1, :] = False
    assert count_shortest_paths(open_, (0, 0), (2, 2)) == 0
    (x, y, _), = generate_mazes(CFG, [1], seed=5)
    a, b = x[0].copy(), y[0].copy()
    b2 = b.copy()
    b2[np.flatnonzero(b2 == PATH)[0]] = OPEN                            # a path cell missing
    assert "marks" in verify_maze(a, b2)
    b3 = b.copy()
    b3[np.flatnonzero(b3 == OPEN)[0]] = PATH                            # an extra cell marked
    assert verify_maze(a, b3) is not None
    # open a wall next to the path to create a second route of the same length somewhere:
    # verify_maze must then complain or still be right; an all-open grid is never unique
    g = np.full((5, 5), OPEN, np.uint8)
    g[0, 0], g[4, 4] = START, GOAL
    lab = g.copy()
    lab[0, 1:5] = PATH
    lab[1:4, 4] = PATH
    assert verify_maze(g.ravel(), lab.ravel()) == "shortest path is not unique"


def test_dihedral_transforms_keep_mazes_valid():
    (x, y, _), = generate_mazes(CFG, [2], seed=9)
    a, b = x[0].reshape(12, 12), y[0].reshape(12, 12)
    seen = set()
    for k in range(8):
        ta, tb = dihedral(a, k), dihedral(b, k)
        assert verify_maze(ta, tb) is None
        assert (inverse_dihedral(ta, k) == a).all()
        seen.add(ta.tobytes())
    assert len(seen) == 8
    with pytest.raises(ValueError):
        dihedral(a, 8)
    assert maze_to_text(x[0]).count("S") == 1


def test_build_maze_dataset_roundtrip(tmp_path):
    s = build_maze_dataset(tmp_path, grid=11, train=6, test=4, min_len=8, max_len=14, seed=1,
                           num_aug=3, progress=False, verbose=False)
    assert s["train_examples"] == 24 and s["test_mazes"] == 4
    tr, te = load_split(tmp_path, "train"), load_split(tmp_path, "test")
    assert tr.meta.vocab_size == 6 and tr.meta.seq_len == 121 and tr.num_groups == 6
    assert tr.group_indices.tolist() == [0, 4, 8, 12, 16, 20, 24]
    for a, b in zip(np.concatenate([tr.inputs, te.inputs]), np.concatenate([tr.labels, te.labels])):
        assert verify_maze(a, b) is None
    with pytest.raises(RuntimeError, match="lower --max-len"):
        build_maze_dataset(tmp_path / "x", grid=5, train=1, test=1, min_len=30, max_len=30,
                           max_grid_attempts=2, max_start_attempts=2, progress=False, verbose=False)
