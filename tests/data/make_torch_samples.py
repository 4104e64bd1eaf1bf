"""Regenerate ``torch_sample.pth`` / ``torch_sample_legacy.pth`` and ``torch_sample.npz``.

Needs PyTorch (not a test dependency): ``python tests/data/make_torch_samples.py``. The .pth
files are what ``torch.save`` writes (zip and legacy layouts) for tensors of many dtypes,
non-contiguous and offset views, shared storages, a Parameter and a few plain Python / NumPy
values; the .npz holds what each tensor must read back as (bfloat16 / float8 widened to
float32, with the dtype name under ``dtype/<name>``). `tests/test_pth.py` reads them without
torch.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    t = {
        "f32": base,
        "f32_transposed": base.t(),  # strides (1, 6)
        "f32_offset": base[1:, 2:],  # offset 8, strides (6, 1)
        "f32_step": base[::2, 1::3],  # strides (12, 3)
        "f32_expanded": base[0:1, :3].expand(3, 3),  # stride 0
        "f32_scalar": base[2, 3].clone(),  # 0-d
        "f32_empty": torch.zeros(0, 3),
        "bf16": (base * 3.3).to(torch.bfloat16),
        "bf16_transposed": (base * 3.3).to(torch.bfloat16).t(),
        "f16": base.to(torch.float16)[1:, ::2],
        "f64": base.double() / 7,
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(-6, 6, dtype=torch.int32)[2:],
        "i16": torch.arange(10, dtype=torch.int16) * -300,
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": base > 0,
        "c64": torch.complex(base[:2], -base[2:]),
        "param": torch.nn.Parameter(base[:2, :2].clone()),
    }
    return t


def v3_tensors() -> dict[str, torch.Tensor]:
    # Dtypes saved as an untyped storage plus a dtype (torch._utils._rebuild_tensor_v3).
    return {"u16": torch.arange(60000, 60012, dtype=torch.int64).to(torch.uint16).reshape(3, 4)
            .t(), "f8": torch.tensor([0.5, -1.25, 3.0, 448.0]).to(torch.float8_e4m3fn)}


def expected(name: str, x: torch.Tensor) -> tuple[np.ndarray, str]:
    dtype = str(x.dtype).removeprefix("torch.")
    x = x.detach()
    if x.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        return x.float().numpy(), dtype
    if x.dtype == torch.uint16:
        return x.to(torch.int64).numpy().astype(np.uint16), dtype
    return x.numpy().copy(), dtype


def main() -> None:
    ts = tensors()
    shared = ts["f32"]
    obj = {
        "tensors": ts,
        "tied": {"a": shared, "b": shared},  # the same tensor twice
        "meta": collections.OrderedDict(step=7, lr=1e-3, name="sample", flags={1, 2},
                                        size=torch.Size([2, 3]), device=torch.device("cpu"),
                                        dtype=torch.bfloat16, nothing=None),
        "numpy_state": np.random.RandomState(3).get_state(),
        "numpy_scalar": np.float64(2.5),
    }
    zip_obj = dict(obj, v3=v3_tensors())
    torch.save(zip_obj, HERE / "torch_sample.pth")
    torch.save(obj, HERE / "torch_sample_legacy.pth", _use_new_zipfile_serialization=False)
    out = {}
    for name, x in list(ts.items()) + list(v3_tensors().items()):
        arr, dtype = expected(name, x)
        out[f"value/{name}"] = arr
        out[f"dtype/{name}"] = np.array(dtype)
    out["numpy_state_keys"] = obj["numpy_state"][1]
    np.savez(HERE / "torch_sample.npz", **out)


if __name__ == "__main__":
    main()
