"""Importers for real puzzle data, with full validation and line-numbered error reports.

Sources:

* Sudoku-Extreme CSV (``source,question,answer,rating``; 81-character strings, '.' blank), from
  a local folder holding ``train.csv`` and ``test.csv`` (:func:`read_sudoku_csv`) or from the
  Hugging Face hub (:func:`download_sudoku_extreme`, needs ``huggingface_hub`` and network).
* Plain text, one puzzle per line ('.' or '0' blanks), optionally followed by whitespace and its
  solution; blank lines and lines starting with '#' are ignored (:func:`read_puzzle_lines`).

Every row is checked: length, characters, clashing givens, the solution (complete, keeps the
givens, obeys the rules) and the number of solutions (exactly one).  A bad row becomes a
:class:`ValidationIssue` naming file and line.  By default the first bad rows raise
:class:`ValidationError` (listing up to 20 of them); with ``skip_invalid=True`` they are skipped
and returned in the result so the caller can count and report them — nothing is dropped silently.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .sudoku import (PuzzleFormatError, _as_flat, check_givens, count_solutions, format_grid,
                     is_valid_solution, parse_grid, solve)

__all__ = ["ValidationIssue", "ValidationError", "ImportResult", "parse_puzzle",
           "parse_puzzle_line", "parse_puzzle_lines", "require_unique", "validate_pair",
           "read_puzzle_lines", "read_sudoku_csv", "load_sudoku_csv_dir", "download_sudoku_extreme",
           "scan_sudoku_csv", "CsvRows", "HubUnavailableError", "HUB_REPO"]

HUB_REPO = "sapientinc/sudoku-extreme"
CSV_HEADER = ["source", "question", "answer", "rating"]


@dataclass(frozen=True)
class ValidationIssue:
    """One rejected row: ``file:line: message``."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ValidationError(ValueError):
    """Invalid input rows; ``issues`` lists them (file, line, message)."""

    def __init__(self, issues: list[ValidationIssue], hint: str = "use --skip-invalid to skip bad rows"):
        self.issues = list(issues)
        shown = "\n".join(f"  {i}" for i in self.issues[:20])
        more = f"\n  ... and {len(self.issues) - 20} more" if len(self.issues) > 20 else ""
        super().__init__(f"{len(self.issues)} invalid row(s):\n{shown}{more}\n({hint})")


@dataclass
class ImportResult:
    """Valid rows of one file: ``puzzles``/``solutions`` (k, n*n) uint8 (0 = blank), the CSV
    ``ratings`` (k,) float (NaN when absent), ``sources`` (k,) str, and the skipped ``issues``."""

    path: str
    puzzles: np.ndarray
    solutions: np.ndarray
    ratings: np.ndarray
    sources: list[str] = field(default_factory=list)
    issues: list[ValidationIssue] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.puzzles)


def parse_puzzle(puzzle_text: str, solution_text: str | None = None, size: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """The one puzzle parser: ``(puzzle (n, n), solution (n, n) or None)`` int32 from text.

    Checks the characters and length (`parse_grid`), that no two givens clash, and that a
    solution is complete, obeys the rules and keeps every given; does not count solutions. Raises
    `PuzzleFormatError` naming every problem found.
    """
    try:
        p = parse_grid(puzzle_text, size)
    except PuzzleFormatError as e:
        raise PuzzleFormatError(f"puzzle: {e}") from None
    n = p.shape[0]
    clash = check_givens(p)
    if clash:
        raise PuzzleFormatError(f"contradictory givens: {clash}")
    if solution_text is None:
        return p, None
    try:
        s = parse_grid(solution_text, n)
    except PuzzleFormatError as e:
        raise PuzzleFormatError(f"solution: {e}") from None
    if (s == 0).any():
        raise PuzzleFormatError("solution has blank cells")
    problems = []
    if not is_valid_solution(np.zeros_like(s), s):
        problems.append(f"solution breaks the rules: {check_givens(s) or 'invalid grid'}")
    mism = np.flatnonzero((p.ravel() != 0) & (p.ravel() != s.ravel()))
    if len(mism):
        r, c = divmod(int(mism[0]), n)
        problems.append(f"solution does not match the given at row {r + 1}, column {c + 1}")
    if problems:
        raise PuzzleFormatError("; ".join(problems))
    return p, s


def parse_puzzle_line(text: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """`parse_puzzle` of a text line ``<puzzle> [<solution>]``."""
    parts = text.split()
    if len(parts) not in (1, 2):
        raise PuzzleFormatError(f"expected '<puzzle> [<solution>]', got {len(parts)} fields")
    return parse_puzzle(parts[0], parts[1] if len(parts) == 2 else None, size)


def require_unique(puzzle: np.ndarray) -> None:
    """Raise `PuzzleFormatError` unless ``puzzle`` has exactly one solution."""
    k = count_solutions(puzzle, 2)
    if k == 0:
        raise PuzzleFormatError("puzzle has no solution")
    if k > 1:
        raise PuzzleFormatError("puzzle has several solutions")


def validate_pair(puzzle_text: str, solution_text: str | None, size: int | None = None,
                  check_unique: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check one row; returns flat (puzzle, solution) int32 or raises PuzzleFormatError.

    `parse_puzzle`, then (``check_unique``) exactly one solution; without a solution text the
    solution is computed (and must exist).
    """
    p, s = parse_puzzle(puzzle_text, solution_text, size)
    if check_unique:
        require_unique(p)
    if s is None:
        s = solve(p)
        if s is None:
            raise PuzzleFormatError("puzzle has no solution")
    return p.reshape(-1).astype(np.int32), s.reshape(-1).astype(np.int32)


def parse_puzzle_lines(lines: Iterable[str], size: int | None = None, *,
                       check_unique: bool = False, file: str = ""
                       ) -> tuple[list[tuple[int, np.ndarray, np.ndarray | None]],
                                  list[ValidationIssue]]:
    """Puzzles of text lines (`parse_puzzle_line`; blank and '#' lines skipped).

    Returns ``([(line, puzzle, solution or None), ...], issues)`` with 1-based line numbers;
    ``check_unique`` also rejects puzzles without exactly one solution.
    """
    out, bad = [], []
    for lineno, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            p, s = parse_puzzle_line(text, size)
            if check_unique:
                require_unique(p)
        except PuzzleFormatError as e:
            bad.append(ValidationIssue(file, lineno, str(e)))
            continue
        out.append((lineno, p, s))
    return out, bad


def _finish(path, rows, issues, skip_invalid, n_hint):
    if issues and not skip_invalid:
        raise ValidationError(issues)
    if rows:
        P = np.stack([r[0] for r in rows]).astype(np.uint8)
        S = np.stack([r[1] for r in rows]).astype(np.uint8)
    else:
        N = (n_hint or 9) ** 2
        P = np.zeros((0, N), np.uint8)
        S = np.zeros((0, N), np.uint8)
    return ImportResult(path=str(path), puzzles=P, solutions=S,
                        ratings=np.array([r[2] for r in rows], np.float64),
                        sources=[r[3] for r in rows], issues=issues, lines=[r[4] for r in rows])


def read_sudoku_csv(path: str | os.PathLike, size: int | None = 9, skip_invalid: bool = False,
                    check_unique: bool = True) -> ImportResult:
    """Read a Sudoku-Extreme style CSV (header ``source,question,answer,rating``).

    Line numbers in issues are 1-based file lines (the header is line 1).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    rows, issues = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ValidationError([ValidationIssue(str(path), 1, "empty file (expected a header)")]) from None
        header = [h.strip().lower() for h in header]
        if header[:2] != CSV_HEADER[:2] and "question" not in header:
            raise ValidationError([ValidationIssue(
                str(path), 1, f"bad header {header}; expected {','.join(CSV_HEADER)}")], hint="fix the header")
        iq = header.index("question")
        ia = header.index("answer") if "answer" in header else None
        ir = header.index("rating") if "rating" in header else None
        isrc = header.index("source") if "source" in header else None
        for rec in reader:
            line = reader.line_num
            if not rec or all(not c.strip() for c in rec):
                continue
            try:
                if len(rec) < len(header):
                    raise PuzzleFormatError(f"expected {len(header)} columns, got {len(rec)}")
                p, s = validate_pair(rec[iq], rec[ia] if ia is not None else None, size, check_unique)
                rating = float(rec[ir]) if ir is not None and rec[ir].strip() else float("nan")
            except (PuzzleFormatError, ValueError) as e:
                issues.append(ValidationIssue(str(path), line, str(e)))
                continue
            rows.append((p, s, rating, rec[isrc] if isrc is not None else "", line))
    return _finish(path, rows, issues, skip_invalid, size)


def read_puzzle_lines(path: str | os.PathLike, size: int | None = None, *, skip_invalid: bool = False,
                      check_unique: bool = True, issues: list | None = None,
                      ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Read a text file of puzzles, one per line, optionally ``<puzzle> <solution>``.

    Returns ``[(puzzle (n, n) int32, solution (n, n) int32 or None), ...]`` where the solution is
    the one written in the file (None when the line has none; the puzzle was still checked to have
    exactly one solution unless ``check_unique=False``).  Bad lines raise
    :class:`ValidationError` naming file and line; with ``skip_invalid`` they are skipped and
    appended to ``issues`` (if given).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    with open(path, encoding="utf-8") as f:
        rows, bad = parse_puzzle_lines(f, size, check_unique=check_unique, file=str(path))
    if bad and not skip_invalid:
        raise ValidationError(bad)
    if issues is not None:
        issues.extend(bad)
    return [(p, s) for _, p, s in rows]


def load_sudoku_csv_dir(folder: str | os.PathLike, size: int | None = 9, skip_invalid: bool = False,
                        check_unique: bool = True) -> dict[str, ImportResult]:
    """``{"train": ..., "test": ...}`` from ``folder/train.csv`` and ``folder/test.csv``."""
    folder = Path(folder)
    out = {}
    for split in ("train", "test"):
        f = folder / f"{split}.csv"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found (expected train.csv and test.csv in {folder}, "
                                    f"laid out as the hub dataset {HUB_REPO})")
        out[split] = read_sudoku_csv(f, size, skip_invalid, check_unique)
    return out


class HubUnavailableError(RuntimeError):
    """The Hugging Face hub cannot be used (package missing, offline, ...); the message names the
    offline alternative (``--source csv DIR``)."""


def download_sudoku_extreme(cache_dir: str | os.PathLike | None = None) -> Path:
    """Download ``train.csv``/``test.csv`` of the hub dataset; returns the folder holding them.

    Raises `HubUnavailableError` when ``huggingface_hub`` is missing or a download fails.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise HubUnavailableError(
            "--source hub needs huggingface_hub (pip install 'eqr-jax[hub]'); or download "
            "train.csv/test.csv yourself and use --source csv DIR") from None
    paths = []
    for name in ("train.csv", "test.csv"):
        try:
            paths.append(Path(hf_hub_download(HUB_REPO, name, repo_type="dataset",
                                              cache_dir=None if cache_dir is None else str(cache_dir))))
        except Exception as e:  # offline, proxy, auth, ... all end here
            raise HubUnavailableError(
                f"could not download {name} of {HUB_REPO} from the Hugging Face hub "
                f"({type(e).__name__}: {e}); the network may be unavailable. Download the files "
                f"elsewhere and use --source csv DIR") from None
    if paths[0].parent != paths[1].parent:
        raise RuntimeError("hub files landed in different folders")
    return paths[0].parent


def format_pair(puzzle, solution) -> str:
    """``<puzzle> <solution>`` one-line text form (the plain-text importer's format)."""
    return f"{format_grid(_as_flat(puzzle)[0])} {format_grid(_as_flat(solution)[0])}"


@dataclass
class CsvRows:
    """Rows of a Sudoku-Extreme CSV as the reference builder sees them.

    ``count``: rows that passed the rating filter (the population the reference subsamples);
    ``rows``: ``{index: (question, answer, rating, source, line)}`` for the selected indices
    (index = position among the counted rows); ``issues``: malformed rows that were skipped.
    """

    path: str
    count: int
    rows: dict
    issues: list[ValidationIssue] = field(default_factory=list)


def scan_sudoku_csv(path: str | os.PathLike, min_rating: float | None = None, select=None,
                    skip_invalid: bool = False) -> CsvRows:
    """One pass over a Sudoku-Extreme CSV with only the reference builder's row checks.

    Counts, in file order, the rows whose integer rating is at least ``min_rating`` (all rows
    when None) and keeps the text of those whose position is in ``select`` (None: all). Rows
    the reference would reject (fewer than 4 columns, a question or answer that is not 81
    characters, an unreadable rating when filtering) raise `ValidationError` naming file and
    line, or are skipped and listed with ``skip_invalid``. The kept rows are *not* validated
    here (see `validate_pair`): checking all ~3.8M training rows would take half an hour, and
    the reference reads them without checks; only the rows a dataset uses need it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    want = None if select is None else set(int(i) for i in select)
    rows, issues, count = {}, [], 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise ValidationError([ValidationIssue(str(path), 1, "empty file (expected a header)")]) from None
        if header[:4] != CSV_HEADER:
            raise ValidationError([ValidationIssue(
                str(path), 1, f"bad header {header}; expected {','.join(CSV_HEADER)}")],
                hint="fix the header")
        for rec in reader:
            line = reader.line_num
            try:
                if len(rec) < 4:
                    raise PuzzleFormatError(f"expected 4 columns, got {len(rec)}")
                source, q, a, rating = rec[:4]
                if min_rating is not None and int(rating) < min_rating:
                    continue
                if len(q) != 81 or len(a) != 81:
                    raise PuzzleFormatError(f"question and answer must have 81 characters, got "
                                            f"{len(q)} and {len(a)}")
            except (PuzzleFormatError, ValueError) as e:
                issues.append(ValidationIssue(str(path), line, str(e)))
                continue
            if want is None or count in want:
                rows[count] = (q, a, rating, source, line)
            count += 1
    if issues and not skip_invalid:
        raise ValidationError(issues)
    return CsvRows(str(path), count, rows, issues)
