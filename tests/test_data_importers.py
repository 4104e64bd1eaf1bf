"""Importers: CSV / text validation with line numbers, --skip-invalid, hub errors, CSV build."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from eqr_jax.cli import data as data_cli
from eqr_jax.data import importers
from eqr_jax.data.format import load_split
from eqr_jax.data.importers import ValidationError, read_puzzle_lines, read_sudoku_csv
from eqr_jax.data.sudoku import count_solutions, format_grid, is_valid_solution, parse_grid, solve

EASY = "003020600900305001001806400008102900700000008006708200002609500800203009005010300"
INKALA = "800000000003600000070090200050007000000045700000100030001000068008500010090000400"
TAREK = "..1..4.......6.3.5...9.....8.....7.3.......285...7.6..3...8...6..92......4...1..."


def _sol(p: str) -> str:
    return format_grid(solve(parse_grid(p)))


def _bad_rows():
    """(puzzle, answer, expected message fragment) for every kind of bad row."""
    e, es = EASY.replace("0", "."), _sol(EASY)
    clash = "11" + e[2:]
    wrong = es[:-2] + es[-1] + es[-2]            # swaps two digits: breaks the rules
    mism = list(es)
    k = e.index("3")                             # first given: contradict it in the solution
    mism[k] = "4" if es[k] != "4" else "5"
    several = "." * 81
    nosol = list(e)
    nosol[0] = "2"                               # a legal-looking given with no completion
    nosol = "".join(nosol)
    return [
        (e[:-1], es, "got 80"),
        (e[:10] + "x" + e[11:], es, "'x'"),
        (clash, es, "repeated in row 1"),
        (e, es[:-1] + ".", "blank cells"),
        (e, wrong, "breaks the rules"),
        (e, "".join(mism), "does not match the given"),
        (several, es, "several solutions"),
        (nosol, es, None),
    ]


def _write_csv(path, rows):
    lines = ["source,question,answer,rating"]
    lines += [f"src{i},{q},{a},{i}" for i, (q, a) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_csv_valid_rows(tmp_path):
    f = tmp_path / "train.csv"
    good = [(EASY.replace("0", "."), _sol(EASY)), (INKALA.replace("0", "."), _sol(INKALA)), (TAREK, _sol(TAREK))]
    _write_csv(f, good)
    res = read_sudoku_csv(f)
    assert len(res) == 3 and res.puzzles.dtype == np.uint8 and res.puzzles.shape == (3, 81)
    assert res.ratings.tolist() == [0.0, 1.0, 2.0] and res.lines == [2, 3, 4]
    for p, s in zip(res.puzzles, res.solutions):
        assert is_valid_solution(p, s)


def test_csv_errors_name_file_and_line(tmp_path):
    f = tmp_path / "test.csv"
    good = (TAREK, _sol(TAREK))
    bad = _bad_rows()
    rows = [good] + [(q, a) for q, a, _ in bad] + [good]
    _write_csv(f, rows)
    with pytest.raises(ValidationError) as ei:
        read_sudoku_csv(f)
    issues = ei.value.issues
    assert [i.line for i in issues] == list(range(3, 3 + len(bad)))
    for issue, (_, _, frag) in zip(issues, bad):
        assert issue.file == str(f)
        if frag:
            assert frag in issue.message, (issue, frag)
    assert f"{f}:3:" in str(ei.value) and "--skip-invalid" in str(ei.value)
    res = read_sudoku_csv(f, skip_invalid=True)
    assert len(res) == 2 and len(res.issues) == len(bad)


def test_text_lines(tmp_path):
    f = tmp_path / "puzzles.txt"
    f.write_text("# comment\n"
                 f"{EASY}\n"
                 "\n"
                 f"{TAREK}   {_sol(TAREK)}\n"
                 "1.3.\n"
                 f"{'.' * 16}\n"
                 f"{TAREK} {_sol(EASY)}\n")
    with pytest.raises(ValidationError) as ei:
        read_puzzle_lines(f)
    assert [(i.line, i.file) for i in ei.value.issues] == [(5, str(f)), (6, str(f)), (7, str(f))]
    assert "several solutions" in ei.value.issues[1].message
    issues = []
    rows = read_puzzle_lines(f, skip_invalid=True, issues=issues)
    assert len(rows) == 2 and len(issues) == 3
    (p0, s0), (p1, s1) = rows
    assert s0 is None and p0.shape == (9, 9) and count_solutions(p0) == 1
    assert is_valid_solution(p1, s1)
    four = tmp_path / "four.txt"
    four.write_text("1..4.4...2.....3 1234341243212143\n")
    with pytest.raises(ValidationError, match="four.txt:1"):
        read_puzzle_lines(four)
    four.write_text("12..34....4.4... 1234341221434321\n")
    (p, s), = read_puzzle_lines(four, check_unique=False)
    assert p.shape == (4, 4) and is_valid_solution(p, s)


def test_hub_without_network_gives_clear_message(monkeypatch):
    class FakeHub:
        @staticmethod
        def hf_hub_download(*a, **k):
            raise OSError("Network is unreachable")
    monkeypatch.setitem(sys.modules, "huggingface_hub", FakeHub)
    with pytest.raises(RuntimeError, match="network may be unavailable.*--source csv"):
        importers.download_sudoku_extreme()
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)      # not installed
    with pytest.raises(RuntimeError, match="pip install"):
        importers.download_sudoku_extreme()


def test_build_from_csv_dir_and_cli(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = [(EASY.replace("0", "."), _sol(EASY)), (INKALA.replace("0", "."), _sol(INKALA)), (TAREK, _sol(TAREK))]
    _write_csv(src / "train.csv", good + [(EASY[:-1], _sol(EASY))])
    _write_csv(src / "test.csv", good[:2])
    out = tmp_path / "ds"
    rc = data_cli.main(["sudoku", "--out", str(out), "--source", "csv", str(src), "--num-aug", "4",
                     "--no-progress"])
    assert rc == 2  # bad input rows: a user error
    assert f"{src / 'train.csv'}:5:" in capsys.readouterr().err
    rc = data_cli.main(["sudoku", "--out", str(out), "--source", "csv", str(src), "--num-aug", "4",
                     "--skip-invalid", "--no-progress"])
    assert rc == 0
    assert "skipped invalid rows: {'train': 1, 'test': 0}" in capsys.readouterr().out
    tr, te = load_split(out, "train"), load_split(out, "test")
    assert tr.inputs.shape == (15, 81) and tr.num_groups == 3 and te.inputs.shape == (2, 81)
    assert tr.meta.vocab_size == 11 and tr.meta.seq_len == 81
    for x, y in zip(tr.inputs.astype(int) - 1, tr.labels.astype(int) - 1):
        assert is_valid_solution(x, y)
    assert rc == 0 and data_cli.main(["sudoku", "--out", str(out), "--source", "ftp"]) == 2
