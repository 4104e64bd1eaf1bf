"""The paper's protocol in one command (`experiments/paper_eval.py` over
`eqr_jax.evaluation.protocol`): killed in the middle of writing a chunk, restarted with the same
command, it ends with the table and per-puzzle results of an uninterrupted run."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import trained_checkpoint, write_array_dataset
from eqr_jax.data.arrays import make_puzzles
from eqr_jax.evaluation import protocol

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# Runs paper_eval.main, but dies (SIGKILL) while writing the third chunk: its temporary file is
# half written and never renamed, as when a machine goes down mid-write.
_DIE_IN_THIRD_CHUNK = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {experiments!r})
    from eqr_jax.evaluation import protocol
    real, chunks = protocol._atomic_write, []

    def dying(path, write):
        if os.path.basename(os.path.dirname(path)) == "chunks":
            chunks.append(path)
            if len(chunks) == 3:
                with open(path + ".tmp", "wb") as f:
                    f.write(b"PK\\x03\\x04 half a chunk")
                os.kill(os.getpid(), signal.SIGKILL)
        real(path, write)

    protocol._atomic_write = dying
    import paper_eval
    sys.exit(paper_eval.main({argv!r}))
""")


def _paper_eval():
    spec = importlib.util.spec_from_file_location("paper_eval", EXPERIMENTS / "paper_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _chunk_arrays(out: Path) -> dict:
    got = {}
    for name in sorted(os.listdir(out / "chunks")):
        with np.load(out / "chunks" / name) as z:
            got[name] = {k: z[k] for k in z.files if k != "seconds"}
    return got


def test_paper_eval_resumes_after_a_kill_to_the_same_table(tmp_path, capsys):
    run = trained_checkpoint()
    data = write_array_dataset(tmp_path / "data", make_puzzles(8, 0),
                               make_puzzles(40, 1, blanks=(3, 8)))
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    # 34 puzzles in chunks of 8 (batches of 4): 5 chunks, the last of 2 (a padded batch).
    argv = ["--checkpoint", run, "--data", str(data), "--depth", "3", "--breadth", "4",
            "--top-k", "2", "--batch-size", "4", "--chunk", "8", "--max-puzzles", "34",
            "--no-progress"]
    script = _DIE_IN_THIRD_CHUNK.format(experiments=str(EXPERIMENTS),
                                        argv=argv + ["--out", str(killed)])
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == -signal.SIGKILL, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(os.listdir(killed / "chunks")) == [
        "chunk-000000000-000000008.npz", "chunk-000000008-000000008.npz",
        "chunk-000000016-000000008.npz.tmp"]
    assert not (killed / "results.json").exists()
    # The same command again: it drops the half-written chunk and continues at puzzle 16.
    paper_eval = _paper_eval()
    assert paper_eval.main(argv + ["--out", str(killed)]) == 0
    out = capsys.readouterr().out
    assert "removed partial writes of an interrupted run: ['chunk-000000016-000000008.npz.tmp']" \
        in out
    assert "resuming: 16 of 34 puzzles already in 2 chunk(s)" in out
    assert "18 puzzles in this session" in out
    assert paper_eval.main(argv + ["--out", str(straight)]) == 0
    table = capsys.readouterr().out
    assert "top-1 by convergence" in table and "34 puzzles in this session" in table
    a, b = (json.loads((d / "results.json").read_text()) for d in (killed, straight))
    assert a["table"] == b["table"] and a["metrics"] == b["metrics"]
    assert a["steps_histogram"] == b["steps_histogram"] and a["chunks"] == b["chunks"] == 5
    assert a["metrics"]["num_puzzles"] == 34 and a["metrics"]["count"] == 34 * 4
    assert {r["metric"] for r in a["table"]} >= {"majority vote", "pass@1", "pass@2"}
    assert a["protocol"] == {**b["protocol"], "model": a["protocol"]["model"]}
    ca, cb = _chunk_arrays(killed), _chunk_arrays(straight)
    assert sorted(ca) == sorted(cb) and len(ca) == 5
    for name in ca:
        for k in cb[name]:
            np.testing.assert_array_equal(ca[name][k], cb[name][k], err_msg=f"{name}:{k}")
    # A different command on the same output is refused, naming what differs.
    assert paper_eval.main([*argv[:5], "4", *argv[6:], "--out", str(killed)]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (eval.depth: 3 there, 4 now)" in err


def test_protocols_and_table_rows():
    sudoku = protocol.PROTOCOLS["paper-sudoku"]
    assert (sudoku.depth, sudoku.breadth, sudoku.top_k, sudoku.noise_scale, sudoku.halt,
            sudoku.window) == (64, 128, 4, 0.5, "fixed", 3)
    assert protocol.PROTOCOLS["paper-maze"].noise_scale == 0.1
    metrics = {"convergence_top_k/cumulative_exact_acc_top1": 0.9, "num_puzzles": 7,
               **{f"different_init/pass@{k}": k / 100 for k in (1, 2, 4, 8, 16, 32, 64)}}
    rows = protocol.table_rows(metrics, 128)
    assert rows[0] == {"metric": "top-1 by convergence", "value": 0.9}
    assert [r["metric"] for r in rows[-8:]] == [
        "pass@1", "pass@2", "pass@4", "pass@8", "pass@16", "pass@32", "pass@64", "puzzles"]
    with pytest.raises(ValueError, match="multiple of the batch size 16"):
        protocol.run_protocol(None, None, "unused", "unused", {}, depth=1, breadth=1,
                              batch_size=16, chunk_puzzles=24)


class _Killed(BaseException):
    """Stands for the machine going down (nothing catches it)."""


def test_paper_eval_in_a_bucket_resumes_to_the_local_table(gcs_bucket, tmp_path, monkeypatch,
                                                          capsys):
    """--out gs://...: chunks, manifest and results.json are objects; a run stopped before its
    third chunk is uploaded continues from the bucket's chunks to the results of a local run."""
    monkeypatch.chdir(tmp_path)
    run = trained_checkpoint()
    data = write_array_dataset(tmp_path / "data", make_puzzles(8, 0),
                               make_puzzles(24, 1, blanks=(3, 8)))
    url, local = gcs_bucket.url("paper"), tmp_path / "local"
    argv = ["--checkpoint", run, "--data", str(data), "--depth", "3", "--breadth", "2",
            "--top-k", "2", "--batch-size", "4", "--chunk", "8", "--max-puzzles", "22",
            "--no-progress"]
    real, written = protocol._atomic_write, []

    def dying(path, write):
        if "/chunks/" in path and len(written) == 2:
            raise _Killed
        written.append(path)
        real(path, write)

    monkeypatch.setattr(protocol, "_atomic_write", dying)
    paper_eval = _paper_eval()
    with pytest.raises(_Killed):
        paper_eval.main(argv + ["--out", url])
    monkeypatch.setattr(protocol, "_atomic_write", real)
    assert gcs_bucket.objects(url) == ["chunks/chunk-000000000-000000008.npz", "manifest.json"]
    assert paper_eval.main(argv + ["--out", url]) == 0
    assert "resuming: 8 of 22 puzzles already in 1 chunk(s)" in capsys.readouterr().out
    assert paper_eval.main(argv + ["--out", str(local)]) == 0
    assert gcs_bucket.objects(url) == sorted(
        ["manifest.json", "results.json"] + [f"chunks/{n}" for n in os.listdir(local / "chunks")])
    a = json.loads(gcs_bucket.fs.cat(url + "/results.json"))
    b = json.loads((local / "results.json").read_text())
    assert a["table"] == b["table"] and a["metrics"] == b["metrics"] and a["chunks"] == 3
    assert a["protocol"]["model"] == b["protocol"]["model"] == os.path.abspath(run)
    for name in os.listdir(local / "chunks"):
        with np.load(local / "chunks" / name) as z, \
                np.load(io.BytesIO(gcs_bucket.fs.cat(f"{url}/chunks/{name}"))) as r:
            for k in z.files:
                if k != "seconds":
                    np.testing.assert_array_equal(r[k], z[k], err_msg=f"{name}:{k}")
    # Other settings on the same bucket run are refused, as locally.
    assert paper_eval.main([*argv[:5], "4", *argv[6:], "--out", url]) == 2
    assert "holds a run with other settings (eval.depth: 3 there, 4 now)" in \
        capsys.readouterr().err
    assert not Path("gs:").exists()
