"""Shared test helpers: fixture location and a tiny model config."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The parity fixtures live in the shared folder beside the checkout (../shared/fixtures);
# EQR_FIXTURES overrides that for other layouts.
FIXTURES = Path(os.environ.get("EQR_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"parity fixture {path} not found (set EQR_FIXTURES to its folder)")
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"parity fixtures folder {FIXTURES} not found")
    return FIXTURES


@functools.lru_cache(maxsize=None)
def reference_step_jit():
    """`interop.reference_step` under one shared `jax.jit` (the config is static): tests that
    check the same model share one compilation instead of running op by op."""
    import jax

    from eqr_jax import interop

    return jax.jit(interop.reference_step, static_argnums=0)
