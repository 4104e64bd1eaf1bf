"""The EqR reasoning network in Flax, and the pure step map built on it.

Layout of the math (docs/model.md): tokens are embedded once (``x``); a latent state ``(z_H, z_L)`` is
advanced by a *reasoning step*, which is ``H_cycles`` latent recursions, each of ``L_cycles``
updates of ``z_L`` from ``z_H + x`` and one update of ``z_H`` from ``z_L``. One update is

    h <- (1 - lambda) h + lambda * Blocks(h + u) + noise_scale * eps          (EqR)
    h <- Blocks(h + u)                                                       (TRM)

with one shared stack of post-norm blocks. Read-outs map ``z_H`` to token logits and a halting
logit. Flax modules hold the parameters; everything the dynamics need is exposed as pure
functions of ``(params, state, x, key)`` so that `lax.scan`, `lax.while_loop`, `vmap` and
the fixed-point solvers all consume the same step map.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eqr_jax.config import ModelConfig

Params = Any
# Std of a unit normal truncated to [-2, 2]: dividing by it makes truncated draws have the
# requested std (the reference's and JAX's "compensated" convention).
_TRUNC_STD = 0.87962566103423978


class LatentState(NamedTuple):
    """The recurrent state: two latents of shape (batch, seq, hidden) in the compute dtype."""

    z_H: jax.Array
    z_L: jax.Array


class Readout(NamedTuple):
    """Read-outs of a state: logits (batch, seq, vocab) in compute dtype; q logits (batch,) f32."""

    logits: jax.Array
    q_halt: jax.Array
    q_continue: jax.Array


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.forward_dtype == "bfloat16" else jnp.float32


def swiglu_intermediate(width: int, expansion: float) -> int:
    """Reference rule: round(expansion * width * 2/3) rounded up to a multiple of 256."""
    inter = round(expansion * width * 2 / 3)  # Python round: ties to even, as the reference
    return -(-inter // 256) * 256


def trunc_normal_init(std: float):
    """Compensated truncated-normal initialiser: values in [-2c, 2c], actual std = ``std``."""
    def init(key, shape, dtype=jnp.float32):
        if std == 0:
            return jnp.zeros(shape, dtype)
        return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
                * (std / _TRUNC_STD)).astype(dtype)
    return init


def rms_norm(x: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over ``axis``, computed in float32, cast back to x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=axis, keepdims=True) + eps)
    return xf.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding


def _rope_angles(positions: np.ndarray, dim: int, theta: float) -> np.ndarray:
    """Angles (len(positions), dim): the half-dim frequency angles repeated twice."""
    inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]
    return np.concatenate([ang, ang], axis=-1)


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """cos/sin tables (seq, head_dim) in float32 for 1-D or 2-D RoPE; None without RoPE."""
    d, n = cfg.head_dim, cfg.seq_len
    if cfg.pos_encodings == "rope":
        ang = _rope_angles(np.arange(n), d, cfg.rope_theta)
    elif cfg.pos_encodings == "rope2d":
        rows, cols = cfg.board_shape
        t = np.arange(n)
        ang = np.concatenate([_rope_angles(t // cols, d // 2, cfg.rope_theta),
                              _rope_angles(t % cols, d // 2, cfg.rope_theta)], axis=-1)
    else:
        return None
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, two_d: bool) -> jax.Array:
    """Rotate (batch, seq, heads, head_dim) in float32; 2-D RoPE rotates each half on its own."""
    xf = x.astype(jnp.float32)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if two_d:
        a, b = jnp.split(xf, 2, axis=-1)
        rot = jnp.concatenate([_rotate_half(a), _rotate_half(b)], axis=-1)
    else:
        rot = _rotate_half(xf)
    return (xf * cos + rot * sin).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Blocks


def _dense(features: int, fan_in: int, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=trunc_normal_init(fan_in ** -0.5), name=name)


class SwiGLU(nn.Module):
    """(..., width) -> (..., width) with a fused gate/up projection; ``I`` per the reference rule."""

    width: int
    expansion: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inter = swiglu_intermediate(self.width, self.expansion)
        gate, up = jnp.split(_dense(2 * inter, self.width, self.dtype, "gate_up_proj")(x), 2, -1)
        return _dense(self.width, inter, self.dtype, "down_proj")(nn.silu(gate) * up)


class TokenSwiGLU(nn.Module):
    """SwiGLU over the *token* axis, per hidden channel (the `mlp_t` block).

    Works on (batch, seq, hidden) directly with einsums, so no transpose is materialised; kernels
    are stored (in, out) like any Dense (the torch weight transposed).
    """

    seq_len: int
    expansion: float
    dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        n, inter = self.seq_len, swiglu_intermediate(self.seq_len, self.expansion)
        w_gu = self.param("gate_up_proj", trunc_normal_init(n ** -0.5), (n, 2 * inter), jnp.float32)
        w_d = self.param("down_proj", trunc_normal_init(inter ** -0.5), (inter, n), jnp.float32)
        gu = jnp.einsum("bnh,nk->bkh", h, w_gu.astype(self.dtype))
        gate, up = jnp.split(gu, 2, axis=1)
        return jnp.einsum("bkh,kn->bnh", nn.silu(gate) * up, w_d.astype(self.dtype))



class Attention(nn.Module):
    """Non-causal multi-head attention with RoPE, through `jax.nn.dot_product_attention`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, compute_dtype(self.cfg)
        b, n, hid = h.shape
        nh, d = cfg.num_heads, cfg.head_dim
        qkv = _dense(3 * hid, hid, dt, "qkv_proj")(h).reshape(b, n, 3 * nh, d)
        q, k, v = qkv[:, :, :nh], qkv[:, :, nh:2 * nh], qkv[:, :, 2 * nh:]
        tables = rope_tables(cfg)
        if tables is not None:
            cos, sin = (jnp.asarray(t) for t in tables)
            two_d = cfg.pos_encodings == "rope2d"
            q, k = apply_rope(q, cos, sin, two_d), apply_rope(k, cos, sin, two_d)
        out = jax.nn.dot_product_attention(q, k, v, implementation=cfg.attention_impl)
        return _dense(hid, hid, dt, "o_proj")(out.reshape(b, n, hid))


class ReasoningBlock(nn.Module):
    """Post-norm block: token mixing (attention or mlp_t) then channel SwiGLU, (B, N, H) -> same."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, compute_dtype(self.cfg)
        if cfg.mlp_t:
            # The token-mixing norm runs over the token axis (docs/model.md), not over hidden.
            h = rms_norm(h + TokenSwiGLU(cfg.seq_len, cfg.expansion, dt, name="mlp_t")(h),
                         cfg.rms_norm_eps, axis=-2)
        else:
            h = rms_norm(h + Attention(cfg, name="self_attn")(h), cfg.rms_norm_eps)
        return rms_norm(h + SwiGLU(cfg.hidden_size, cfg.expansion, dt, name="mlp")(h),
                        cfg.rms_norm_eps)


class BlockStack(nn.Module):
    """``num_layers`` distinct blocks applied in order."""

    cfg: ModelConfig
    num_layers: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        block = nn.remat(ReasoningBlock) if self.cfg.remat_blocks else ReasoningBlock
        for i in range(self.num_layers):
            h = block(self.cfg, name=f"layers_{i}")(h)
        return h


class _Network(nn.Module):
    """The Flax parameter container (private: use `EqRModel` or the pure functions below): token embedding, the shared block stack, LM head and Q head.

    Parameter tree (kernels are (in, out)): ``embed_tokens/embedding (V, H)``,
    ``L_level/layers_i/...``, ``lm_head/kernel (H, V)``, ``q_head/{kernel (H, 2), bias (2,)}``;
    the TRM variant with ``learned`` positions adds ``embed_pos/embedding (N, H)``.
    """

    cfg: ModelConfig

    def setup(self):
        cfg, dt = self.cfg, compute_dtype(self.cfg)
        h = cfg.hidden_size
        self.embed_tokens = nn.Embed(cfg.vocab_size, h, dtype=dt, param_dtype=jnp.float32,
                                     embedding_init=trunc_normal_init(h ** -0.5))
        if cfg.variant == "trm" and cfg.pos_encodings == "learned":
            self.embed_pos = nn.Embed(cfg.seq_len, h, dtype=dt, param_dtype=jnp.float32,
                                      embedding_init=trunc_normal_init(h ** -0.5))
        layers = cfg.num_ff_layers if cfg.variant == "feedforward" else cfg.L_layers
        self.L_level = BlockStack(cfg, layers)
        self.lm_head = _dense(cfg.vocab_size, h, dt, "lm_head")
        self.q_head = nn.Dense(2, dtype=dt, param_dtype=jnp.float32,
                               kernel_init=nn.initializers.zeros,
                               bias_init=nn.initializers.constant(-5.0))

    def embed(self, inputs: jax.Array) -> jax.Array:
        cfg = self.cfg
        scale = cfg.hidden_size ** 0.5
        e = self.embed_tokens(inputs.astype(jnp.int32))
        if cfg.variant == "trm" and cfg.pos_encodings in ("learned", "absolute"):
            if cfg.pos_encodings == "learned":
                pos = self.embed_pos(jnp.arange(cfg.seq_len))
            else:
                pos = jnp.asarray(sinusoidal_positions(cfg.seq_len, cfg.hidden_size), e.dtype)
            # The reference scales the sum by 1/sqrt(2) to keep its variance.
            return (scale * 0.70710678) * (e + pos[None])
        return scale * e

    def blocks(self, h: jax.Array) -> jax.Array:
        return self.L_level(h)

    def readout(self, z_H: jax.Array) -> Readout:
        q = self.q_head(z_H[:, 0]).astype(jnp.float32)
        return Readout(self.lm_head(z_H), q[:, 0], q[:, 1])

    def __call__(self, inputs: jax.Array) -> Readout:  # used only to create parameters
        x = self.embed(inputs)
        return self.readout(self.blocks(x))


def sinusoidal_positions(n: int, h: int) -> np.ndarray:
    """TRM `absolute` positions: even channels sin(p w_j), odd channels cos(p w_j)."""
    pos = np.arange(n, dtype=np.float64)[:, None]
    omega = np.exp(-np.arange(0, h, 2, dtype=np.float64) * np.log(10000.0) / h)
    out = np.zeros((n, h), np.float64)
    out[:, 0::2] = np.sin(pos * omega)
    out[:, 1::2] = np.cos(pos * omega)[:, : h // 2]
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Pure functions over (params, state, x, key)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Fresh float32 parameters (initialisation as in docs/model.md)."""
    dummy = jnp.zeros((1, cfg.seq_len), jnp.int32)
    return _Network(cfg).init(key, dummy)["params"]


def num_params(params: Params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def embed(cfg: ModelConfig, params: Params, inputs: jax.Array) -> jax.Array:
    """Token ids (batch, seq) int -> input injection x (batch, seq, hidden) in compute dtype."""
    chex.assert_rank(inputs, 2)
    return _Network(cfg).apply({"params": params}, inputs, method=_Network.embed)


def apply_blocks(cfg: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """The shared block stack, (batch, seq, hidden) -> same shape and dtype."""
    return _Network(cfg).apply({"params": params}, h, method=_Network.blocks)


def readout(cfg: ModelConfig, params: Params, state: LatentState) -> Readout:
    """Logits from z_H (batch, seq, vocab) and halting logits from token 0 of z_H (batch,)."""
    return _Network(cfg).apply({"params": params}, state.z_H, method=_Network.readout)


def update(cfg: ModelConfig, params: Params, h: jax.Array, u: jax.Array,
           key: jax.Array | None) -> jax.Array:
    """One latent update of ``h`` with injection ``u`` (both (batch, seq, hidden)).

    EqR: damped and noisy; the noise is skipped when ``key`` is None or ``noise_scale`` is 0
    (deterministic map for fixed-point solvers and parity). TRM: plain replacement.
    """
    out = apply_blocks(cfg, params, h + u)
    if cfg.variant == "trm":
        return out
    # Coefficients stay float32 (bf16 would store lambda = 0.9492, sigma = 0.0100098) and the
    # update is rounded to the compute dtype once, as the reference's fused kernel does.
    lam = float(cfg.lambda_)
    new = (1.0 - lam) * h.astype(jnp.float32) + lam * out.astype(jnp.float32)
    if key is not None and cfg.noise_scale > 0:
        eps = jax.random.normal(key, h.shape, jnp.float32).astype(h.dtype)
        new = new + float(cfg.noise_scale) * eps.astype(jnp.float32)
    return new.astype(h.dtype)


def latent_recursion(cfg: ModelConfig, params: Params, state: LatentState, x: jax.Array,
                     key: jax.Array | None) -> LatentState:
    """``L_cycles`` updates of z_L from z_H + x, then one update of z_H from z_L.

    The cycles run under `lax.scan`, so the block stack is compiled once whatever L_cycles is.
    """
    u = state.z_H + x
    if key is None:
        z_L, _ = jax.lax.scan(lambda z, _: (update(cfg, params, z, u, None), None), state.z_L,
                              None, length=cfg.L_cycles)
        key_H = None
    else:
        keys = jax.random.split(key, cfg.L_cycles + 1)
        z_L, _ = jax.lax.scan(lambda z, k: (update(cfg, params, z, u, k), None), state.z_L,
                              keys[:-1])
        key_H = keys[-1]
    z_H = update(cfg, params, state.z_H, z_L, key_H)
    return LatentState(z_H, z_L)


def reasoning_step(cfg: ModelConfig, params: Params, state: LatentState, x: jax.Array,
                   key: jax.Array | None = None, *, truncate: bool = True) -> LatentState:
    """One reasoning (ACT) step: ``H_cycles`` latent recursions, the state map of EqR.

    Args:
      state: latents, each (batch, seq, hidden) in the compute dtype.
      x: input injection from `embed`, (batch, seq, hidden).
      key: PRNG key for the update noise, or None for the noise-free map.
      truncate: the reference's gradient rule: the first ``H_cycles - 1`` recursions are cut from
        the graph (stop_gradient on their result), only the last recursion carries gradient.
        False lets gradient flow through every recursion (``full``/``one_step`` modes).
    Returns:
      The next state (not detached: callers decide where the graph is cut).
    """
    chex.assert_equal_shape([state.z_H, state.z_L, x])
    if cfg.variant == "feedforward":
        # The baseline ignores the latents: one pass of distinct blocks over the input.
        h = apply_blocks(cfg, params, x)
        return LatentState(h, h)
    keys = (None,) * cfg.H_cycles if key is None else jax.random.split(key, cfg.H_cycles)
    for i in range(cfg.H_cycles):
        if truncate and i == cfg.H_cycles - 1 and cfg.H_cycles > 1:
            state = jax.tree_util.tree_map(jax.lax.stop_gradient, state)
        state = latent_recursion(cfg, params, state, x, keys[i])
    return state


def init_latents(cfg: ModelConfig, key: jax.Array, batch: int) -> LatentState:
    """Fresh latents (batch, seq, hidden) in compute dtype.

    EqR: independent compensated truncated-normal draws per row, token and channel with
    ``H_init_std``/``L_init_std``. TRM: the two fixed init vectors broadcast to every row and
    token (they are derived from a fixed seed, like the reference's constructor-time buffers).
    """
    shape = (batch, cfg.seq_len, cfg.hidden_size)
    dt = compute_dtype(cfg)
    if cfg.variant == "trm":
        h0, l0 = trm_init_vectors(cfg)
        return LatentState(jnp.broadcast_to(h0.astype(dt), shape),
                           jnp.broadcast_to(l0.astype(dt), shape))
    kh, kl = jax.random.split(key)
    return LatentState(trunc_normal_init(cfg.H_init_std)(kh, shape).astype(dt),
                       trunc_normal_init(cfg.L_init_std)(kl, shape).astype(dt))


@functools.lru_cache(maxsize=8)
def _trm_vectors_np(hidden: int) -> tuple[np.ndarray, np.ndarray]:
    kh, kl = jax.random.split(jax.random.PRNGKey(20240520))
    init = trunc_normal_init(1.0)
    return (np.asarray(init(kh, (hidden,))), np.asarray(init(kl, (hidden,))))


def trm_init_vectors(cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """TRM's fixed (hidden,) initial vectors for z_H and z_L (never trained)."""
    h0, l0 = _trm_vectors_np(cfg.hidden_size)
    return jnp.asarray(h0), jnp.asarray(l0)


class EqRModel:
    """The model: a `ModelConfig` bound to the pure functions of this module.

    ``params`` are the float32 parameter tree of `init`; latents are a `LatentState` of two
    (batch, seq, hidden) arrays in the compute dtype. One reasoning step is
    ``model.step(params, state, model.embed(params, inputs), key)``; `readout` gives the logits.
    The object is hashable (by config), so it can be a static argument of `jax.jit`.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def __hash__(self):
        return hash(self.cfg)

    def __eq__(self, other):
        return isinstance(other, EqRModel) and other.cfg == self.cfg

    def __repr__(self):
        return f"EqRModel({self.cfg!r})"

    def init(self, key: jax.Array) -> Params:
        """Fresh float32 parameters from a PRNG key."""
        return init_params(self.cfg, key)

    def embed(self, params: Params, inputs: jax.Array) -> jax.Array:
        """Token ids (batch, seq) -> input injection (batch, seq, hidden)."""
        return embed(self.cfg, params, inputs)

    def step(self, params: Params, state: LatentState, x: jax.Array,
             key: jax.Array | None = None, *, truncate: bool = True) -> LatentState:
        """One reasoning step (see `reasoning_step`); ``key`` None is the noise-free map."""
        return reasoning_step(self.cfg, params, state, x, key, truncate=truncate)

    def readout(self, params: Params, state: LatentState) -> Readout:
        """Logits (batch, seq, vocab) and halting logits (batch,) of a state."""
        return readout(self.cfg, params, state)

    def init_latents(self, key: jax.Array, batch: int) -> LatentState:
        """Fresh latents (batch, seq, hidden) in the compute dtype (see `init_latents`)."""
        return init_latents(self.cfg, key, batch)
