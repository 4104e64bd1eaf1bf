"""Interoperability with the reference PyTorch EqR: configs, state dicts, checkpoints, one step.

Reference tensors are named as ``EqRModel.state_dict()`` names them (``inner.L_level.layers.0.
mlp.gate_up_proj.weight`` ...) with torch's (out, in) layout; our kernels are (in, out).
Checkpoints saved by the reference trainer prefix names with ``model.`` and, for a compiled
model, ``_orig_mod.``; both are accepted. Official ``.pth`` files are read by `eqr_jax.pth`
(no torch, nothing from the file is run) and converted by `convert_reference_checkpoint`
(``eqr convert``) or loaded directly by `load_reference_model` (``--reference``).
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
    """Read an official ``.pth`` checkpoint without PyTorch and without running its pickle.

    Accepts what the reference trainer saves (a dict with ``model``, ``ema``, ``config``,
    ``step``, ... in torch's zip or legacy layout) and a bare state dict. Classes of the
    reference code inside it (the ACT carry, ...) load as inert placeholders; a pickle that names
    any other callable is refused (see `eqr_jax.pth`).

    Returns:
      dict with ``state_dict`` (name -> NumPy array in its stored dtype), ``ema_state_dict``
      (the EMA shadow, same form, or None), ``config`` (the saved run config dict, or None) and
      ``step`` (or None).
    Raises:
      FileNotFoundError; `eqr_jax.pth.UnsafePickleError` (a disallowed callable, named);
      `eqr_jax.pth.PthError` (truncated / corrupt / not a torch file); `CheckpointMismatchError`
      (a readable file that holds neither a checkpoint nor a state dict).
    """
    from eqr_jax import pth, storage

    remote = storage.path(path, name="--reference")
    path = os.fspath(storage.cached_file(remote, "reference"))  # the reader needs a local file
    ckpt = pth.load(path)
    is_array = lambda v: isinstance(v, np.ndarray)
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        state = ckpt["model"]
    elif isinstance(ckpt, Mapping) and ckpt and all(is_array(v) for v in ckpt.values()):
        state, ckpt = ckpt, {}  # a bare state dict
    else:
        raise CheckpointMismatchError(f"{path}: neither a reference checkpoint (no 'model' entry) "
                                      "nor a bare state dict")

    def arrays(d: Mapping, what: str) -> dict[str, np.ndarray]:
        bad = [k for k, v in d.items() if not is_array(v)]
        if bad:
            raise CheckpointMismatchError(f"{path}: {what} entries {bad[:5]} are not tensors")
        return {str(k): v for k, v in d.items()}

    ema = ckpt.get("ema")
    shadow = ema.get("shadow") if isinstance(ema, Mapping) else None
    cfg = ckpt.get("config")
    return {"state_dict": arrays(state, "model"),
            "ema_state_dict": arrays(shadow, "ema.shadow") if isinstance(shadow, Mapping)
            else None,
            "config": dict(cfg) if isinstance(cfg, Mapping) else None,
            "step": ckpt.get("step")}


# ----------------------------------------------------------------------------------------------
# Official checkpoint -> this project's run config and parameters


# Reference run-config keys that mean the same here (section, our key).
_REFERENCE_RUN_KEYS = {"lr": ("train", "lr"), "lr_min_ratio": ("train", "lr_min_ratio"),
                       "lr_warmup_steps": ("train", "lr_warmup_steps"),
                       "weight_decay": ("train", "weight_decay"), "beta1": ("train", "beta1"),
                       "beta2": ("train", "beta2"), "epochs": ("train", "epochs"),
                       "seed": ("train", "seed"), "ema": ("train", "ema"),
                       "ema_rate": ("train", "ema_rate"),
                       "global_batch_size": ("data", "global_batch_size")}


def reference_data_sizes(state_dict: Mapping[str, Any], *, data: str | os.PathLike | None = None,
                         seq_len: int | None = None, vocab_size: int | None = None
                         ) -> dict[str, int]:
    """``seq_len`` and ``vocab_size`` for a reference model (the reference takes them from data).

    Sources, in order: the explicit values; the metadata of the dataset folder ``data`` (its
    ``test`` split, else ``train``); the weights themselves (``vocab_size`` is the embedding's
    row count, ``seq_len`` the input width of an ``mlp_t`` token-mixing layer). Explicit values
    that contradict ``data`` raise `ConfigError`, as does a size none of them gives.
    """
    sizes = {"seq_len": seq_len, "vocab_size": vocab_size}
    if data is not None:
        from eqr_jax.data.bucket import dataset_dir
        from eqr_jax.data.format import DataFormatError, dataset_info

        split = next((s for s in ("test", "train") if (dataset_dir(data) / s).is_dir()), None)
        if split is None:
            raise ConfigError(f"--data {data}: no test/ or train/ split with a dataset.json")
        try:
            meta = dataset_info(data, split)
        except DataFormatError as e:
            raise ConfigError(str(e)) from None
        for k in sizes:
            if sizes[k] is not None and int(sizes[k]) != int(meta[k]):
                raise ConfigError(f"{k}={sizes[k]} contradicts {data}/{split}/dataset.json "
                                  f"({k}={meta[k]})")
            sizes[k] = int(meta[k])
    named = {_strip_prefixes(k): v for k, v in state_dict.items()}
    emb = named.get("inner.embed_tokens.embedding_weight")
    if sizes["vocab_size"] is None and emb is not None and np.ndim(emb) == 2:
        sizes["vocab_size"] = int(np.shape(emb)[0])
    mix = named.get("inner.L_level.layers.0.mlp_t.gate_up_proj.weight")
    if sizes["seq_len"] is None and mix is not None and np.ndim(mix) == 2:
        sizes["seq_len"] = int(np.shape(mix)[1])
    missing = [k for k, v in sizes.items() if v is None]
    if missing:
        raise ConfigError(f"the checkpoint does not record {missing} (the reference takes them "
                          "from the dataset): pass --data DATASET_DIR or "
                          + " ".join(f"--{k.replace('_', '-')} N" for k in missing))
    return {k: int(v) for k, v in sizes.items()}


def run_config_from_reference(ckpt: Mapping[str, Any], *, data: str | os.PathLike | None = None,
                              seq_len: int | None = None, vocab_size: int | None = None):
    """A `RunConfig` for a checkpoint read by `load_reference_checkpoint`.

    The model section comes from the saved ``config['arch']`` plus `reference_data_sizes`;
    the training hyper-parameters that mean the same here (lr, betas, weight decay, EMA, ...)
    are carried over for the record; ``data.path`` is ``data`` or the reference's data path.
    Only EqR checkpoints are supported (a TRM checkpoint's fixed initial latents are buffers
    this project does not load).
    """
    from eqr_jax import config as config_lib
    from eqr_jax.config import RunConfig

    ref = ckpt.get("config")
    if not isinstance(ref, Mapping):
        raise ConfigError("the checkpoint has no saved config (a bare state dict?): the "
                          "architecture cannot be known")
    arch = ref.get("arch", ref)
    name = str(arch.get("name", "eqr")) if isinstance(arch, Mapping) else "eqr"
    if not name.split("@")[0].lower().startswith("eqr"):
        raise ConfigError(f"reference architecture {name!r} is not supported (only EqR)")
    sizes = reference_data_sizes(ckpt["state_dict"], data=data, seq_len=seq_len,
                                 vocab_size=vocab_size)
    model = config_from_reference(ref, **sizes)
    d = {"preset": "reference", "model": dataclasses.asdict(model), "train": {}, "data": {}}
    for key, (section, ours) in _REFERENCE_RUN_KEYS.items():
        if ref.get(key) is not None:
            d[section][ours] = ref[key]
    dataset = ref.get("dataset")
    ref_path = dataset.get("data_path") if isinstance(dataset, Mapping) else None
    path = os.fspath(data) if data is not None else ref_path
    if path:
        d["data"]["path"] = str(path)
    return config_lib.from_dict(RunConfig, d, where="reference config")


def load_reference_model(path: str | os.PathLike, *, use_ema: bool = True,
                         data: str | os.PathLike | None = None, seq_len: int | None = None,
                         vocab_size: int | None = None):
    """Read an official ``.pth`` into ``(RunConfig, params, which)``.

    ``which`` is ``"ema"`` when the EMA shadow was used (``use_ema`` and the checkpoint has one,
    as the reference evaluates), else ``"raw"``. Sizes as in `reference_data_sizes`. The
    parameters are placed on the default device as `load_for_inference` places them, so both
    paths share compiled code.
    """
    ckpt = load_reference_checkpoint(path)
    cfg = run_config_from_reference(ckpt, data=data, seq_len=seq_len, vocab_size=vocab_size)
    which = "ema" if use_ema and ckpt["ema_state_dict"] is not None else "raw"
    state = ckpt["ema_state_dict"] if which == "ema" else ckpt["state_dict"]
    params = jax.device_put(params_from_reference(state, cfg.model),
                            jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return cfg, params, which


def convert_reference_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                                 data: str | os.PathLike | None = None,
                                 seq_len: int | None = None, vocab_size: int | None = None,
                                 overwrite: bool = False):
    """Convert an official ``.pth`` into this project's checkpoint layout under ``out_dir``.

    Writes ``out_dir/config.json`` and ``out_dir/checkpoints/<step>/`` with ``params`` (raw
    weights), ``ema`` (the EMA shadow, when saved), ``config`` and ``meta`` (step, source), which
    `eqr_jax.checkpoint.load_for_inference`, ``eqr eval`` and ``eqr solve`` read. It holds no
    optimiser state, so it cannot resume training. Sizes as in `reference_data_sizes`.

    Returns the path of the written step directory. Refuses a non-empty ``checkpoints/`` unless
    ``overwrite``.
    """
    import orbax.checkpoint as ocp

    from eqr_jax import config as config_lib
    from eqr_jax import storage
    from eqr_jax.checkpoint import Checkpointer

    src = str(storage.absolute(path, name="--reference"))
    ckpt = load_reference_checkpoint(src)
    cfg = run_config_from_reference(ckpt, data=data, seq_len=seq_len, vocab_size=vocab_size)
    params = params_from_reference(ckpt["state_dict"], cfg.model)
    ema = None
    if ckpt["ema_state_dict"] is not None:
        ema = params_from_reference(ckpt["ema_state_dict"], cfg.model)
    step = int(ckpt["step"]) if isinstance(ckpt["step"], (int, np.integer)) else 0
    out = storage.absolute(out_dir, name="--out")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(out)))
    ck = Checkpointer(out / "checkpoints")
    try:
        existing = ck.all_steps()
        if existing and not overwrite:
            raise FileExistsError(f"{out}/checkpoints already holds step(s) {existing}; choose "
                                  "another output directory or overwrite")
        for s in existing:
            ck.manager.delete(s)
        items = {"params": ocp.args.StandardSave(params),
                 "config": ocp.args.JsonSave(config_lib.to_dict(cfg)),
                 "meta": ocp.args.JsonSave({"step": step, "metrics": {},
                                            "converted_from": src, "weights_only": True})}
        if ema is not None:
            items["ema"] = ocp.args.StandardSave(ema)
        ck.manager.save(step, args=ocp.args.Composite(**items), force=True)
        ck.manager.wait_until_finished()
    finally:
        ck.close()
    config_lib.save(cfg, out / "config.json")
    return str(out / "checkpoints" / str(step))
