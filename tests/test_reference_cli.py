"""Official checkpoints end to end: `eqr convert`, `eqr eval --reference`, `eqr solve
--reference`, and the evaluation noise setting on them. Uses the official-layout fixture (a
3-step 9x9 Sudoku model) on a small 9x9 dataset made here; one compiled evaluation shape
(batch 4, 2 copies, one noise value) serves every CLI run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import fixture_path, reference_step_jit
from eqr_jax import config as config_lib
from eqr_jax import cli, interop
from eqr_jax.cli import convert as convert_cli, eval as eval_cli, solve as solve_cli
from eqr_jax.checkpoint import Checkpointer, load_for_inference
from eqr_jax.data.format import write_split

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
TOL = dict(atol=2e-4, rtol=2e-4)
EVAL_ARGS = ["--depth", "2", "--breadth", "2", "--batch-size", "4", "--noise", "0.5",
             "--no-plots", "--no-progress"]


def _relabelled(seed: int) -> tuple[str, str]:
    perm = np.random.default_rng(seed).permutation(9) + 1
    m = lambda s: "".join("." if c == "." else str(perm[int(c) - 1]) for c in s)
    return m(PUZZLE), m(SOLUTION)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(pth path, fixture outputs, dataset dir, converted run dir, puzzle lines)."""
    pth_path = fixture_path("official_ckpt_mlpt.pth")
    data = np.load(fixture_path("official_ckpt_mlpt.npz"))
    root = tmp_path_factory.mktemp("ref")
    lines = [_relabelled(s) for s in range(4)]
    tok = lambda s: [1 if c == "." else int(c) + 1 for c in s]
    inputs = np.array([tok(p) for p, _ in lines])
    labels = np.array([tok(s) for _, s in lines])
    write_split(root / "sudoku9", "test", inputs, labels, vocab_size=11)
    conv = root / "converted"
    assert cli.main(["convert", str(pth_path), "--out", str(conv), "--data",
                             str(root / "sudoku9")]) == 0
    return pth_path, data, root / "sudoku9", conv, [f"{p} {s}" for p, s in lines]


def test_converted_checkpoint_reproduces_raw_and_ema_outputs(setup):
    _, data, ds, conv, _ = setup
    for which in ("ema", "raw"):
        cfg, params = load_for_inference(conv, use_ema=which == "ema")
        assert (cfg.model.seq_len, cfg.model.vocab_size) == (81, 11)
        assert cfg.model.hidden_size == 64 and cfg.model.mlp_t and cfg.preset == "reference"
        assert cfg.data.path == str(ds) and cfg.train.ema_rate == 0.9 and cfg.train.lr == 1e-3
        out = reference_step_jit()(cfg.model, params, data["inputs"], data["z_H0"],
                                     data["z_L0"])
        for key in ("z_H", "z_L", "logits", "q_halt"):
            np.testing.assert_allclose(np.asarray(out[key]), data[f"{which}/{key}"], **TOL,
                                       err_msg=f"{which}/{key}")
    meta = Checkpointer(conv / "checkpoints", read_only=True).read_json(3, "meta")
    assert meta["step"] == 3 and meta["weights_only"] and meta["converted_from"].endswith(".pth")
    assert config_lib.load(str(conv / "config.json")).model == cfg.model
    # Weights only: a training run refuses to resume from it (rather than failing in Orbax).
    with pytest.raises(ValueError, match="holds weights only"):
        Checkpointer(conv / "checkpoints", read_only=True).restore(None, cfg)


def test_convert_refuses_to_overwrite_and_bad_input(setup, tmp_path, capsys):
    pth_path, _, _, conv, _ = setup
    assert convert_cli.main([str(pth_path), "--out", str(conv)]) == 2
    assert "already holds step(s) [3]" in capsys.readouterr().err
    assert convert_cli.main([str(pth_path), "--out", str(tmp_path / "c"), "--seq-len", "64",
                             "--data", str(setup[2])]) == 2
    assert "seq_len=64 contradicts" in capsys.readouterr().err
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    assert convert_cli.main([str(tmp_path / "bad.pth"), "--out", str(tmp_path / "c")]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err


def test_data_sizes_come_from_data_flags_or_weights(setup):
    _, _, ds, _, _ = setup
    sd = {"model.inner.embed_tokens.embedding_weight": np.zeros((6, 8), np.float32)}
    assert interop.reference_data_sizes(sd, data=ds) == {"seq_len": 81, "vocab_size": 11}
    assert interop.reference_data_sizes(sd, seq_len=900) == {"seq_len": 900, "vocab_size": 6}
    # An attention model's weights do not fix seq_len: the error says what to pass.
    with pytest.raises(config_lib.ConfigError, match=r"\['seq_len'\].*--data DATASET_DIR or "
                                                     r"--seq-len N"):
        interop.reference_data_sizes(sd)


def test_eval_reference_matches_converted_checkpoint(setup, tmp_path, capsys):
    pth_path, _, ds, conv, _ = setup
    runs = {"reference": ["--reference", str(pth_path), "--data", str(ds)],
            "converted": ["--checkpoint", str(conv), "--data", str(ds)],
            "raw": ["--reference", str(pth_path), "--data", str(ds), "--no-ema"]}
    res = {}
    for name, args in runs.items():
        assert eval_cli.main(args + EVAL_ARGS + ["--out", str(tmp_path / name)]) == 0
        res[name] = json.loads((tmp_path / name / "results.json").read_text())["settings"][0]
    out = capsys.readouterr()
    assert "noise=0.5" in out.out and "ema weights" in out.err and "raw weights" in out.err
    m = {k: {n: v for n, v in r["metrics"].items() if n != "time_s"} for k, r in res.items()}
    assert res["reference"]["noise_scale"] == 0.5 and m["reference"]["num_puzzles"] == 4
    assert m["reference"] == m["converted"]  # same (EMA) weights, same keys: same numbers
    assert m["raw"]["all/final_residual"] != m["reference"]["all/final_residual"]


def test_solve_reference_and_flag_errors(setup, tmp_path, capsys):
    pth_path, _, ds, _, lines = setup
    f = tmp_path / "p.txt"
    f.write_text("\n".join(lines) + "\n")
    # seq_len and vocab_size come from the (mlp_t) weights here: no --data needed.
    args = ["--reference", str(pth_path), "--puzzles", str(f), "--depth", "2", "--breadth", "2",
            "--batch-size", "4", "--noise", "0.5", "--quiet"]
    assert solve_cli.main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("valid: ") and out[-2].endswith("/4")
    assert out[-1].startswith("exact_accuracy: ")
    bad = {("--checkpoint", str(tmp_path)): "exactly one of --checkpoint",
           ("--step", "3"): "--step applies to --checkpoint",
           ("--noise", "-1"): "eval.noise_scale must be >= 0"}
    for extra, message in bad.items():
        assert solve_cli.main(args + list(extra)) == 2
        assert message in capsys.readouterr().err
    assert solve_cli.main(["--checkpoint", str(tmp_path), "--seq-len", "81", "--puzzles",
                       str(f)]) == 2
    assert "--seq-len applies to --reference" in capsys.readouterr().err
