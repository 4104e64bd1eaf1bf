"""Datasets built exactly as the official builders build them.

`tests/fixtures/make_reference_data_fixture.py` ran the official Sudoku-Extreme and Maze-Unique
builders (locuslab/EqR) on small cases and recorded the SHA-256 of every file they wrote; here
eqr-jax builds the same cases and must reproduce each file byte for byte. The one allowed
difference is storage only: the official Sudoku builder writes augmented train tokens as int64,
eqr-jax as uint8, with equal values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import make_reference_data_fixture as fx  # noqa: E402

EXPECTED = json.loads((fx.HERE / "expected.json").read_text())


def test_fixture_inputs_unchanged():
    for name, digest in EXPECTED["csv_sha256"].items():
        assert fx.sha256(fx.CSV_DIR / name) == digest, name


@pytest.mark.parametrize("name", sorted(EXPECTED["cases"]))
def test_build_matches_official_builder(name, tmp_path):
    case = EXPECTED["cases"][name]
    assert case["settings"] == fx.CASES[name]
    fx.run_ours(case["settings"], tmp_path / name)
    same, values, bad = fx.compare(case["sha256"], fx.file_hashes(tmp_path / name))
    assert not bad, f"files that differ from the official builder's: {bad}"
    assert set(values) <= fx.DTYPE_ONLY
    assert len(same) + len(values) == len(case["sha256"]) == 13
