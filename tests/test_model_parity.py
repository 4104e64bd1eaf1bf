"""Parity of one reasoning step with the reference PyTorch EqR (shared fixtures), and interop."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from eqr_jax import interop, losses
from eqr_jax.config import ConfigError, maze_model, sudoku_model
from eqr_jax.model import init_params, num_params, swiglu_intermediate

FIXTURE_FILES = ["parity_sudoku_mlpt.npz", "parity_maze_attn_rope.npz"]
TOL = dict(atol=2e-4, rtol=2e-4)


def _load(name):
    data = np.load(fixture_path(name))
    cfg = interop.config_from_reference(json.loads(str(data["config_json"])))
    state_dict = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
    return data, cfg, state_dict


@pytest.fixture(scope="module", params=FIXTURE_FILES)
def fixture(request):
    data, cfg, sd = _load(request.param)
    return data, cfg, interop.params_from_reference(sd, cfg), sd


@pytest.mark.parametrize("step,src", [("step1", ("z_H0", "z_L0")),
                                      ("step2", ("step1/z_H", "step1/z_L"))])
def test_reference_step_matches_fixture(fixture, step, src):
    data, cfg, params, _ = fixture
    out = interop.reference_step(cfg, params, data["inputs"], data[src[0]], data[src[1]])
    for key in ("z_H", "z_L", "logits", "q_halt"):
        np.testing.assert_allclose(np.asarray(out[key]), data[f"{step}/{key}"], **TOL,
                                   err_msg=f"{step}/{key}")


def test_stablemax_cross_entropy_matches_fixture(fixture):
    data, *_ = fixture
    with jax.enable_x64(True):
        ce = losses.stablemax_cross_entropy(jnp.asarray(data["step1/logits"]),
                                            jnp.asarray(data["labels_for_loss"]))
        assert ce.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(ce), data["stablemax_ce_tokenwise"], rtol=1e-6,
                                   atol=1e-9)
    ignored = data["labels_for_loss"] == -100
    assert ignored.any(), "fixture should exercise ignored positions"
    ce32 = np.asarray(losses.stablemax_cross_entropy(jnp.asarray(data["step1/logits"]),
                                                     jnp.asarray(data["labels_for_loss"])))
    assert np.all(ce32[ignored] == 0)
    np.testing.assert_allclose(ce32, data["stablemax_ce_tokenwise"], rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_and_prefixes(fixture):
    _, cfg, params, sd = fixture
    back = interop.params_to_reference(params, cfg)
    assert set(back) == set(sd)
    for name, value in sd.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    prefixed = {f"_orig_mod.model.{k}": v for k, v in sd.items()}
    again = interop.params_from_reference(prefixed, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_state_dict_errors_name_the_tensor(fixture):
    _, cfg, _, sd = fixture
    name = "inner.lm_head.weight"
    missing = {k: v for k, v in sd.items() if k != name}
    with pytest.raises(interop.CheckpointMismatchError, match="missing.*lm_head"):
        interop.params_from_reference(missing, cfg)
    extra = dict(sd, **{"inner.L_level.layers.7.mlp.down_proj.weight": sd[name]})
    with pytest.raises(interop.CheckpointMismatchError, match="unexpected.*layers.7"):
        interop.params_from_reference(extra, cfg)
    bad = dict(sd, **{name: sd[name][:, :-1]})
    with pytest.raises(interop.CheckpointMismatchError, match="lm_head.weight.*shape"):
        interop.params_from_reference(bad, cfg)


def test_config_from_reference_rejects_bad_keys():
    data = np.load(fixture_path(FIXTURE_FILES[0]))
    d = json.loads(str(data["config_json"]))
    with pytest.raises(ConfigError, match="unknown key.*hiden_size"):
        interop.config_from_reference(dict(d, hiden_size=3))
    # A reference run config nests the architecture under `arch` and takes seq_len/vocab_size
    # from the dataset; they are passed separately.
    arch = {k: v for k, v in d.items() if k not in ("seq_len", "vocab_size")}
    run_cfg = {"arch": dict(arch, name="eqr@EqRModel", loss={"name": "ACTLossHead"})}
    with pytest.raises(ConfigError, match=r"missing.*\['seq_len', 'vocab_size'\]"):
        interop.config_from_reference(run_cfg)
    assert interop.config_from_reference(run_cfg, seq_len=d["seq_len"],
                                         vocab_size=d["vocab_size"]) == \
        interop.config_from_reference(d)
    d.pop("hidden_size")
    with pytest.raises(ConfigError, match="missing.*hidden_size"):
        interop.config_from_reference(d)


def test_preset_parameter_counts_match_reference():
    # The reference training script logs these counts (docs/model.md, "Parameters").
    for cfg, want in [(sudoku_model(), 4_855_298), (maze_model(), 263_938)]:
        shapes = jax.eval_shape(lambda c=cfg: init_params(c, jax.random.PRNGKey(0)))
        assert num_params(shapes) == want


def test_swiglu_intermediate_rule():
    assert [swiglu_intermediate(d, 4) for d in (512, 128, 81, 900, 64)] == \
        [1536, 512, 256, 2560, 256]
