"""Ahead-of-time compilation of the programs a run executes, for a target it does not run on
(docs/accelerators.md): ``eqr plan``, ``eqr train --dry-run --target T`` and
``eqr eval --dry-run --target T``.

The programs are the project's own jitted functions with the arguments the real run passes,
as abstract values carrying the real shardings: the train step of the run's
`eqr_jax.train_program.TrainProgram` (the one `training.train` calls: its shardings, donation and
``steps_per_call``), the batched
evaluation loop `evaluation.core.evaluate_copies` and the streaming pool
`evaluation.stream.stream_jobs`. Each is lowered and compiled for the target's devices
(`jit(...).lower(...).compile()`); `compiled.memory_analysis()` gives the memory per device,
`compiled.as_text()` the collectives. A program that does not fit is not an error here: the
compiler's RESOURCE_EXHAUSTED message becomes a `Compiled` with ``fits=False``.

`max_rows_that_fit` searches the largest batch that fits by compiling (interpolation between
the largest size that fit and the smallest that did not, over multiples of the device count),
as MaxText's estimator does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from eqr_jax import sharding as sharding_lib
from eqr_jax.config import EvalConfig, RunConfig
from eqr_jax.targets import quiet_libtpu

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
# "... HLO temporaries (38.92G) exceeds available HBM (15.75G)" and similar.
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|bytes|B)?\b")
# XLA writes sizes in binary units ("15.75G" of a 16 GiB v5e chip).
_UNIT = {"": 1, "B": 1, "b": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


@dataclasses.dataclass
class Compiled:
    """What one compilation says about a program on one device of the target (bytes)."""

    fits: bool
    compile_s: float
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    code: int = 0
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> [count, bytes]
    error: str = ""  # the compiler's message when it did not fit
    hlo_sha: str = ""  # of the lowered program (to tell two lowerings are the same program)

    @property
    def total(self) -> int:
        """Peak bytes per device: arguments + outputs - aliased (donated) + temporaries + code
        (MaxText's sum; the compiler's own total when it refused the program)."""
        if not self.fits and self.error:
            return self.reported_need() or 0
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def reported_need(self) -> int | None:
        """Bytes the compiler said it needed in its out-of-memory message (its first size)."""
        m = re.search(r"\((\d+(?:\.\d+)?)([KMGT])\)", self.error) or _SIZE.search(self.error)
        if not m:
            return None
        return int(float(m.group(1)) * _UNIT.get((m.group(2) or "")[:1], 1))

    def reported_hbm(self) -> int | None:
        """The available HBM the compiler named in its out-of-memory message."""
        m = re.search(r"available HBM \((\d+(?:\.\d+)?)([KMGT])\)", self.error)
        return int(float(m.group(1)) * _UNIT[m.group(2)]) if m else None


def collectives(hlo_text: str) -> dict[str, list[int]]:
    """{kind: [ops, result bytes]} of the collective ops in an HLO module's text (an op inside
    a loop body is counted once)."""
    out: dict[str, list[int]] = {}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m or "-done(" in line:
            continue
        size = sum(_DTYPE_BYTES[dt] * math.prod(int(v) for v in dims.split(",") if v)
                   for dt, dims in _SHAPE.findall(m.group(1)))
        entry = out.setdefault(m.group(2), [0, 0])
        entry[0] += 1
        entry[1] += size
    return out


def lowered_sha(fn, *args, **kwargs) -> str:
    """A fingerprint of the lowered (not compiled) program: equal for the same program."""
    return hashlib.sha256(fn.lower(*args, **kwargs).as_text().encode()).hexdigest()[:16]


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "exceeds available" in text or "Out of memory" in text


def compile_program(fn, *args, memory_limit: int | None = None, verbose: bool = False,
                    **kwargs) -> Compiled:
    """Lower and compile the jitted ``fn`` for abstract ``args`` (whose shardings name the
    target's devices). ``memory_limit``: bytes per device beyond which it does not fit (the
    TPU compiler enforces its own; CPU targets use this)."""
    t0 = time.perf_counter()
    with quiet_libtpu(verbose):
        lowered = fn.lower(*args, **kwargs)
        sha = hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - only the out-of-memory refusal is an answer
            if not _is_oom(e):
                raise
            msg = " ".join(str(e).split())
            return Compiled(False, time.perf_counter() - t0, error=msg[:600], hlo_sha=sha)
    dt = time.perf_counter() - t0
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without it: no memory figures
        mem = None
    get = lambda name: int(getattr(mem, name, 0) or 0) if mem is not None else 0
    try:
        coll = collectives(compiled.as_text())
    except Exception:  # noqa: BLE001 - a backend without HLO text: no collective count
        coll = {}
    out = Compiled(True, dt, get("argument_size_in_bytes"), get("output_size_in_bytes"),
                   get("alias_size_in_bytes"), get("temp_size_in_bytes"),
                   get("generated_code_size_in_bytes"), coll, hlo_sha=sha)
    if memory_limit is not None and out.total > memory_limit:
        out.fits = False
    return out


# ----------------------------------------------------------------------------------------------
# The programs


def train_program(cfg: RunConfig, mesh: Mesh, total_steps: int = 1) -> tuple[Callable, tuple]:
    """The jitted train step `training.train` calls first (``steps_per_call`` steps, at most
    ``total_steps``) and its abstract arguments (the sharded `TrainState` and a stacked global
    batch): `eqr_jax.train_program.make_train_program`'s, the program the run executes."""
    from eqr_jax.train_program import make_train_program

    program = make_train_program(cfg, total_steps, mesh)
    n = program.first_call_steps()
    return program.step(n), program.abstract_args(n)


def eval_program(cfg: RunConfig, eval_cfg: EvalConfig, mesh: Mesh, *, batch: int, depth: int,
                 breadth: int, copies: int | None = None, stream: bool = False,
                 slots: int | None = None) -> tuple[Callable, tuple, dict]:
    """One call of the evaluation loop an `Evaluator` with ``eval_cfg`` makes on ``mesh``:
    the batched `core.evaluate_copies` on ``copies`` (default: `copies_per_call`) copies of a
    ``batch``-row batch, or with ``stream`` one `stream_jobs` call of a pool of ``slots``
    (default as `StreamRunner`) fed one batch's ``batch x breadth`` jobs. Returns (jitted
    function, positional abstract arguments, keyword arguments)."""
    from eqr_jax.evaluation import core
    from eqr_jax.evaluation.evaluator import Evaluator, copies_per_call
    from eqr_jax.evaluation.stream import empty_pool, stream_jobs
    from eqr_jax.model import EqRModel

    model = EqRModel(cfg.model)
    ev = Evaluator(model, dataclasses.replace(eval_cfg, stream=stream), mesh=mesh)
    c, d, N = ev.cfg, mesh.devices.size, cfg.model.seq_len
    repl = sharding_lib.replicated(mesh)
    params = sharding_lib.abstract(jax.eval_shape(model.init, jax.random.PRNGKey(0)), repl)
    stop = sharding_lib.abstract(core.stopping(c.halt, c.convergence_metric, c.convergence_tol), repl)
    window, points = int(c.convergence_window), int(c.trace_points)
    i32 = lambda *shape: np.zeros(shape, np.int32)
    if not stream:
        rows = ev.batch_sharding(batch)
        inputs = sharding_lib.abstract(i32(batch, N), rows)
        mask = sharding_lib.abstract(np.zeros((batch,), bool), rows)
        copies = copies or copies_per_call(breadth, batch, c.max_rows)
        seed = sharding_lib.abstract(i32(), repl)
        args = (ev.model, params, inputs, inputs, mask, seed, seed,
                sharding_lib.abstract(i32(copies), repl), breadth, depth, stop)
        return core.evaluate_copies, args, {"window": window, "trace_points": points}
    jobs = batch * breadth
    if slots is None:
        slots = c.stream_slots or jobs
        if not c.stream_slots and c.max_rows:
            slots = min(slots, c.max_rows)
    slots = int(math.ceil(max(slots, 1) / d) * d)
    # The pool's structure from `empty_pool` itself, one slot per device, widened to `slots`.
    small = empty_pool(ev.model, d, window)
    pool = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(
        (slots,) + a.shape[1:], a.dtype, sharding=sharding_lib.batch_sharding(mesh)), small)
    per = max(1, math.ceil(jobs / d))
    split = sharding_lib.batch_sharding(mesh)
    args = (ev.model, mesh, params, pool, sharding_lib.abstract(i32(batch, N), repl),
            sharding_lib.abstract(i32(batch, N), repl), sharding_lib.abstract(i32(d * per), split),
            sharding_lib.abstract(i32(d * per), split), sharding_lib.abstract(i32(d), split), sharding_lib.abstract(i32(d), split),
            0, int(c.seed), depth, stop, True)
    return stream_jobs, args, {"window": window, "trace_points": points}


# ----------------------------------------------------------------------------------------------
# The largest size that fits


def max_rows_that_fit(compile_at: Callable[[int], Compiled], unit: int, start: int,
                      first: Compiled | None = None, limit: int | None = None,
                      max_compiles: int = 8, upper: int | None = None) -> dict[str, Any]:
    """The largest multiple of ``unit`` for which ``compile_at(size)`` fits.

    Memory per device is close to affine in the rows, so the next size is where the line
    through the largest size known to fit and the smallest known not to (before a failure: the
    last two that fit; with one point: through the origin) meets ``limit`` (bytes per device),
    kept strictly inside that bracket; a bisection step when the line says nothing useful or
    two answers in a row fell on the same side. Stops when they are one ``unit`` apart, at ``upper`` (a cap), or after
    ``max_compiles`` compilations (the answer is then the bracket found so far).

    Returns ``{"largest": size or 0, "largest_compiled": Compiled, "smallest_failing": size or
    None, "compiles": [(size, fits, total bytes)], "exact": bracket closed}``."""
    lo, hi = 0, None
    lo_c = hi_c = None
    tried: list[tuple[int, bool, int]] = []
    size, c = start, first
    for _ in range(max_compiles + (first is not None)):
        if c is None:
            c = compile_at(size)
        tried.append((size, c.fits, c.total))
        if c.fits and size > lo:
            lo, lo_c = size, c
        elif not c.fits and (hi is None or size < hi):
            hi, hi_c = size, c
        if (hi is not None and hi - lo <= unit) or (upper is not None and lo >= upper):
            break
        # The line through the bracket's ends (regula falsi); before a failure, through the
        # last two sizes that fit.
        if hi_c is None:
            ends = [(s, t) for s, ok, t in tried if ok and t][-2:]
        else:
            ends = [(lo, lo_c.total)] if lo_c is not None else []
            ends += [(hi, hi_c.total)] if hi_c.total else []
        # Two answers on the same side in a row: the line is not closing the bracket from the
        # other side (curvature), so bisect once (the Illinois idea).
        stalled = len(tried) >= 3 and hi is not None and tried[-1][1] == tried[-2][1]
        size = _next_size(lo, hi, [] if stalled else ends, limit, unit, upper)
        if size is None or any(s == size for s, _, _ in tried):
            break
        c = None
    return {"largest": lo, "largest_compiled": lo_c, "smallest_failing": hi, "compiles": tried,
            "exact": hi is not None and hi - lo <= unit}


def _next_size(lo: int, hi: int | None, points, limit, unit: int, upper: int | None):
    guess = None
    if limit and len(points) >= 2:
        (s0, m0), (s1, m1) = sorted(points[-2:])
        if s1 != s0 and m1 > m0:
            slope = (m1 - m0) / (s1 - s0)
            guess = s1 + (limit - m1) / slope
    elif limit and len(points) == 1 and points[0][0] and points[0][1]:
        guess = points[0][0] * limit / points[0][1]  # through the origin: an under-estimate
    if guess is None:
        guess = lo * 2 if hi is None else (lo + hi) / 2
    if hi is None:
        guess = max(guess, lo + unit)
    size = max(unit, int(guess // unit) * unit)
    if hi is not None:
        size = min(max(size, lo + unit), hi - unit)
    if upper is not None:
        size = min(size, upper)
    return size if size > lo and (hi is None or size < hi) else None
