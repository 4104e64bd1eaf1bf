"""Ahead-of-time plans for TPU slices (`eqr plan`, `eqr train/eval --dry-run --target`;
`eqr_jax.targets`, `eqr_jax.aot`, `eqr_jax.target_plan`): the tiny preset's programs compiled
for a one-host and a multi-host TPU topology through libtpu, on this CPU machine."""

from __future__ import annotations

import json
import re

import pytest

from eqr_jax import aot
from eqr_jax.cli.plan import main as plan_main
from eqr_jax.config import ConfigError
from eqr_jax.targets import libtpu_version, parse_target

needs_libtpu = pytest.mark.skipif(
    libtpu_version() is None,
    reason='libtpu is not installed (pip install -e ".[tpu]"; Linux x86_64 only)')


def _last_lines(text: str) -> tuple[int, str]:
    lines = text.strip().splitlines()
    if lines[-1].startswith(("cheapest configuration that fits", "no configuration tried")):
        lines = lines[:-1]  # the memory options' verdict follows the configured plan's lines
    *_, peak, fits = lines
    m = re.fullmatch(r"peak_bytes_per_chip: (\d+)", peak)
    assert m, peak
    assert fits in ("fits: yes", "fits: no"), fits
    return int(m.group(1)), fits


def test_target_names_map_to_libtpu_topologies():
    cases = {"v5e-8": "v5e:2x4", "v5litepod-16": "v5e:4x4", "v5e-64": "v5e:8x8",
             "v4-8": "v4:2x2x1", "v4-32": "v4:2x2x4", "v5p-16": "v5p:2x2x2",
             "v6e-64": "v6e:8x8", "v5e:2x2": "v5e:2x2", "V6E-8": "v6e:2x4"}
    for name, topo in cases.items():
        assert parse_target(name).topology == topo, name
    assert parse_target("v4-8").num_chips == 4 and parse_target("v5e-8").num_chips == 8
    assert parse_target("cpu:4").cpu_devices == 4
    for bad, why in (("v9-8", "unknown target"), ("v4-7", "must be even"),
                     ("v5e-12", "no standard v5e slice"), ("v5e:2x2x2", "2 dimensions"),
                     ("h100", "GPU targets are not supported"), ("cpu:0", "N >= 1")):
        with pytest.raises(ConfigError, match=why):
            parse_target(bad)


def test_collectives_and_out_of_memory_messages_are_read():
    hlo = """
  %all-reduce.1 = f32[512,512]{1,0} all-reduce(f32[512,512]{1,0} %p), channel_id=1
  %all-reduce-start.2 = (f32[4]{0}, bf16[8]{0}) all-reduce-start(f32[4]{0} %a, bf16[8]{0} %b)
  %all-reduce-done.2 = (f32[4]{0}, bf16[8]{0}) all-reduce-done(%all-reduce-start.2)
  ag = s32[16,2]{1,0} all-gather(s32[2,2]{1,0} %x), dimensions={0}
  %add = f32[] add(f32[] %x, f32[] %y)
"""
    assert aot.collectives(hlo) == {"all-reduce": [2, 512 * 512 * 4 + 16 + 16],
                                    "all-gather": [1, 16 * 2 * 4]}
    c = aot.Compiled(False, 1.0, error="RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total "
                     "memory required for HLO temporaries (38.92G) exceeds available HBM "
                     "(15.75G).")
    assert c.reported_need() == int(38.92 * 2 ** 30) == c.total
    assert c.reported_hbm() == int(15.75 * 2 ** 30)


def test_max_batch_search_brackets_the_largest_fitting_size():
    """An affine memory model (what the compiler reports, nearly): the search finds the exact
    boundary over multiples of the unit in a few compilations."""
    limit, calls = 16e9, []

    def compile_at(rows):
        calls.append(rows)
        need = int(2e8 + 6.5e6 * rows)
        return aot.Compiled(need <= limit, 0.0, temporaries=need) if need <= limit else \
            aot.Compiled(False, 0.0, error=f"needs ({need / 2 ** 30:.2f}G)")

    found = aot.max_rows_that_fit(compile_at, 8, 768, limit=limit, max_compiles=8)
    best = max(r for r in range(8, 10_000, 8) if 2e8 + 6.5e6 * r <= limit)
    assert found["exact"] and found["largest"] == best and found["smallest_failing"] == best + 8
    assert len(calls) <= 6
    calls.clear()  # starting above the boundary (what maze at batch 768 on v5e-8 does)
    found = aot.max_rows_that_fit(compile_at, 8, 8 * best, limit=limit, max_compiles=8)
    assert found["exact"] and found["largest"] == best and len(calls) <= 6
    capped = aot.max_rows_that_fit(compile_at, 1, 4, limit=limit, upper=8)
    assert capped["largest"] == 8 and capped["smallest_failing"] is None


def test_bad_input_is_one_line_exit_2(capsys, monkeypatch):
    for argv, why in ((["--target", "v9-8"], "unknown target"),
                      (["--target", "h200"], "GPU targets are not supported"),
                      (["--target", "v5e-8", "model.no_such_key=1"], "no_such_key"),
                      (["--target", "cpu:64"], "xla_force_host_platform_device_count=64"),
                      (["--target", "v5e-8", "--depth", "0"], "--depth must be >= 1")):
        assert plan_main(["--preset", "tiny", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("eqr plan: ") and why in err, err
    from eqr_jax import targets
    monkeypatch.setattr(targets, "libtpu_version", lambda: None)
    assert plan_main(["--preset", "tiny", "--target", "v5e-8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[tpu]"' in err
    from eqr_jax.cli.train import main as train_main
    assert train_main(["--preset", "tiny", "--target", "v5e-8"]) == 2
    assert "--target applies to --dry-run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def one_host_plan(tmp_path_factory):
    """`eqr plan --preset tiny --target v5e:2x2` at global batch 256, one step per call:
    (printed text, JSON report). Shared: the tests below need its compilations once."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("plan") / "plan.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert plan_main(["--preset", "tiny", "--target", "v5e:2x2", "--no-stream", "--json",
                          str(out), "data.global_batch_size=256", "train.steps_per_call=1"]) == 0
    return buf.getvalue(), json.loads(out.read_text())


@needs_libtpu
def test_plan_tiny_on_one_host_topology(one_host_plan):
    """`eqr plan` on v5e:2x2: the train step and the batched loop compile, with memory,
    collectives, compile time and labelled estimates; the last lines have their format."""
    text, rep = one_host_plan
    peak, fits = _last_lines(text)
    assert fits == "fits: yes"
    assert rep["target"]["devices"] == 4 and rep["target"]["hosts"] == 1
    assert rep["train"]["fits"] and rep["eval"]["fits"] and rep["programs"] == ["train", "eval"]
    assert peak == max(rep["train"]["total"], rep["eval"]["total"]) > 0
    tr = rep["train"]
    assert tr["total"] == (tr["arguments"] + tr["outputs"] - tr["aliased"] + tr["temporaries"]
                           + tr["code"])
    assert tr["aliased"] > 0  # the state is donated
    assert tr["rows_per_device"] == 256 // 4 and tr["steps_per_call"] == 1
    assert tr["collectives"]["all-reduce"][0] >= 1  # the gradient mean over the data axis
    assert rep["eval"]["same_program_at_depths"]
    assert "devices: 4 x tpu (TPU v5 lite), 1 process(es), 64 rows per device" in text
    assert "ESTIMATED at the chip's peak 197 TFLOP/s bf16" in text and "30% MFU" in text
    assert "depth 64 vs 4096: the same program" in text and "libtpu " in text


@needs_libtpu
def test_train_and_eval_dry_run_compile_for_a_multi_host_slice(capsys, tmp_path):
    """v5e:4x4 is 16 chips on 4 hosts: `eqr train --dry-run --target` and `eqr eval --dry-run
    --target` build the mesh over every host's devices in one process."""
    from eqr_jax.cli.eval import main as eval_main
    from eqr_jax.cli.train import main as train_main

    assert train_main(["--preset", "tiny", "--dry-run", "--target", "v5e:4x4", "--no-eval",
                       "--no-stream", "--json", str(tmp_path / "plan.json"),
                       "data.global_batch_size=256", "train.steps_per_call=1"]) == 0
    text = capsys.readouterr().out
    assert _last_lines(text)[1] == "fits: yes"
    assert "16 x TPU v5 lite, 4 host(s)" in text
    assert "global batch 256: 16 rows per device, 64 per host" in text
    rep = json.loads((tmp_path / "plan.json").read_text())
    assert rep["train"]["rows_per_device"] == 16 and rep["target"]["hosts"] == 4
    # (Its HBM temporaries may be 0: at 16 rows per chip the tiny step's scratch fits on chip.)
    assert rep["train"]["total"] > 0 and rep["train"]["aliased"] > 0
    assert eval_main(["--dry-run", "--target", "v5e:4x4", "--preset", "tiny", "--depth", "8",
                      "--breadth", "4"]) == 0
    text = capsys.readouterr().out
    assert _last_lines(text)[1] == "fits: yes"
    assert "batched loop (depth 8, breadth 4, batch 128, 4 copies per call = 512 rows" in text
    assert "streaming pool (512 slots, 32 per device, depth 8)" in text


@needs_libtpu
def test_temporaries_grow_with_the_batch_and_a_huge_batch_does_not_fit(one_host_plan, capsys):
    """Far too large: the compiler's own refusal, reported with its numbers (exit 0); the
    temporaries it names are those of 4096x the rows per chip of the fixture's plan."""
    assert plan_main(["--preset", "tiny", "--target", "v5e:2x2", "--no-eval", "--no-stream",
                      "data.global_batch_size=1048576", "train.steps_per_call=1"]) == 0
    text = capsys.readouterr().out
    peak, fits = _last_lines(text)
    assert fits == "fits: no" and peak > 16 * 2 ** 30
    assert peak > 1000 * one_host_plan[1]["train"]["temporaries"]  # 4096x the rows per chip
    assert "DOES NOT FIT: the compiler needs" in text and "exceeds available HBM" in text


def test_plan_lowers_the_step_train_runs():
    """`aot.train_program` hands out the `TrainProgram`'s own jitted step (the object `train`
    calls, shared by configs that differ only in bookkeeping) with its abstract state and a
    stacked batch carrying the run's shardings; nothing is compiled here."""
    from dataclasses import replace

    from conftest import micro_run

    from eqr_jax.sharding import make_mesh
    from eqr_jax.train_program import make_train_program

    cfg, mesh = micro_run(max_steps=6), make_mesh()
    fn, (state, batch) = aot.train_program(cfg, mesh, 6)
    program = make_train_program(replace(cfg, train=replace(cfg.train, out_dir="elsewhere",
                                                            log_every=7)), 6, mesh)
    assert fn is program.step(3) and state is program.abstract_state
    assert batch["inputs"].shape == (3, 16, cfg.model.seq_len)
    assert batch["inputs"].sharding == program.batch_sharding
    assert state.carry.steps.sharding == program.state_shardings.carry.steps
    assert aot.train_program(cfg, mesh, 2)[1][1]["inputs"].shape[0] == 2  # capped by the total
    assert make_train_program(replace(cfg, train=replace(cfg.train, lr=1e-4)), 6,
                              mesh).step(3) is not fn


def test_plan_tries_the_memory_switches_and_names_the_cheapest_that_fits(monkeypatch):
    """The choice among the memory options, with the compiler replaced by memory figures per
    switch (the real TPU compilations are docs/accelerators.md's table): each option's FLOPs
    count rematerialisation's recomputed forwards, and the last line names the option with the
    fewest FLOPs among those that fit."""
    from eqr_jax import config as C, flops, target_plan

    need = {(False, False): 9e9, (True, False): 6e9, (False, True): 4e9, (True, True): 3e9}
    monkeypatch.setattr(aot, "train_program", lambda cfg, mesh, total: (cfg, ()))
    monkeypatch.setattr(aot, "compile_program", lambda cfg, memory_limit=None, verbose=False: (
        aot.Compiled(fits=need[cfg.model.remat_blocks, cfg.train.remat] <= memory_limit,
                     compile_s=0.0, temporaries=int(need[cfg.model.remat_blocks,
                                                         cfg.train.remat]))))
    monkeypatch.setattr(target_plan, "memory_per_device", lambda target, info: int(5e9))
    cfg = C.apply_overrides(C.preset("tiny"), ["train.grad_mode=full"])
    rep = target_plan.run_plan(cfg, parse_target("cpu:1"), evaluate=False, stream=False)
    rows = {r["name"]: r for r in rep["memory_options"]}
    assert list(rows) == ["as configured", "model.remat_blocks=true", "train.remat=true",
                          "model.remat_blocks=true train.remat=true"]
    assert [r["fits"] for r in rows.values()] == [False, False, True, True]
    m, G = cfg.model, cfg.data.global_batch_size
    taped = cfg.train.unroll_steps * m.blocks_per_step  # the full gradient's tape
    once = G * taped * flops.block_flops(m).total
    assert rows["model.remat_blocks=true"]["extra_flops"] == once
    assert rows["model.remat_blocks=true train.remat=true"]["extra_flops"] == 2 * once
    assert rep["cheapest_fit"] == "train.remat=true" and not rep["fits"]
    text = target_plan.format_report(rep)
    assert text.splitlines()[-1].startswith(
        f"cheapest configuration that fits at global batch {G}: train.remat=true (4,000.0 MB "
        "per chip, +")
    assert _last_lines(text)[1] == "fits: no"
    # Nothing fits: the last line says so, naming what was tried.
    monkeypatch.setattr(target_plan, "memory_per_device", lambda target, info: int(1e9))
    rep = target_plan.run_plan(cfg, parse_target("cpu:1"), evaluate=False, stream=False)
    assert rep["cheapest_fit"] is None
    assert target_plan.format_report(rep).splitlines()[-1].startswith(
        f"no configuration tried fits at global batch {G} (tried: as configured, ")
