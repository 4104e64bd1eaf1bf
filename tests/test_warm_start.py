"""Warm starts (`eqr_jax.warm_start`, ``eqr train --init-from``) and extending a finished run.

A run started from another run's weights is evaluated at step 0 exactly as ``eqr eval`` on its
source; resumed with a larger ``train.max_steps`` it continues from its last step and keeps the
record of its start; started from the official-layout checkpoint it reproduces that
checkpoint's outputs; weights that do not fit the model are one line naming the parameter.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import (fixture_path, micro_model, read_tensorboard, reference_step_jit, replace,
                      trained_checkpoint, write_array_dataset)
from eqr_jax import cli
from eqr_jax.checkpoint import Checkpointer, load_for_inference
from eqr_jax.config import ConfigError
from eqr_jax.data.arrays import make_puzzles
from eqr_jax.model import EqRModel
from eqr_jax.warm_start import fit_to_model
from test_cli import _TRAIN_MICRO, _last, _one_line_error


def test_fit_to_model_names_the_first_misfit():
    template = jax.eval_shape(EqRModel(micro_model()).init, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda t: np.zeros(t.shape, np.float64), template)
    fitted = fit_to_model(params, template)
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(fitted))
    bigger = jax.eval_shape(EqRModel(micro_model(vocab_size=7)).init, jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match=r"parameter embed_tokens/embedding has shape "
                                          r"\(6, 32\), the model needs \(7, 32\)"):
        fit_to_model(params, bigger)
    deeper = jax.eval_shape(EqRModel(micro_model(L_layers=2)).init, jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match=r"its parameter L_level/layers_1/mlp/down_proj/kernel "
                                          r"\(\d+, 32\) is missing from them"):
        fit_to_model(params, deeper)
    with pytest.raises(ConfigError, match=r"parameter L_level/layers_1/mlp/down_proj/kernel "
                                          r"\(\d+, 32\) is not in the model"):
        fit_to_model(fit_to_model(jax.tree_util.tree_map(
            lambda t: np.zeros(t.shape), deeper), deeper), template)


def _data(root):
    return write_array_dataset(root, make_puzzles(256, 0, blanks=(2, 5)),
                               make_puzzles(40, 1, blanks=(2, 5)))


def test_init_from_a_run_starts_at_its_accuracy_and_resume_extends_it(tmp_path, capsys):
    """`--init-from` a trained run: the new run's evaluation at step 0 is `eqr eval` of the
    source's weights at the same settings, metric for metric; its step counter and
    optimiser start fresh; config.json records the source. `--resume train.max_steps=9` of the
    finished 6-step run continues it from step 6 to 9, says how the length changed, and keeps
    the record of the start."""
    source, data = trained_checkpoint(), _data(tmp_path / "data")
    ft = tmp_path / "ft"
    args = ["train", "--preset", "tiny", "--data", str(data), "--out", str(ft), "--no-progress",
            *_TRAIN_MICRO]
    assert cli.main([*args, "--init-from", source]) == 0
    out = capsys.readouterr().out
    # The source trained without EMA (conftest), so its raw weights, as `eqr eval` takes them.
    assert f"initial weights: {source}/checkpoints/40, raw weights (it saved no EMA)" in out
    assert "step 0: eval exact" in out
    recorded = json.loads((ft / "config.json").read_text())["train"]
    assert (recorded["init_from"], recorded["init_step"]) == (source, 0)
    tb = read_tensorboard(ft)
    assert [s for s, _ in tb["all/exact_accuracy"]] == [0, 3, 6]
    ck = Checkpointer(ft / "checkpoints", read_only=True)
    assert ck.all_steps() == [3, 6]  # a fresh step counter: the source had done 40
    ck.close()

    ev = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", source, "--data", str(data), "--breadth", "1",
                     "--noise", "0.5", "--seed", "3", "--batch-size", "16", "--out", str(ev),
                     "--no-plots", "--no-progress"]) == 0
    capsys.readouterr()
    evaluated = json.loads((ev / "results.json").read_text())["settings"][0]["metrics"]
    for k in ("all/exact_accuracy", "all/accuracy", "all/q_halt_accuracy", "all/final_residual"):
        step, value = tb[k][0]
        assert step == 0
        np.testing.assert_allclose(value, evaluated[k], rtol=1e-6, err_msg=k)
    assert evaluated["all/accuracy"] > 0.3  # a trained source, not random weights

    # Train it longer: the same command with --resume and a larger total (no --init-from).
    longer = [a for a in args if a != "train.max_steps=6"] + ["train.max_steps=9", "--resume"]
    assert cli.main(longer) == 0
    out = capsys.readouterr().out
    assert "resumed from step 6" in out and "initial weights" not in out
    assert ("run length changed (train.max_steps 6 -> 9): total steps 6 -> 9; the "
            "learning-rate schedule is re-planned over 9 steps") in out
    ck = Checkpointer(ft / "checkpoints", read_only=True)
    assert ck.all_steps()[-1] == 9
    ck.close()
    recorded = json.loads((ft / "config.json").read_text())["train"]
    assert (recorded["max_steps"], recorded["init_from"]) == (9, source)
    _last(out)

    # A total below the checkpoint's step is one line.
    assert cli.main([a for a in longer if a != "train.max_steps=9"]
                    + ["train.max_steps=7", "--resume"]) == 2
    assert "train.max_steps 9 -> 7 gives 7 total steps, fewer than the 9 the checkpoint" \
        in _one_line_error(capsys, "train")


def test_init_from_the_official_checkpoint_reproduces_its_outputs(tmp_path, capsys):
    """A run started from the official-layout `.pth` (with the config it records) begins with
    its EMA weights: one step reproduces the fixture's outputs; EMA = params, step 0."""
    from eqr_jax import interop
    from eqr_jax.data.arrays import ArrayTrainLoader
    from eqr_jax.training import train

    pth, expected = fixture_path("official_ckpt_mlpt.pth"), fixture_path("official_ckpt_mlpt.npz")
    ref = np.load(expected)
    cfg = interop.run_config_from_reference(interop.load_reference_checkpoint(pth),
                                            seq_len=int(ref["seq_len"]),
                                            vocab_size=int(ref["vocab_size"]))
    cfg = replace(cfg, train={"out_dir": str(tmp_path / "ft"), "init_from": str(pth),
                              "max_steps": 10, "eval_every": 0, "checkpoint_every": 0},
                  data={"global_batch_size": 8})
    rng = np.random.default_rng(0)
    x = rng.integers(1, cfg.model.vocab_size, (64, cfg.model.seq_len)).astype(np.int32)
    loaders = (ArrayTrainLoader(x, x, 8), lambda: iter(()))
    state, result = train(cfg, loaders, stop_after=0, progress=False, verbose=False)
    assert result["step"] == 0 and int(state.step) == 0
    assert "starting from" in capsys.readouterr().out
    ema_leaves = jax.tree_util.tree_leaves(state.ema)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), ema_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = reference_step_jit()(cfg.model, state.params, ref["inputs"], ref["z_H0"], ref["z_L0"])
    for name in ("z_H", "z_L", "logits", "q_halt"):
        np.testing.assert_allclose(np.asarray(out[name]), ref[f"ema/{name}"], atol=2e-4,
                                   rtol=2e-4, err_msg=name)
    # The raw weights on request.
    raw = replace(cfg, train={"init_weights": "raw", "out_dir": str(tmp_path / "raw")})
    state, _ = train(raw, loaders, stop_after=0, progress=False, verbose=False)
    out = reference_step_jit()(cfg.model, state.params, ref["inputs"], ref["z_H0"], ref["z_L0"])
    np.testing.assert_allclose(np.asarray(out["logits"]), ref["raw/logits"], atol=2e-4, rtol=2e-4)
    assert not np.allclose(ref["raw/logits"], ref["ema/logits"])


def test_init_from_sources_that_do_not_fit_are_one_line(tmp_path, capsys):
    """An official `.pth` or a run whose architecture differs from the new config, a missing
    source, a step the source lacks, and --init-step for a `.pth`: one line each, exit 2,
    before any data is built or anything is written."""
    pth = fixture_path("official_ckpt_mlpt.pth")
    source = trained_checkpoint()
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--build", "--out",
            str(out), "--no-progress"]
    probes = [
        (["--init-from", str(pth)], "do not fit the model: parameter L_level/layers_0/mlp_t/"
                                    "down_proj has shape (256, 81), the model needs (256, 16)"),
        (["--init-from", source], "do not fit the model: parameter L_level/layers_0/mlp/"
                                  "down_proj/kernel has shape ("),
        (["--init-from", str(tmp_path / "nowhere")], "does not exist"),
        (["--init-from", source, "--init-step", "7"], "no checkpoint at step 7"),
        (["--init-from", str(pth), "--init-step", "3"], "applies to a run directory"),
        (["--init-step", "3"], "--init-step and --init-weights apply to --init-from"),
    ]
    for extra, expected in probes:
        assert cli.main([*base, *extra]) == 2, extra
        line = _one_line_error(capsys, "train")
        assert expected in line, (extra, line)
    assert not (tmp_path / "data").exists() and not out.exists()
    # The run-directory source's own weights load as eqr eval loads them.
    _, ema = load_for_inference(source)
    assert np.asarray(jax.tree_util.tree_leaves(ema)[0]).shape[-1] == 32
