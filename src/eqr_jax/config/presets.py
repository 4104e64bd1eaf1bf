"""The named presets: `sudoku` and `maze` (the reference's recipes), `tiny` (a CPU-sized
run) and `sudoku6` (CPU-sized, 6x6 puzzles that need reasoning). Configs are code: each preset
is a function returning a fresh `RunConfig`."""

from __future__ import annotations

import dataclasses

from eqr_jax.config.sections import (ConfigError, DataConfig, ModelConfig, RunConfig,
                                     TrainConfig)


def sudoku_model(**kw) -> ModelConfig:
    """EqR Sudoku-Extreme architecture (reference `train/eqr_sudoku`): mlp_t, 42 blocks per step."""
    base = dict(seq_len=81, vocab_size=11, H_cycles=3, L_cycles=6, L_layers=2, hidden_size=512,
                num_heads=8, expansion=4.0, mlp_t=True, pos_encodings="rope", board_height=9,
                board_width=9, halt_max_steps=16, halt_exploration_prob=0.1)
    base.update(kw)
    return ModelConfig(**base)


def maze_model(**kw) -> ModelConfig:
    """EqR Maze-Unique 30x30 architecture (reference `train/eqr_maze`): attention + 1-D RoPE."""
    base = dict(seq_len=900, vocab_size=6, H_cycles=3, L_cycles=4, L_layers=1, hidden_size=128,
                num_heads=8, expansion=4.0, mlp_t=False, pos_encodings="rope",
                halt_max_steps=16, halt_exploration_prob=0.1)
    base.update(kw)
    return ModelConfig(**base)


def _preset_sudoku() -> RunConfig:
    return RunConfig(
        preset="sudoku",
        model=sudoku_model(),
        data=DataConfig(path="data/sudoku-extreme-1k-aug-1000", global_batch_size=768,
                        build_kind="sudoku", build_source="hub", build_size=9, build_train=1000,
                        build_test=0, build_num_aug=1000, build_seed=42),
        train=TrainConfig(epochs=50_000, epochs_per_iter=5000, eval_every=5000,
                          checkpoint_every=5000, out_dir="runs/sudoku"),
    )


def _preset_maze() -> RunConfig:
    return RunConfig(
        preset="maze",
        model=maze_model(),
        data=DataConfig(path="data/maze-30x30-unique-1k", global_batch_size=768,
                        build_kind="maze", build_size=30, build_train=1000, build_test=1000,
                        build_num_aug=0, build_seed=42),
        train=TrainConfig(epochs=100_000, epochs_per_iter=5000, eval_every=5000,
                          checkpoint_every=5000, out_dir="runs/maze"),
    )


def _preset_tiny() -> RunConfig:
    """A CPU-sized EqR on 4x4 Sudoku: trains to high exact accuracy in minutes on 2 cores."""
    return RunConfig(
        preset="tiny",
        model=ModelConfig(seq_len=16, vocab_size=6, H_cycles=2, L_cycles=2, L_layers=1,
                          hidden_size=64, num_heads=4, expansion=2.0, mlp_t=True,
                          pos_encodings="none", halt_max_steps=4, halt_exploration_prob=0.1,
                          forward_dtype="float32"),
        data=DataConfig(path="data/sudoku4-tiny", global_batch_size=128, build_size=4,
                        build_train=1000, build_test=200, build_num_aug=8, build_difficulty="any"),
        train=TrainConfig(epochs=2000, max_steps=500, lr=1e-3, lr_warmup_steps=50,
                          weight_decay=0.1, ema_rate=0.99, steps_per_call=10, eval_every=250,
                          checkpoint_every=250, log_every=50, out_dir="runs/tiny"),
    )


def _preset_sudoku6() -> RunConfig:
    """The `tiny` architecture (78k parameters) on 6x6 Sudoku from the `hard` generator, whose
    puzzles rate 0-10 (some need guessing): the CPU-sized setting where reasoning is needed
    (docs/analysis.md, "A real analysis"; the gradient ablation of docs/ablation.md)."""
    tiny = _preset_tiny()
    return RunConfig(
        preset="sudoku6",
        model=dataclasses.replace(tiny.model, seq_len=36, vocab_size=8),
        data=dataclasses.replace(tiny.data, path="data/sudoku6", build_size=6, build_train=2000,
                                 build_test=256, build_num_aug=8, build_difficulty="hard"),
        train=dataclasses.replace(tiny.train, max_steps=3000, out_dir="runs/sudoku6"),
    )


PRESETS = {"sudoku": _preset_sudoku, "maze": _preset_maze, "tiny": _preset_tiny,
           "sudoku6": _preset_sudoku6}


def preset(name: str) -> RunConfig:
    """Return a fresh copy of a named preset (`sudoku`, `maze`, `tiny`, `sudoku6`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
