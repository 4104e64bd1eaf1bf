"""Which JAX backends to start: keep libtpu quiet on machines without TPU chips.

The ``test`` and ``tpu`` extras install libtpu (for deviceless TPU compilation, ``eqr plan``).
With libtpu present JAX tries to start a TPU backend in every process; on a machine without TPU
chips libtpu then prints several lines of errors (host bounds, worker hostnames) before falling
back to the CPU, which reads as a broken install. Where no TPU chip is attached, no GPU plugin is
installed and the user chose no platform, `quiet_absent_tpu` selects the CPU backend before JAX
starts any. On a TPU VM (chips on the PCI bus, or the TPU environment variables set) and with a
GPU plugin nothing changes: JAX picks its backends as usual. Deviceless compilation for a TPU
topology loads libtpu itself and is unaffected.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import sys

# The PCI vendor id of Google (TPU chips), as JAX's own hardware probe reads it.
GOOGLE_PCI_VENDOR = "0x1ae0"
# Set on TPU VMs / by users who point libtpu at a topology themselves.
# (Not TPU_SKIP_MDS_QUERY: `import jax` itself sets it on machines without chips.)
TPU_ENV_VARS = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_HOSTNAMES", "JAX_FORCE_TPU_INIT")


# TPU device files (v2-v4: /dev/accel*, v5e and later: VFIO groups): a container may see them
# without /sys/bus/pci.
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


def tpu_chips_attached(pci_root: str = "/sys/bus/pci/devices",
                       device_globs: tuple[str, ...] = TPU_DEVICE_GLOBS) -> bool:
    """True when a Google (TPU) device is on the PCI bus, a TPU device file exists, or the TPU
    environment is set: then JAX is left to choose."""
    if any(v in os.environ for v in TPU_ENV_VARS):
        return True
    if any(glob.glob(pattern) for pattern in device_globs):
        return True
    for path in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(path) as f:
                if f.read().strip().lower() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def gpu_plugin_installed() -> bool:
    """True when a JAX GPU plugin (CUDA / ROCm) is installed: then JAX chooses as it does."""
    try:
        if list(importlib.metadata.entry_points(group="jax_plugins")):
            return True
    except Exception:  # a broken distribution's metadata must not stop the import
        pass
    return importlib.util.find_spec("jax_plugins") is not None


def quiet_absent_tpu(*, pci_root: str = "/sys/bus/pci/devices") -> bool:
    """Select the CPU backend when nothing but libtpu could claim another one.

    Acts only when ``JAX_PLATFORMS`` is unset, no TPU chip is attached, no GPU plugin is
    installed and JAX has not started a backend yet. Returns True when it chose the CPU.
    """
    if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME"):
        return False
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        return False  # without libtpu JAX tries no TPU backend: nothing to quiet
    if tpu_chips_attached(pci_root) or gpu_plugin_installed():
        return False
    if "jax" in sys.modules:
        # Too late for the environment variable; still in time while no backend is running
        # (JAX's own probe for that is private: if it moved, leave JAX to choose).
        try:
            import jax
            from jax._src import xla_bridge

            if xla_bridge.backends_are_initialized() or jax.config.jax_platforms:
                return False
            jax.config.update("jax_platforms", "cpu")
        except Exception:
            return False
    # Also for the processes this one starts (workers, subprocess tests), as JAX would decide.
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True
