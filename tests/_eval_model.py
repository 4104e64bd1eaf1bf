"""A tiny 4x4-Sudoku EqR trained for a few dozen steps, shared by the evaluation/solve tests.

Trained once per test session (through `eqr_jax.train.train`, so the checkpoint is a real one
that `load_for_inference` and the CLIs read) into a temporary directory.
"""

from __future__ import annotations

import functools
import tempfile

import numpy as np

from _train_data import ArrayTrainLoader, eval_batches, make_puzzles  # noqa: F401

TRAIN_STEPS = 40


def tiny_config(out_dir: str):
    from eqr_jax import config as C

    cfg = C.preset("tiny")
    return C.apply_overrides(cfg, [
        f"train.out_dir={out_dir}", f"train.max_steps={TRAIN_STEPS}", "train.epochs=1000",
        "model.hidden_size=32", "model.num_heads=2", "model.H_cycles=1", "model.L_cycles=1",
        "data.global_batch_size=32", "train.lr=3e-3", "train.lr_warmup_steps=5",
        "train.eval_every=100000", "train.checkpoint_every=100000", "train.log_every=100000",
        "train.ema=false"])


@functools.lru_cache(maxsize=1)
def trained_checkpoint() -> str:
    """Directory of the trained run (config.json + checkpoints/)."""
    from eqr_jax.train import train

    out = tempfile.mkdtemp(prefix="eqr-eval-test-")
    cfg = tiny_config(out)
    xi, yi = make_puzzles(512, 0, blanks=(2, 5))
    # No evaluation batches: the tests evaluate the checkpoint themselves.
    train(cfg, loaders=(ArrayTrainLoader(xi, yi, 32), lambda: iter(())), progress=False)
    return out


def eval_data(n: int = 20, batch: int = 8, seed: int = 3):
    """Evaluation batches of easy puzzles; the last batch is partly padding."""
    x, y = make_puzzles(n, seed, blanks=(2, 5))
    return list(eval_batches(x, y, batch)), x, y


def solution_strings(x: np.ndarray, y: np.ndarray) -> list[str]:
    """'puzzle solution' lines (digits, '.' blanks) for tokens from `make_puzzles`."""
    to_s = lambda t: "".join("." if v <= 1 else str(v - 1) for v in t)
    return [f"{to_s(a)} {to_s(b)}" for a, b in zip(x, y)]
