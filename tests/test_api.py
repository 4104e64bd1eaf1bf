"""The public API: ``import eqr_jax`` stays light, every advertised name resolves, and the
registry of named choices is what configs and command lines accept."""

from __future__ import annotations

import subprocess
import sys

import pytest

import eqr_jax
from eqr_jax import config, modes


def test_import_is_light_and_names_resolve():
    code = ("import sys, eqr_jax; heavy = [m for m in ('jax', 'flax', 'optax', 'numba') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for name in eqr_jax.__all__:
        assert getattr(eqr_jax, name) is not None, name
    assert eqr_jax.train.__module__ == "eqr_jax.training"
    assert eqr_jax.load_checkpoint.__name__ == "load_for_inference"
    with pytest.raises(AttributeError):
        eqr_jax.not_a_name


def test_registry_is_what_configs_accept():
    for mode in modes.GRAD_MODES:
        assert config.TrainConfig(grad_mode=mode).grad_mode == mode
    for halt in modes.HALT_RULES:
        assert config.EvalConfig(halt=halt).halt == halt
    for solver in modes.SOLVERS:
        assert config.EvalConfig(solver=solver).solver == solver
    with pytest.raises(config.ConfigError, match=r"train.grad_mode='none' is not one of"):
        config.TrainConfig(grad_mode=modes.NO_GRAD)
    cfg = config.preset("tiny")
    assert cfg.eval_depth == cfg.model.halt_max_steps == 4
    assert cfg.data.eval_batch == cfg.data.global_batch_size
    assert config.apply_overrides(cfg, ["eval.depth=9", "data.eval_batch_size=8"]).eval_depth == 9
