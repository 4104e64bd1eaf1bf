"""The paper's evaluation protocol as one resumable run (``experiments/paper_eval.py``).

`PROTOCOLS` holds the settings (docs/evaluation.md, "The paper's protocol", says where each comes
from and what is assumed). `run_protocol` evaluates a split chunk by chunk through an
`Evaluator` and appends each finished chunk's per-puzzle results to ``<out>/chunks/`` as one
``.npz`` written atomically (a temporary file, fsync, rename): a chunk file either holds every
puzzle of its chunk or does not exist. A run that is killed and restarted with the same command
finds the chunks already written, checks that they were made with the same settings
(``<out>/manifest.json``), and continues with the first puzzle after them. Every job (puzzle,
copy) draws its keys from its puzzle's index in the split (`core.job_keys`), so a resumed run
computes exactly what the uninterrupted run would have, and the final table, built from the
chunk files alone, is the same. ``<out>`` may be a ``gs://`` URL: each chunk, the manifest and
``results.json`` are then single object uploads (whole or absent), and a restart lists and
reads the chunks back from the bucket.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import re
import time
from typing import Any, Mapping

import numpy as np

from eqr_jax import storage
from eqr_jax.evaluation.aggregate import SettingAccumulator, summarize_setting


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One evaluation protocol: depth, breadth, selection and test-time noise."""

    name: str
    depth: int
    breadth: int
    top_k: int  # convergence top-k selection (top-1 is reported from it too)
    noise_scale: float
    halt: str = "fixed"  # every copy runs exactly `depth` steps, as the reference evaluates
    window: int = 3  # logit changes in the convergence score (the reference's default)
    source: str = ""


PROTOCOLS = {
    "paper-sudoku": Protocol(
        "paper-sudoku", depth=64, breadth=128, top_k=4, noise_scale=0.5,
        source="the paper's Sudoku-Extreme evaluation: depth 64, breadth 128, convergence "
        "top-4, noise 0.5"),
    "paper-maze": Protocol(
        "paper-maze", depth=64, breadth=128, top_k=4, noise_scale=0.1,
        source="noise 0.1 (the paper's Maze control); depth 64, breadth 128 from the official "
        "README's breadth example; convergence top-4 as for Sudoku (assumed)"),
}

# The table's rows: (label, metric of `summarize_setting`).
TABLE = (
    ("top-1 by convergence", "convergence_top_k/cumulative_exact_acc_top1"),
    ("convergence top-k (mean over the k chosen)", "convergence_top_k/exact_accuracy"),
    ("convergence top-k any-correct", "convergence_top_k/any_correct"),
    ("majority vote", "majority_vote/exact_accuracy"),
    ("any-correct (oracle pass@breadth)", "different_init/any_correct"),
    ("single trajectory (mean over copies)", "all/exact_accuracy"),
)
# Metrics that depend on the schedule or the machine, not on the results: kept apart.
COST_KEYS = ("time_s", "halting/executed_row_steps", "halting/utilisation",
             "halting/mean_batch_loop_steps")
_CHUNK = re.compile(r"chunk-(\d{9})-(\d{9})\.npz$")
_FIELDS = ("exact", "n_correct", "steps", "score", "residual", "q_halt")


class ResumeError(ValueError):
    """The output directory holds a run that this command cannot continue."""


def table_rows(metrics: Mapping[str, Any], breadth: int) -> list[dict[str, Any]]:
    """The protocol's table: one {"metric", "value"} row per reported number (pass@k for
    k = 1, 2, 4, ... < breadth after the fixed rows)."""
    rows = [{"metric": label, "value": metrics.get(key)} for label, key in TABLE]
    k = 1
    while k < breadth:
        rows.append({"metric": f"pass@{k}", "value": metrics.get(f"different_init/pass@{k}")})
        k *= 2
    rows.append({"metric": "puzzles", "value": metrics.get("num_puzzles")})
    return rows


def _atomic_write(path: str, write) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync it, rename it over
    ``path`` and fsync the directory: a reader sees the old file, or all of the new one. In a
    bucket (``gs://``), one object upload of the bytes ``write`` produced: an object appears
    whole or not at all, so no temporary object is needed."""
    if storage.is_remote(path):
        buf = io.BytesIO()
        write(buf)
        storage.write_bytes(storage.path(path), buf.getvalue())
        return
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, default=_jsonable)
                                           + "\n").encode()))


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


class ChunkStore:
    """The chunk files of one run: ``chunks/chunk-<first>-<count>.npz`` (puzzle indices), in
    a local folder or under a ``gs://`` URL."""

    def __init__(self, out_dir: str):
        self.dir = os.path.join(out_dir, "chunks")
        self.remote = storage.is_remote(self.dir)
        if not self.remote:  # a bucket has no folders to create
            os.makedirs(self.dir, exist_ok=True)

    def clean_partial(self) -> list[str]:
        """Remove temporary files of writes a kill interrupted; returns their names (none in a
        bucket, where a chunk is one upload)."""
        if self.remote:
            return []
        stale = sorted(glob.glob(os.path.join(self.dir, "*.tmp")))
        for p in stale:
            os.remove(p)
        return [os.path.basename(p) for p in stale]

    def chunks(self) -> list[tuple[int, int, str]]:
        """(first puzzle, count, path) of every complete chunk, checked to tile [0, end)."""
        found = []
        for name in self._names():
            m = _CHUNK.match(name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), os.path.join(self.dir, name)))
        end = 0
        for first, count, path in found:
            if first != end:
                raise ResumeError(f"{self.dir}: chunk files do not follow on at puzzle {end} "
                                  f"({os.path.basename(path)})")
            end = first + count
        return found

    def _names(self) -> list[str]:
        if not self.remote:
            return sorted(os.listdir(self.dir))
        d = storage.path(self.dir)
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def done(self) -> int:
        """Puzzles already in complete chunks (the next puzzle to evaluate)."""
        c = self.chunks()
        return c[-1][0] + c[-1][1] if c else 0

    def write(self, first: int, acc: SettingAccumulator, seconds: float) -> str:
        """One finished chunk (its per-puzzle results in ``acc``), atomically."""
        arrays = {name: acc.get(name) for name in _FIELDS + ("n_valid",)}
        if acc.votes:
            arrays["votes"] = np.concatenate(acc.votes, axis=0)
        count = len(arrays["exact"])
        path = os.path.join(self.dir, f"chunk-{first:09d}-{count:09d}.npz")
        _atomic_write(path, lambda f: np.savez_compressed(
            f, seconds=np.float64(seconds), **arrays))
        return path

    def accumulator(self) -> SettingAccumulator:
        """Every complete chunk's results in one `SettingAccumulator`, in puzzle order."""
        acc = SettingAccumulator()
        for _, _, path in self.chunks():
            with np.load(io.BytesIO(_read_bytes(path)) if self.remote else path) as z:
                for name in _FIELDS + ("n_valid",):
                    acc.parts.setdefault(name, []).append(z[name])
                if "votes" in z:
                    acc.votes.append(z["votes"])
                acc.seconds += float(z["seconds"])
        return acc


def _exists(path: str) -> bool:
    return storage.path(path).exists() if storage.is_remote(path) else os.path.exists(path)


def _read_bytes(path: str) -> bytes:
    if storage.is_remote(path):
        return storage.path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def _check_manifest(path: str, manifest: Mapping[str, Any]) -> None:
    old = json.loads(_read_bytes(path))
    diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if diff:
        detail = "; ".join(f"{k}: {old.get(k)!r} there, {manifest.get(k)!r} now" for k in diff)
        raise ResumeError(f"{os.path.dirname(path)} holds a run with other settings ({detail}); "
                          "rerun the same command to continue it, or pick another --out")


def run_protocol(evaluator, params, data: str, out_dir: str, manifest: Mapping[str, Any], *,
                 depth: int, breadth: int, batch_size: int, chunk_puzzles: int,
                 max_puzzles: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate the test split of ``data`` at (``depth``, ``breadth``) with ``evaluator``,
    resumably, into ``out_dir``; returns the results (also written to ``results.json``).

    Args:
      evaluator: an `eqr_jax.evaluation.Evaluator` (its config: halting, noise, top-k, seed,
        streaming); params: the model's parameters.
      manifest: what identifies the run (model, data, settings): written on the first start,
        compared on every restart (`ResumeError` if it differs).
      batch_size: puzzles per batch; chunk_puzzles: puzzles per chunk file (a multiple of it).
      max_puzzles: evaluate only the first N puzzles of the split (a smoke run).
    Returns:
      ``{"protocol", "table", "metrics", "cost", "chunks"}``: the table rows (`table_rows`),
      every `summarize_setting` metric but the schedule-dependent ones, which are in ``cost``
      with this session's puzzles per second.
    """
    import jax

    from eqr_jax.data.loader import EvalLoader

    if batch_size < 1 or chunk_puzzles < batch_size or chunk_puzzles % batch_size:
        raise ValueError(f"chunk of {chunk_puzzles} puzzles must be a positive multiple of the "
                         f"batch size {batch_size}")
    main = jax.process_index() == 0
    store = _open_store(out_dir, manifest, main)
    loader = EvalLoader(data, batch_size, process_index=jax.process_index(),
                        process_count=jax.process_count(), stop=max_puzzles)
    total = loader.stop
    start = store.done()
    if start > total:
        raise ResumeError(f"{out_dir} holds {start} puzzles, more than the {total} asked for")
    if start:
        print(f"[paper_eval] resuming: {start} of {total} puzzles already in "
              f"{len(store.chunks())} chunk(s)", flush=True)
    loader = EvalLoader(data, batch_size, process_index=jax.process_index(),
                        process_count=jax.process_count(), start=start, stop=total)
    t_session = time.perf_counter()
    evaluated = _evaluate_chunks(evaluator, params, loader, store, depth=depth, breadth=breadth,
                                 start=start, total=total, per_chunk=chunk_puzzles // batch_size,
                                 main=main, progress=progress)
    session_s = time.perf_counter() - t_session
    final = store.accumulator()
    n = int(sum(len(p) for p in final.parts.get("exact", [])))
    if n != total:
        raise RuntimeError(f"{out_dir}: chunks hold {n} puzzles, expected {total}")
    setting = summarize_setting(final, depth, breadth, evaluator.cfg.convergence_top_k)
    metrics = dict(setting["metrics"])
    cost = {k: metrics.pop(k) for k in COST_KEYS if k in metrics}
    cost["time_s"] = final.seconds
    cost.update(session_puzzles=evaluated, session_s=session_s,
                session_puzzles_per_s=evaluated / session_s if session_s > 0 else None)
    results = {"protocol": dict(manifest), "table": table_rows(metrics, breadth),
               "metrics": metrics, "steps_histogram": setting["steps_histogram"], "cost": cost,
               "chunks": len(store.chunks())}
    if main:
        write_json_atomic(os.path.join(out_dir, "results.json"), results)
    return results


def _open_store(out_dir: str, manifest: Mapping[str, Any], main: bool) -> ChunkStore:
    """The run's chunk store, its manifest written (first start) or compared (restart), and
    the partial writes of an interrupted run removed."""
    storage.check("--out", out_dir)
    if not storage.is_remote(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    store = ChunkStore(out_dir)
    manifest_path = os.path.join(out_dir, "manifest.json")
    if _exists(manifest_path):
        _check_manifest(manifest_path, manifest)
    elif main:
        if store.chunks():
            raise ResumeError(f"{out_dir}: chunk files without a manifest.json")
        write_json_atomic(manifest_path, dict(manifest))
    if main:
        stale = store.clean_partial()
        if stale:
            print(f"[paper_eval] removed partial writes of an interrupted run: {stale}",
                  flush=True)
    return store


def _evaluate_chunks(evaluator, params, loader, store: ChunkStore, *, depth: int,
                     breadth: int, start: int, total: int, per_chunk: int, main: bool,
                     progress: bool) -> int:
    """Evaluate ``loader``'s batches from puzzle ``start`` on, writing a chunk every
    ``per_chunk`` batches (process 0); returns the puzzles evaluated in this session."""
    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="puzzle", desc="paper_eval",
                   dynamic_ncols=True, smoothing=0.05)
    acc, t_chunk, first = SettingAccumulator(), time.perf_counter(), start
    evaluated = 0
    for bi, r in evaluator.results(params, loader, depth=depth, breadth=breadth,
                                   first_index=start):
        acc.add(r)
        n_real = int(np.sum(r.mask))
        evaluated += n_real
        if bar is not None:
            bar.update(n_real)
        if (bi + 1) % per_chunk == 0 or bi == len(loader) - 1:
            now = time.perf_counter()
            if main:
                store.write(first, acc, now - t_chunk)
            first += len(acc.get("exact"))
            acc, t_chunk = SettingAccumulator(), now
    if bar is not None:
        bar.close()
    return evaluated
