"""Reporting: the one table printer, evaluation tables, the JSON / CSV results writers, and
training's log (`TrainLog`: TensorBoard, progress bar, console) and summary table.

Every table of the project (evaluation grids, training summaries, the ablation, the benchmarks)
goes through `format_table`; every results file records the machine it was measured on
(`machine_info`).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from eqr_jax import storage


def machine_info() -> dict:
    """Where and when a result was measured: backend, device kind/count, versions, CPU count,
    UTC date."""
    import jax
    import jaxlib

    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jaxlib, "__version__", "?"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def describe_machine(info: Mapping[str, Any] | None = None) -> str:
    """One line, e.g. ``cpu (cpu x1), jax 0.10.2, 2 CPUs, 2026-11-28T23:40:00Z``."""
    info = info or machine_info()
    return (f"{info['backend']} ({info['device_kind']} x{info['device_count']}), "
            f"jax {info['jax_version']}, {info['cpu_count']} CPUs, {info['date_utc']}")


# ----------------------------------------------------------------------------------------------
# Tables


def _fmt(v: Any, floatfmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return format(v, floatfmt)
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
                 floatfmt: str = ".4g", markdown: bool = False) -> str:
    """Rows of dicts as an aligned text table (or a GitHub markdown table).

    ``columns`` default to every key in order of appearance; missing values print as '-',
    floats with ``floatfmt`` (very large or small ones in 3 significant digits), strings as they
    are.
    """
    if not rows:
        return "(no rows)"
    columns = list(columns or _all_keys(rows))
    cells = [[_fmt(r.get(c), floatfmt) for c in columns] for r in rows]
    if markdown:
        head = "| " + " | ".join(columns) + " |"
        sep = "|" + "|".join("---" for _ in columns) + "|"
        return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _all_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    return keys


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
                title: str | None = None, floatfmt: str = ".4g") -> None:
    """`format_table` to stdout, under an optional ``== title ==`` line."""
    if title:
        print(f"\n== {title} ==")
    print(format_table(rows, columns, floatfmt=floatfmt), flush=True)


TABLE_KEYS = ("all/exact_accuracy", "majority_vote/exact_accuracy",
              "convergence_top_k/exact_accuracy", "different_init/any_correct",
              "halting/mean_steps")


def depth_breadth_table(results: Mapping[str, Any], key: str = "all/exact_accuracy",
                        markdown: bool = False) -> str:
    """A depth (rows) x breadth (columns) table of one metric of an evaluation ('-' where it does
    not apply), titled with the metric's name unless ``markdown``."""
    settings = results["settings"]
    depths = sorted({s["depth"] for s in settings})
    breadths = sorted({s["breadth"] for s in settings})
    cell = {(s["depth"], s["breadth"]): s["metrics"].get(key) for s in settings}
    corner = "depth \\ breadth"
    rows = [{corner: str(d), **{str(n): cell.get((d, n)) for n in breadths}} for d in depths]
    table = format_table(rows, [corner] + [str(n) for n in breadths], floatfmt=".4f",
                         markdown=markdown)
    return table if markdown else f"{key}:\n{table}"


def write_results(results: Mapping[str, Any], out_dir, plots: bool = True) -> list[str]:
    """results.json (with the machine), results.csv and (optionally) the three plots of an
    evaluation in ``out_dir`` (a local folder or a ``gs://`` URL; each file written whole);
    returns the written paths."""
    root = storage.path(out_dir, name="--out")
    storage.makedirs(root)
    paths = [str(root / "results.json"), str(root / "results.csv")]
    write_json(paths[0], results)
    rows = results_rows(results)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    storage.write_text(root / "results.csv", text.getvalue())
    if plots:
        from eqr_jax.analysis import save_all_plots
        paths += save_all_plots(results, str(root))
    return paths


def eval_report(results: Mapping[str, Any]) -> str:
    """The console tables of an evaluation: every headline metric that any setting reports."""
    present = {k for s in results["settings"] for k in s["metrics"]}
    return "\n\n".join(depth_breadth_table(results, k) for k in TABLE_KEYS if k in present)


def results_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per setting (for CSV)."""
    rows = []
    for s in results["settings"]:
        row = {"depth": s["depth"], "breadth": s["breadth"], "halt": s.get("halt"),
               "solver": s.get("solver"), "noise_scale": s.get("noise_scale")}
        row.update(s["metrics"])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# JSON


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return _jsonable(float(obj))
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path, payload: Mapping[str, Any], *, machine: bool = True):
    """Write ``payload`` (plus ``machine: machine_info()`` unless present or disabled) as JSON
    to ``path`` (local, or a ``gs://`` URL), atomically (`eqr_jax.storage.write_text`: a
    temporary file renamed over the target, or one object upload); returns the path (a
    `pathlib.Path`, or an `etils.epath.Path` for a URL). NaN and infinities become null, NumPy
    scalars and arrays plain numbers and lists."""
    path = storage.path(path, name="output")
    data = dict(payload)
    if machine and "machine" not in data:
        data["machine"] = machine_info()
    storage.write_text(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Training's log and summary


class TrainLog:
    """Training's TensorBoard scalars/histograms, progress bar and console lines (written by the
    main process only).

    The events go to ``<out_dir>/tb``. For a run directory in a bucket (``gs://...``) they are
    written into a local staging folder, and every file of it that changed is uploaded to
    ``<out_dir>/tb/`` at each flush (every `write`: the log and evaluation windows) and at
    `close` (an object is replaced whole, so a reader sees the events up to the last flush).
    A resumed run starts a new event file beside the old ones, as it does locally, and
    ``tensorboard --logdir gs://...`` reads them all. A failed upload is reported and tried
    again at the next flush; it never stops training.
    """

    def __init__(self, cfg, out_dir, total: int, step: int, progress: bool, verbose: bool):
        import jax

        self.main = jax.process_index() == 0
        self.verbose = verbose
        self.writer = self.bar = None
        self.remote = self.staging = None  # the bucket's tb/ and its local staging folder
        self._uploaded: dict = {}
        if self.main:
            from tensorboardX import SummaryWriter
            tb = storage.path(out_dir, name="--out") / "tb"
            if storage.is_remote(tb):
                import tempfile
                # tensorboardX's own gs:// writer fails (no 'buffer' attribute): write local
                # files and copy them up.
                self.remote, self.staging = tb, Path(tempfile.mkdtemp(prefix="eqr-tb-"))
            self.writer = SummaryWriter(str(self.staging or tb))
        if progress and self.main:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=step, desc=f"train {cfg.preset}",
                            dynamic_ncols=True, smoothing=0.1)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.main and self.verbose:
            print(text, flush=True)

    def write(self, scalars: Mapping[str, float], at: int,
              hists: Mapping[str, np.ndarray] = {}) -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, at)
        for k, counts in hists.items():
            if counts.sum() > 0:
                vals = np.arange(1, len(counts) + 1, dtype=np.float64)
                nz = np.flatnonzero(counts)
                self.writer.add_histogram_raw(
                    k, min=float(vals[nz[0]]), max=float(vals[nz[-1]]), num=int(counts.sum()),
                    sum=float((vals * counts).sum()), sum_squares=float((vals ** 2 * counts).sum()),
                    bucket_limits=(vals + 0.5).tolist(), bucket_counts=counts.tolist(),
                    global_step=at)
        self.flush()

    def flush(self) -> list[str]:
        """Write the buffered events out; for a bucket run directory, upload the event files
        that changed since the last flush. Returns the files uploaded (relative to tb/)."""
        if self.writer is not None:
            if self.staging is not None:
                _drain(self.writer)
            self.writer.flush()
        return self._upload() or []

    def _upload(self, final: bool = False) -> list[str] | None:
        """Upload the changed staging files; None (after a warning on stderr) if that failed."""
        if self.staging is None:
            return []
        try:
            return storage.upload_tree(self.staging, self.remote, only_changed=self._uploaded)
        except Exception as e:  # noqa: BLE001 (any client error: the run goes on)
            then = (f"the events stay in {self.staging}" if final
                    else "trying again at the next flush")
            why = (str(e).splitlines() or [""])[0]
            msg = (f"[eqr] warning: uploading TensorBoard events to {self.remote} failed "
                   f"({type(e).__name__}: {why}); {then}")
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr, flush=True)
            return None

    def train_line(self, at: int, s: Mapping[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{s.get('train/total_loss', 0):.3f}",
                                 acc=f"{s.get('train/accuracy', 0):.3f}",
                                 exact=f"{s.get('train/exact_accuracy', 0):.3f}",
                                 steps=f"{s.get('train/steps', 0):.1f}",
                                 **({"mfu": f"{s['perf/mfu']:.1%}"} if "perf/mfu" in s else {}),
                                 refresh=False)
        elif self.main and self.verbose:
            print(f"[eqr] step {at}: " + " ".join(
                f"{k.split('/')[1]}={s[k]:.4g}" for k in
                ("train/total_loss", "train/accuracy", "train/exact_accuracy", "train/steps",
                 "train/lr", "train/puzzles_per_s") if k in s)
                  + (f" mfu={s['perf/mfu']:.1%}" if "perf/mfu" in s else ""), flush=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.staging is not None:
            if self._upload(final=True) is not None:
                import shutil
                shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def _drain(writer) -> None:
    """Wait until tensorboardX's background thread has written every event queued so far.

    ``SummaryWriter.flush`` flushes the file but not the queue in front of it, so events added
    just before would miss the upload that follows. The queue is first in, first out: stopping
    the thread (its stop signal queued after the events) and starting a new one on the same
    queue and file drains it. Without those internals (another tensorboardX), the events that
    miss one upload go with the next, or at close."""
    ew = getattr(writer.file_writer, "event_writer", None)
    worker = getattr(ew, "_worker", None)
    if worker is None or not all(hasattr(ew, a) for a in ("_event_queue", "_ev_writer",
                                                          "_flush_secs")):
        return
    worker.stop()
    ew._worker = type(worker)(ew._event_queue, ew._ev_writer, ew._flush_secs)
    ew._worker.start()


def train_results_table(cfg, r: Mapping[str, Any]) -> str:
    """A short markdown results table of a run (``cfg`` its `RunConfig`, ``r`` the dict
    `eqr_jax.training.train` returns)."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"
    rows = [("preset", cfg.preset), ("steps", f"{r['step']} / {r['total_steps']}"),
            ("test exact accuracy", pct(r.get("all/exact_accuracy"))),
            ("test token accuracy", pct(r.get("all/accuracy"))),
            ("test puzzles", f"{int(r.get('eval_puzzles', 0))}"),
            ("train exact accuracy (halted rows)", pct(r.get("train/exact_accuracy"))),
            ("train loss", f"{r.get('train/total_loss', float('nan')):.4f}"),
            ("wall time", f"{r['time_s']:.1f} s")]
    return format_table([{"metric": a, "value": b} for a, b in rows], markdown=True)
