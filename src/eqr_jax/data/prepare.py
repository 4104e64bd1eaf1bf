"""Getting a run's data ready: build ``data.path`` from the ``data.build_*`` recipe when it is
missing, check it against the model, and open the loaders training reads (docs/data.md).

`eqr train` (`eqr_jax.cli.train`) and the experiments call these before `eqr_jax.training.train`,
which itself builds no data.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from eqr_jax.config import ConfigError, RunConfig
from eqr_jax.data.bucket import dataset_dir, local_dataset
from eqr_jax.data.format import DataFormatError, Split, dataset_info, load_split
from eqr_jax.data.loader import EvalLoader, TrainLoader


def data_build_command(cfg: RunConfig) -> str:
    """The `eqr data` command that builds ``data.path`` from the ``data.build_*`` options."""
    d = cfg.data
    if d.build_kind == "maze":
        return (f"eqr data maze --out {d.path} --grid {d.build_size} --train {d.build_train} "
                f"--test {d.build_test} --num-aug {d.build_num_aug} --seed {d.build_seed}")
    test = "" if (d.build_source == "hub" and d.build_test == 0) else f" --test {d.build_test}"
    extra = "" if d.build_source == "hub" else f" --size {d.build_size} --difficulty {d.build_difficulty}"
    return (f"eqr data sudoku --out {d.path} --source {d.build_source}{extra} "
            f"--train {d.build_train}{test} --num-aug {d.build_num_aug} --seed {d.build_seed}")


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    if "://" in str(a) or "://" in str(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def check_data_path(cfg: RunConfig, default_path: str | None, build: bool = False) -> bool:
    """Whether ``data.path`` exists; when it does not, it may be built only if it is the
    preset's own ``default_path`` or ``build`` is set (so a mistyped ``--data`` is an error, not
    minutes of building in a new folder). Returns True when it exists; raises `ConfigError`.
    A ``gs://`` folder exists when anything is stored under it (`check_dataset` then says
    whether it is a complete upload)."""
    path = dataset_dir(cfg.data.path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--data {path} is not a directory")
        return True
    if build or (default_path is not None and same_path(path, default_path)):
        return False
    raise ConfigError(
        f"--data {path} does not exist; pass --build to build it there "
        f"({data_build_command(cfg)}), or give an existing dataset folder")


def ensure_dataset(cfg: RunConfig, progress: bool = True, process_index: int = 0,
                   process_count: int = 1) -> None:
    """Build the dataset with the ``data.build_*`` options when ``data.path`` does not exist.

    ``build_kind=maze``: Maze-Unique (`build_maze_dataset`); ``build_kind=sudoku`` with
    ``build_source=hub``: Sudoku-Extreme from the hub, built as the reference builds it (raises
    `HubUnavailableError` naming the offline command when the hub cannot be reached);
    ``build_source=generate``: the project's generator, never into a folder named like
    Sudoku-Extreme.

    The build writes into ``.<name>.partial`` beside ``data.path`` and renames it when complete,
    so an interrupted build leaves no half-built ``data.path`` (the generator's cache inside the
    partial folder lets the next build resume). Only process 0 builds; with several processes
    the others wait for it and must then see the folder (shared storage).

    A ``gs://`` ``data.path`` is built in a local folder of this host's cache and uploaded
    (`eqr_jax.data.bucket.building_into`: ``train/dataset.json`` last, so no process takes a
    half-uploaded folder for a dataset); every host then reads it through its own copy.
    """
    path = dataset_dir(cfg.data.path)
    if not path.exists():
        if cfg.data.build_kind == "sudoku" and cfg.data.build_source == "generate":
            from eqr_jax.data.build import check_generated_name

            check_generated_name(path)
        if process_index == 0:
            if "://" in str(path):
                _build_into_bucket(cfg, str(path), progress)
            else:
                _build_atomically(cfg, path, progress)
    if process_count > 1:
        from eqr_jax.shared_storage import check_all_see
        from eqr_jax.sharding import barrier, distributed_timeout

        # Through the coordination service, not a device collective: a build takes minutes to
        # hours, far beyond gloo's fixed 30 s rendezvous.
        barrier(f"data-ready:{path}", timeout_s=max(distributed_timeout(), 24 * 3600.0))
        # Every process stops with the same line when one of them cannot see the build.
        check_all_see(path, "the dataset",
                      f"build it on every host first with `{data_build_command(cfg)}`")


def _build_atomically(cfg: RunConfig, path: Path, progress: bool) -> None:
    import shutil

    partial = path.parent / f".{path.name}.partial"
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        _build(cfg, partial, path, progress)
    except BaseException:
        # Keep a partial folder only for what it can resume (the generator's cache).
        if partial.exists() and not (partial / ".cache").exists():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    os.rename(partial, path)
    print(f"[eqr] dataset complete: {path}", flush=True)


def _build_into_bucket(cfg: RunConfig, url: str, progress: bool) -> None:
    from eqr_jax.data.bucket import building_into

    with building_into(url) as stage:
        _build(cfg, stage, url, progress)
    print(f"[eqr] dataset complete: {url}", flush=True)


def _build(cfg: RunConfig, out: Path, path, progress: bool) -> None:
    """Build the ``data.build_*`` recipe into ``out`` (messages name the final ``path``)."""
    # The builders import numba kernels: only when something is built.
    from eqr_jax.data import build as build_lib
    from eqr_jax.data.importers import HubUnavailableError

    d = cfg.data
    if d.build_kind == "maze":
        print(f"[eqr] building {d.build_size}x{d.build_size} Maze-Unique data in {path} ...",
              flush=True)
        build_lib.build_maze_dataset(str(out), grid=d.build_size, train=d.build_train,
                                     test=d.build_test, seed=d.build_seed,
                                     num_aug=d.build_num_aug, progress=progress)
    elif d.build_source == "hub":
        print(f"[eqr] building Sudoku-Extreme (hub, reference recipe) in {path} ...", flush=True)
        try:
            build_lib.build_sudoku_dataset(
                str(out), size=9, train=d.build_train, test=d.build_test or None,
                num_aug=d.build_num_aug, seed=d.build_seed, source="hub", progress=progress)
        except HubUnavailableError as e:
            csv_cmd = data_build_command(cfg).replace("--source hub", "--source csv DIR")
            raise HubUnavailableError(
                f"{path} does not exist and cannot be built: {e}\n"
                f"Offline: put train.csv and test.csv of the hub dataset in a folder DIR and run\n"
                f"  {csv_cmd}\nthen train again (or pass --data PATH to a built dataset)") from None
    else:
        print(f"[eqr] building {d.build_size}x{d.build_size} Sudoku data (generated) in {path} ...",
              flush=True)
        build_lib.build_sudoku_dataset(str(out), size=d.build_size, train=d.build_train,
                                       test=d.build_test, num_aug=d.build_num_aug,
                                       seed=d.build_seed, difficulty=d.build_difficulty,
                                       progress=progress)


def check_matches_model(cfg: RunConfig) -> None:
    """Raise `ConfigError` unless ``data.path``'s ``seq_len`` / ``vocab_size`` are the model's
    (metadata only: the dry run's check)."""
    info = dataset_info(cfg.data.path)
    for key in ("seq_len", "vocab_size"):
        if int(info[key]) != getattr(cfg.model, key):
            raise ConfigError(
                f"model.{key}={getattr(cfg.model, key)} does not match the data in "
                f"{cfg.data.path} ({key}={info[key]}); set model.{key}={info[key]}")


def check_split_fits_model(meta, model_cfg, where: str) -> None:
    """Raise `ConfigError` unless a split's tokens fit the model: the same sequence length
    (board size) and a vocabulary no larger than the model's. ``meta``: `DatasetMetadata`."""
    board = lambda n: (f"{math.isqrt(n)}x{math.isqrt(n)} boards, " if math.isqrt(n) ** 2 == n
                       else "")
    if int(meta.seq_len) != model_cfg.seq_len or int(meta.vocab_size) > model_cfg.vocab_size:
        raise ConfigError(
            f"{where} holds {board(int(meta.seq_len))}seq_len {meta.seq_len}, vocab "
            f"{meta.vocab_size}, but the model takes {board(model_cfg.seq_len)}seq_len "
            f"{model_cfg.seq_len}, vocab {model_cfg.vocab_size}")


def check_dataset(cfg: RunConfig, process_count: int = 1) -> dict[str, Split]:
    """Everything the run will read, checked before the first step: both splits load and are
    consistent (`load_split`: a truncated or corrupt file, row counts against ``dataset.json``),
    their tokens fit the model, a full training batch can be drawn, and the batch sizes split
    over the processes. Returns the memory-mapped splits. Raises `ConfigError` /
    `DataFormatError` naming the file or key."""
    d = cfg.data
    root = local_dataset(d.path)  # a gs:// folder: copied (or found) once for both splits
    check_matches_model(cfg)
    splits = {}
    for name in ("train", "test"):
        split = load_split(root, name, mmap=True)
        check_split_fits_model(split.meta, cfg.model, f"{d.path}/{name}")
        if split.num_examples == 0:
            raise DataFormatError(f"{d.path}/{name}: holds no examples")
        splits[name] = split
    for what, rows in (("data.global_batch_size", d.global_batch_size),
                       ("the evaluation batch (data.eval_batch_size, 0: the global batch)",
                        d.eval_batch)):
        if rows % process_count:
            raise ConfigError(f"{what}={rows} is not divisible by the {process_count} processes")
    loader = TrainLoader(splits["train"], d.global_batch_size, cfg.train.seed, prefetch=0)
    if not loader.full_batch_possible():
        raise ConfigError(
            f"data.global_batch_size={d.global_batch_size} is larger than a batch "
            f"{d.path}/train can fill ({splits['train'].num_groups} groups, one puzzle each "
            "per batch); lower it")
    return splits


def make_loaders(cfg: RunConfig, process_index: int = 0, process_count: int = 1,
                 splits: dict[str, Split] | None = None):
    """``(TrainLoader, EvalLoader factory)`` of ``data.path`` for `eqr_jax.training.train`: this
    process's slice of every global batch (it reads only those rows); evaluation batches of
    ``data.eval_batch`` rows. ``splits``: the memory-mapped splits `check_dataset` returned
    (default: loaded here)."""
    d = cfg.data
    pi, pc = process_index, process_count
    train, test = (splits or {}).get("train", d.path), (splits or {}).get("test", d.path)
    train_loader = TrainLoader(train, d.global_batch_size, cfg.train.seed,
                               epochs_per_iter=cfg.train.epochs_per_iter or cfg.train.epochs,
                               process_index=pi, process_count=pc, prefetch=d.prefetch)
    eval_factory = lambda: EvalLoader(test, d.eval_batch, process_index=pi, process_count=pc)
    return train_loader, eval_factory
