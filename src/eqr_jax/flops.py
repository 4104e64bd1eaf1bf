"""Analytic FLOP counts of the EqR network (matmul FLOPs, 2 per multiply-add).

Only matrix products are counted: norms, RoPE, activations, the damped update and the noise are
elementwise work that is small next to the matmuls and does not run on the matrix units, so MFU
computed from these counts is the usual "model FLOPs utilisation".

Per token-mixing + channel block, for ``N`` tokens, hidden ``H``, token MLP intermediate
``I_N = swiglu_intermediate(N, expansion)`` and channel intermediate
``I_H = swiglu_intermediate(H, expansion)``:

* attention variant (``mlp_t=False``)::

      qkv        2 N H (3H)
      scores+AV  4 N^2 H          (Q K^T and P V, all heads together)
      out-proj   2 N H^2

* ``mlp_t`` variant (token-mixing SwiGLU over the token axis, per hidden channel)::

      gate/up    2 H N (2 I_N)
      down       2 H I_N N

* channel SwiGLU (both variants)::

      gate/up    2 N H (2 I_H)
      down       2 N I_H H

One reasoning step applies ``blocks_per_step = H_cycles (L_cycles + 1) L_layers`` blocks; the read
-out (lm head ``2 N H V``, q head ``2 H 2``) is counted once per step when ``readout=True``.

Check: the ``sudoku`` preset (N=81, H=512, I_N=256, I_H=1536, 42 blocks) gives
445,906,944 FLOP per block, 18,728,091,648 per step (18.73 GFLOP/puzzle/step), 18,729,006,080
with the read-out; the ``maze`` preset (N=900, H=128, attention, 15 blocks) gives 886,579,200 per
block, 13,298,688,000 per step (13.30 GFLOP).
"""

from __future__ import annotations

from typing import NamedTuple

from eqr_jax.config import ModelConfig
from eqr_jax.model import swiglu_intermediate


class BlockFlops(NamedTuple):
    """FLOPs of one block application for one puzzle, split by sublayer."""

    token_mixing: int
    channel_mlp: int

    @property
    def total(self) -> int:
        return self.token_mixing + self.channel_mlp


def attention_flops(n: int, h: int) -> int:
    """qkv projection + scores + weighted sum + output projection, one sequence of n tokens."""
    return 2 * n * h * 3 * h + 4 * n * n * h + 2 * n * h * h


def token_mlp_flops(n: int, h: int, expansion: float) -> int:
    """The mlp_t SwiGLU over the token axis, applied to each of the h channels."""
    i_n = swiglu_intermediate(n, expansion)
    return 2 * h * n * 2 * i_n + 2 * h * i_n * n


def channel_mlp_flops(n: int, h: int, expansion: float) -> int:
    """The channel SwiGLU applied to each of the n tokens."""
    i_h = swiglu_intermediate(h, expansion)
    return 2 * n * h * 2 * i_h + 2 * n * i_h * h


def block_flops(cfg: ModelConfig) -> BlockFlops:
    """FLOPs of one `ReasoningBlock` application for one puzzle."""
    n, h = cfg.seq_len, cfg.hidden_size
    mix = token_mlp_flops(n, h, cfg.expansion) if cfg.mlp_t else attention_flops(n, h)
    return BlockFlops(mix, channel_mlp_flops(n, h, cfg.expansion))


def readout_flops(cfg: ModelConfig) -> int:
    """lm head over every token plus the q head on token 0, one puzzle."""
    return 2 * cfg.seq_len * cfg.hidden_size * cfg.vocab_size + 2 * cfg.hidden_size * 2


def step_flops(cfg: ModelConfig, *, readout: bool = False) -> int:
    """FLOPs of one reasoning step (``blocks_per_step`` blocks) for one puzzle."""
    flops = cfg.blocks_per_step * block_flops(cfg).total
    return flops + (readout_flops(cfg) if readout else 0)


def forward_flops(cfg: ModelConfig, steps: int, batch: int = 1, breadth: int = 1, *,
                  readout: bool = True) -> int:
    """FLOPs of ``steps`` reasoning steps for ``batch x breadth`` rows, read-out once at the end."""
    rows = batch * breadth
    return rows * (steps * step_flops(cfg) + (readout_flops(cfg) if readout else 0))


def train_step_flops(cfg: ModelConfig, batch: int, grad_blocks: int, fwd_steps: int = 1,
                     recompute_blocks: int = 0) -> int:
    """Approximate FLOPs of one loss+gradient evaluation.

    ``fwd_steps`` reasoning steps run forward; ``grad_blocks`` block applications are on the
    gradient tape, each costing 2x its forward FLOPs in the backward pass (gradients with respect
    to activations and to weights). With the reference's truncated gradient and one step,
    ``grad_blocks = (L_cycles + 1) L_layers``. ``recompute_blocks`` block forwards are run a
    second time in the backward pass (rematerialisation: `remat_recompute_blocks`), 1x each.
    """
    per_block = block_flops(cfg).total
    fwd = fwd_steps * step_flops(cfg) + readout_flops(cfg)
    bwd = 2 * grad_blocks * per_block + 2 * readout_flops(cfg)
    return batch * (fwd + bwd + recompute_blocks * per_block)


def remat_recompute_blocks(grad_blocks: int, *, remat_blocks: bool, remat_steps: bool) -> int:
    """Block forwards rematerialisation recomputes in one backward pass over ``grad_blocks``
    taped block applications: each block once under per-block remat (``model.remat_blocks``),
    and once more when whole steps are rematerialised too (``train.remat``, full gradient:
    the step's recomputation then runs the blocks without their residuals, and each block's
    backward recomputes its own)."""
    return grad_blocks * (int(remat_blocks) + int(remat_steps))
