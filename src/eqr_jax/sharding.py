"""Device meshes and shardings, shared by training and evaluation (docs/training.md, "Devices").

One mesh axis, ``data``: batches (and the ACT carry) are split along it, parameters, optimiser
state and EMA are replicated. The same code runs on one CPU, one GPU or a multi-host slice: the
host loops hand over *process-local* rows and `to_global` assembles the global arrays.
Room for model parallelism: add an ``fsdp``/``model`` axis in `make_mesh` and give the parameter
leaves of `train_state_shardings` a non-trivial spec.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eqr_jax.config import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: every device of every process)."""
    devs = np.asarray(jax.devices() if devices is None else list(devices)).reshape(-1)
    return Mesh(devs, (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Rows split along ``data``; ``stacked`` batches have a leading (steps) axis first."""
    return NamedSharding(mesh, P(None, DATA_AXIS) if stacked else P(DATA_AXIS))


def train_state_shardings(state, mesh: Mesh):
    """Shardings for a training state (a NamedTuple with a ``carry`` field, e.g.
    `eqr_jax.training.TrainState`): everything replicated but the ACT carry, split on its rows."""
    repl, data = replicated(mesh), batch_sharding(mesh)
    tree = jax.tree_util.tree_map(lambda _: repl, state._replace(carry=None))
    return tree._replace(carry=jax.tree_util.tree_map(lambda _: data, state.carry))


def abstract(tree, sharding):
    """`jax.ShapeDtypeStruct`s of ``tree`` (arrays or structs) carrying ``sharding``: one
    sharding for every leaf, or a tree of them matching ``tree`` (a restore target, or the
    abstract arguments of an ahead-of-time compilation)."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), tree, sharding)


def check_divisible(rows: int, mesh: Mesh, what: str) -> None:
    """Raise `ConfigError` (a ValueError) unless ``rows`` split evenly over the mesh's devices."""
    n = mesh.devices.size
    if rows % n:
        raise ConfigError(f"{what}={rows} is not divisible by the {n} devices of the mesh")


def to_global(batch: Mapping[str, Any], sharding: NamedSharding) -> dict:
    """Process-local numpy rows -> global jax.Arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def fetch(tree):
    """Global arrays -> host NumPy, the same full arrays on every process.

    The one place where evaluation brings per-row results back to the host. With several
    processes each holds only its own rows: arrays split across processes are gathered
    (`multihost_utils.process_allgather`, a collective every process enters, in the same order,
    because all of them evaluate the same batches); replicated ones are read locally.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(one, tree)


# ----------------------------------------------------------------------------------------------
# Multi-process launch

# The launch settings `initialize_distributed` reads when no flag gives them.
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _cluster_launch() -> str | None:
    """The multi-process launcher JAX can configure itself from, when one is evident from the
    environment (no network probe): SLURM or Open MPI with several tasks, a multi-host TPU slice
    (GKE), or ``EQR_DISTRIBUTED=1`` (anything JAX detects: Cloud TPU VMs, k8s, ...)."""
    env = os.environ
    if env.get("EQR_DISTRIBUTED", "") not in ("", "0"):
        return "EQR_DISTRIBUTED"
    if int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) > 1 and \
            "SLURM_PROCID" in env:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU slice"
    return None


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-process run before JAX touches a device; returns True if one was joined.

    The settings come from the arguments (the ``--coordinator`` / ``--num-processes`` /
    ``--process-id`` flags), else from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``; what is still unset JAX detects itself (TPU pods, SLURM, Open MPI).
    Without any of them, JAX's own cluster detection runs when a cluster launch is evident
    (`_cluster_launch`); otherwise this is a single-process run and nothing happens. On CPU the
    cross-process collectives are gloo's. Raises `ConfigError` for malformed settings.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    try:
        if num_processes is None and env.get("JAX_NUM_PROCESSES"):
            num_processes = int(env["JAX_NUM_PROCESSES"])
        if process_id is None and env.get("JAX_PROCESS_ID"):
            process_id = int(env["JAX_PROCESS_ID"])
    except ValueError as e:
        raise ConfigError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers ({e})") from None
    explicit = (coordinator, num_processes, process_id) != (None, None, None)
    if not explicit and _cluster_launch() is None:
        return False
    if jax.distributed.is_initialized():
        return True
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and \
            not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id {process_id} is outside 0..{num_processes - 1}")
    if coordinator is not None and ":" not in coordinator:
        raise ConfigError(f"--coordinator {coordinator!r} must be HOST:PORT")
    try:
        # Only the CPU client reads this; GPU and TPU use NCCL / ICI.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a JAX without the option: its default
        pass
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except ValueError as e:  # a setting JAX could neither read nor detect
        raise ConfigError(
            f"cannot join the multi-process run: {e} (give --coordinator HOST:PORT, "
            "--num-processes N and --process-id I, or JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID)") from None
    return True


def sync(name: str) -> None:
    """A barrier every process enters (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(flags) -> np.ndarray:
    """Each process's 1-D bool vector ``flags`` -> their AND over processes (a collective every
    process enters with the same length; identity with one process)."""
    flags = np.asarray(flags, bool).reshape(-1)
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(flags.astype(np.int32))
    return np.asarray(gathered).reshape(jax.process_count(), -1).min(axis=0).astype(bool)
