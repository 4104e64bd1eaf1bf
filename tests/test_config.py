"""Typed configs: presets, overrides, unknown keys, JSON round trip."""

from __future__ import annotations

import json

import pytest

from eqr_jax import config
from eqr_jax.config import ConfigError


def test_presets_have_reference_values():
    s = config.preset("sudoku")
    assert (s.model.mlp_t, s.model.hidden_size, s.model.L_cycles, s.model.L_layers) == \
        (True, 512, 6, 2)
    assert s.model.blocks_per_step == 42 and config.preset("maze").model.blocks_per_step == 15
    assert (s.train.lr, s.train.weight_decay, s.train.beta2, s.train.ema_rate) == \
        (1e-4, 1.0, 0.95, 0.999)
    assert s.data.global_batch_size == 768
    with pytest.raises(ConfigError, match="unknown preset"):
        config.preset("sodoku")


def test_overrides_and_errors():
    cfg = config.apply_overrides(config.preset("tiny"),
                                 ["train.lr=3e-4", "hidden_size=48", "model.mlp_t=false",
                                  "model.board_height=none"])
    assert cfg.train.lr == 3e-4 and cfg.model.hidden_size == 48 and cfg.model.mlp_t is False
    assert cfg.model.board_height is None
    with pytest.raises(ConfigError, match="unknown key 'hiden_size'"):
        config.apply_overrides(cfg, ["model.hiden_size=3"])
    with pytest.raises(ConfigError, match="unknown key"):
        config.apply_overrides(cfg, ["nonsense=3"])
    with pytest.raises(ConfigError, match="ambiguous"):
        config.apply_overrides(cfg, ["seed=3"])
    with pytest.raises(ConfigError, match="cannot read 'abc' as int"):
        config.apply_overrides(cfg, ["model.hidden_size=abc"])
    with pytest.raises(ConfigError, match="grad_mode"):
        config.apply_overrides(cfg, ["train.grad_mode=magic"])
    # The Python API too: an unsupported URL is refused, never made a local "s3:" folder.
    for key in ("train.out_dir", "data.path", "train.init_from"):
        with pytest.raises(ConfigError, match=f"{key}=s3://b/r: s3:// is not supported"):
            config.apply_overrides(cfg, [f"{key}=s3://b/r"])
        assert config.apply_overrides(cfg, [f"{key}=gs://b/r"]) is not None
    with pytest.raises(ConfigError, match="key=value"):
        config.apply_overrides(cfg, ["train.lr"])


def test_json_round_trip_and_unknown_keys(tmp_path):
    cfg = config.preset("maze")
    path = tmp_path / "config.json"
    config.save(cfg, str(path))
    assert config.load(str(path)) == cfg
    d = json.loads(path.read_text())
    d["model"]["extra"] = 1
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json\.model: unknown key\(s\) \['extra'\]"):
        config.load(str(path))
    # A config saved before the implicit backward's tolerance keys existed (issue 28) loads with
    # their defaults and keeps its one-cycle GMRES budget; bad values name the key.
    del d["model"]["extra"]
    for k in ("implicit_backward_tol", "implicit_backward_restart", "implicit_unconverged"):
        del d["train"][k]
    d["train"]["implicit_backward_iters"] = 20
    path.write_text(json.dumps(d))
    old = config.load(str(path))
    # (A cycle is min(restart, iters) vectors: still one 20-vector cycle.)
    assert (old.train.implicit_backward_tol, old.train.implicit_backward_restart,
            old.train.implicit_backward_iters) == (1e-4, 30, 20)
    for bad, match in (("train.implicit_backward_tol=0", "implicit_backward_tol must be > 0"),
                       ("train.implicit_unconverged=skip", "implicit_unconverged"),
                       ("train.implicit_backward_restart=0", "implicit_backward_restart")):
        with pytest.raises(ConfigError, match=match):
            config.apply_overrides(cfg, [bad])
    path.write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config.load(str(path))


def test_model_validation():
    with pytest.raises(ConfigError, match="divisible"):
        config.ModelConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="rope2d board"):
        config.ModelConfig(seq_len=10, hidden_size=32, num_heads=2, pos_encodings="rope2d",
                           board_height=3, board_width=3)
    with pytest.raises(ConfigError, match="only for the trm variant"):
        config.ModelConfig(pos_encodings="learned")
