"""Interoperability with the reference PyTorch EqR: configs, state dicts, checkpoints, one step.

Reference tensors are named as ``EqRModel.state_dict()`` names them (``inner.L_level.layers.0.
mlp.gate_up_proj.weight`` ...) with torch's (out, in) layout; our kernels are (in, out).
Checkpoints saved by the reference trainer prefix names with ``model.`` and, for a compiled
model, ``_orig_mod.``; both are accepted.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from eqr_jax.config import ConfigError, ModelConfig
from eqr_jax.model import LatentState, Params, embed, init_params, readout, reasoning_step


class CheckpointMismatchError(ValueError):
    """A state dict does not match the model: names the missing, extra or misshapen tensor."""


# Reference model-config fields that have no effect on the computation (or are ours by another
# name); accepted and ignored so that a reference `config` dump loads as it is.
_IGNORED_REFERENCE_KEYS = {"batch_size", "causal", "name", "short_name", "loss", "puzzle_emb_ndim",
                           "puzzle_emb_len", "num_puzzle_identifiers", "disable_act_halt",
                           "act_inference", "halt_threshold", "halt_confirm_steps",
                           "halt_confirm_mode", "no_ACT_continue"}
_REQUIRED_REFERENCE_KEYS = ("seq_len", "vocab_size", "H_cycles", "L_cycles", "L_layers",
                            "hidden_size", "expansion", "num_heads")


def config_from_reference(d: Mapping[str, Any], variant: str = "eqr", **extra) -> ModelConfig:
    """Model config from the reference's field names (e.g. a fixture's ``config_json``).

    A full reference run config (with an ``arch`` section, as saved in its checkpoints) is also
    accepted; since the reference takes ``seq_len``/``vocab_size`` from the dataset, pass them
    (or any other field) as keyword arguments. Missing required keys and unknown keys raise
    `ConfigError` naming them.
    """
    if isinstance(d.get("arch"), Mapping):
        d = d["arch"]
    d = {**d, **extra}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    missing = [k for k in _REQUIRED_REFERENCE_KEYS if k not in d]
    if missing:
        raise ConfigError(f"reference config is missing required key(s) {missing}")
    unknown = sorted(set(d) - fields - _IGNORED_REFERENCE_KEYS)
    if unknown:
        raise ConfigError(f"reference config has unknown key(s) {unknown}")
    kw = {k: v for k, v in d.items() if k in fields}
    if kw.get("pos_encodings") is None:
        kw["pos_encodings"] = "none"
    kw["variant"] = variant
    kw["expansion"] = float(kw["expansion"])
    return ModelConfig(**kw)


def _reference_names(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Our flat param path -> (reference name, transpose?)."""
    names = {
        ("embed_tokens", "embedding"): ("inner.embed_tokens.embedding_weight", False),
        ("lm_head", "kernel"): ("inner.lm_head.weight", True),
        ("q_head", "kernel"): ("inner.q_head.weight", True),
        ("q_head", "bias"): ("inner.q_head.bias", False),
    }
    if cfg.variant == "trm" and cfg.pos_encodings == "learned":
        names[("embed_pos", "embedding")] = ("inner.embed_pos.embedding_weight", False)
    layers = cfg.num_ff_layers if cfg.variant == "feedforward" else cfg.L_layers
    for i in range(layers):
        ours, ref = ("L_level", f"layers_{i}"), f"inner.L_level.layers.{i}"
        mixers = {"mlp_t": ("gate_up_proj", "down_proj")} if cfg.mlp_t else \
            {"self_attn": ("qkv_proj", "o_proj")}
        mixers["mlp"] = ("gate_up_proj", "down_proj")
        for sub, projs in mixers.items():
            for proj in projs:
                leaf = () if sub == "mlp_t" else ("kernel",)
                names[ours + (sub, proj) + leaf] = (f"{ref}.{sub}.{proj}.weight", True)
    return names


def _strip_prefixes(name: str) -> str:
    for prefix in ("_orig_mod.", "model.", "_orig_mod."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


# Non-parameter entries a reference state dict may carry (buffers).
_REFERENCE_BUFFERS = ("inner.H_init", "inner.L_init", "inner.rotary_emb.cos_cached",
                      "inner.rotary_emb.sin_cached", "inner.absolute_pos_embedding")


def params_from_reference(state_dict: Mapping[str, Any], cfg: ModelConfig) -> Params:
    """Convert a reference state dict (numpy or torch tensors) into our float32 param tree.

    Raises `CheckpointMismatchError` naming any missing, unexpected or wrongly shaped tensor.
    """
    template = flatten_dict(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))
    names = _reference_names(cfg)
    given = {}
    for raw, value in state_dict.items():
        name = _strip_prefixes(raw)
        if name in given:
            raise CheckpointMismatchError(f"tensor {name!r} appears twice (as {raw!r})")
        given[name] = value
    wanted = {ref for ref, _ in names.values()}
    missing = sorted(wanted - set(given))
    extra = sorted(n for n in set(given) - wanted if n not in _REFERENCE_BUFFERS)
    if missing:
        raise CheckpointMismatchError(f"reference state dict is missing tensor(s) {missing}")
    if extra:
        raise CheckpointMismatchError(f"reference state dict has unexpected tensor(s) {extra} "
                                      f"for a {cfg.variant} model with mlp_t={cfg.mlp_t}, "
                                      f"layers={cfg.L_layers}")
    flat = {}
    for path, (ref, transpose) in names.items():
        arr = _to_numpy(given[ref]).astype(np.float32)
        if transpose:
            arr = arr.T
        want = tuple(template[path].shape)
        if arr.shape != want:
            shown = arr.T.shape if transpose else arr.shape
            raise CheckpointMismatchError(
                f"tensor {ref!r} has shape {tuple(shown)}, expected "
                f"{tuple(reversed(want)) if transpose else want}")
        flat[path] = jnp.asarray(arr)
    return unflatten_dict(flat)


def params_to_reference(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `params_from_reference`: reference names, torch (out, in) layout."""
    flat = flatten_dict(params)
    out = {}
    for path, (ref, transpose) in _reference_names(cfg).items():
        if path not in flat:
            raise CheckpointMismatchError(f"params lack {'/'.join(path)} (reference {ref!r})")
        arr = np.asarray(flat[path], np.float32)
        out[ref] = arr.T.copy() if transpose else arr
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().float().cpu().numpy()
    return np.asarray(value)


def reference_step(cfg: ModelConfig, params: Params, inputs, z_H, z_L,
                   key: jax.Array | None = None) -> dict[str, jax.Array]:
    """One reasoning step exactly as the reference ``InnerNetwork.forward`` computes it.

    Args:
      inputs: int32 (batch, seq) token ids.
      z_H, z_L: (batch, seq, hidden) latents (cast to the compute dtype).
      key: noise key (None: noise off, as in the parity fixtures).
    Returns:
      dict with z_H, z_L (batch, seq, hidden), logits (batch, seq, vocab), q_halt (batch,).
    """
    from eqr_jax.model import compute_dtype
    dt = compute_dtype(cfg)
    state = LatentState(jnp.asarray(z_H, dt), jnp.asarray(z_L, dt))
    x = embed(cfg, params, jnp.asarray(inputs, jnp.int32))
    state = reasoning_step(cfg, params, state, x, key)
    out = readout(cfg, params, state)
    return {"z_H": state.z_H, "z_L": state.z_L, "logits": out.logits, "q_halt": out.q_halt}


def load_reference_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read an official ``.pth`` checkpoint; returns a dict with ``state_dict`` (numpy arrays),
    ``ema_state_dict`` (or None), ``config`` (the saved config dict, or None) and ``step``.

    Needs the optional torch dependency (``pip install eqr-jax[torch]``).
    """
    try:
        import torch
    except ImportError:
        raise ImportError("loading a reference .pth checkpoint needs PyTorch: "
                          "pip install 'eqr-jax[torch]'") from None
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointMismatchError(f"{path}: cannot be read as a torch checkpoint ({e})") from e
    if isinstance(ckpt, Mapping) and "model" in ckpt and isinstance(ckpt["model"], Mapping):
        state = ckpt["model"]
    elif isinstance(ckpt, Mapping) and all(hasattr(v, "shape") for v in ckpt.values()):
        state = ckpt  # a bare state dict
    else:
        raise CheckpointMismatchError(f"{path}: neither a reference checkpoint (no 'model' entry) "
                                      "nor a bare state dict")
    ema = None
    if isinstance(ckpt.get("ema"), Mapping) and "shadow" in ckpt["ema"]:
        ema = {k: _to_numpy(v) for k, v in ckpt["ema"]["shadow"].items()}
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else None
    return {"state_dict": {k: _to_numpy(v) for k, v in state.items()}, "ema_state_dict": ema,
            "config": cfg, "step": ckpt.get("step")}
