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
    """Global arrays -> host NumPy.

    The one place where evaluation brings per-row results back to the host. With several
    processes each holds only its own rows; gathering them (`multihost_utils.process_allgather`)
    belongs here.
    """
    return jax.device_get(tree)


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched multi-process (coordinator env set)."""
    if any(os.environ.get(v) for v in ("JAX_COORDINATOR_ADDRESS", "EQR_DISTRIBUTED")):
        jax.distributed.initialize()
