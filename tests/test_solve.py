"""`eqr solve`: input validation with line numbers, and an end-to-end solve of 4x4 puzzles."""

from __future__ import annotations

import pytest

from conftest import eval_data, solution_strings, trained_checkpoint
from eqr_jax import solve
from eqr_jax.cli import solve as solve_cli

GOOD9 = ("53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79")
SOL9 = ("534678912672195348198342567859761423426853791713924856961537284287419635345286179")


def test_parse_valid_lines():
    p = solve.parse_line(f"{GOOD9} {SOL9}", 4)
    assert p.line == 4 and p.grid.shape == (9, 9) and p.grid[0, 0] == 5 and p.grid[0, 2] == 0
    assert solve.is_solution(p.grid, p.solution)
    q = solve.parse_line("1.3..4.1" + "0" * 8)  # 4x4, '.' and '0' are blanks
    assert q.grid.shape == (4, 4) and q.solution is None
    assert solve.parse_line("1" + "." * 35).grid.shape == (6, 6)  # 2x3 boxes


@pytest.mark.parametrize("text, message", [
    (GOOD9[:80], "puzzle: length 80 is not a square board"),
    (GOOD9[:40] + "x" + GOOD9[41:], "bad character 'x' at position 41"),
    ("55" + GOOD9[2:], "contradictory givens: digit 5 repeated in row 1"),
    (f"{GOOD9} {SOL9[:-1]}", "solution: expected 81 characters"),
    (f"{GOOD9} {'1' + SOL9[1:]}", "solution breaks the rules"),
    (f"{GOOD9} {SOL9} extra", "3 fields"),
    ("1234" * 4, "contradictory givens"),
])
def test_bad_lines_are_reported_with_line_number(text, message):
    with pytest.raises(solve.PuzzleError) as e:
        solve.read_puzzles(["# comment", "", text])
    assert str(e.value).startswith("line 3: ") and message in str(e.value)


def test_read_puzzles_collects_all_errors_or_skips():
    lines = [GOOD9, "12", "", GOOD9.replace("5", "A", 1)]
    with pytest.raises(solve.PuzzleError) as e:
        solve.read_puzzles(lines)
    assert str(e.value).splitlines()[0].startswith("line 2: ")
    assert str(e.value).splitlines()[1].startswith("line 4: ")
    ok, errors = solve.read_puzzles(lines, skip_invalid=True)
    assert [p.line for p in ok] == [1] and len(errors) == 2


def test_main_rejects_bad_input_before_loading(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text(f"{GOOD9}\n{GOOD9[:-1]}x\n")
    code = solve_cli.main(["--checkpoint", str(tmp_path / "none"), "--puzzles", str(f)])
    err = capsys.readouterr().err
    assert code == 2 and "line 2: puzzle: bad character 'x' at position 81" in err
    assert solve_cli.main(["--checkpoint", "x"]) == 2  # neither a puzzle nor a file
    assert solve_cli.main(["--checkpoint", "x", "1.3"]) == 2  # a puzzle on the command line
    assert "puzzle: length 3" in capsys.readouterr().err
    assert solve_cli.main(["--checkpoint", "x", "--puzzles", str(tmp_path / "missing.txt")]) == 2


def test_solve_file_end_to_end(tmp_path, capsys):
    ckpt = trained_checkpoint()
    _, x, y = eval_data(n=8, batch=8, seed=5)
    lines = solution_strings(x, y)
    lines[-1] = lines[-1].split()[0]  # one puzzle without its solution
    lines.insert(2, GOOD9)  # a 9x9 puzzle for a 4x4 model: reported, skipped
    f = tmp_path / "p.txt"
    f.write_text("\n".join(lines) + "\n")
    gif = tmp_path / "traj.gif"
    # Batch 8, one copy per call: the compilation the eval-table test already made.
    args = ["--checkpoint", ckpt, "--puzzles", str(f), "--depth", "4", "--breadth", "2",
            "--batch-size", "8", "--max-rows", "8"]
    assert solve_cli.main(args) == 2
    assert "line 3: a 9x9 puzzle" in capsys.readouterr().err
    code = solve_cli.main(args + ["--skip-invalid", "--trajectory", str(gif)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[-2].startswith("valid: ") and out[-2].endswith("/8")
    assert out[-1].startswith("exact_accuracy: ")
    acc = float(out[-1].split(": ")[1])
    assert acc * 7 == pytest.approx(round(acc * 7))  # a fraction of the 7 puzzles with solutions
    assert sum(line.startswith("puzzle ") for line in out) == 8
    assert "puzzle 3 (line 4): steps 4, residual" in "\n".join(out)
    assert gif.stat().st_size > 0
    from PIL import Image
    assert Image.open(gif).n_frames == 4
