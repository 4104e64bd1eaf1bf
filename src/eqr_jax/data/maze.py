"""Maze-Unique: mazes whose label is the unique shortest start->goal path (reference semantics).

Tokens (row-major ``grid x grid``): ``#`` wall -> 1, `` `` open -> 2, ``S`` -> 3, ``G`` -> 4,
``o`` path -> 5, 0 = PAD (vocab 6).  The input shows walls, open cells, S and G; the label is the
same grid with the interior cells of the shortest path marked ``o``.

Generation follows the reference builder's semantics and random-draw order, using one
``np.random.default_rng(seed)`` stream for train then test:

* path length ``L`` ~ UniformInt[min_len, max_len] (the BFS distance S->G), up to
  ``max_length_resamples`` draws per sample;
* ``perfect`` mode: a randomised depth-first backtracker on the largest odd square that fits
  (cells at odd coordinates, neighbours tried in the order down, up, right, left), placed
  top-left in an all-wall grid — a spanning tree, so every shortest path is unique;
  ``random`` mode: every cell open with probability ``1 - wall_prob`` and, with
  ``require_unique``, mazes whose S->G shortest path is not unique are rejected;
* S uniform over open cells (row-major), G uniform over the cells at BFS distance exactly L;
* with ``dedupe``, a maze whose input grid equals an earlier one (train or test) is resampled.

:func:`verify_maze` checks a built pair independently (the label is the unique shortest path).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["CHARSET", "MazeConfig", "generate_mazes", "count_shortest_paths", "verify_maze",
           "encode", "decode", "maze_to_text"]

#: Token id = index in CHARSET + 1.
CHARSET = "# SGo"
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5
# neighbour order used by the generator and BFS (down, up, right, left)
_DIRS = ((1, 0), (-1, 0), (0, 1), (0, -1))


@dataclass
class MazeConfig:
    """Every parameter of the Maze-Unique builder (defaults = the published preset)."""

    grid: int = 30
    min_len: int = 100
    max_len: int = 140
    maze_mode: str = "perfect"          # perfect | random
    wall_prob: float = 0.37             # random mode only
    require_unique: bool = True         # reject non-unique shortest paths (random mode)
    dedupe: bool = True
    max_length_resamples: int = 50
    max_grid_attempts: int = 200
    max_start_attempts: int = 200
    strict: bool = True                 # raise when a drawn length cannot be realised

    def check(self) -> None:
        if self.grid < 3:
            raise ValueError("maze grid must be >= 3")
        if self.maze_mode not in ("perfect", "random"):
            raise ValueError(f"maze_mode must be perfect or random, got {self.maze_mode!r}")
        if not 0 <= self.wall_prob < 1:
            raise ValueError("wall_prob must be in [0, 1)")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError("need 1 <= min_len <= max_len")


def _perfect_maze(m: int, rng: np.random.Generator) -> np.ndarray:
    """(m, m) bool open mask of a randomised DFS spanning-tree maze; m odd."""
    open_ = np.zeros((m, m), bool)
    h = (m - 1) // 2
    seen = np.zeros((h, h), bool)
    cur = (int(rng.integers(h)), int(rng.integers(h)))
    seen[cur] = True
    open_[2 * cur[0] + 1, 2 * cur[1] + 1] = True
    stack = [cur]
    while stack:
        r, c = stack[-1]
        nbrs = [(r + dr, c + dc) for dr, dc in _DIRS
                if 0 <= r + dr < h and 0 <= c + dc < h and not seen[r + dr, c + dc]]
        if not nbrs:
            stack.pop()
            continue
        nr, nc = nbrs[int(rng.integers(len(nbrs)))]
        seen[nr, nc] = True
        open_[r + nr + 1, c + nc + 1] = True          # the wall cell between the two cells
        open_[2 * nr + 1, 2 * nc + 1] = True
        stack.append((nr, nc))
    return open_


def _bfs(open_: np.ndarray, src: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (-1 unreachable) and parents (flat index, -1 none) from ``src``."""
    n = open_.shape[0]
    dist = np.full((n, n), -1, np.int32)
    par = np.full((n, n), -1, np.int64)
    dist[src] = 0
    q = deque([src])
    while q:
        y, x = q.popleft()
        for dy, dx in _DIRS:
            ny, nx = y + dy, x + dx
            if 0 <= ny < n and 0 <= nx < n and open_[ny, nx] and dist[ny, nx] < 0:
                dist[ny, nx] = dist[y, x] + 1
                par[ny, nx] = y * n + x
                q.append((ny, nx))
    return dist, par


def count_shortest_paths(open_: np.ndarray, s: tuple[int, int], g: tuple[int, int], cap: int = 2) -> int:
    """Number of shortest s->g paths on the open cells, counted up to ``cap`` (0 if unreachable)."""
    ds, _ = _bfs(open_, s)
    L = ds[g]
    if L < 0:
        return 0
    n = open_.shape[0]
    ways = np.zeros((n, n), np.int64)
    ways[s] = 1
    # process cells layer by layer: ways(v) = sum of ways(u) over neighbours u one step closer
    order = np.argsort(ds, axis=None, kind="stable")
    for flat in order:
        y, x = divmod(int(flat), n)
        d = ds[y, x]
        if d <= 0 or d > L:
            continue
        tot = 0
        for dy, dx in _DIRS:
            py, px = y + dy, x + dx
            if 0 <= py < n and 0 <= px < n and ds[py, px] == d - 1:
                tot += ways[py, px]
        ways[y, x] = min(cap, tot)
    return int(ways[g])


def encode(open_: np.ndarray, s, g, path) -> tuple[np.ndarray, np.ndarray]:
    """(input, label) flat uint8 token grids of a maze with start, goal and path cells."""
    grid = np.where(open_, OPEN, WALL).astype(np.uint8)
    grid[s] = START
    grid[g] = GOAL
    label = grid.copy()
    for y, x in path[1:-1]:
        label[y, x] = PATH
    return grid.reshape(-1), label.reshape(-1)


def decode(tokens: np.ndarray, grid: int | None = None) -> np.ndarray:
    """(n, n) array of characters from flat tokens (PAD shown as '?')."""
    t = np.asarray(tokens).reshape(-1)
    n = grid or int(round(np.sqrt(t.size)))
    chars = np.array(list("?" + CHARSET))
    return chars[t.reshape(n, n)]


def maze_to_text(tokens: np.ndarray) -> str:
    """Multi-line text of a token grid."""
    return "\n".join("".join(r) for r in decode(tokens))


def _sample(cfg: MazeConfig, L: int, rng: np.random.Generator):
    n = cfg.grid
    for _ in range(cfg.max_grid_attempts):
        if cfg.maze_mode == "perfect":
            m = n if n % 2 else n - 1
            open_ = np.zeros((n, n), bool)
            open_[:m, :m] = _perfect_maze(m, rng)
        else:
            open_ = rng.random((n, n)) >= cfg.wall_prob
        if int(open_.sum()) < L + 1:
            continue
        cells = np.argwhere(open_)
        for _ in range(cfg.max_start_attempts):
            s = tuple(int(v) for v in cells[rng.integers(len(cells))])
            dist, par = _bfs(open_, s)
            goals = np.argwhere(dist == L)
            if len(goals) == 0:
                continue
            g = tuple(int(v) for v in goals[rng.integers(len(goals))])
            path = [g]
            while path[-1] != s:
                p = int(par[path[-1]])
                path.append(divmod(p, n))
            path.reverse()
            if cfg.require_unique and cfg.maze_mode != "perfect":
                if count_shortest_paths(open_, s, g, 2) != 1:
                    continue
            return open_, s, g, path
    return None


def generate_mazes(cfg: MazeConfig, counts: list[int], seed: int,
                   progress: Callable[[int], None] | None = None):
    """Generate consecutive splits from one RNG stream.

    Returns one ``(inputs, labels, lengths)`` per entry of ``counts``: (k, grid*grid) uint8 token
    arrays and (k,) int32 path lengths.  ``progress(1)`` is called per maze.
    """
    cfg.check()
    rng = np.random.default_rng(seed)
    seen: set[bytes] | None = set() if cfg.dedupe else None
    out = []
    for count in counts:
        xs, ys, ls = [], [], []
        while len(xs) < count:
            for _ in range(cfg.max_length_resamples):
                L = int(rng.integers(cfg.min_len, cfg.max_len + 1))
                smp = _sample(cfg, L, rng)
                if smp is None:
                    if cfg.strict:
                        raise RuntimeError(
                            f"no {cfg.grid}x{cfg.grid} {cfg.maze_mode} maze with a shortest path of "
                            f"length {L} after {cfg.max_grid_attempts}x{cfg.max_start_attempts} "
                            f"attempts; lower --max-len or enlarge --grid")
                    continue
                x, y = encode(*smp)
                if seen is not None:
                    key = x.tobytes()
                    if key in seen:
                        continue
                    seen.add(key)
                xs.append(x)
                ys.append(y)
                ls.append(L)
                if progress:
                    progress(1)
                break
            else:
                raise RuntimeError("could not generate a maze after resampling lengths; "
                                   "adjust --wall-prob or the length range")
        N = cfg.grid * cfg.grid
        out.append((np.array(xs, np.uint8).reshape(-1, N), np.array(ys, np.uint8).reshape(-1, N),
                    np.array(ls, np.int32)))
    return out


def verify_maze(inp: np.ndarray, label: np.ndarray) -> str | None:
    """None when ``label`` marks the unique shortest S->G path of ``inp``; else the problem."""
    x = np.asarray(inp).reshape(-1)
    y = np.asarray(label).reshape(-1)
    n = int(round(np.sqrt(x.size)))
    if n * n != x.size or y.shape != x.shape:
        return "input/label are not equal square grids"
    x, y = x.reshape(n, n), y.reshape(n, n)
    if ((x < WALL) | (x > GOAL)).any():
        return "input holds tokens outside # , S, G"
    ss, gs = np.argwhere(x == START), np.argwhere(x == GOAL)
    if len(ss) != 1 or len(gs) != 1:
        return "input needs exactly one S and one G"
    s, g = tuple(ss[0]), tuple(gs[0])
    if ((y != x) & ~((x == OPEN) & (y == PATH))).any():
        return "label changes cells other than open -> path"
    open_ = x != WALL
    dist, _ = _bfs(open_, s)
    if dist[g] < 0:
        return "goal unreachable"
    if count_shortest_paths(open_, s, g, 2) != 1:
        return "shortest path is not unique"
    marked = set(map(tuple, np.argwhere(y == PATH)))
    if len(marked) != dist[g] - 1:
        return f"label marks {len(marked)} cells, shortest path has {dist[g] - 1} interior cells"
    # the marked cells plus S and G must form a connected S->G chain of unit steps
    cur, prev, steps = s, None, 0
    allowed = marked | {g}
    while cur != g:
        nxt = [(cur[0] + dy, cur[1] + dx) for dy, dx in _DIRS
               if (cur[0] + dy, cur[1] + dx) in allowed and (cur[0] + dy, cur[1] + dx) != prev]
        if len(nxt) != 1:
            return "marked cells do not form a simple S->G path"
        prev, cur = cur, nxt[0]
        steps += 1
    if steps != dist[g]:
        return "marked path is not a shortest path"
    return None
