"""Live performance figures: analytic TFLOP/s per device and MFU (docs/performance.md, "MFU").

The FLOPs are the analytic matmul counts of `eqr_jax.flops`, as ``eqr plan`` and
``eqr train --dry-run`` count them for the configured gradient mode (`train_flops_per_step`);
the time is the wall time of a log window between host syncs the loop already makes. MFU is
that rate over the peak dense bf16 FLOP/s of one device of the kind running it
(`PEAK_BF16_FLOPS`, looked up from ``jax.devices()[0].device_kind``). Where no peak is known
(a CPU, an unlisted GPU) MFU is absent: never a made-up number.
"""

from __future__ import annotations

from typing import Any, Mapping

from eqr_jax.targets import CHIPS

# Peak dense bf16 FLOP/s of ONE JAX device, keyed by its ``device_kind``; the one table of
# the project. TPU generations come from the target table (`eqr_jax.targets.CHIPS`: Cloud TPU
# system-architecture pages; at run time a v4 / v5p chip is one megacore device). The GPUs from
# NVIDIA's datasheets (dense, i.e. without the 2:4 sparsity the headline figures include):
# H100 SXM 989 TFLOP/s (PCIe 756, NVL 835), H200 989, A100 312 (SXM and PCIe).
PEAK_BF16_FLOPS: dict[str, float] = {
    **{chip.name: chip.peak_bf16_flops for chip in CHIPS.values()},
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100": 989e12,  # SXM5 (device_kind "NVIDIA H100 80GB HBM3")
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of ``device_kind`` (None: unknown, e.g. "cpu").

    TPU kinds must match exactly ("TPU v5" is v5p, "TPU v5 lite" v5e); a GPU kind matches the
    longest table key it starts with ("NVIDIA H100 80GB HBM3" -> "NVIDIA H100")."""
    kind = str(device_kind).strip()
    if kind in PEAK_BF16_FLOPS:
        return PEAK_BF16_FLOPS[kind]
    gpus = [k for k in PEAK_BF16_FLOPS if k.startswith("NVIDIA") and kind.startswith(k)]
    return PEAK_BF16_FLOPS[max(gpus, key=len)] if gpus else None


def train_flops_per_step(cfg) -> int:
    """Analytic matmul FLOPs of one optimiser step of ``cfg`` (a `RunConfig`) over its global
    batch, for its gradient mode and rematerialisation, as ``eqr plan`` counts them."""
    from eqr_jax.plan import flops_per_step

    return flops_per_step(cfg)[0]


def window_scalars(flops_per_step: float, steps: int, seconds: float, n_devices: int,
                   device_kind: str) -> dict[str, float]:
    """The performance scalars of one log window: ``steps`` optimiser steps of
    ``flops_per_step`` FLOPs each in ``seconds`` of wall time on ``n_devices`` devices.

    Returns ``{"perf/tflops_per_device": FLOPs / (seconds x n_devices) / 1e12}`` and, when the
    device kind's peak is known, ``"perf/mfu"`` (that rate over the peak); ``{}`` for an empty
    window."""
    if steps <= 0 or seconds <= 0 or n_devices <= 0:
        return {}
    rate = flops_per_step * steps / (seconds * n_devices)
    out = {"perf/tflops_per_device": rate / 1e12}
    peak = peak_flops(device_kind)
    if peak:
        out["perf/mfu"] = rate / peak
    return out


def eval_scalars(model_cfg, metrics: Mapping[str, Any], n_devices: int,
                 device_kind: str) -> dict[str, float]:
    """Throughput of one evaluation setting from its `summarize_setting` ``metrics``: the row
    steps the loops executed (``halting/executed_row_steps``: puzzles x copies x steps, halted
    rows included while they share a call) over ``time_s`` (which includes the first call's
    compilation). ``perf/eval_puzzle_steps_per_s``, ``perf/eval_tflops_per_device`` (one
    reasoning step's analytic FLOPs per row step) and, where the peak is known,
    ``perf/eval_mfu``."""
    from eqr_jax.flops import step_flops

    row_steps, seconds = metrics.get("halting/executed_row_steps", 0), metrics.get("time_s", 0)
    if not row_steps or not seconds or seconds <= 0:
        return {}
    rate = row_steps * step_flops(model_cfg) / (seconds * n_devices)
    out = {"perf/eval_puzzle_steps_per_s": row_steps / seconds,
           "perf/eval_tflops_per_device": rate / 1e12}
    peak = peak_flops(device_kind)
    if peak:
        out["perf/eval_mfu"] = rate / peak
    return out


def eval_lines(results: Mapping[str, Any]) -> list[str]:
    """One console line per setting of an evaluation's results with its `eval_scalars` (the
    setting's ``perf``)."""
    lines = []
    for st in results.get("settings", []):
        m = {**st.get("perf", {}), "time_s": st["metrics"].get("time_s", 0.0)}
        if "perf/eval_puzzle_steps_per_s" not in m:
            continue
        mfu = f", MFU {m['perf/eval_mfu']:.1%}" if "perf/eval_mfu" in m else ""
        lines.append(f"depth {st['depth']} x breadth {st['breadth']}: "
                     f"{m['perf/eval_puzzle_steps_per_s']:,.0f} puzzle-steps/s, "
                     f"{m['perf/eval_tflops_per_device']:.3g} TFLOP/s per device{mfu} "
                     f"({m['time_s']:.1f} s, first call's compilation included)")
    return lines


def device_kind(mesh=None) -> str:
    """The ``device_kind`` of ``mesh``'s first device (default: of ``jax.devices()[0]``); the
    one place the performance scalars read it (tests patch it)."""
    import jax

    return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).device_kind


class RunPerf:
    """The constants of a training run's performance scalars, fixed once at its start (so the
    log hook does no lookups): FLOPs per optimiser step, device count and device kind of
    ``mesh`` (default: every device)."""

    def __init__(self, cfg, mesh=None):
        import jax

        self.flops_per_step = train_flops_per_step(cfg)
        self.n_devices = int(mesh.devices.size if mesh is not None else jax.device_count())
        self.device_kind = device_kind(mesh)

    def scalars(self, steps: int, seconds: float) -> dict[str, float]:
        """`window_scalars` of a window of ``steps`` steps in ``seconds``."""
        return window_scalars(self.flops_per_step, steps, seconds, self.n_devices,
                              self.device_kind)
