"""Checkpoints: exact resume (bit for bit against an uninterrupted run), refusal to resume under
another config, loading for inference (run, checkpoints/ or step directory), the best-checkpoint
retention by the evaluator's metric."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from conftest import train_loaders as _loaders
from eqr_jax.checkpoint import BEST_METRIC, Checkpointer, ConfigMismatchError, load_for_inference
from eqr_jax.train_program import TrainState
from eqr_jax.training import train


def test_resume_is_bit_exact(resume_runs):
    root, _, (r_full, r_a, r_b) = resume_runs
    assert (r_a["step"], r_a["steps_this_run"]) == (3, 3)
    assert (r_b["step"], r_b["steps_this_run"]) == (6, 3)
    assert r_full["step"] == 6
    for use_ema in (False, True):
        cfg1, p1 = load_for_inference(root / "full", use_ema=use_ema)
        cfg2, p2 = load_for_inference(root / "split" / "checkpoints", use_ema=use_ema)
        assert cfg1.model == cfg2.model
        for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The last-window training metrics agree too (same carry, data and randomness).
    for k in ("train/total_loss", "train/accuracy", "train/grad_norm"):
        assert r_full[k] == r_b[k], k
    # Checkpoints hold the run config beside them.
    assert json.loads((root / "split" / "config.json").read_text())["train"]["max_steps"] == 6



def test_resume_refuses_other_config(resume_runs):
    root, split, _ = resume_runs
    other = dataclasses.replace(split, train=dataclasses.replace(split.train, lr=1e-2))
    with pytest.raises(ConfigMismatchError, match=r"train\.lr"):
        train(other, _loaders(other), progress=False, verbose=False, resume=True)



def test_resume_with_a_larger_total_extends_a_finished_run_to_the_uninterrupted_one(
        resume_runs, tmp_path, capsys):
    """A run that finished at step 3, resumed with train.max_steps=6, ends bit for bit where the
    uninterrupted 6-step run ends (the schedule is constant after warm-up, so re-planning it
    changes nothing); another changed key is still refused, naming only that key."""
    from conftest import micro_run
    from test_training import _assert_resumes_from_step_3_to_the_full_run

    root, _, _ = resume_runs
    short = micro_run(str(tmp_path / "short"), max_steps=3)
    _, r = train(short, _loaders(short), progress=False, verbose=False)
    assert (r["step"], r["total_steps"]) == (3, 3)
    longer = dataclasses.replace(short, train=dataclasses.replace(short.train, max_steps=6))
    other = dataclasses.replace(longer, train=dataclasses.replace(longer.train, lr=1e-2))
    with pytest.raises(ConfigMismatchError, match=r"\(train\.lr: checkpoint=0\.003 vs "
                                                  r"now=0\.01\); refusing"):
        train(other, _loaders(other), progress=False, verbose=False, resume=True)
    capsys.readouterr()
    _assert_resumes_from_step_3_to_the_full_run(longer, root / "full", tmp_path / "short")
    assert ("run length changed (train.max_steps 3 -> 6): total steps 3 -> 6; the learning-rate "
            "schedule is re-planned over 6 steps (lr at step 4: 0.003, the old plan's: 0.003)"
            in capsys.readouterr().out)
    assert json.loads((tmp_path / "short" / "config.json").read_text())["train"]["max_steps"] == 6


def test_resumed_config_replans_a_decaying_schedule_and_refuses_a_shorter_total():
    """With a cosine decay (lr_min_ratio < 1) the extended run's schedule is the one a run
    launched with the new total would have; the line gives both learning rates. Epochs count
    too; a total below the checkpoint's step is refused; the start record is kept."""
    from conftest import micro_run
    from eqr_jax import config as config_lib, optim
    from eqr_jax.startup import resumed_config

    was = micro_run("r", max_steps=300, lr_min_ratio=0.1, init_from="runs/src", init_step=5)
    now = micro_run("r", max_steps=400, lr_min_ratio=0.1)
    cfg, line = resumed_config(now, config_lib.to_dict(was), 300, steps_per_epoch=10)
    assert cfg.train.max_steps == 400 and (cfg.train.init_from, cfg.train.init_step) == (
        "runs/src", 5)
    lr_new = float(optim.make_schedule(now.train, 400)(301))
    lr_old = float(optim.make_schedule(was.train, 300)(301))
    assert lr_new > 2 * lr_old  # the old plan had decayed to its floor
    assert line == (f"[eqr] run length changed (train.max_steps 300 -> 400): total steps 300 -> "
                    f"400; the learning-rate schedule is re-planned over 400 steps (lr at step "
                    f"301: {lr_new:.4g}, the old plan's: {lr_old:.4g})")
    by_epochs = micro_run("r", epochs=50, max_steps=0)
    _, line = resumed_config(by_epochs, config_lib.to_dict(micro_run("r", epochs=30)), 300, 10)
    assert "(train.epochs 30 -> 50): total steps 300 -> 500" in line
    assert resumed_config(was, config_lib.to_dict(was), 300, 10) == (was, None)
    with pytest.raises(config_lib.ConfigError, match="train.max_steps 300 -> 250 gives 250 total "
                                                     "steps, fewer than the 300 the checkpoint"):
        resumed_config(micro_run("r", max_steps=250), config_lib.to_dict(was), 300, 10)


def test_load_for_inference_step_dir(resume_runs):
    root, _, _ = resume_runs
    cfg, params = load_for_inference(root / "split" / "checkpoints" / "3", use_ema=False)
    assert cfg.train.max_steps == 6 and "embed_tokens" in params




def _toy_state(step: int) -> TrainState:
    """A small `TrainState` whose parameter ``w`` holds ``step`` (no EMA)."""
    return TrainState({"w": np.full(3, step, np.float32)}, {"m": np.zeros(3, np.float32)}, None,
                      np.int32(step), np.zeros(2, np.uint32), {"z": np.zeros(2, np.float32)})


def test_retention_keeps_newest_and_best_by_the_evaluator_metric(tmp_path):
    """keep=2: the two newest checkpoints plus the one with the best ``all/exact_accuracy`` (the
    metric training's evaluation logs and ``eqr eval`` reproduces)."""
    from conftest import micro_run

    assert BEST_METRIC == "all/exact_accuracy"
    ck = Checkpointer(tmp_path / "checkpoints", keep=2)
    cfg = micro_run(str(tmp_path))
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2), (5, None)]:
        ck.save(step, _toy_state(step), loader_state={"epoch": step}, cfg=cfg,
                metrics=None if acc is None else {BEST_METRIC: acc, "all/accuracy": 0.5})
    assert ck.all_steps() == [2, 4, 5] and ck.best_step() == 2
    assert ck.read_json(2, "meta")["metrics"] == {BEST_METRIC: 0.9, "all/accuracy": 0.5}
    ck.close()


# ----------------------------------------------------------------------------------------------
# Faults: a damaged newest checkpoint, a chosen step, no checkpoint at all


def _copy_run(root, name, tmp_path):
    """A copy of one of `resume_runs`' run directories (checkpoints at steps 3 and 6)."""
    import shutil

    dst = tmp_path / name
    shutil.copytree(root / name, dst)
    return dst


def _damage(step_dir, how: str) -> None:
    import shutil

    if how == "missing item":
        shutil.rmtree(step_dir / "misc")
    else:  # truncate every array data file of the parameters to half its length
        files = [f for f in (step_dir / "params").rglob("*") if f.is_file() and
                 f.parent.name == "d"]
        assert files
        for f in files:
            data = f.read_bytes()
            f.write_bytes(data[:len(data) // 2])


def _same_params(a, b) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(load_for_inference(a, use_ema=False)[1]),
                    jax.tree_util.tree_leaves(load_for_inference(b, use_ema=False)[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Orbax's reader leaves the other failed reads of a truncated checkpoint unretrieved.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncated", "missing item"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(resume_runs, tmp_path, capsys, how):
    """Step 6 is damaged: --resume says so in one line, continues from step 3, and ends where
    the uninterrupted run ended, bit for bit."""
    root, split, _ = resume_runs
    run = _copy_run(root, "split", tmp_path)
    _damage(run / "checkpoints" / "6", how)
    cfg = dataclasses.replace(split, train=dataclasses.replace(split.train, out_dir=str(run)))
    _, r = train(cfg, _loaders(cfg), progress=False, verbose=False, resume=True)
    assert (r["step"], r["steps_this_run"]) == (6, 3)
    err = [line for line in capsys.readouterr().err.splitlines() if "does not restore" in line]
    assert len(err) == 1 and f"{run}/checkpoints/6 does not restore (" in err[0] \
        and err[0].endswith("trying step 3"), err
    assert ("misc" in err[0]) if how == "missing item" else ("params" in err[0] or
                                                             "Error" in err[0])
    _same_params(root / "full", run)


def test_resume_step_picks_a_checkpoint_and_reports_bad_ones(resume_runs, tmp_path):
    from eqr_jax.checkpoint import CheckpointError

    root, split, _ = resume_runs
    run = _copy_run(root, "split", tmp_path)
    cfg = dataclasses.replace(split, train=dataclasses.replace(split.train, out_dir=str(run)))
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 5 in .* \(steps: 3, 6\)"):
        train(cfg, _loaders(cfg), progress=False, verbose=False, resume_step=5)
    _damage(run / "checkpoints" / "6", "missing item")
    with pytest.raises(CheckpointError, match=r"checkpoints/6 does not restore: missing item"):
        train(cfg, _loaders(cfg), progress=False, verbose=False, resume_step=6)
    _, r = train(cfg, _loaders(cfg), progress=False, verbose=False, resume_step=3)
    assert (r["step"], r["steps_this_run"]) == (6, 3)
    _same_params(root / "full", run)


def test_resume_without_checkpoint_starts_fresh_with_a_warning_and_fresh_run_refuses_old_ones(
        resume_runs, tmp_path, capsys):
    from eqr_jax.checkpoint import CheckpointError

    root, split, (_, r_a, _) = resume_runs
    cfg = dataclasses.replace(split, train=dataclasses.replace(split.train,
                                                               out_dir=str(tmp_path / "new")))
    _, r = train(cfg, _loaders(cfg), progress=False, verbose=False, resume=True, stop_after=3)
    assert "warning: --resume: no checkpoint in" in capsys.readouterr().err
    assert r["step"] == 3 and r["train/total_loss"] == r_a["train/total_loss"]
    # Without --resume a directory that holds checkpoints is not overwritten.
    before = (tmp_path / "new" / "config.json").read_text()
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(steps 3\): pass "
                                              r"--resume"):
        train(cfg, _loaders(cfg), progress=False, verbose=False)
    assert (tmp_path / "new" / "config.json").read_text() == before


# ----------------------------------------------------------------------------------------------
# Object storage: a step is finished when Orbax's commit marker is there


@pytest.mark.parametrize("where", ["bucket", "gcsfuse"])
def test_an_interrupted_save_is_never_taken_for_the_newest_step(where, request, tmp_path):
    """Steps 1 and 2 saved, then a save of step 3 interrupted after its arrays were written
    (every object but Orbax's ``commit_success.txt``): on a bucket (gs://, marker mode by
    itself) and on a local path written in marker mode (a gcsfuse mount), readers list steps 1
    and 2 only, `locate` and a resume take step 2, and the next save of step 3 completes; a
    finished step damaged afterwards is passed over with one warning."""
    from conftest import micro_run
    from eqr_jax import sharding as sharding_lib
    from eqr_jax import storage
    from eqr_jax.checkpoint import COMMIT_MARKER, commit_mode, locate

    if where == "bucket":
        root = storage.path(request.getfixturevalue("gcs_bucket").url("ckpt"))
        commit = "auto"
    else:
        root, commit = tmp_path / "mount", "marker"
    cfg = micro_run(str(root))
    ck = Checkpointer(root / "checkpoints", keep=5, commit=commit)
    assert ck.commit == "marker"
    for s in (1, 2):
        ck.save(s, _toy_state(s), loader_state={"epoch": s}, cfg=cfg)
    ck.close()
    storage.copy_tree(root / "checkpoints" / "2", root / "checkpoints" / "3")
    (root / "checkpoints" / "3" / COMMIT_MARKER).unlink()
    assert (root / "checkpoints" / "3" / "params").is_dir()

    assert commit_mode(root / "checkpoints") == "marker"  # detected from the markers
    reader = Checkpointer(root / "checkpoints", read_only=True)
    assert reader.all_steps() == [1, 2]
    reader.close()
    assert locate(root)[1] == 2
    ck = Checkpointer(root / "checkpoints", keep=5)
    abstract = sharding_lib.abstract(_toy_state(0),
                                     jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    restored, loader_state, meta = ck.restore(abstract, cfg)
    assert int(restored.step) == 2 and meta["step"] == 2 and loader_state == {"epoch": 2}
    np.testing.assert_array_equal(restored.params["w"], np.full(3, 2, np.float32))
    ck.save(3, _toy_state(3), loader_state={"epoch": 3}, cfg=cfg)
    assert ck.all_steps() == [1, 2, 3]
    # A finished step whose array files were damaged later: the restore falls back past it,
    # as it does on a local disk.
    data = [f for f in storage.files(root / "checkpoints" / "3" / "params")
            if f.split("/")[-2:-1] == ["d"]]
    assert data
    for f in data:
        obj = root / "checkpoints" / "3" / "params" / f
        storage.write_bytes(obj, obj.read_bytes()[:3])
    warnings = []
    restored, _, _ = ck.restore(abstract, cfg, warn=warnings.append)
    assert int(restored.step) == 2 and len(warnings) == 1, warnings
    assert "checkpoints/3 does not restore" in warnings[0] and "trying step 2" in warnings[0]
    ck.close()
