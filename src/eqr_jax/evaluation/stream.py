"""Streaming evaluation: a fixed pool of slots on device, each running one (puzzle, copy) job;
a slot whose job halts records its result and takes the next queued job inside the jitted loop.

* `stream_jobs` (device): one `lax.while_loop` per device (`jax.shard_map` over the mesh's
  ``data`` axis) that refills free slots from a job queue, steps every slot, and records the
  jobs that halt (by the rule of `core.advance_rows`, the batched loop's) or reach the depth cap;
* `StreamRunner` (host): feeds each batch's jobs to the pool and files the finished jobs' results
  back into per-batch `BatchResult`s, with the interface of `evaluator.BatchedRunner`.

A job draws its keys from (seed, puzzle index in the split, copy) (`core.job_keys`) and counts
its own steps, so its result does not depend on its slot or on when it ran: the streaming
evaluator gives the batched one's per-job results (tests/test_evaluation.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from eqr_jax import sharding as sharding_lib
from eqr_jax.evaluation.aggregate import BatchResult, SettingAccumulator
from eqr_jax.evaluation.core import (ResidualTrace, Rows, Stopping, advance_rows,
                                     convergence_score, empty_trace, fold_step, fresh_rows,
                                     init_rows, job_keys, record_trace, step_rows, stopping)
from eqr_jax.losses import IGNORE_LABEL, sequence_exact
from eqr_jax.model import EqRModel, LatentState, compute_dtype

if TYPE_CHECKING:  # the evaluator imports this module
    from eqr_jax.evaluation.evaluator import Evaluator


class Pool(NamedTuple):
    """The slots of a streaming evaluation, (S, ...) leading axis; a free slot has job -1."""

    rows: Rows
    x: jax.Array  # (S, N, H): the input injection of the slot's puzzle
    labels: jax.Array  # (S, N) int32
    noise_keys: jax.Array  # (S, 2): the job's noise key (`job_keys`)
    job: jax.Array  # (S,) int32: the job's number in the stream, -1: free


class StreamOut(NamedTuple):
    """The jobs that finished during one `stream_jobs` call, per device in finishing order:
    records ``[:done]`` are valid (leading axis O = jobs queued + slots, per device)."""

    job: jax.Array  # (O,) int32: the job's number in the stream
    preds: jax.Array  # (O, N) int32
    n_correct: jax.Array  # (O,) int32
    exact: jax.Array  # (O,) bool
    steps: jax.Array  # (O,) int32
    score: jax.Array  # (O,) float32
    residual: jax.Array  # (O,) float32
    q_halt: jax.Array  # (O,) float32
    done: jax.Array  # (1,) int32: records written
    trace: ResidualTrace  # leaves (1, K)
    iterations: jax.Array  # (1,) int32: loop iterations (each steps every slot)


def empty_pool(model: EqRModel, slots: int, window: int) -> Pool:
    """A pool of ``slots`` free slots as host arrays (place it with the mesh's sharding)."""
    c = model.cfg
    lat = jnp.zeros((slots, c.seq_len, c.hidden_size), compute_dtype(c))
    rows = fresh_rows(LatentState(lat, lat), jnp.zeros((slots, c.seq_len, c.vocab_size),
                                                       jnp.float32), window)
    pool = Pool(rows, lat, jnp.zeros((slots, c.seq_len), jnp.int32),
                jnp.zeros((slots, 2), jnp.uint32), jnp.full((slots,), -1, jnp.int32))
    # Host copies: leaves that share a buffer could not all be donated.
    return jax.tree_util.tree_map(lambda a: np.array(a), pool)


def _stream_local(model: EqRModel, window: int, trace_points: int, params, pool: Pool, inputs,
                  labels, job_rows, job_copies, first_job, num_jobs, first_index, seed, depth,
                  stop: Stopping, drain, min_iterations):
    """One device's streaming loop (see `stream_jobs`); ``first_job``/``num_jobs`` are (1,)."""
    s_slots, q = pool.job.shape[0], job_rows.shape[0]
    o = q + s_slots
    n_tok = labels.shape[1]
    depth = jnp.asarray(depth, jnp.int32)
    first_job, num_jobs = first_job[0], num_jobs[0]
    readout = lambda z: model.readout(params, z)

    def refill(pool: Pool, nxt):
        free = pool.job < 0
        rank = jnp.cumsum(free.astype(jnp.int32)) - 1
        take = free & (nxt + rank < num_jobs)
        j = jnp.clip(nxt + rank, 0, q - 1)
        rows_ = job_rows[j]
        init_keys, noise_keys = job_keys(seed, first_index + rows_, job_copies[j])
        lat = init_rows(model, init_keys)
        fresh = Pool(fresh_rows(lat, readout(lat).logits, window),
                     model.embed(params, inputs[rows_]), labels[rows_], noise_keys,
                     first_job + j)
        pick = lambda n, o_: jnp.where(take.reshape(take.shape + (1,) * (n.ndim - 1)), n, o_)
        return (jax.tree_util.tree_map(pick, fresh, pool),
                nxt + jnp.sum(take.astype(jnp.int32)))

    def cond(c):
        pool, nxt, it = c[0], c[1], c[5]
        return (nxt < num_jobs) | ((drain | (it < min_iterations)) & jnp.any(pool.job >= 0))

    def body(c):
        pool, nxt, out, done, trace, it = c
        refillable = jnp.any(pool.job < 0) & (nxt < num_jobs)
        pool, nxt = jax.lax.cond(refillable, refill, lambda p, n: (p, n), pool, nxt)
        active = pool.job >= 0
        r = pool.rows
        new = step_rows(model, params, r.latents, pool.x, fold_step(pool.noise_keys, r.steps))
        ro = readout(new)
        rows, halts, res = advance_rows(r, new, ro.logits, ro.q_halt, active, stop, window)
        trace = record_trace(trace, r.steps + 1, res, active, depth)
        finished = halts | (active & (rows.steps >= depth))
        pos = jnp.where(finished, done + jnp.cumsum(finished.astype(jnp.int32)) - 1, o)
        n_correct, _, exact = sequence_exact(rows.logits, pool.labels)
        rec = (pool.job, jnp.argmax(rows.logits, -1).astype(jnp.int32), n_correct, exact,
               rows.steps, convergence_score(rows, window), rows.residual, rows.q_halt)
        out = tuple(buf.at[pos].set(v, mode="drop") for buf, v in zip(out, rec))
        pool = pool._replace(rows=rows, job=jnp.where(finished, -1, pool.job))
        return (pool, nxt, out, done + jnp.sum(finished.astype(jnp.int32)), trace, it + 1)

    zeros = lambda dt: jnp.zeros((o,), dt)
    out0 = (jnp.full((o,), -1, jnp.int32), jnp.zeros((o, n_tok), jnp.int32),
            zeros(jnp.int32), zeros(bool), zeros(jnp.int32), zeros(jnp.float32),
            zeros(jnp.float32), zeros(jnp.float32))
    carry = (pool, jnp.int32(0), out0, jnp.int32(0), empty_trace(trace_points), jnp.int32(0))
    pool, _, out, done, trace, it = jax.lax.while_loop(cond, body, carry)
    lead = lambda a: a[None]
    return pool, StreamOut(*out, done=lead(done),
                           trace=jax.tree_util.tree_map(lead, trace), iterations=lead(it))


@functools.partial(jax.jit, static_argnames=("model", "mesh", "window", "trace_points"),
                   donate_argnames=("pool",))
def stream_jobs(model: EqRModel, mesh, params, pool: Pool, inputs, labels, job_rows, job_copies,
                first_job, num_jobs, first_index, seed, depth, stop: Stopping, drain,
                min_iterations=0, *, window: int, trace_points: int) -> tuple[Pool, StreamOut]:
    """Run a queue of jobs through a pool of slots; returns the pool and the finished jobs.

    Each device runs its own pool and its own share of the queue (`jax.shard_map` over the
    mesh's ``data`` axis; D devices). Every iteration refills the free slots with the next
    queued jobs (fresh latents from `job_keys`, counters at 0), takes one step of every slot,
    and records and frees the slots whose job halted by ``stop`` or reached ``depth`` steps.

    Args:
      mesh: static; the pool, the queue and the outputs are split along its ``data`` axis.
      pool: `Pool` with (S, ...) leaves, S a multiple of D (donated): jobs still running from
        an earlier call continue.
      inputs, labels: (B, N) int32, replicated: the puzzles the queued jobs refer to.
      job_rows, job_copies: (D * Q,) int32: each device's Q queued jobs (row of ``inputs``,
        copy number); first_job, num_jobs: (D,) int32: the stream number of each device's
        first queued job and how many of its Q entries are real.
      first_index: int32: the split index of ``inputs`` row 0 (for `job_keys`); seed: int32.
      depth: int32 (traced) step cap; stop: `Stopping`; drain: bool: run until every slot is
        free, else return as soon as the queue is taken (running jobs stay in the pool) and at
        least ``min_iterations`` iterations ran (while any slot runs; int32, traced). A host
        that refills the pool itself every K steps calls with a queue of at most the free
        slots and ``min_iterations=K`` (benchmarks/streaming_eval.py compares the two).
    Returns:
      (pool, `StreamOut` with per-device leading axes concatenated: (D * (Q + S/D), ...)).
    """
    from eqr_jax.sharding import DATA_AXIS

    d = P(DATA_AXIS)
    fn = functools.partial(_stream_local, model, window, trace_points)
    pool_spec = jax.tree_util.tree_map(lambda _: d, pool)
    out_spec = (pool_spec, StreamOut(*([d] * 8), done=d, trace=ResidualTrace(d, d, d),
                                     iterations=d))
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(
        P(), pool_spec, P(), P(), d, d, d, d, P(), P(), P(), P(), P(), P()),
        out_specs=out_spec, check_vma=False)
    return mapped(params, pool, inputs, labels, job_rows, job_copies, first_job, num_jobs,
                  jnp.asarray(first_index, jnp.int32), jnp.asarray(seed, jnp.int32),
                  jnp.asarray(depth, jnp.int32), stop, jnp.asarray(drain),
                  jnp.asarray(min_iterations, jnp.int32))

# ----------------------------------------------------------------------------------------------
# The host side: a runner of one (depth, breadth) setting


@dataclasses.dataclass
class _Pending:
    """A batch whose jobs are in the stream: its per-copy buffers, filled as jobs finish."""

    tag: int
    first_job: int
    rows: np.ndarray  # (Q,) int32: the real jobs' rows, puzzle-major
    copies: np.ndarray  # (Q,) int32
    buffers: dict
    mask: np.ndarray
    labels: np.ndarray
    left: int  # jobs not finished yet


class StreamRunner:
    """A fixed pool of slots on device (`stream_jobs`): each batch's jobs (real rows x
    breadth copies, puzzle-major) join a queue; a slot whose job halts takes the next one.

    `feed` returns the batches whose jobs have all finished so far; `finish` runs the pool dry.
    The pool has ``cfg.stream_slots`` slots (0: batch x breadth, at most ``cfg.max_rows``),
    rounded up to a multiple of the devices; each device runs its own pool and its share of
    every batch's jobs. A call is dispatched before the previous call's records are fetched,
    so the host's bookkeeping overlaps the device's work.
    """

    _FIELDS = ("n_correct", "exact", "steps", "score", "residual", "q_halt")

    def __init__(self, ev: Evaluator, params, depth: int, breadth: int,
                 accumulator: SettingAccumulator | None = None):
        self.ev, self.params, self.depth, self.breadth = ev, params, depth, breadth
        self.acc = accumulator
        self.devices = ev.mesh.devices.size
        c = ev.cfg
        self.stop = stopping(c.halt, c.convergence_metric, c.convergence_tol)
        self.pool = None
        self.slots = 0
        self.pending: list[_Pending] = []
        self.next_job = 0
        self.inflight = None
        self.last = None  # (inputs, labels) of the last batch: shapes for the drain call

    def _make_pool(self, batch: int) -> None:
        c = self.ev.cfg
        slots = c.stream_slots or batch * self.breadth
        if not c.stream_slots and c.max_rows:
            slots = min(slots, c.max_rows)
        self.slots = int(math.ceil(max(slots, 1) / self.devices) * self.devices)
        pool = empty_pool(self.ev.model, self.slots, int(c.convergence_window))
        self.pool = jax.device_put(pool, sharding_lib.batch_sharding(self.ev.mesh))

    def _call(self, inputs, labels, rows, copies, first_index: int, drain: bool):
        """Dispatch one `stream_jobs` call with the jobs (``rows``, ``copies``) of the
        batch (``inputs``, ``labels``); returns the previous call's (not yet fetched) output."""
        d = self.devices
        q = len(rows)
        per = max(1, math.ceil(inputs.shape[0] * self.breadth / d))  # static per batch size
        job_rows = np.zeros((d * per,), np.int32)
        job_copies = np.zeros((d * per,), np.int32)
        job_rows[:q], job_copies[:q] = rows, copies
        starts = np.arange(d) * per
        num = np.clip(q - starts, 0, per).astype(np.int32)
        first_job = (self.next_job + starts).astype(np.int32)
        sh = sharding_lib.batch_sharding(self.ev.mesh)
        put = lambda a: jax.device_put(a, sh)
        repl = lambda a: jax.device_put(a, sharding_lib.replicated(self.ev.mesh))
        c = self.ev.cfg
        self.pool, out = stream_jobs(
            self.ev.model, self.ev.mesh, self.params, self.pool, repl(inputs), repl(labels),
            put(job_rows), put(job_copies), put(first_job), put(num), first_index, c.seed,
            self.depth, self.stop, drain, window=int(c.convergence_window),
            trace_points=int(c.trace_points))
        self.next_job += q
        previous, self.inflight = self.inflight, out
        return previous

    def _collect(self, out) -> list[tuple[int, BatchResult]]:
        """File the records of one call's `StreamOut` into their batches."""
        if out is None:
            return []
        out = sharding_lib.fetch(out)
        d = self.devices
        per = out.job.shape[0] // d
        keep = np.concatenate([np.arange(i * per, i * per + int(out.done[i])) for i in range(d)])
        jobs = out.job[keep]
        if self.acc is not None:
            self.acc.executed += int(np.sum(out.iterations)) * (self.slots // d)
            self.acc.add_trace(np.max(out.trace.steps, axis=0),
                               np.sum(out.trace.total.astype(np.float64), axis=0),
                               np.sum(out.trace.rows.astype(np.int64), axis=0))
        starts = [p.first_job for p in self.pending]
        which = np.searchsorted(starts, jobs, side="right") - 1
        for bi in np.unique(which):
            p = self.pending[bi]
            sel = which == bi
            local = jobs[sel] - p.first_job
            r, c = p.rows[local], p.copies[local]
            p.buffers["preds"][r, c] = out.preds[keep[sel]]
            for name in self._FIELDS:
                p.buffers[name][r, c] = getattr(out, name)[keep[sel]]
            p.left -= int(sel.sum())
        done = []
        while self.pending and self.pending[0].left == 0:
            done.append(self._result(self.pending.pop(0)))
        return done

    def _result(self, p: _Pending) -> tuple[int, BatchResult]:
        n_valid = np.sum(p.labels != IGNORE_LABEL, axis=1).astype(np.int32)
        empty = np.zeros((0,), np.int32)
        return p.tag, BatchResult(n_valid=n_valid, trace_steps=empty,
                                  trace_sum=empty.astype(np.float64),
                                  trace_count=empty.astype(np.int64), loop_steps=-1, executed=0,
                                  mask=p.mask, labels=p.labels, **p.buffers)

    def feed(self, placed: Mapping[str, Any], first_index: int,
             tag: int) -> list[tuple[int, BatchResult]]:
        """Queue a placed batch's jobs (row ``r`` is puzzle ``first_index + r``); returns the
        batches completed so far, in feeding order."""
        inputs, labels, mask = sharding_lib.fetch((placed["inputs"], placed["labels"],
                                                   placed["mask"]))
        inputs, labels = np.asarray(inputs, np.int32), np.asarray(labels, np.int32)
        mask = np.asarray(mask, bool)
        if self.pool is None:
            self._make_pool(inputs.shape[0])
        n, b = self.breadth, inputs.shape[0]
        real = np.nonzero(mask)[0].astype(np.int32)
        rows, copies = np.repeat(real, n), np.tile(np.arange(n, dtype=np.int32), len(real))
        shape = (b, n)
        buffers = {"preds": np.zeros(shape + (inputs.shape[1],), np.int32),
                   "n_correct": np.zeros(shape, np.int32), "exact": np.zeros(shape, bool),
                   "steps": np.zeros(shape, np.int32), "score": np.zeros(shape, np.float32),
                   "residual": np.zeros(shape, np.float32), "q_halt": np.zeros(shape, np.float32)}
        self.pending.append(_Pending(tag, self.next_job, rows, copies, buffers, mask, labels,
                                     len(rows)))
        self.last = (inputs, labels)
        previous = self._call(inputs, labels, rows, copies, first_index, drain=False)
        return self._collect(previous)

    def finish(self) -> list[tuple[int, BatchResult]]:
        """Run every job still in the pool to its end; returns the remaining batches."""
        if self.pool is None:
            return []
        inputs, labels = self.last
        previous = self._call(inputs, labels, np.zeros((0,), np.int32),
                              np.zeros((0,), np.int32), 0, drain=True)
        done = self._collect(previous)
        last, self.inflight = self.inflight, None
        done += self._collect(last)
        if self.pending:
            raise RuntimeError(f"streaming evaluation lost jobs of {len(self.pending)} batches")
        return done
