"""Sudoku core: solver, uniqueness, the rating rule, canonical forms, augmentation, generator."""

from __future__ import annotations

import numpy as np
import pytest

from eqr_jax.data import sudoku as sd
from eqr_jax.data.augment import apply_sudoku_transform, augment_sudoku, sudoku_transforms
from eqr_jax.data.generate import generate_chunk, generate_puzzles

EASY = "003020600900305001001806400008102900700000008006708200002609500800203009005010300"
# Arto Inkala's 2010 "world's hardest Sudoku" and "tarek" from the classic hard collections.
INKALA = "800000000003600000070090200050007000000045700000100030001000068008500010090000400"
TAREK = "..1..4.......6.3.5...9.....8.....7.3.......285...7.6..3...8...6..92......4...1..."
# A generated puzzle of moderate rating (small enough tree for the pure-Python check below).
MID = "..........7......53..49..18...........9...6.3.6.72.5....6..9.3.8.32..1...9....2.."


# ---------------------------------------------------------------------------------------------
# An independent, slow, pure-Python implementation of the rating rule (sets of candidates).


def _py_rate(puzzle: str) -> tuple[int, int]:
    g = sd.parse_grid(puzzle)
    n = g.shape[0]
    br, bc = sd.box_shape(n)
    cells = [(r, c) for r in range(n) for c in range(n)]
    units = [[(r, c) for c in range(n)] for r in range(n)]
    units += [[(r, c) for r in range(n)] for c in range(n)]
    units += [[(b + i, s + j) for i in range(br) for j in range(bc)]
              for b in range(0, n, br) for s in range(0, n, bc)]
    peers = {x: set().union(*[set(u) for u in units if x in u]) - {x} for x in cells}
    digits = set(range(1, n + 1))

    def propagate(cand):
        """cand: dict cell -> set. Returns False on contradiction (naked + hidden singles)."""
        done = set()
        while True:
            changed = False
            for x in cells:
                if not cand[x]:
                    return False
                if len(cand[x]) == 1 and x not in done:
                    done.add(x)
                    changed = True
                    (d,) = cand[x]
                    for p in peers[x]:
                        cand[p].discard(d)
                        if not cand[p]:
                            return False
            for u in units:
                for d in digits:
                    places = [x for x in u if d in cand[x]]
                    if not places:
                        return False
                    if len(places) == 1 and len(cand[places[0]]) > 1:
                        cand[places[0]] = {d}
                        changed = True
            if not changed:
                return True

    stats = {"branch": 0, "sol": 0}

    def node(cand):
        if not propagate(cand):
            return
        open_ = [x for x in cells if len(cand[x]) > 1]
        if not open_:
            stats["sol"] += 1
            return
        k = min(len(cand[x]) for x in open_)
        x = next(x for x in open_ if len(cand[x]) == k)  # first in row-major order
        stats["branch"] += 1
        for d in sorted(cand[x]):
            child = {y: set(v) for y, v in cand.items()}
            child[x] = {d}
            node(child)

    node({(r, c): ({int(g[r, c])} if g[r, c] else set(digits)) for r, c in cells})
    return stats["branch"], stats["sol"]


# ---------------------------------------------------------------------------------------------


def test_parse_format_roundtrip_and_errors():
    g = sd.parse_grid(EASY)
    assert g.shape == (9, 9) and g[0, 2] == 3 and g[0, 0] == 0
    assert sd.format_grid(g) == EASY.replace("0", ".")
    assert sd.parse_grid(TAREK).shape == (9, 9)
    assert sd.parse_grid("1.3." "3..." ".1.." "...1").shape == (4, 4)
    with pytest.raises(sd.PuzzleFormatError, match="length 80"):
        sd.parse_grid(EASY[:-1])
    with pytest.raises(sd.PuzzleFormatError, match=r"'x' at position 5"):
        sd.parse_grid(EASY[:4] + "x" + EASY[5:])
    with pytest.raises(sd.PuzzleFormatError, match="'5'"):
        sd.parse_grid("5" + "." * 15)   # digit too large for a 4x4 board
    t = sd.tokens_from_grid(g)
    assert t.dtype == np.uint8 and t.shape == (81,) and t.min() >= 1 and t.max() <= 10
    assert (sd.grid_from_tokens(t) == g).all()


def test_token_codec_round_trip_and_predictions():
    """The one codec (used by the datasets and by `eqr solve`): blank -> 1, digit d -> d + 1;
    back, PAD 0, blank 1 and tokens that are no digit of the board (a model may predict them)
    are blanks; batches keep their leading axes."""
    grid = np.array([[1, 0, 0, 2], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]])
    np.testing.assert_array_equal(sd.tokens_from_grid(grid)[[0, 1, 3, 15]], [2, 1, 3, 4])
    preds = np.array([[2, 0, 1, 3] + [1] * 11 + [9], [5] * 16])
    back = sd.grid_from_tokens(preds, 4)
    assert back.shape == (2, 4, 4)
    np.testing.assert_array_equal(back[0].ravel()[[0, 1, 2, 3, 15]], [1, 0, 0, 2, 0])
    np.testing.assert_array_equal(back[1], 4)
    np.testing.assert_array_equal(sd.grid_from_tokens(sd.tokens_from_grid(grid)), grid)


def test_box_shapes():
    assert sd.box_shape(4) == (2, 2)
    assert sd.box_shape(6) == (2, 3)
    assert sd.box_shape(9) == (3, 3)
    assert sd.box_shape(12) == (3, 4)
    with pytest.raises(sd.PuzzleFormatError):
        sd.box_shape(7)


def test_solver_and_counter():
    for s in (EASY, INKALA, TAREK):
        g = sd.parse_grid(s)
        sol = sd.solve(g)
        assert sol is not None and sol.shape == (9, 9)
        assert sd.is_valid_solution(g, sol)
        assert sd.count_solutions(g) == 1
    # 4x4 has exactly 288 grids; 6x6 (2x3 boxes) with a partial first row is still solvable
    assert sd.count_solutions(np.zeros((4, 4), int), limit=0) == 288
    assert sd.count_solutions(np.zeros((4, 4), int), limit=2) == 2
    six = np.zeros((6, 6), int)
    six[0] = [1, 2, 3, 4, 5, 6]
    assert sd.is_valid_solution(six, sd.solve(six))
    # a capped search terminates on the empty 9x9 grid (whose full tree is astronomically large)
    assert sd.rate_and_count(np.zeros((9, 9), int), max_solutions=2)[1] == 2
    # clashing givens and an unsolvable puzzle
    bad = sd.parse_grid("11" + "." * 79)
    assert sd.count_solutions(bad) == 0 and sd.solve(bad) is None
    assert "repeated in row 1" in sd.check_givens(bad)
    g = sd.parse_grid(EASY)
    sol = sd.solve(g)
    broken = sol.copy()
    broken[0, 0], broken[0, 1] = broken[0, 1], broken[0, 0]
    assert not sd.is_valid_solution(np.zeros((9, 9), int), broken)


def test_rating_known_puzzles_and_python_reference():
    assert sd.rate(sd.parse_grid(EASY)) == 0            # solved by singles alone
    for s in (EASY, MID, INKALA):
        r, nsol = sd.rate_and_count(sd.parse_grid(s))
        assert nsol == 1
        assert (r, nsol) == _py_rate(s), s
    # exact values of the rule (cross-checked by the pure-Python implementation above)
    assert sd.rate(sd.parse_grid(INKALA)) == 160
    assert sd.rate(sd.parse_grid(TAREK)) == 211
    # 4x4 and 6x6 boards too
    for s in ("." * 16, "1..." "..3." "...." "4..."):
        assert sd.rate_and_count(sd.parse_grid(s))[0] == _py_rate(s)[0]


def test_rating_independent_of_candidate_order_and_digit_relabelling():
    # The rule explores the whole tree, so the candidate order cannot matter, and relabelling the
    # digits maps the tree onto itself.  Row/column/transpose transforms are NOT rating-invariant
    # in general: they move which cell is "first in row-major order" among the tied ones.
    rng = np.random.default_rng(0)
    for s in (MID, INKALA, TAREK):
        g = sd.parse_grid(s)
        r0 = sd.rate_and_count(g, order=0)
        assert r0 == sd.rate_and_count(g, order=1)
        t = sudoku_transforms(rng, 5, 9)
        t["transpose"][:] = False
        t["rows"][:] = np.arange(9)
        t["cols"][:] = np.arange(9)
        for aug in apply_sudoku_transform(g.reshape(-1), t):
            assert sd.rate(aug) == r0[0]


def test_augmentation_keeps_valid_pairs():
    rng = np.random.default_rng(1)
    for s in (INKALA, "1..." "..3." "...." "4..."):
        p = sd.parse_grid(s)
        sol = sd.solve(p)
        n = p.shape[0]
        ap, asol = augment_sudoku(p.reshape(-1), sol.reshape(-1), 40, rng)
        assert ap.shape == (40, n * n)
        assert len({a.tobytes() for a in ap}) > 1          # transforms actually differ
        for a, b in zip(ap, asol):
            assert sd.is_valid_solution(a, b)
            assert sd.count_solutions(a, 0) == sd.count_solutions(p, 0)
            assert (a > 0).sum() == (p > 0).sum()
    # 6x6 (non-square boxes: never transposed) also stays valid
    six = sd.solve(np.zeros((6, 6), int))
    t = sudoku_transforms(rng, 20, 6)
    assert not t["transpose"].any()
    for b in apply_sudoku_transform(six.reshape(-1), t):
        assert sd.is_valid_solution(np.zeros(36, int), b)


def test_canonical_form_invariance_and_separation():
    rng = np.random.default_rng(2)
    g = sd.parse_grid(TAREK)
    c = sd.canonical_form(g)
    t = sudoku_transforms(rng, 6, 9)
    for aug in apply_sudoku_transform(g.reshape(-1), t):
        assert (sd.canonical_form(aug) == c).all()
    assert (sd.canonical_form(c) == c).all()
    assert not (sd.canonical_form(sd.parse_grid(INKALA)) == c).all()
    # moving one given to an unrelated cell gives an inequivalent puzzle (different clue count
    # per row multiset): the canonical form must change
    g2 = g.copy().reshape(-1)
    i = np.flatnonzero(g2)[0]
    g2[i] = 0
    assert not (sd.canonical_form(g2) == c).all()


def test_generator_deterministic_unique_and_rated():
    p1, s1, r1 = generate_chunk(9, 2, seed=7, difficulty="hard", iters=60)
    p2, s2, r2 = generate_chunk(9, 2, seed=7, difficulty="hard", iters=60)
    assert (p1 == p2).all() and (s1 == s2).all() and (r1 == r2).all()
    for p, s, r in zip(p1, s1, r1):
        assert sd.count_solutions(p) == 1
        assert sd.is_valid_solution(p, s)
        assert sd.rate(p) == r
    p3, _, _ = generate_chunk(9, 2, seed=8, difficulty="any")
    assert not (p3 == p1).all()
    # minimal: removing any single given breaks uniqueness for "any" puzzles
    p = p3[0].astype(int)
    for i in np.flatnonzero(p):
        q = p.copy()
        q[i] = 0
        assert sd.count_solutions(q) == 2


def test_generate_puzzles_chunks_cache_and_workers(tmp_path):
    a = generate_puzzles(4, 12, seed=3, difficulty="any", chunk_size=5, workers=1, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("chunk_*.npz"))
    assert len(files) == 3
    files[1].unlink()                                 # "interrupted" build: one chunk missing
    b = generate_puzzles(4, 12, seed=3, difficulty="any", chunk_size=5, workers=2, cache_dir=tmp_path)
    for x, y in zip(a, b):
        assert (x == y).all()
    c = generate_puzzles(4, 12, seed=3, difficulty="any", chunk_size=5, workers=1)
    assert all((x == y).all() for x, y in zip(a, c))
    for p, s in zip(a[0], a[1]):
        assert sd.is_valid_solution(p, s) and sd.count_solutions(p) == 1


def test_build_small_dataset_inequivalent_splits_and_valid_augmentations(tmp_path):
    from eqr_jax.data.build import build_sudoku_dataset
    from eqr_jax.data.format import load_split
    s = build_sudoku_dataset(tmp_path, size=6, train=12, test=6, num_aug=3, seed=4, progress=False,
                             verbose=False, workers=1)
    assert s["train_examples"] == 48 and s["test_puzzles"] == 6 and s["distinct"] == "canonical"
    tr, te = load_split(tmp_path, "train"), load_split(tmp_path, "test")
    assert tr.meta.vocab_size == 8 and tr.meta.seq_len == 36
    assert tr.group_indices.tolist() == list(range(0, 49, 4))
    x, y = tr.inputs.astype(int) - 1, tr.labels.astype(int) - 1
    for a, b in zip(x, y):
        assert sd.is_valid_solution(a, b) and sd.count_solutions(a) == 1
    # group members are transforms of their original: same canonical form
    for g in range(12):
        keys = {sd.canonical_form(x[4 * g + k]).tobytes() for k in range(4)}
        assert len(keys) == 1
    train_keys = {sd.canonical_form(x[4 * g]).tobytes() for g in range(12)}
    test_keys = {sd.canonical_form(p).tobytes() for p in te.inputs.astype(int) - 1}
    assert len(train_keys) == 12 and len(test_keys) == 6 and not (train_keys & test_keys)
    # same seed -> same dataset (the chunk cache is reused; a fresh folder regenerates)
    build_sudoku_dataset(tmp_path / "again", size=6, train=12, test=6, num_aug=3, seed=4,
                         progress=False, verbose=False, workers=1)
    assert (load_split(tmp_path / "again", "train").inputs == tr.inputs).all()
