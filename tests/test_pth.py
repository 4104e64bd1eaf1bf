"""The torch-free, code-free `.pth` reader: real torch files, the official checkpoint, and
crafted files (views, bounds, truncation, malicious pickles). No test here imports torch."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import fixture_path, reference_step_jit
from eqr_jax import interop, pth
from torch_zip import dict_ as _dict, global_ as _global, str_ as _str, tensor as _tensor
from torch_zip import torch_zip as _torch_zip, tuple_ as _tuple

DATA = Path(__file__).resolve().parent / "data"
TOL = dict(atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# Files written by torch.save (tests/data/make_torch_samples.py)


@pytest.fixture(scope="module")
def expected():
    return np.load(DATA / "torch_sample.npz")


@pytest.mark.parametrize("name", ["torch_sample.pth", "torch_sample_legacy.pth"])
def test_torch_samples_read_back_exactly(name, expected):
    obj = pth.load(DATA / name)
    tensors = dict(obj["tensors"])
    if name == "torch_sample.pth":  # the legacy layout cannot store the v3 dtypes
        tensors.update(obj["v3"])
    assert len(tensors) == (21 if name == "torch_sample.pth" else 19)
    for key, arr in tensors.items():
        want, dtype = expected[f"value/{key}"], str(expected[f"dtype/{key}"])
        assert isinstance(arr, np.ndarray) and arr.flags.c_contiguous and arr.flags.owndata
        assert str(arr.dtype) == dtype, key
        assert arr.shape == want.shape, key
        got = arr.astype(np.float32) if dtype in ("bfloat16", "float8_e4m3fn") else arr
        np.testing.assert_array_equal(got, want, err_msg=key)
    # Views of one storage: transposed, offset, strided, expanded (stride 0), 0-d, empty.
    f32 = tensors["f32"]
    np.testing.assert_array_equal(tensors["f32_transposed"], f32.T)
    np.testing.assert_array_equal(tensors["f32_offset"], f32[1:, 2:])
    np.testing.assert_array_equal(tensors["f32_step"], f32[::2, 1::3])
    np.testing.assert_array_equal(tensors["f32_expanded"], np.broadcast_to(f32[0:1, :3], (3, 3)))
    assert tensors["f32_scalar"].shape == () and tensors["f32_scalar"] == f32[2, 3]
    assert tensors["f32_empty"].shape == (0, 3)
    assert tensors["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    # One tensor saved twice is one array; plain data round-trips.
    assert obj["tied"]["a"] is obj["tied"]["b"]
    meta = obj["meta"]
    assert list(meta) == ["step", "lr", "name", "flags", "size", "device", "dtype", "nothing"]
    assert (meta["step"], meta["lr"], meta["name"], meta["flags"]) == (7, 1e-3, "sample", {1, 2})
    assert (meta["size"], meta["device"], meta["nothing"]) == ((2, 3), "cpu", None)
    assert meta["dtype"] == np.dtype(ml_dtypes.bfloat16)
    kind, keys, pos, has_gauss, cached = obj["numpy_state"]
    assert kind == "MT19937" and pos == 624 and has_gauss == 0 and cached == 0.0
    np.testing.assert_array_equal(keys, expected["numpy_state_keys"])
    assert keys.dtype == np.uint32
    assert obj["numpy_scalar"] == 2.5 and isinstance(obj["numpy_scalar"], np.float64)


# ---------------------------------------------------------------------------------------------
# The official checkpoint fixture


@pytest.fixture(scope="module")
def official():
    return fixture_path("official_ckpt_mlpt.pth"), np.load(fixture_path("official_ckpt_mlpt.npz"))


def test_official_checkpoint_contents(official):
    path, _ = official
    obj = pth.load(path)
    assert obj["step"] == 3 and obj["iteration"] == 4 and obj["total_steps"] == 1000
    carry = obj["carry"]  # pickled by reference to the reference's models.eqr module
    assert isinstance(carry, pth.Opaque)
    assert (carry.module, carry.name) == ("models.eqr", "ModelCarry")
    inner = carry.state["inner_carry"]
    assert (inner.module, inner.name) == ("models.eqr", "LatentCarry")
    assert inner.state["z_H"].shape == (8, 81, 64) and inner.state["z_H"].dtype == np.float32
    assert carry.state["halted"].dtype == np.bool_
    assert obj["rng"]["torch"].dtype == np.uint8 and obj["rng"]["cuda"] is None
    assert obj["numpy"][0] == "MT19937" and obj["numpy"][1].shape == (624,)
    assert obj["optimizers"][0]["state"][0]["m"].shape == (11, 64)
    assert obj["ema"]["mu"] == 0.9


def test_official_checkpoint_reproduces_reference_outputs(official):
    path, data = official
    ckpt = interop.load_reference_checkpoint(path)
    assert ckpt["step"] == 3
    assert ckpt["config"]["arch"]["hidden_size"] == 64 and ckpt["config"]["ema_rate"] == 0.9
    sizes = dict(seq_len=int(data["seq_len"]), vocab_size=int(data["vocab_size"]))
    cfg = interop.config_from_reference(ckpt["config"], **sizes)
    assert cfg == interop.config_from_reference(json.loads(str(data["config_json"])))
    for which, sd in (("raw", ckpt["state_dict"]), ("ema", ckpt["ema_state_dict"])):
        params = interop.params_from_reference(sd, cfg)
        out = reference_step_jit()(cfg, params, data["inputs"], data["z_H0"], data["z_L0"])
        for key in ("z_H", "z_L", "logits", "q_halt"):
            np.testing.assert_allclose(np.asarray(out[key]), data[f"{which}/{key}"], **TOL,
                                       err_msg=f"{which}/{key}")
    # EMA and raw weights really differ (3 steps at EMA rate 0.9).
    name = "model.inner.lm_head.weight"
    assert not np.allclose(ckpt["state_dict"][name], ckpt["ema_state_dict"][name])


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_official_checkpoint_is_a_clear_error(official, tmp_path, cut):
    path, _ = official
    raw = Path(path).read_bytes()
    bad = tmp_path / "part.pth"
    bad.write_bytes(raw[:int(len(raw) * cut)])
    with pytest.raises(pth.PthError, match=r"part\.pth: truncated or corrupt zip"):
        interop.load_reference_checkpoint(bad)


@pytest.mark.parametrize("cut", [40, 150, 7000])
def test_truncated_legacy_file_is_a_clear_error(tmp_path, cut):
    raw = (DATA / "torch_sample_legacy.pth").read_bytes()
    bad = tmp_path / "part.pth"
    bad.write_bytes(raw[:cut])
    with pytest.raises(pth.PthError, match="truncated"):
        pth.load(bad)


def test_not_a_checkpoint(tmp_path):
    cases = {"garbage.pth": (b"not a checkpoint at all", "not a PyTorch checkpoint"),
             "empty.pth": (b"", "empty"),
             "plain.pkl": (pickle.dumps({"a": 1}, protocol=2), "not a torch checkpoint")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(pth.PthError, match=message):
            interop.load_reference_checkpoint(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(pth.PthError, match="without <archive>/data.pkl"):
        pth.load(tmp_path / "other.zip")
    with pytest.raises(FileNotFoundError):
        pth.load(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------
# Hand-made pickles in torch's zip layout (raw opcodes: tests/torch_zip.py)


def test_crafted_views_offsets_and_strides(tmp_path):
    store = np.arange(24, dtype=np.float32)
    body = _dict(
        full=_tensor("0", 24, 0, (4, 6), (6, 1)),
        cols=_tensor("0", 24, 1, (4, 2), (6, 3)),  # store.reshape(4, 6)[:, 1::3]
        tail=_tensor("0", 24, 20, (4,), (1,)),
        bcast=_tensor("0", 24, 5, (3, 2), (0, 7)),
        ints=_tensor("1", 3, 1, (2,), (1,), storage="LongStorage"))
    path = _torch_zip(tmp_path / "views.pth", body,
                      {"0": store.tobytes(), "1": np.array([7, -8, 9], np.int64).tobytes()})
    out = pth.load(path)
    np.testing.assert_array_equal(out["full"], store.reshape(4, 6))
    np.testing.assert_array_equal(out["cols"], store.reshape(4, 6)[:, 1::3])
    np.testing.assert_array_equal(out["tail"], store[20:])
    np.testing.assert_array_equal(out["bcast"], [[5, 12], [5, 12], [5, 12]])
    assert out["ints"].dtype == np.int64 and out["ints"].tolist() == [-8, 9]
    out["full"][0, 0] = 99  # every array owns its memory: no aliasing between views
    assert out["cols"][0, 0] == 1


@pytest.mark.parametrize("tensor, records, message", [
    (_tensor("0", 24, 20, (5,), (1,)), {"0": bytes(96)}, "reaches element 24"),
    (_tensor("0", 24, 0, (4, 6), (7, 1)), {"0": bytes(96)}, "reaches element 26"),
    (_tensor("0", 24, 0, (24,), (1,)), {"0": bytes(95)}, "holds 95 bytes, expected 96"),
    (_tensor("0", 24, 0, (24,), (1,)), {}, "record 'archive/data/0' is missing"),
    (_tensor("0", 4, 0, (2, 2), (1,)), {"0": bytes(16)}, "differ in rank"),
])
def test_crafted_bad_tensors_are_clear_errors(tmp_path, tensor, records, message):
    path = _torch_zip(tmp_path / "bad.pth", _dict(w=tensor), records)
    with pytest.raises(pth.PthError, match=message):
        pth.load(path)


MALICIOUS = {
    "os.system": lambda m: _global("os", "system") + _tuple(_str(f"touch {m}")) + b"R",
    "builtins.eval": lambda m: _global("builtins", "eval")
    + _tuple(_str(f"open({str(m)!r}, 'w').close()")) + b"R",
    "subprocess.Popen": lambda m: _global("subprocess", "Popen")
    + _tuple(_tuple(_str("touch"), _str(str(m)))) + b"R",
    # The protocol-4 spelling (STACK_GLOBAL) of the same call.
    "os.system (protocol 4)": lambda m: b"\x8c\x02os\x8c\x06system\x93"
    + _tuple(_str(f"touch {m}")) + b"R",
    # What pickle.dumps writes for an object whose __reduce__ returns os.system.
    "posix.system": None,
}


class _RunsCommand:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


@pytest.mark.parametrize("name", sorted(MALICIOUS))
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, name):
    marker = tmp_path / "pwned"
    if MALICIOUS[name] is None:
        evil = pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2)[2:-1]
    else:
        evil = MALICIOUS[name](marker)
    # An otherwise normal checkpoint whose `step` is the payload.
    body = _dict(model=_dict(w=_tensor("0", 1, 0, (1,), (1,))), step=evil)
    path = _torch_zip(tmp_path / "evil.pth", body, {"0": bytes(4)})
    with pytest.raises(pth.UnsafePickleError, match=rf"names {name.split()[0]}, .*refusing"):
        interop.load_reference_checkpoint(path)
    assert not marker.exists()
    # The file is really malicious: an unrestricted unpickler runs the command.
    with zipfile.ZipFile(path) as z:
        ran = _unrestricted_load(z.read("archive/data.pkl"))
    if hasattr(ran["step"], "wait"):
        ran["step"].wait()
    assert marker.exists()


def _unrestricted_load(data: bytes):
    class Plain(pickle.Unpickler):
        def persistent_load(self, pid):
            return None

        def find_class(self, module, name):
            if module.startswith(("torch", "collections")):
                return lambda *a, **k: None
            return super().find_class(module, name)

    return Plain(io.BytesIO(data)).load()


def test_state_on_allow_listed_objects_is_refused(tmp_path):
    # BUILD on a shared allow-listed object would change the reader for later loads.
    body = _dict(x=_global("torch", "FloatStorage") + _dict(dtype=_str("evil")) + b"b")
    with pytest.raises(pth.UnsafePickleError, match="sets state"):
        pth.load(_torch_zip(tmp_path / "build.pth", body))
    assert pth.load(DATA / "torch_sample.pth")["tensors"]["f32"].dtype == np.float32


def test_placeholder_classes_are_inert(tmp_path):
    # A reference class "called" with arguments and given state: recorded, never run.
    body = _dict(carry=_global("models.eqr", "ModelCarry") + _tuple(_str("arg"))
                 + b"R" + _dict(steps=_tensor("0", 2, 0, (2,), (1,), "IntStorage")) + b"b")
    out = pth.load(_torch_zip(tmp_path / "carry.pth", body,
                              {"0": np.array([3, 4], np.int32).tobytes()}))
    carry = out["carry"]
    assert isinstance(carry, pth.Opaque) and carry.args == ("arg",)
    np.testing.assert_array_equal(carry.state["steps"], [3, 4])
    # Narrowing the placeholder namespaces turns the same file into a refusal.
    with pytest.raises(pth.UnsafePickleError, match="models.eqr.ModelCarry"):
        pth.load(tmp_path / "carry.pth", placeholder_modules=())


def test_bare_state_dict(tmp_path):
    body = _dict(**{"inner.q_head.bias": _tensor("0", 2, 0, (2,), (1,))})
    path = _torch_zip(tmp_path / "sd.pth", body, {"0": np.array([1, 2], np.float32).tobytes()})
    ckpt = interop.load_reference_checkpoint(path)
    assert ckpt["ema_state_dict"] is None and ckpt["config"] is None and ckpt["step"] is None
    np.testing.assert_array_equal(ckpt["state_dict"]["inner.q_head.bias"], [1, 2])
