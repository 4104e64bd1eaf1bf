"""The `eqr` command: the dispatcher, shared option errors, and the one evaluator seen from the
command line: the final evaluation `eqr train` logs equals `eqr eval` on the saved checkpoint
(same depth, breadth 1, seed), step by step, and both end with ``exact_accuracy:``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import EVAL_MODEL_OVERRIDES, read_tensorboard, write_array_dataset
from eqr_jax import cli
from eqr_jax.checkpoint import Checkpointer
from eqr_jax.data.arrays import make_puzzles


def test_dispatcher_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2 and cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_train_rejects_unknown_override(capsys):
    assert cli.main(["train", "--preset", "tiny", "train.not_a_key=1"]) == 2
    assert "not_a_key" in capsys.readouterr().err


def _last(out: str) -> float:
    line = out.strip().splitlines()[-1]
    assert line.startswith("exact_accuracy: "), out[-2000:]
    return float(line.split(": ")[1])


def test_train_final_evaluation_equals_eqr_eval(tmp_path, capsys):
    """The tiny preset (cut to the micro width) trains 6 steps and evaluates at steps 3 and 6
    with test-time noise 0.5 and seed 3; `eqr eval` on each saved step reproduces what training
    logged (TensorBoard, checkpoint metadata, the last line) to the last bit."""
    rng_train, rng_test = make_puzzles(256, 0, blanks=(2, 5)), make_puzzles(40, 1, blanks=(2, 5))
    data = write_array_dataset(tmp_path / "data", rng_train, rng_test)
    run = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--data", str(data), "--out", str(run),
                     "--no-progress", *EVAL_MODEL_OVERRIDES, "data.global_batch_size=16",
                     "train.max_steps=6", "train.steps_per_call=3", "train.eval_every=3",
                     "train.checkpoint_every=3", "train.log_every=3", "train.lr=3e-3",
                     "eval.noise_scale=0.5", "eval.seed=3"]) == 0
    trained = _last(capsys.readouterr().out)
    ck = Checkpointer(run / "checkpoints", read_only=True)
    logged = {s: ck.read_json(s, "meta")["metrics"] for s in ck.all_steps()}
    ck.close()
    assert sorted(logged) == [3, 6] and logged[6]["all/exact_accuracy"] == trained
    for step, metrics in logged.items():
        out = tmp_path / f"eval{step}"
        assert cli.main(["eval", "--checkpoint", str(run), "--step", str(step), "--breadth",
                         "1", "--out", str(out), "--no-plots", "--no-progress"]) == 0
        text = capsys.readouterr().out
        assert "noise=0.5" in text and "seed=3" in text and "depths [4]" in text
        setting = json.loads((out / "results.json").read_text())["settings"]
        assert len(setting) == 1 and setting[0]["metrics"]["num_puzzles"] == 40
        evaluated = {k: v for k, v in setting[0]["metrics"].items() if "/" in k}
        assert evaluated == {k: v for k, v in metrics.items() if "/" in k}, step
        assert evaluated["all/accuracy"] > 0 and evaluated["all/final_residual"] > 0
        if step == 6:
            assert _last(text) == trained
    # The TensorBoard scalars are the same numbers.
    tb = read_tensorboard(run)
    for k in ("all/exact_accuracy", "all/accuracy", "all/q_halt_accuracy"):
        assert [s for s, _ in tb[k]] == [3, 6]
        np.testing.assert_allclose([v for _, v in tb[k]], [logged[3][k], logged[6][k]],
                                   rtol=1e-6)


def test_eval_and_solve_report_bad_checkpoints(tmp_path, capsys):
    for cmd in ("eval", "solve"):
        extra = ["--puzzles", str(tmp_path / "p.txt")] if cmd == "solve" else []
        (tmp_path / "p.txt").write_text("12..34....4.4...\n")
        assert cli.main([cmd, "--checkpoint", str(tmp_path / "missing"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"eqr {cmd}: ") and "does not exist" in err
    assert cli.main(["eval"]) == 2
    assert "exactly one of --checkpoint DIR or --reference" in capsys.readouterr().err


def test_stream_options_belong_to_eqr_eval(capsys):
    from conftest import trained_checkpoint

    run = trained_checkpoint()
    assert cli.main(["eval", "--checkpoint", run, "--slots", "4"]) == 2
    assert "--slots applies to --stream" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", run, "--stream", "--solver", "anderson"]) == 2
    assert "eval.stream needs eval.solver='unroll'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # eqr solve evaluates single batches: no pool to stream
        cli.main(["solve", "--checkpoint", run, "--stream", "1234123412341234"])
    assert "unrecognized arguments: --stream" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: eqr {command}" in capsys.readouterr().out
