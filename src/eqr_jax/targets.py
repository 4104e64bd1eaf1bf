"""Accelerator targets for ahead-of-time ("deviceless") compilation (docs/accelerators.md).

A *target* names the machine a run is planned for: a Cloud TPU slice (``v5e-8``, ``v4-32``,
``v5p-16``, ``v6e-64``), a TPU topology (``v5e:2x4``, ``v4:2x2x2``) or ``cpu:N`` (N host
devices of this process). `target_devices` returns its devices without the hardware: TPU
slices come from libtpu's topology description (`jax.experimental.topologies`), which also says
which host (process index) each chip belongs to, so the mesh of a multi-host slice is built here
in one process exactly as every host of the real slice builds it.

`CHIPS` holds what the compiler does not report: the peak bf16 FLOP/s per chip (for *estimated*
step times) and the HBM per chip (the compiler reports its own figure only when a program does
not fit; see `aot`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile

from eqr_jax.config import ConfigError

GIB = 1 << 30
INSTALL_TPU = 'pip install -e ".[tpu]"'


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip generation."""

    name: str  # libtpu's device_kind
    peak_bf16_flops: float  # per chip, dense bf16 matmul
    hbm_bytes: int  # per chip
    cores_count_in_name: bool  # slice names count TensorCores (v4-8 = 4 chips), not chips
    dims: int  # torus dimensions of the topology string
    usable_bytes: int  # per device, as the compiler states it ("exceeds available HBM (..)")


# Peak bf16 FLOP/s and HBM per chip from the Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e); the usable HBM per device from libtpu
# 0.0.42.1's own out-of-memory messages (benchmarks/results/tpu-plan-cpu-sandbox.json). A
# program that compiles is checked against the latter; a newer libtpu's message replaces it.
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GIB, True, 3, int(15.25 * GIB)),  # per TensorCore
    "v5e": Chip("TPU v5 lite", 197e12, 16 * GIB, False, 2, int(15.75 * GIB)),
    "v5p": Chip("TPU v5", 459e12, 95 * GIB, True, 3, int(95.74 * GIB)),
    "v6e": Chip("TPU v6 lite", 918e12, 32 * GIB, False, 2, int(31.25 * GIB)),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e"}
# The usual torus shape of a slice with this many chips.
SHAPES = {2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"},
          3: {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4",
              64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16"}}
GPU_NAMES = ("h100", "h200", "a100", "b200", "gpu", "cuda")
GPU_UNSUPPORTED = (
    "GPU targets are not supported: a deviceless CUDA compilation needs jax's CUDA plugin and "
    "the NVIDIA CUDA/cuDNN/NCCL wheels (several GB), which the CPU install does not carry "
    "(docs/accelerators.md, \"GPU targets\"); run `eqr plan` with a TPU or cpu:N target, or "
    "`eqr train --dry-run` on the GPU machine itself")


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed ``--target``: ``platform`` "tpu" with a libtpu ``topology`` and its `Chip`,
    or "cpu" with ``cpu_devices`` host devices."""

    name: str
    platform: str
    topology: str = ""
    chip: Chip | None = None
    family: str = ""
    cpu_devices: int = 0

    @property
    def host_bounds(self) -> dict:
        """libtpu's hosts are 4 chips each for v5e / v6e; an 8-chip slice of those (v5e-8,
        v6e-8) is one VM with all 8 chips."""
        if self.family in ("v5e", "v6e") and self.topology.endswith(":2x4"):
            return {"chips_per_host_bounds": (2, 4, 1)}
        return {}

    @property
    def num_chips(self) -> int:
        if self.platform == "cpu":
            return self.cpu_devices
        n = 1
        for v in self.topology.split(":")[1].split("x"):
            n *= int(v)
        return n


def parse_target(text: str) -> Target:
    """``v5e-8`` / ``v4-32`` (slice names), ``v5e:2x4`` (topologies) or ``cpu:N``.

    Raises `ConfigError` naming the accepted forms."""
    t = text.strip().lower()
    forms = ("expected a TPU slice (v4-8, v5e-8, v5p-8, v6e-8, v5e-64, ...), a topology "
             "(v5e:2x4, v4:2x2x2) or cpu:N")
    if t.startswith(GPU_NAMES):
        raise ConfigError(f"--target {text}: {GPU_UNSUPPORTED}")
    m = re.fullmatch(r"cpu:(\d+)", t)
    if m:
        if int(m.group(1)) < 1:
            raise ConfigError(f"--target {text}: cpu:N needs N >= 1")
        return Target(text, "cpu", cpu_devices=int(m.group(1)))
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", t)
    fam = ALIASES.get(m.group(1), m.group(1)) if m else None
    if fam not in CHIPS:
        raise ConfigError(f"--target {text}: unknown target; {forms}; chips: "
                          f"{', '.join(CHIPS)}")
    chip = CHIPS[fam]
    if m.group(3):
        dims = m.group(3).split("x")
        if len(dims) != chip.dims or min(int(v) for v in dims) < 1:
            raise ConfigError(f"--target {text}: a {fam} topology has {chip.dims} dimensions, "
                              f"e.g. {fam}:{SHAPES[chip.dims][8]}")
        return Target(text, "tpu", f"{fam}:{m.group(3)}", chip, fam)
    n = int(m.group(2))
    chips = n // 2 if chip.cores_count_in_name else n
    if chip.cores_count_in_name and n % 2:
        raise ConfigError(f"--target {text}: {fam}-N counts TensorCores (2 per chip): N must "
                          "be even")
    if chips not in SHAPES[chip.dims]:
        sizes = [k * (2 if chip.cores_count_in_name else 1) for k in SHAPES[chip.dims]]
        raise ConfigError(f"--target {text}: no standard {fam} slice of that size; use one "
                          f"of {', '.join(f'{fam}-{k}' for k in sizes)} or a topology "
                          f"{fam}:AxB{'xC' if chip.dims == 3 else ''}")
    return Target(text, "tpu", f"{fam}:{SHAPES[chip.dims][chips]}", chip, fam)


# libtpu's start-up lines when no TPU is attached (no metadata server, no worker hostnames,
# host bounds): expected in a deviceless compilation, and not the user's concern.
_NOISE = re.compile(r"TPU_WORKER_HOSTNAMES|TPU_ACCELERATOR_TYPE|host bounds|InitGoogle|"
                    r"Source Location Trace|libtpu_init_utils|common_lib\.cc|"
                    r"^\s*$|^\s*(learning|third_party|platforms)/")


@contextlib.contextmanager
def quiet_libtpu(show: bool = False):
    """Hold back libtpu's C++ start-up warnings (written straight to file descriptor 2) and
    replay the other stderr lines afterwards; ``show`` passes everything through."""
    if show:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not _NOISE.search(line):
                    print(line, file=sys.stderr)


def libtpu_version() -> str | None:
    """The installed libtpu's version (None: not installed)."""
    from importlib import metadata

    for dist in ("libtpu", "libtpu-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def target_devices(target: Target, *, verbose: bool = False) -> list:
    """The devices of ``target`` (a flat list in libtpu's / JAX's order).

    TPU targets need libtpu (`ConfigError` with the install command when it is missing); a
    ``cpu:N`` target needs N host devices in this process (``eqr plan`` sets
    ``--xla_force_host_platform_device_count`` before JAX starts)."""
    import jax

    if target.platform == "cpu":
        devs = jax.devices("cpu")
        if len(devs) < target.cpu_devices:
            raise ConfigError(
                f"--target {target.name}: this process has {len(devs)} CPU device(s); start it "
                f"with XLA_FLAGS=--xla_force_host_platform_device_count={target.cpu_devices}")
        return list(devs[:target.cpu_devices])
    if libtpu_version() is None:
        raise ConfigError(f"--target {target.name}: libtpu is not installed; install it with "
                          f"{INSTALL_TPU} (Linux x86_64)")
    from jax.experimental import topologies

    # Without it libtpu waits on the GCE metadata server, which a CPU machine does not have.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Any other JAX process that loaded libtpu holds its lockfile; a deviceless compilation
    # touches no chip, so it need not wait for exclusive use.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    def describe_topology(**kw):
        with quiet_libtpu(verbose):
            return topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                                **kw)

    try:
        try:
            topo = describe_topology(**target.host_bounds)
        except Exception:  # noqa: BLE001 - a libtpu without the option: its own host layout
            if not target.host_bounds:
                raise
            topo = describe_topology()
    except Exception as e:  # libtpu refuses the shape: a user error, one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--target {target.name}: libtpu cannot describe topology "
                          f"{target.topology}: {first}") from None
    return list(topo.devices)


def describe(devices) -> dict:
    """Counts of a device list: devices, chips, hosts (processes), devices per chip/host."""
    chips = {(d.process_index, tuple(getattr(d, "coords", (d.id,)))) for d in devices}
    hosts = {d.process_index for d in devices}
    return {"devices": len(devices), "chips": len(chips), "hosts": len(hosts),
            "devices_per_chip": len(devices) // max(len(chips), 1),
            "device_kind": devices[0].device_kind, "platform": devices[0].platform}


def memory_per_device(target: Target, info: dict) -> int:
    """Memory one device may use: what the compiler allows (`Chip.usable_bytes`; libtpu's
    deviceless v4 lists each of a chip's two TensorCores as a device), or for ``cpu:N`` the
    host's RAM split over the N devices."""
    if target.chip is not None:
        return target.chip.usable_bytes
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 0
    return ram // max(target.cpu_devices, 1)


def peak_flops_per_device(target: Target, info: dict) -> float | None:
    """Peak bf16 FLOP/s of one device (None for CPU targets: no time estimate)."""
    if target.chip is None:
        return None
    return target.chip.peak_bf16_flops / info["devices_per_chip"]
