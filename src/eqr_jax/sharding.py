"""Device meshes and shardings, shared by training and evaluation (docs/training.md, "Devices").

One mesh axis, ``data``: batches (and the ACT carry) are split along it, parameters, optimiser
state and EMA are replicated. The same code runs on one CPU, one GPU or a multi-host slice: the
host loops hand over *process-local* rows and `to_global` assembles the global arrays.
Room for model parallelism: add an ``fsdp``/``model`` axis in `make_mesh` and give the parameter
leaves of `train_state_shardings` a non-trivial spec.
"""

from __future__ import annotations

import math
import os
import sys
import threading
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
                           process_id: int | None = None, timeout_s: float | None = None,
                           prog: str = "eqr") -> bool:
    """Join a multi-process run before JAX touches a device; returns True if one was joined.

    The settings come from the arguments (the ``--coordinator`` / ``--num-processes`` /
    ``--process-id`` flags), else from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``; what is still unset JAX detects itself (TPU pods, SLURM, Open MPI).
    Without any of them, JAX's own cluster detection runs when a cluster launch is evident
    (`_cluster_launch`); otherwise this is a single-process run and nothing happens. On CPU the
    cross-process collectives are gloo's. Raises `ConfigError` for malformed settings.

    ``timeout_s`` (default: ``EQR_DISTRIBUTED_TIMEOUT``, else `DEFAULT_DISTRIBUTED_TIMEOUT_S`)
    bounds the wait for every process to join, the heartbeat and shutdown timeouts (at least
    JAX's defaults) and the project's own barriers (`barrier`, `exchange`). When the processes
    have not all joined by then, this process prints one line ``PROG: ...`` naming who is missing
    and exits with status 2 (JAX itself would abort the process with a C++ stack trace).
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
    global _timeout_s
    _timeout_s = None  # this call's setting, not an earlier one's
    _timeout_s = distributed_timeout(timeout_s)
    joined = _join_watchdog(_timeout_s, coordinator, num_processes, process_id, prog)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **_timeout_kwargs(_timeout_s))
    except ValueError as e:  # a setting JAX could neither read nor detect
        raise ConfigError(
            f"cannot join the multi-process run: {e} (give --coordinator HOST:PORT, "
            "--num-processes N and --process-id I, or JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID)") from None
    finally:
        joined.set()
    return True


# Seconds a process waits for its peers: to join, at the project's barriers and exchanges.
DISTRIBUTED_TIMEOUT_ENV = "EQR_DISTRIBUTED_TIMEOUT"
DEFAULT_DISTRIBUTED_TIMEOUT_S = 300  # JAX's own initialization_timeout
_timeout_s: float | None = None  # settled by initialize_distributed


def distributed_timeout(value: float | str | None = None) -> float:
    """The multi-process timeout in seconds: ``value`` (``--distributed-timeout``), else the
    one `initialize_distributed` settled on, else ``EQR_DISTRIBUTED_TIMEOUT``, else
    `DEFAULT_DISTRIBUTED_TIMEOUT_S`. Raises `ConfigError` for a value that is not a positive
    number."""
    where = "--distributed-timeout"
    if value is None and _timeout_s is not None:
        return _timeout_s
    if value is None and os.environ.get(DISTRIBUTED_TIMEOUT_ENV, "").strip():
        value, where = os.environ[DISTRIBUTED_TIMEOUT_ENV].strip(), DISTRIBUTED_TIMEOUT_ENV
    if value is None:
        return float(DEFAULT_DISTRIBUTED_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{where} must be a positive number of seconds, got {value!r}")
    return seconds


def _timeout_kwargs(timeout_s: float) -> dict[str, int]:
    """`jax.distributed.initialize`'s timeout arguments for ``timeout_s``, those this JAX has.
    JAX's own join deadline is left later than `_join_watchdog`'s, so that the watchdog's one
    line, not JAX's abort, reports a missing peer; the heartbeat and shutdown timeouts never
    drop below JAX's defaults (a loaded machine is slow, not dead)."""
    import inspect

    t = int(math.ceil(timeout_s))
    wanted = {"initialization_timeout": 2 * t + 30, "heartbeat_timeout_seconds": max(100, t),
              "shutdown_timeout_seconds": max(300, t)}
    params = inspect.signature(jax.distributed.initialize).parameters
    return {k: v for k, v in wanted.items() if k in params}


def _join_watchdog(timeout_s: float, coordinator: str | None, num_processes: int | None,
                   process_id: int | None, prog: str) -> threading.Event:
    """An event to set once `jax.distributed.initialize` returned; unless it is set within
    ``timeout_s``, print one line naming the missing peer(s) and end the process with status
    2. (JAX's client connects with the GIL released; on its own deadline it aborts with a C++
    stack trace, and its error callback cannot be replaced by a Python one that survives.)"""
    joined = threading.Event()
    n, me = num_processes, process_id
    where = f"the coordinator at {coordinator}" if coordinator else "the coordinator"
    t = f"{timeout_s:g} s"
    if n == 2 and me is not None:
        who = (f"process 1 of 2 did not join within {t} ({where}, this is process 0)" if me == 0
               else f"process 0 of 2 ({where}) did not answer within {t}")
    else:
        who = (f"not all of the {n or 'expected'} processes joined within {t} ({where}; this "
               f"is process {me if me is not None else '?'})")
    message = (f"{prog}: {who}; start every process with the same --coordinator and "
               "--num-processes and its own --process-id, or wait longer with "
               f"--distributed-timeout SECONDS / {DISTRIBUTED_TIMEOUT_ENV}\n")

    def watch():
        if not joined.wait(timeout_s):
            sys.stderr.write(message)
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(2)  # atexit would wait on the half-joined coordination service

    threading.Thread(target=watch, name="eqr-join-watchdog", daemon=True).start()
    return joined


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


class PeerTimeoutError(ConfigError):
    """A peer process did not reach a barrier or exchange within the distributed timeout."""


def _coordination_client():
    """The coordination service's client of `jax.distributed` (its key-value store and
    barriers need no compiled program and no gloo context)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialised")
    return client


_exchange_ids = iter(range(1 << 62))
_barrier_ids = iter(range(1 << 62))


def exchange(value: str, what: str, timeout_s: float | None = None) -> list[str]:
    """Every process's ``value`` (a string), in process order: each process publishes its own
    in the coordination service's key-value store and reads the others'. Every process calls
    it in the same order (the keys count the calls); identity with one process.

    ``what`` names the occasion in the error: `PeerTimeoutError` when a peer has not published
    within ``timeout_s`` (default: `distributed_timeout`)."""
    pc = jax.process_count()
    if pc == 1:
        return [value]
    client, pi = _coordination_client(), jax.process_index()
    timeout = distributed_timeout(timeout_s)
    key = f"eqr/exchange/{next(_exchange_ids)}"
    client.key_value_set(f"{key}/{pi}", value)
    out = []
    for i in range(pc):
        if i == pi:
            out.append(value)
            continue
        try:
            out.append(client.blocking_key_value_get(f"{key}/{i}", int(timeout * 1000)))
        except Exception as e:  # JaxRuntimeError: DEADLINE_EXCEEDED, or the service is gone
            raise PeerTimeoutError(
                f"process {i} of {pc} did not reach {what} within {timeout:g} s "
                f"({str(e).splitlines()[0][:120]}); raise --distributed-timeout / "
                f"{DISTRIBUTED_TIMEOUT_ENV} if the processes are slow rather than stuck") from None
    return out


def compile_together(fn, args: tuple, name: str, **kwargs) -> None:
    """With several processes, compile the jitted ``fn`` for ``args`` / ``kwargs`` ahead of its
    first call (the call then finds the executable in jit's cache) and wait at a
    coordination-service `barrier` until every process has: the first call's collectives then
    start together. Gloo (CPU) gives a peer a fixed 30 s to show up at a collective, and one
    process's compilation may take that much longer than another's on a loaded machine; the
    barrier's timeout is the configurable `distributed_timeout`. Nothing with one process."""
    if jax.process_count() == 1:
        return
    fn.lower(*args, **kwargs).compile()
    barrier(f"compiled:{name}")


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Wait until every process has reached the barrier ``name`` (unique per occasion), at
    most ``timeout_s`` (default: `distributed_timeout`), through the coordination service: no
    device collective, so no gloo timeout applies. Raises `PeerTimeoutError`; no-op with one
    process."""
    if jax.process_count() == 1:
        return
    timeout = distributed_timeout(timeout_s)
    try:
        # Numbered: every process passes the same barriers in the same order.
        _coordination_client().wait_at_barrier(f"eqr/{name}/{next(_barrier_ids)}",
                                               int(timeout * 1000))
    except Exception as e:
        raise PeerTimeoutError(
            f"not every one of the {jax.process_count()} processes reached {name} within "
            f"{timeout:g} s ({str(e).splitlines()[0][:120]}); raise --distributed-timeout / "
            f"{DISTRIBUTED_TIMEOUT_ENV} if the processes are slow rather than stuck") from None
