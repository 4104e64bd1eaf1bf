"""Getting a run's data ready: build ``data.path`` from the ``data.build_*`` recipe when it is
missing, check it against the model, and open the loaders training reads (docs/data.md).

`eqr train` (`eqr_jax.cli.train`) and the experiments call these before `eqr_jax.training.train`,
which itself builds no data.
"""

from __future__ import annotations

from pathlib import Path

from eqr_jax.config import ConfigError, RunConfig
from eqr_jax.data.format import dataset_info
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


def ensure_dataset(cfg: RunConfig, progress: bool = True, process_index: int = 0) -> None:
    """Build the dataset with the ``data.build_*`` options when ``data.path`` does not exist.

    ``build_kind=maze``: Maze-Unique (`build_maze_dataset`); ``build_kind=sudoku`` with
    ``build_source=hub``: Sudoku-Extreme from the hub, built as the reference builds it (raises
    `HubUnavailableError` naming the offline command when the hub cannot be reached);
    ``build_source=generate``: the project's generator, never into a folder named like
    Sudoku-Extreme. Only process ``process_index`` 0 builds.
    """
    path = Path(cfg.data.path)
    if path.exists():
        return
    # The builders import numba kernels: only when something is built.
    from eqr_jax.data import build as build_lib
    from eqr_jax.data.importers import HubUnavailableError

    d = cfg.data
    if d.build_kind == "sudoku" and d.build_source == "generate":
        build_lib.check_generated_name(path)
    if process_index != 0:
        return
    if d.build_kind == "maze":
        print(f"[eqr] building {d.build_size}x{d.build_size} Maze-Unique data in {path} ...",
              flush=True)
        build_lib.build_maze_dataset(str(path), grid=d.build_size, train=d.build_train,
                                     test=d.build_test, seed=d.build_seed,
                                     num_aug=d.build_num_aug, progress=progress)
    elif d.build_source == "hub":
        print(f"[eqr] building Sudoku-Extreme (hub, reference recipe) in {path} ...", flush=True)
        try:
            build_lib.build_sudoku_dataset(
                str(path), size=9, train=d.build_train, test=d.build_test or None,
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
        build_lib.build_sudoku_dataset(str(path), size=d.build_size, train=d.build_train,
                                       test=d.build_test, num_aug=d.build_num_aug,
                                       seed=d.build_seed, difficulty=d.build_difficulty,
                                       progress=progress)


def check_matches_model(cfg: RunConfig) -> None:
    """Raise `ConfigError` unless ``data.path``'s ``seq_len`` / ``vocab_size`` are the model's."""
    info = dataset_info(cfg.data.path)
    for key in ("seq_len", "vocab_size"):
        if int(info[key]) != getattr(cfg.model, key):
            raise ConfigError(
                f"model.{key}={getattr(cfg.model, key)} does not match the data in "
                f"{cfg.data.path} ({key}={info[key]}); set model.{key}={info[key]}")


def make_loaders(cfg: RunConfig, process_index: int = 0, process_count: int = 1):
    """``(TrainLoader, EvalLoader factory)`` of ``data.path`` for `eqr_jax.training.train`: this
    process's slice of every global batch; evaluation batches of ``data.eval_batch`` rows."""
    d = cfg.data
    pi, pc = process_index, process_count
    train_loader = TrainLoader(d.path, d.global_batch_size, cfg.train.seed,
                               epochs_per_iter=cfg.train.epochs_per_iter or cfg.train.epochs,
                               process_index=pi, process_count=pc, prefetch=d.prefetch)
    eval_factory = lambda: EvalLoader(d.path, d.eval_batch, process_index=pi, process_count=pc)
    return train_loader, eval_factory
