"""Files in torch's zip layout written without torch, for the tests: raw pickle opcodes for the
objects a `.pth` holds (`save` for plain containers of arrays and numbers), and the pieces to
hand-craft unusual or malicious ones (`test_pth.py`)."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
           np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
           np.dtype(np.bool_): "BoolStorage"}


def global_(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def str_(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def int_(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def tuple_(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def tensor(key: str, numel: int, offset: int, size, stride, storage="FloatStorage") -> bytes:
    """``torch._utils._rebuild_tensor_v2`` of storage record ``key`` (persistent id)."""
    pid = tuple_(str_("storage"), global_("torch", storage), str_(key), str_("cpu"),
                 int_(numel))
    hooks = global_("collections", "OrderedDict") + b")R"
    return (global_("torch._utils", "_rebuild_tensor_v2")
            + tuple_(pid + b"Q", int_(offset), tuple_(*map(int_, size)),
                     tuple_(*map(int_, stride)), b"\x89", hooks) + b"R")


def dict_(**items: bytes) -> bytes:
    return b"}(" + b"".join(str_(k) + v for k, v in items.items()) + b"u"


def torch_zip(path: Path, body: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A zip in torch's layout: ``archive/data.pkl`` (protocol 2 around ``body``), the byte
    order and the storage records."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + body + b".")
        z.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def save(obj, path: Path) -> Path:
    """``torch.save(obj, path)`` for dicts (string keys), lists, tuples, strings, ints, floats,
    bools, None and NumPy arrays (written as contiguous tensors), without torch."""
    records: dict[str, bytes] = {}

    def enc(v) -> bytes:
        if isinstance(v, dict):
            return b"}(" + b"".join(str_(k) + enc(x) for k, x in v.items()) + b"u"
        if isinstance(v, (list, tuple)):
            items = b"".join(enc(x) for x in v)
            return b"(" + items + (b"t" if isinstance(v, tuple) else b"l")
        if v is None:
            return b"N"
        if isinstance(v, (bool, np.bool_)):
            return b"\x88" if v else b"\x89"
        if isinstance(v, (int, np.integer)):
            return int_(int(v))
        if isinstance(v, (float, np.floating)):
            return b"G" + struct.pack(">d", float(v))
        if isinstance(v, str):
            return str_(v)
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            key = str(len(records))
            records[key] = a.tobytes()
            stride = [int(np.prod(a.shape[i + 1:])) for i in range(a.ndim)]
            return tensor(key, a.size, 0, a.shape, stride, STORAGE[a.dtype])
        raise TypeError(f"cannot write {type(v).__name__}")

    return torch_zip(path, enc(obj), records)
