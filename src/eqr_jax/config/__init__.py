"""Typed run configuration: model, data, training and evaluation, with presets and overrides.

Configs are code (as in big_vision): frozen dataclasses (`sections`), a few named presets
(`presets`: `sudoku`, `maze`, `tiny`), and ``key=value`` overrides from the command line
(`serialization`). Unknown keys are errors everywhere, so a typo never silently trains the wrong
model. A resolved config round-trips through JSON (`to_dict` / `from_dict`) and is saved beside
every run. Everything is importable from here (``from eqr_jax.config import ...``).
"""

from eqr_jax.config.presets import PRESETS, maze_model, preset, sudoku_model
from eqr_jax.config.sections import (POS_ENCODINGS, VARIANTS, ConfigError, DataConfig,
                                     EvalConfig, ModelConfig, RunConfig, TrainConfig,
                                     URL_SCHEMES, check_path, url_refusal, url_scheme)
from eqr_jax.config.serialization import (apply_overrides, from_dict, load, save, to_dict,
                                          to_json)

__all__ = ["ConfigError", "ModelConfig", "DataConfig", "TrainConfig", "EvalConfig", "RunConfig",
           "VARIANTS", "POS_ENCODINGS", "PRESETS", "preset", "sudoku_model", "maze_model",
           "to_dict", "to_json", "from_dict", "apply_overrides", "save", "load",
           "check_path", "url_refusal", "url_scheme", "URL_SCHEMES"]
