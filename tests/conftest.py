"""Shared test configuration: fixture files, the micro model configs, and one trained run.

Every test model is `micro_model` with the fields that matter to the test spelled out; tests
that share a config share its compiled functions. `micro_run` is the training config of the
training tests; `trained_run` trains the evaluation/solve tests' model once per session.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The reference fixtures (outputs of the official code) ship with the tests
# (tests/fixtures/reference, README there); EQR_FIXTURES points at another copy. Under
# EQR_REQUIRE_FIXTURES=1 (set by .ci/run) a missing fixture fails its test instead of skipping.
FIXTURES = Path(os.environ.get("EQR_FIXTURES", REPO_ROOT / "tests" / "fixtures" / "reference"))
REQUIRE_FIXTURES = os.environ.get("EQR_REQUIRE_FIXTURES", "") not in ("", "0")


def _missing(what: str):
    message = f"{what} not found (set EQR_FIXTURES to the folder of the reference fixtures)"
    if REQUIRE_FIXTURES:
        pytest.fail(f"{message}; EQR_REQUIRE_FIXTURES is set, so a parity test may not skip")
    pytest.skip(message)


# `eqr train` / `eqr eval` (in-process and in subprocesses, which inherit this) would write
# compiled programs into the user's persistent cache; tests that test the cache name their own.
os.environ["EQR_COMPILE_CACHE"] = "off"
# The test extra installs libtpu (for the TPU compilations of test_aot.py); without this JAX
# would also try, and fail, to start a TPU backend in every test process. Deviceless TPU
# compilation does not need one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        _missing(f"parity fixture {path}")
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        _missing(f"parity fixtures folder {FIXTURES}")
    return FIXTURES


@functools.lru_cache(maxsize=None)
def reference_step_jit():
    """`interop.reference_step` under one shared `jax.jit` (the config is static): tests that
    check the same model share one compilation instead of running op by op."""
    import jax

    from eqr_jax import interop

    return jax.jit(interop.reference_step, static_argnums=0)


# ----------------------------------------------------------------------------------------------
# Micro configs (4x4 Sudoku sized: 16 tokens, vocabulary 6)


def micro_model(**kw):
    """The tests' `ModelConfig`: 16 tokens, vocabulary 6, one mlp_t layer of width 32, float32.
    ``kw`` overrides fields (cycles, expansion, halting, dtype, ...)."""
    from eqr_jax.config import ModelConfig

    base = dict(seq_len=16, vocab_size=6, H_cycles=1, L_cycles=1, L_layers=1, hidden_size=32,
                num_heads=2, expansion=2.0, mlp_t=True, pos_encodings="none",
                forward_dtype="float32")
    return ModelConfig(**{**base, **kw})


# The step-map tests' config (test_model.py, test_dynamics.py): two cycles of each level, noise on.
STEP_CFG = micro_model(H_cycles=2, L_cycles=2, noise_scale=0.01)
STEP_BATCH = 3


@pytest.fixture(scope="session")
def step_setup():
    """(model, params, inputs, labels) of `STEP_CFG` with `STEP_BATCH` random puzzles."""
    import jax

    from eqr_jax.model import EqRModel

    model = EqRModel(STEP_CFG)
    params = model.init(jax.random.PRNGKey(0))
    shape = (STEP_BATCH, STEP_CFG.seq_len)
    inputs = jax.random.randint(jax.random.PRNGKey(1), shape, 1, STEP_CFG.vocab_size)
    labels = jax.random.randint(jax.random.PRNGKey(2), shape, 2, STEP_CFG.vocab_size)
    return model, params, inputs, labels


def tree_flat(tree):
    """Every leaf of a pytree raveled into one vector."""
    import jax
    import jax.numpy as jnp

    return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])


def tree_cosine(a, b) -> float:
    """Cosine similarity of two pytrees flattened to one vector (gradient comparisons)."""
    import jax.numpy as jnp

    fa, fb = tree_flat(a), tree_flat(b)
    return float(fa @ fb / (jnp.linalg.norm(fa) * jnp.linalg.norm(fb)))


def micro_run(out_dir: str = "", **train_kw):
    """The training tests' `RunConfig`: batch 16, 3 steps per call, logs every call, no periodic
    evaluation or checkpoints; ``train_kw`` overrides `TrainConfig` fields."""
    from eqr_jax.config import DataConfig, RunConfig, TrainConfig

    model = micro_model(H_cycles=2, expansion=1.0, halt_max_steps=2)
    kw = dict(epochs=100, lr=3e-3, lr_warmup_steps=2, weight_decay=0.1, ema_rate=0.9,
              steps_per_call=3, log_every=3, eval_every=0, checkpoint_every=0, out_dir=out_dir)
    return RunConfig(preset="test", model=model, data=DataConfig(global_batch_size=16),
                     train=TrainConfig(**{**kw, **train_kw}))


# The evaluation/solve tests' model: the tiny preset cut to the micro size.
EVAL_MODEL_OVERRIDES = ("model.hidden_size=32", "model.num_heads=2", "model.H_cycles=1",
                        "model.L_cycles=1")
TRAIN_STEPS = 40


def eval_run_config(out_dir: str):
    from eqr_jax import config as C

    return C.apply_overrides(C.preset("tiny"), [
        *EVAL_MODEL_OVERRIDES, f"train.out_dir={out_dir}", f"train.max_steps={TRAIN_STEPS}",
        "train.epochs=1000", "data.global_batch_size=32", "train.lr=3e-3",
        "train.lr_warmup_steps=5", "train.eval_every=100000", "train.checkpoint_every=100000",
        "train.log_every=100000", "train.ema=false"])


@functools.lru_cache(maxsize=1)
def trained_checkpoint() -> str:
    """Directory of a tiny run trained for a few dozen steps (config.json + checkpoints/),
    trained once per session through `eqr_jax.train`, so it is a real checkpoint."""
    from eqr_jax import train
    from eqr_jax.data.arrays import ArrayTrainLoader, make_puzzles

    out = tempfile.mkdtemp(prefix="eqr-eval-test-")
    xi, yi = make_puzzles(512, 0, blanks=(2, 5))
    # No evaluation batches: the tests evaluate the checkpoint themselves.
    train(eval_run_config(out), (ArrayTrainLoader(xi, yi, 32), lambda: iter(())),
          progress=False)
    return out


@pytest.fixture(scope="session")
def trained_model():
    """(config, model, EMA parameters) of `trained_checkpoint`, loaded as ``eqr eval`` loads it."""
    from eqr_jax.checkpoint import load_for_inference
    from eqr_jax.model import EqRModel

    cfg, params = load_for_inference(trained_checkpoint())
    return cfg, EqRModel(cfg.model), params


def eval_data(n: int = 20, batch: int = 8, seed: int = 3):
    """Evaluation batches of easy puzzles; the last batch is partly padding."""
    from eqr_jax.data.arrays import eval_batches, make_puzzles

    x, y = make_puzzles(n, seed, blanks=(2, 5))
    return list(eval_batches(x, y, batch)), x, y


def solution_strings(x: np.ndarray, y: np.ndarray) -> list[str]:
    """'puzzle solution' lines (digits, '.' blanks) for tokens from `make_puzzles`."""
    to_s = lambda t: "".join("." if v <= 1 else str(v - 1) for v in t)
    return [f"{to_s(a)} {to_s(b)}" for a, b in zip(x, y)]


def write_array_dataset(root, train: tuple, test: tuple) -> Path:
    """A dataset folder in the on-disk format from (inputs, labels) arrays (vocabulary 6)."""
    from eqr_jax.data.format import write_split

    for split, (x, y) in (("train", train), ("test", test)):
        write_split(root, split, x, y, vocab_size=6)
    return Path(root)


def replace(cfg, **sections):
    """``cfg`` with fields of its sections replaced: ``replace(cfg, train={"lr": 1e-2})``."""
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v)
                                       for k, v in sections.items()})


def train_loaders(cfg):
    """Array loaders of 256 random 4x4 puzzles (no evaluation batches) for `micro_run` configs."""
    from eqr_jax.data.arrays import ArrayTrainLoader, make_puzzles

    tr = make_puzzles(256, 0)
    return ArrayTrainLoader(*tr, cfg.data.global_batch_size, cfg.train.seed), lambda: iter(())


@pytest.fixture(scope="session")
def resume_runs(tmp_path_factory):
    """Three `micro_run` trainings of 6 steps (compiled once): ``full`` uninterrupted, ``split``
    stopped after 3 steps and resumed. Returns (root, split config, (metrics of full, of the
    first and of the second half of split))."""
    from eqr_jax.training import train

    root = tmp_path_factory.mktemp("runs")
    full = micro_run(str(root / "full"), max_steps=6)
    _, r_full = train(full, train_loaders(full), progress=False, verbose=False)
    split = micro_run(str(root / "split"), max_steps=6)
    _, r_a = train(split, train_loaders(split), progress=False, verbose=False, stop_after=3)
    _, r_b = train(split, train_loaders(split), progress=False, verbose=False, resume=True)
    return root, split, (r_full, r_a, r_b)


def load_params(path, use_ema: bool = False):
    from eqr_jax.checkpoint import load_for_inference

    return load_for_inference(path, use_ema=use_ema)[1]


def read_tensorboard(run_dir):
    """{tag: [(step, value or histogram counts)]} from the tensorboardX event files of a run
    (a local folder, or a ``gs://`` URL: its ``tb/`` objects are read as they are stored)."""
    import struct

    from tensorboardX.proto import event_pb2

    from eqr_jax import storage

    tb = storage.path(str(run_dir)) / "tb"
    out = {}
    names = sorted(p.name for p in tb.iterdir()) if tb.exists() else []
    for f in (tb / n for n in names if n.startswith("events.")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                val = list(v.histo.bucket) if v.HasField("histo") else v.simple_value
                out.setdefault(v.tag, []).append((ev.step, val))
    return out


# ----------------------------------------------------------------------------------------------
# A Cloud Storage bucket on 127.0.0.1


class Bucket:
    """The session's emulated bucket: ``url(name)`` is a fresh ``gs://`` prefix under it; ``fs``
    a gcsfs client on it (to list and read objects); ``env`` the variables that point clients
    (gcsfs, TensorStore) at the emulator, set in ``os.environ`` for the session's processes."""

    def __init__(self, endpoint: str, name: str):
        from gcs_emulator import client_env, make_bucket

        self.endpoint, self.name, self.env = endpoint, name, client_env(endpoint)
        self.fs = make_bucket(endpoint, name)
        self._n = 0

    def url(self, name: str) -> str:
        self._n += 1
        return f"gs://{self.name}/{name}-{self._n}"

    def objects(self, url: str) -> list[str]:
        """Every object under ``url``, relative to it, sorted."""
        root = url[len("gs://"):].rstrip("/")
        return sorted(p[len(root) + 1:] for p in self.fs.find(root))


@pytest.fixture(scope="session")
def gcs_bucket():
    """A fake-gcs-server (in memory) on 127.0.0.1 for the session (`gcs_emulator`), with one
    bucket; the client variables are set for the session (subprocesses inherit them) and
    restored after."""
    from gcs_emulator import ENV_NAMES, start

    saved = {k: os.environ.get(k) for k in ENV_NAMES}
    server = start()
    try:
        yield Bucket(server.url, "eqr-test")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
