"""eqr_jax.platforms: no libtpu noise on machines without TPU chips; TPU VMs left to JAX."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from eqr_jax import platforms

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORM", "TPU_"))}
    env.update(extra)
    return env


def _fake_pci(root, vendors):
    """A stand-in for /sys/bus/pci/devices with one device per vendor id."""
    for i, vendor in enumerate(vendors):
        dev = root / f"0000:00:0{i}.0"
        dev.mkdir(parents=True)
        (dev / "vendor").write_text(vendor + "\n")
    return str(root)


def test_tpu_chip_detection(tmp_path, monkeypatch):
    for name in platforms.TPU_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    plain = _fake_pci(tmp_path / "a", ["0x8086", "0x1af4"])
    assert not platforms.tpu_chips_attached(plain)
    assert platforms.tpu_chips_attached(_fake_pci(tmp_path / "b", ["0x8086", "0x1ae0"]))
    (tmp_path / "accel0").write_text("")  # a TPU device file, seen without the PCI bus
    assert platforms.tpu_chips_attached(plain, device_globs=(str(tmp_path / "accel*"),))
    assert not platforms.tpu_chips_attached(plain, device_globs=(str(tmp_path / "vfio*"),))
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # a TPU VM's environment
    assert platforms.tpu_chips_attached(plain)


def test_leaves_a_tpu_vm_and_a_chosen_platform_alone(tmp_path, monkeypatch):
    pci = _fake_pci(tmp_path / "pci", ["0x1ae0"])
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    for name in platforms.TPU_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    if HAS_LIBTPU:
        assert platforms.quiet_absent_tpu(pci_root=pci) is False  # chips on the bus
        assert "JAX_PLATFORMS" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert platforms.quiet_absent_tpu(pci_root=str(tmp_path)) is False
    assert os.environ["JAX_PLATFORMS"] == "tpu"


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu (test extra) not installed: nothing to quiet")
@pytest.mark.parametrize("order", ["import eqr_jax, jax", "import jax, eqr_jax"])
def test_no_libtpu_noise_without_chips(order):
    # The user chose no platform: before the fix libtpu printed five lines of errors here.
    code = f"{order}; print(jax.devices()[0].platform)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_clean_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cpu"
    assert out.stderr == ""
