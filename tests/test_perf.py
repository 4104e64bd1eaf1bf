"""Live performance scalars (`eqr_jax.perf`) and the profiler window's boundaries
(`eqr_jax.profiling`), without training: the run-level checks (a traced call, the logged
TFLOP/s and MFU under an injected clock) are in test_training.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import micro_model, replace
from eqr_jax import flops, perf, profiling
from eqr_jax.config import ConfigError, TrainConfig, preset
from eqr_jax.plan import flops_per_step


def test_peak_table_lookup_by_device_kind():
    assert perf.peak_flops("TPU v5 lite") == 197e12
    assert perf.peak_flops("TPU v5") == 459e12  # v5p: an exact match, not v5e's prefix
    assert perf.peak_flops("TPU v4") == 275e12 and perf.peak_flops("TPU v6 lite") == 918e12
    assert perf.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert perf.peak_flops("NVIDIA H100 PCIe") == 756e12  # the longer key wins
    assert perf.peak_flops("NVIDIA H200") == 989e12
    assert perf.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    for kind in ("cpu", "TPU v7x", "NVIDIA GeForce RTX 4090"):
        assert perf.peak_flops(kind) is None, kind


def test_window_scalars_are_flops_over_time_and_devices():
    s = perf.window_scalars(3.94e12, 50, 2.5, 8, "TPU v5 lite")
    rate = 3.94e12 * 50 / (2.5 * 8)
    assert s == {"perf/tflops_per_device": pytest.approx(rate / 1e12),
                 "perf/mfu": pytest.approx(rate / 197e12)}
    assert perf.window_scalars(3.94e12, 50, 2.5, 8, "cpu") == {
        "perf/tflops_per_device": pytest.approx(rate / 1e12)}  # no peak: no MFU
    assert perf.window_scalars(1e9, 0, 1.0, 1, "cpu") == {}


def test_train_flops_follow_the_plan_and_count_rematerialisation():
    """The FLOPs the log uses are `eqr plan`'s; per-block remat adds one forward of every
    taped block (the reference's sudoku: truncated gradient, 5 blocks on the tape)."""
    cfg = preset("sudoku")
    base = perf.train_flops_per_step(cfg)
    assert base == flops_per_step(cfg)[0]
    remat = replace(cfg, model={"remat_blocks": True})
    taped = (cfg.model.L_cycles + 1) * cfg.model.L_layers
    extra = cfg.data.global_batch_size * taped * flops.block_flops(cfg.model).total
    assert perf.train_flops_per_step(remat) - base == extra
    assert "recomputed by rematerialisation" in flops_per_step(remat)[1]


def test_eval_scalars_from_executed_row_steps():
    m = micro_model()
    got = perf.eval_scalars(m, {"halting/executed_row_steps": 600, "time_s": 3.0}, 2,
                            "TPU v5 lite")
    rate = 600 * flops.step_flops(m) / (3.0 * 2)
    assert got == {"perf/eval_puzzle_steps_per_s": 200.0,
                   "perf/eval_tflops_per_device": pytest.approx(rate / 1e12),
                   "perf/eval_mfu": pytest.approx(rate / 197e12)}
    assert "perf/eval_mfu" not in perf.eval_scalars(
        m, {"halting/executed_row_steps": 600, "time_s": 3.0}, 2, "cpu")


def test_profile_config_key_parses_and_rejects_bad_windows():
    assert TrainConfig(profile="20:2").profile_window == (20, 2)
    assert TrainConfig(profile="7").profile_window == (7, 1)
    assert TrainConfig().profile_window is None
    for bad in ("x", "3:0", "-1:2", "1:2:3"):
        with pytest.raises(ConfigError, match="train.profile must be START"):
            TrainConfig(profile=bad)


class _FakeProfiler:
    def __init__(self, monkeypatch):
        import jax

        self.events: list = []
        monkeypatch.setattr(jax.profiler, "start_trace", lambda d: self.events.append("start"))
        monkeypatch.setattr(jax.profiler, "stop_trace", lambda: self.events.append("stop"))


@pytest.mark.parametrize("start, calls, boundaries, traced", [
    (20, 2, range(0, 60, 10), [20, 30]),   # on the boundaries: calls starting at 20 and 30
    (25, 1, range(0, 60, 10), [30]),       # inside a call: the next boundary
    (50, 3, range(0, 60, 10), [50]),       # the run ends inside the window: close() stops it
    (90, 1, range(0, 60, 10), []),         # never reached
])
def test_window_falls_on_call_boundaries(monkeypatch, tmp_path, start, calls, boundaries,
                                         traced):
    fake = _FakeProfiler(monkeypatch)
    w = profiling.ProfileWindow(start, calls, 10, tmp_path / "tb")
    for step in boundaries:
        w.run(step, None, lambda s: (s, None))
    w.close()
    assert w.traced == traced
    assert fake.events == (["start", "stop"] if traced else [])


def test_window_only_on_process_0_unless_all_processes(monkeypatch, tmp_path):
    fake = _FakeProfiler(monkeypatch)
    for index, every, expected in ((1, False, []), (1, True, [0]), (0, False, [0])):
        w = profiling.ProfileWindow(0, 1, 1, tmp_path, process_index=index,
                                    all_processes=every)
        w.run(0, None, lambda s: (s, None))
        assert w.traced == expected
    assert fake.events == ["start", "stop"] * 2


def test_profile_batches_traces_the_second_batch(monkeypatch, tmp_path):
    fake = _FakeProfiler(monkeypatch)
    seen = []
    for b in profiling.profile_batches(range(4), tmp_path):
        seen.append((b, list(fake.events)))
    assert seen == [(0, []), (1, ["start"]), (2, ["start", "stop"]), (3, ["start", "stop"])]
    fake.events.clear()
    assert list(profiling.profile_batches([7], tmp_path)) == [7]  # one batch: that one
    assert fake.events == ["start", "stop"]


def test_traces_of_a_bucket_run_are_staged_and_uploaded(monkeypatch, gcs_bucket, tmp_path):
    """The profiler writes local files only: with a gs:// log dir it traces into a local
    staging folder, uploaded to the bucket after the window (and after an eval batch)."""
    import jax

    monkeypatch.chdir(tmp_path)
    dirs: list = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: dirs.append(d))

    def stop():  # what the profiler leaves behind: <dir>/plugins/profile/<run id>/<host>...
        trace = Path(dirs[-1], "plugins", "profile", f"run{len(dirs)}", "vm.xplane.pb")
        trace.parent.mkdir(parents=True)
        trace.write_bytes(b"xplane")

    monkeypatch.setattr(jax.profiler, "stop_trace", stop)
    url = gcs_bucket.url("run") + "/tb"
    w = profiling.ProfileWindow(2, 1, 1, url)
    for step in range(4):
        w.run(step, None, lambda s: (s, None))
    assert w.traced == [2] and not dirs[0].startswith("gs:") and not Path(dirs[0]).exists()
    assert [str(p) for p in w.trace_files()] == [f"{url}/plugins/profile/run1/vm.xplane.pb"]
    assert list(profiling.profile_batches(range(3), url)) == [0, 1, 2]
    assert gcs_bucket.objects(url) == ["plugins/profile/run1/vm.xplane.pb",
                                       "plugins/profile/run2/vm.xplane.pb"]
    assert not Path("gs:").exists()
