"""The `eqr` command: the dispatcher, shared option errors, and the one evaluator seen from the
command line: the final evaluation `eqr train` logs equals `eqr eval` on the saved checkpoint
(same depth, breadth 1, seed), step by step, and both end with ``exact_accuracy:``."""

from __future__ import annotations

import json
from pathlib import Path

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
        # Throughput beside the metrics (timing: not compared); no peak on a CPU, so no MFU.
        perf = setting[0]["perf"]
        assert perf["perf/eval_tflops_per_device"] > 0 and "perf/eval_mfu" not in perf
        assert "puzzle-steps/s" in text and "TFLOP/s per device" in text
        if step == 6:
            assert _last(text) == trained
    # The TensorBoard scalars are the same numbers.
    tb = read_tensorboard(run)
    for k in ("all/exact_accuracy", "all/accuracy", "all/q_halt_accuracy",
              "perf/eval_puzzle_steps_per_s", "perf/eval_tflops_per_device"):
        assert [s for s, _ in tb[k]] == [3, 6]
        if not k.startswith("perf/"):
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


# ----------------------------------------------------------------------------------------------
# Preemption, and user errors as one line with exit status 2

_TRAIN_MICRO = [*EVAL_MODEL_OVERRIDES, "data.global_batch_size=16", "train.max_steps=6",
                "train.steps_per_call=3", "train.eval_every=3", "train.checkpoint_every=3",
                "train.log_every=3", "train.lr=3e-3", "eval.noise_scale=0.5", "eval.seed=3"]


def _micro_data(root):
    return write_array_dataset(root, make_puzzles(256, 0, blanks=(2, 5)),
                               make_puzzles(40, 1, blanks=(2, 5)))


def test_train_sigterm_exits_75_and_resume_matches_an_uninterrupted_run(tmp_path, capsys,
                                                                        monkeypatch):
    """`eqr train` sent SIGTERM mid-run saves at the next step boundary and exits 75; the same
    command with --resume ends with the uninterrupted run's evaluation, to the last bit (the
    config of the test above: its compiled functions are reused)."""
    from eqr_jax.data import prepare
    from test_training import _SigtermAt

    data = _micro_data(tmp_path / "data")
    args = ["train", "--preset", "tiny", "--data", str(data), "--no-progress", *_TRAIN_MICRO]
    assert cli.main([*args, "--out", str(tmp_path / "full")]) == 0
    full = _last(capsys.readouterr().out)
    make = prepare.make_loaders
    monkeypatch.setattr(prepare, "make_loaders",
                        lambda *a, **k: (lambda tr, ev: (_SigtermAt(tr, 2), ev))(*make(*a, **k)))
    assert cli.main([*args, "--out", str(tmp_path / "pre")]) == 75
    assert "preempted (SIGTERM): checkpoint saved at step 3" in capsys.readouterr().err
    monkeypatch.setattr(prepare, "make_loaders", make)
    assert cli.main([*args, "--out", str(tmp_path / "pre"), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resumed from step 3" in text and _last(text) == full
    metrics = {}
    for run in ("full", "pre"):
        ck = Checkpointer(tmp_path / run / "checkpoints", read_only=True)
        metrics[run] = ck.read_json(6, "meta")["metrics"]
        ck.close()
    assert metrics["pre"] == metrics["full"] and metrics["full"]["all/accuracy"] > 0


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"eqr {command}: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def test_train_user_errors_are_one_line_with_status_2(tmp_path, capsys, resume_runs):
    """A mistyped --data, bad values, an unwritable --out, a truncated test split, data the
    model does not fit, a run directory that already holds checkpoints and a resume under
    another config: each one line naming what and where, exit status 2, before any training."""
    data = _micro_data(tmp_path / "data")
    base = ["train", "--preset", "tiny", "--no-progress", *_TRAIN_MICRO]
    run = str(tmp_path / "run")
    (tmp_path / "file").write_text("")
    truncated = _micro_data(tmp_path / "truncated")
    f = truncated / "test" / "all__inputs.npy"   # e.g. an interrupted copy
    f.write_bytes(f.read_bytes()[:400])
    board6 = write_array_dataset(tmp_path / "six", (np.ones((8, 36), np.uint8),) * 2,
                                 (np.ones((4, 36), np.uint8),) * 2)
    _, split, _ = resume_runs
    trained = split.train.out_dir  # a run written by another config (the training tests')
    probes = [
        (["--data", str(tmp_path / "typo"), "--out", run], "does not exist; pass --build"),
        (["--data", str(data), "--out", run, "data.global_batch_size=-4"],
         "data.global_batch_size must be >= 1, got -4"),
        (["--data", str(data), "--out", run, "train.lr=-1"], "train.lr must be >= 0"),
        (["--data", str(data), "--out", str(tmp_path / "file" / "run")],
         f"--out {tmp_path / 'file' / 'run'}: cannot write there"),
        (["--data", str(truncated), "--out", run],
         "truncated/test/all__inputs.npy: cannot read ("),
        (["--data", str(board6), "--out", run], "model.seq_len=16 does not match the data"),
        (["--data", str(data), "--out", trained], "already holds checkpoints (steps 3, 6)"),
        (["--data", str(data), "--out", trained, "--resume"],
         "was written with a different config ("),
        (["--data", str(data), "--out", run, "--resume-step", "0"], "--resume-step must be >= 1"),
        # A URL went through pathlib into a local "s3:/..." folder; gs:// is supported.
        (["--data", str(data), "--out", "s3://my-bucket/run1"],
         "--out s3://my-bucket/run1: s3:// is not supported"),
        (["--data", str(data), "--out", run, "train.init_from=http://b/r"],
         "train.init_from=http://b/r: http:// is not supported"),
    ]
    for extra, expected in probes:
        assert cli.main([*base, *extra]) == 2, extra
        line = _one_line_error(capsys, "train")
        assert expected in line, (extra, line)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not Path("s3:").exists()
    # --debug: the traceback instead
    from eqr_jax.config import ConfigError
    with pytest.raises(ConfigError, match="does not exist"):
        cli.main([*base, "--data", str(tmp_path / "typo"), "--debug"])


def test_eval_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    """`eqr eval` of a 4x4 model on 6x6 data, of a truncated checkpoint, with a bad batch size,
    and `eqr data` with a bad count: one line, exit status 2."""
    import shutil

    from conftest import trained_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint(), run)
    board6 = write_array_dataset(tmp_path / "six", (np.ones((8, 36), np.uint8),) * 2,
                                 (np.ones((4, 36), np.uint8),) * 2)
    assert cli.main(["eval", "--checkpoint", str(run), "--data", str(board6)]) == 2
    assert "six/test holds 6x6 boards, seq_len 36, vocab 6, but the model takes 4x4 boards" \
        in _one_line_error(capsys, "eval")
    assert cli.main(["eval", "--checkpoint", "s3://b/run"]) == 2
    assert "--checkpoint s3://b/run: s3:// is not supported" in _one_line_error(capsys, "eval")
    assert cli.main(["eval", "--checkpoint", str(run), "--batch-size", "-4"]) == 2
    assert "--batch-size must be >= 1, got -4" in _one_line_error(capsys, "eval")
    step = Checkpointer(run / "checkpoints", read_only=True).latest_step()
    for f in (run / "checkpoints" / str(step)).rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:8])
    assert cli.main(["eval", "--checkpoint", str(run), "--no-progress"]) == 2
    assert f"checkpoint {run}/checkpoints/{step} does not restore (" in \
        _one_line_error(capsys, "eval")
    assert cli.main(["data", "sudoku", "--out", str(tmp_path / "d"), "--train", "0"]) == 2
    assert "--train must be >= 1, got 0" in _one_line_error(capsys, "data")


def test_train_help_lists_the_override_sections_and_show_config_the_keys(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sections: model, data, train, eval" in text and "--show-config" in text
    assert "75 preempted by SIGTERM" in text
    assert cli.main(["train", "--preset", "tiny", "train.lr=3e-4", "--show-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "train.lr=0.0003" in lines and "model.hidden_size=64" in lines
    assert "data.path=data/sudoku4-tiny" in lines and "eval.noise_scale=None" in lines


def test_eval_warns_when_convergence_halting_stopped_nothing(capsys):
    """`--halt convergence` whose tolerance no row met (the noise floor of the logit change is
    above it) would silently equal `--halt fixed`: `eqr eval` says so, naming the depths."""
    from eqr_jax.cli.eval import warn_no_convergence
    from eqr_jax.config import EvalConfig

    def results(*saved):
        return {"settings": [{"depth": d, "noise_scale": 0.01,
                              "metrics": {"halting/compute_saved": c}} for d, c in saved]}

    cfg = EvalConfig(halt="convergence")
    warn_no_convergence(results((16, 0.0), (64, 0.0)), cfg)
    err = capsys.readouterr().err
    assert "stopped no row before the depth cap (depths 16, 64; --tol 0.001" in err
    assert "noise 0.01" in err
    warn_no_convergence(results((16, 0.0), (64, 0.7)), cfg)
    assert "depths 16;" in capsys.readouterr().err
    warn_no_convergence(results((64, 0.7)), cfg)  # rows halted: nothing to say
    warn_no_convergence(results((64, 0.0)), EvalConfig(halt="fixed"))  # nothing promised
    assert capsys.readouterr().err == ""
