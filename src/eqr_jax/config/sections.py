"""The config sections: `ModelConfig`, `DataConfig`, `TrainConfig`, `EvalConfig` and the
`RunConfig` that holds them; each checks its own values on construction (`ConfigError` naming
the key)."""


from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from eqr_jax import modes

VARIANTS = ("eqr", "trm", "feedforward")
POS_ENCODINGS = ("rope", "rope2d", "none", "learned", "absolute")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the offending key."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the reasoning network (field names follow the reference where it has them).

    ``variant`` picks the dynamics: ``eqr`` (damped noisy update, random latent init), ``trm``
    (plain replacement update, fixed init vectors) or ``feedforward`` (``ff_layers`` distinct
    blocks applied once, no recursion).
    """

    variant: str = "eqr"
    seq_len: int = 81
    vocab_size: int = 11
    H_cycles: int = 3
    L_cycles: int = 6
    L_layers: int = 2
    H_layers: int = 0  # reference field, unused by the reference too: one shared stack
    hidden_size: int = 512
    expansion: float = 4.0
    num_heads: int = 8
    pos_encodings: str = "rope"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    board_height: int | None = None
    board_width: int | None = None
    mlp_t: bool = False
    lambda_: float = 0.95
    noise_scale: float = 0.01
    H_init_std: float = 1.0
    L_init_std: float = 1.0
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    forward_dtype: str = "bfloat16"
    # Feedforward baseline depth; 0 means "as many blocks as one EqR reasoning step applies".
    ff_layers: int = 0
    # jax.nn.dot_product_attention implementation: None (backend default), "xla" or "cudnn".
    attention_impl: str | None = None
    # Rematerialise each block in the backward pass (the reference's `gradient_checkpoint`).
    remat_blocks: bool = False

    def __post_init__(self):
        _check_choice("model.variant", self.variant, VARIANTS)
        _check_choice("model.pos_encodings", self.pos_encodings, POS_ENCODINGS)
        _check_choice("model.forward_dtype", self.forward_dtype, ("bfloat16", "float32"))
        _check_choice("model.attention_impl", self.attention_impl, (None, "xla", "cudnn"))
        if self.variant == "eqr" and self.pos_encodings in ("learned", "absolute"):
            raise ConfigError(
                f"model.pos_encodings={self.pos_encodings!r} exists only for the trm variant "
                "(the reference EqR accepts rope, rope2d or none)")
        for name in ("seq_len", "vocab_size", "H_cycles", "L_cycles", "L_layers", "hidden_size",
                     "num_heads", "halt_max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not self.mlp_t and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_heads={self.num_heads}")
        if not 0.0 < self.lambda_ <= 1.0:
            raise ConfigError(f"model.lambda_ must be in (0, 1], got {self.lambda_}")
        if self.uses_attention and self.pos_encodings == "rope2d":
            rows, cols = self.board_shape
            if rows * cols != self.seq_len:
                raise ConfigError(f"rope2d board {rows}x{cols} does not cover seq_len={self.seq_len}")
            if self.head_dim % 4:
                raise ConfigError(f"rope2d needs head_dim divisible by 4, got {self.head_dim}")

    @property
    def uses_attention(self) -> bool:
        return not self.mlp_t

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def board_shape(self) -> tuple[int, int]:
        """(rows, cols) of the 2-D RoPE board: explicit, or the square root of ``seq_len``."""
        if self.board_height and self.board_width:
            return int(self.board_height), int(self.board_width)
        side = math.isqrt(self.seq_len)
        if side * side != self.seq_len:
            raise ConfigError(f"rope2d needs board_height/board_width or a square seq_len, "
                              f"got seq_len={self.seq_len}")
        return side, side

    @property
    def blocks_per_step(self) -> int:
        """Block applications in one reasoning (ACT) step: 42 for Sudoku, 15 for Maze."""
        if self.variant == "feedforward":
            return self.num_ff_layers
        return self.H_cycles * (self.L_cycles + 1) * self.L_layers

    @property
    def num_ff_layers(self) -> int:
        return self.ff_layers or self.H_cycles * (self.L_cycles + 1) * self.L_layers


@dataclass(frozen=True)
class DataConfig:
    """Where the puzzles live and how batches are drawn."""

    path: str = ""
    global_batch_size: int = 768
    eval_batch_size: int = 0  # 0: same as global_batch_size
    prefetch: int = 4
    # Used by `eqr train` when `path` does not exist yet: build a dataset with these options.
    # build_kind: `sudoku` or `maze`. build_source (Sudoku): `generate` (the project's generator)
    # or `hub` (Sudoku-Extreme from the Hugging Face hub, built as the reference builds it:
    # `build_train` rows subsampled, every test row when `build_test` is 0). build_size: board
    # side (Sudoku) or grid side (maze).
    build_kind: str = "sudoku"
    build_source: str = "generate"
    build_size: int = 9
    build_train: int = 1000
    build_test: int = 1000
    build_num_aug: int = 1000
    build_difficulty: str = "hard"
    build_seed: int = 0

    def __post_init__(self):
        check_path("data.path", self.path)
        _check_choice("data.build_kind", self.build_kind, ("sudoku", "maze"))
        _check_choice("data.build_source", self.build_source, ("generate", "hub"))
        if self.global_batch_size < 1:
            raise ConfigError(f"data.global_batch_size must be >= 1, got {self.global_batch_size}")
        for name in ("eval_batch_size", "prefetch", "build_test", "build_num_aug"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("build_size", "build_train"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def eval_batch(self) -> int:
        """Puzzles per evaluation batch: ``eval_batch_size``, or the global batch when 0."""
        return self.eval_batch_size or self.global_batch_size


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the training loop (reference values in the `sudoku`/`maze` presets)."""

    seed: int = 0
    # Total steps = epochs x steps_per_epoch, where steps_per_epoch =
    # max(floor(total_groups * mean_puzzle_examples / global_batch_size), 1) from the training
    # split's metadata (one epoch = one pass over the groups, one puzzle per group).
    epochs: int = 50_000
    max_steps: int = 0  # 0: no cap beyond epochs x steps_per_epoch
    # Epochs per data-loader pass; pass k draws from Philox(seed + k) (the reference's
    # `train_epochs_per_iter`, 5000 in its presets). 0: all epochs in one pass.
    epochs_per_iter: int = 0
    optimizer: str = "adam_atan2"  # or "adamw"
    lr: float = 1e-4
    lr_min_ratio: float = 1.0
    lr_warmup_steps: int = 2000
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 1.0
    grad_clip_norm: float = 0.0  # 0: no clipping (the reference never clips)
    ema: bool = True
    ema_rate: float = 0.999
    grad_mode: str = "truncated"
    # Step-map applications per ACT supervision segment (the reference uses 1); the gradient mode
    # decides how gradient flows through them.
    unroll_steps: int = 1
    remat: bool = False  # jax.checkpoint each step when grad_mode == "full"
    implicit_maxiter: int = 30
    # Implicit mode (docs/training.md, "Implicit gradients"): a row stops once its relative
    # residual ||f(z) - z|| / ||z|| is at most implicit_tol; Anderson mixes each row's last
    # implicit_history iterates. The backward linear solve runs per row until its relative
    # residual is at most implicit_backward_tol or implicit_backward_iters VJPs (GMRES restarts
    # every implicit_backward_restart); a row whose forward solve did not converge gets the
    # implicit gradient at its returned iterate ("implicit") or the one-step gradient
    # ("one_step"). docs/implicit-gradients.md has the defaults' accuracy and cost.
    implicit_tol: float = 1e-3
    implicit_method: str = "anderson"
    implicit_history: int = 5
    implicit_backward: str = "gmres"
    implicit_backward_iters: int = 200
    implicit_backward_tol: float = 1e-4
    implicit_backward_restart: int = 30
    # A row whose forward solve did not converge: the one-step gradient, not the IFT at a point
    # that is no fixed point (there I - J can be near singular: on a trained sudoku6 model the
    # tolerance-solved IFT gradient went non-finite in 3 steps; docs/implicit-gradients.md).
    implicit_unconverged: str = "one_step"
    # grad_mode=phantom: phantom_k damped steps z <- (1 - d) z + d f(z) carry the gradient.
    phantom_k: int = 2
    phantom_damping: float = 0.5
    # Jacobian regularisation (every grad_mode): jac_reg x Hutchinson estimate of
    # ||df/dz||_F^2 / dim at the segment's output state, jac_reg_samples probes; 0: off.
    jac_reg: float = 0.0
    jac_reg_samples: int = 1
    steps_per_call: int = 1  # optimiser steps per jitted host call (lax.scan)
    log_every: int = 50
    eval_every: int = 5000
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    # How a checkpoint step is marked finished (docs/training.md, "Cloud TPU pod"): "rename"
    # (written under a temporary name, renamed when complete: a local disk), "marker" (written
    # in place, finished when Orbax's commit_success.txt appears: object stores, and a bucket
    # mounted with gcsfuse, whose rename is not atomic), "auto" (marker for gs://, and where
    # the directory already holds marked steps; rename otherwise).
    checkpoint_commit: str = "auto"
    # The run directory: a local path or a Cloud Storage URL (gs://bucket/run).
    out_dir: str = "runs/default"
    # Start a new run from existing weights (``eqr train --init-from``): a run directory, its
    # checkpoints/ or one step directory, or an official .pth; "" starts from ``seed``'s random
    # weights. Parameters and EMA start from the chosen weights (``init_weights``: "ema" or
    # "raw"; ``init_step`` 0: the newest checkpoint); optimiser, schedule and step start fresh.
    init_from: str = ""
    init_step: int = 0
    init_weights: str = "ema"
    # Profiler window (``eqr train --profile``, docs/performance.md): "START[:CALLS]" traces
    # CALLS jitted calls (default 1) from the first call boundary at or after optimiser step
    # START, into out_dir/tb/plugins/profile; "" off. Process 0 only unless
    # profile_all_processes. Bookkeeping: it changes no result.
    profile: str = ""
    profile_all_processes: bool = False

    @property
    def profile_window(self) -> tuple[int, int] | None:
        """``profile`` as (start step, calls), or None when off."""
        if not self.profile:
            return None
        start, _, calls = self.profile.partition(":")
        return int(start), int(calls or 1)

    def __post_init__(self):
        check_path("train.out_dir", self.out_dir)
        check_path("train.init_from", self.init_from)
        _check_choice("train.grad_mode", self.grad_mode, modes.GRAD_MODES)
        _check_choice("train.optimizer", self.optimizer, ("adam_atan2", "adamw"))
        _check_choice("train.init_weights", self.init_weights, ("ema", "raw"))
        _check_choice("train.checkpoint_commit", self.checkpoint_commit,
                      ("auto", "rename", "marker"))
        _check_choice("train.implicit_method", self.implicit_method, modes.IMPLICIT_SOLVERS)
        _check_choice("train.implicit_backward", self.implicit_backward,
                      modes.IMPLICIT_BACKWARDS)
        _check_choice("train.implicit_unconverged", self.implicit_unconverged,
                      modes.IMPLICIT_UNCONVERGED)
        for name in ("epochs", "max_steps", "epochs_per_iter", "init_step", "lr", "lr_warmup_steps",
                     "weight_decay", "grad_clip_norm", "log_every", "eval_every",
                     "checkpoint_every", "jac_reg"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("steps_per_call", "unroll_steps", "keep_checkpoints", "implicit_maxiter",
                     "implicit_history", "implicit_backward_iters", "implicit_backward_restart",
                     "phantom_k",
                     "jac_reg_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ema_rate", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ConfigError(f"train.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if self.profile and not re.fullmatch(r"\d+(:[1-9]\d*)?", self.profile.strip()):
            raise ConfigError(f"train.profile must be START[:CALLS] (optimiser step >= 0, calls "
                              f">= 1), e.g. 20:2; got {self.profile!r}")
        for name in ("implicit_tol", "implicit_backward_tol"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.phantom_damping <= 1:
            raise ConfigError(f"train.phantom_damping must be in (0, 1], got "
                              f"{self.phantom_damping}")


@dataclass(frozen=True)
class EvalConfig:
    """Test-time scaling: depth (reasoning steps), breadth (random initialisations), halting.

    One evaluator reads it: training's periodic evaluation (at breadth 1), ``eqr eval`` and
    ``eqr solve`` (docs/evaluation.md).
    """

    depth: int = 0  # 0: the model's halt_max_steps (the reference evaluates at its ACT limit)
    breadth: int = 1
    halt: str = "fixed"  # one of eqr_jax.modes.HALT_RULES
    convergence_tol: float = 1e-3
    convergence_window: int = 3
    convergence_top_k: int = 1
    max_batches: int = 0  # 0: the whole test split
    seed: int = 0
    # How the state is advanced (eqr_jax.modes.SOLVERS): the noisy step map (`unroll`, the
    # reference), or a per-row solve of the noise-free map (`anderson` | `fixed_point`) with
    # at most `depth` iterations.
    solver: str = "unroll"
    # What `halt="convergence"` watches (eqr_jax.modes.CONVERGENCE_METRICS).
    convergence_metric: str = "logits"
    # Rows (copies x puzzles) per compiled call; breadth is chunked to fit. 0: no limit.
    max_rows: int = 0
    # Size of the O(1) residual-vs-step record (exact for the first half, log-spaced after).
    trace_points: int = 64
    # Std of the update noise at test time; None: the model's training value (model.noise_scale).
    # The paper evaluates Sudoku with 0.5 (trained with 0.01) and its Maze control with 0.1.
    noise_scale: float | None = None
    # Streaming evaluation: a fixed pool of `stream_slots` rows on device (0: batch x breadth,
    # at most max_rows); a row whose job (puzzle, copy) halts takes the next job at once instead
    # of idling until its batch ends. Same per-job results as the batched loop.
    stream: bool = False
    stream_slots: int = 0

    def __post_init__(self):
        _check_choice("eval.halt", self.halt, modes.HALT_RULES)
        _check_choice("eval.solver", self.solver, modes.SOLVERS)
        _check_choice("eval.convergence_metric", self.convergence_metric,
                      modes.CONVERGENCE_METRICS)
        for name in ("breadth", "trace_points"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.stream_slots < 0:
            raise ConfigError(f"eval.stream_slots must be >= 0, got {self.stream_slots}")
        if self.stream and self.solver != "unroll":
            raise ConfigError(f"eval.stream needs eval.solver='unroll', got {self.solver!r}")
        if self.depth < 0:
            raise ConfigError(f"eval.depth must be >= 1 (or 0 for model.halt_max_steps), got "
                              f"{self.depth}")
        if self.noise_scale is not None and not self.noise_scale >= 0:
            raise ConfigError(f"eval.noise_scale must be >= 0 (or None), got {self.noise_scale}")

    def depth_for(self, halt_max_steps: int) -> int:
        """The evaluation depth: ``depth``, or the model's ``halt_max_steps`` when it is 0."""
        return self.depth or int(halt_max_steps)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; saved as `config.json` beside its logs and checkpoints."""

    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def eval_depth(self) -> int:
        """Evaluation depth: ``eval.depth``, or ``model.halt_max_steps`` when it is 0."""
        return self.eval.depth_for(self.model.halt_max_steps)


# A URL scheme (gs://, s3://, http://): pathlib would turn "gs://b/run" into a local folder
# "gs:/b/run" and write the run there. gs:// goes through `eqr_jax.storage`; others are refused.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
URL_SCHEMES = ("gs",)


def url_scheme(value: str) -> str | None:
    """The scheme of ``value`` when it is a URL (``gs`` for ``gs://bucket/run``), else None."""
    m = _URL.match(str(value).strip())
    return m.group(1).lower() if m else None


def url_refusal(where: str, value: str) -> str | None:
    """The message refusing ``value`` as a path when it is a URL of a scheme other than gs://
    (``where`` names it: a key ``train.out_dir=``, a flag ``--out ``), else None."""
    scheme = url_scheme(value)
    if not scheme or scheme in URL_SCHEMES:
        return None
    return (f"{where}{value}: {scheme}:// is not supported; give a local path or a Cloud "
            "Storage URL gs://bucket/... (or mount the storage as a file system)")


def check_path(name: str, value: str) -> None:
    """Refuse a URL of an unsupported scheme (`ConfigError` naming ``name``)."""
    message = url_refusal(f"{name}=", value)
    if message:
        raise ConfigError(message)


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")
