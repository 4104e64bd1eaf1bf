"""Stand-ins for what a torch checkpoint's pickle may name: tensors and storages (rebuilt as NumPy
arrays), plain data, NumPy arrays and scalars, inert placeholders for the reference's own
classes, and the allow-list mapping each accepted name to its stand-in (see `eqr_jax.pth`)."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any, Callable

import ml_dtypes
import numpy as np

# Modules whose classes load as `Opaque` placeholders: the reference's own top-level packages
# (its carry dataclasses live in ``models.eqr``; ``__main__`` is its training script) and the
# pydantic machinery its run config uses. Nothing from them is imported or called.
PLACEHOLDER_MODULES = ("models", "utils", "config", "dataset", "evaluators", "pretrain",
                       "evaluate", "__main__", "pydantic", "pydantic_core")

class PthError(ValueError):
    """The file is not a readable PyTorch checkpoint (truncated, corrupt, unsupported)."""


class UnsafePickleError(PthError):
    """The checkpoint's pickle names a callable outside the allow-list; nothing was run."""


class Opaque:
    """Inert stand-in for an instance of a class the reader does not rebuild.

    Attributes: ``module`` and ``name`` (the class the pickle named), ``args`` / ``kwargs``
    (what it was constructed with), ``state`` (what the pickle set on it, e.g. a dataclass's
    field dict), ``items`` / ``listitems`` (entries stored into it as into a dict / list).
    """

    module = "?"
    name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "items", {})
        object.__setattr__(self, "listitems", [])
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.listitems.append(value)

    def extend(self, values):
        self.listitems.extend(values)

    def __repr__(self):
        return f"<Opaque {self.module}.{self.name}>"


# ----------------------------------------------------------------------------------------------
# Tensors and storages

_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "UntypedStorage": np.dtype(np.uint8),
}

_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "complex128": np.complex128, "cdouble": np.complex128, "complex64": np.complex64,
    "cfloat": np.complex64,
}
_TORCH_DTYPES.update({n: getattr(ml_dtypes, n) for n in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(ml_dtypes, n)})
_TORCH_DTYPES = {k: np.dtype(v) for k, v in _TORCH_DTYPES.items()}


class _StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: only a dtype."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"<storage type {self.name}>"


class _Storage:
    """One storage record: ``numel`` elements of ``dtype``; its bytes arrive via ``fetch``."""

    def __init__(self, key: str, dtype: np.dtype, numel: int, fetch: Callable[[], bytes]):
        self.key, self.dtype, self.numel, self._fetch = key, dtype, numel, fetch
        self._array: np.ndarray | None = None

    def array(self, dtype: np.dtype | None = None) -> np.ndarray:
        """The whole storage as a read-only 1-D array (reinterpreted as ``dtype`` if given)."""
        if self._array is None:
            raw = self._fetch()
            want = self.numel * self.dtype.itemsize
            if len(raw) != want:
                raise PthError(f"storage {self.key!r} holds {len(raw)} bytes, expected {want} "
                               f"({self.numel} x {self.dtype}): the file is truncated or corrupt")
            self._array = np.frombuffer(raw, self.dtype)
        arr = self._array
        if dtype is not None and dtype != arr.dtype:
            if arr.nbytes % dtype.itemsize:
                raise PthError(f"storage {self.key!r} ({arr.nbytes} bytes) cannot hold {dtype}")
            arr = arr.view(dtype)
        return arr


class _TensorRef:
    """A tensor view of a storage, materialised once the storage bytes are available."""

    def __init__(self, storage, offset, size, stride, dtype: np.dtype | None = None):
        if not isinstance(storage, _Storage):
            raise PthError(f"a tensor refers to {type(storage).__name__}, not a storage record")
        size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
        if len(size) != len(stride):
            raise PthError(f"tensor size {size} and stride {stride} differ in rank")
        if not isinstance(offset, int) or offset < 0 or any(s < 0 for s in size + stride):
            raise PthError(f"tensor with negative offset/size/stride ({offset}, {size}, {stride})")
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.dtype = storage.dtype if dtype is None else dtype

    def materialize(self) -> np.ndarray:
        base = self.storage.array(self.dtype)
        if 0 in self.size:
            return np.zeros(self.size, self.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= base.shape[0]:
            raise PthError(f"tensor view (offset {self.offset}, size {self.size}, stride "
                           f"{self.stride}) reaches element {last} of storage {self.storage.key!r}"
                           f" with {base.shape[0]} elements")
        item = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(base[self.offset:], shape=self.size,
                                               strides=[s * item for s in self.stride],
                                               writeable=False)
        return np.array(view, copy=True, order="C")


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PthError(f"tensor {what} {value!r} is not a tuple of integers")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    # _rebuild_tensor (storage, offset, size, stride) and _rebuild_tensor_v2 (+ requires_grad,
    # backward_hooks[, metadata]): gradient flags and hooks mean nothing for arrays.
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, *_ignored):
    # Dtypes without a legacy typed storage (uint16/32/64, float8): an untyped byte storage plus
    # the dtype; offset and strides count elements of that dtype.
    if not isinstance(dtype, np.dtype):
        raise PthError(f"tensor dtype {dtype!r} is not a torch dtype this reader knows")
    return _TensorRef(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *_ignored):
    # nn.Parameter (data, requires_grad, backward_hooks[, state]): the array is the parameter.
    return data


_TENSOR_TYPES = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter")}


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensors with Python attributes or of a Parameter/Tensor type: rebuild the plain tensor.
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        raise PthError(f"_rebuild_from_type_v2 with unsupported function {func!r}")
    return func(*args)


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


def _torch_size(dims=()):
    return tuple(_int_tuple(tuple(dims), "torch.Size"))


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise PthError(f"torch.device({kind!r}, {index!r}) has unexpected arguments")
    return kind if index is None or ":" in kind else f"{kind}:{index}"


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol 2 spells a bytes object as _codecs.encode(<latin-1 text>, "latin1").
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode is allowed only on text with encoding "
                                f"'latin1', got {type(obj).__name__} / {encoding!r}")
    return obj.encode("latin-1")


# ----------------------------------------------------------------------------------------------
# NumPy arrays and scalars (as NumPy pickles them with protocol 2)

_SIMPLE_NP_TYPECODE = re.compile(r"^[a-zA-Z?]\d*$")


class _NpDtype:
    """``numpy.dtype(code, align, copy)`` + its pickled state, for simple dtypes only."""

    def __init__(self, code, align=False, copy=False):
        if not isinstance(code, str) or not _SIMPLE_NP_TYPECODE.match(code):
            raise PthError(f"numpy dtype {code!r} is not a simple type code")
        self.code, self.endian, self.supported = code, "=", True

    def __setstate__(self, state):
        # (version, byte order, subarray, names, fields, itemsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 8:
            raise PthError(f"numpy dtype state {state!r} is malformed")
        self.endian = state[1] if state[1] in "<>=|" else "="
        self.supported = state[2] is None and state[3] is None and state[4] is None

    def resolve(self) -> np.dtype | None:
        if not self.supported:
            return None
        try:
            dt = np.dtype(self.code)  # a one-letter type code plus size: parsing only
        except (TypeError, ValueError):
            return None  # a code this NumPy does not know: kept as a placeholder
        if dt.kind in "Mm" or dt.kind == "V":  # datetimes carry units in metadata; void is raw
            return None
        return dt.newbyteorder(self.endian) if self.endian in "<>" else dt


_NDARRAY = _Marker("numpy.ndarray")


class _NpArray:
    """``numpy.core.multiarray._reconstruct(ndarray, ...)`` + the array's pickled state."""

    def __init__(self, subtype, shape=(0,), typecode=b"b"):
        if subtype is not _NDARRAY:
            raise PthError(f"numpy array of subtype {subtype!r} is not supported")
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def finish(self):
        st = self.state
        if isinstance(st, tuple) and len(st) == 4:
            st = (1,) + st
        if not (isinstance(st, tuple) and len(st) == 5 and isinstance(st[2], _NpDtype)):
            return _opaque("numpy", "ndarray", state=self.state)
        _, shape, dtype, fortran, raw = st
        dt = dtype.resolve()
        shape = _int_tuple(tuple(shape), "numpy shape")
        if dt is None:
            return _opaque("numpy", "ndarray", state=self.state)
        order = "F" if fortran else "C"
        if dt.kind == "O":
            if not isinstance(raw, list) or len(raw) != math.prod(shape):
                raise PthError("numpy object array with malformed contents")
            out = np.empty(len(raw), dtype=object)
            out[:] = raw
            return out.reshape(shape, order=order)
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != math.prod(shape) * dt.itemsize:
            raise PthError(f"numpy array data does not match shape {shape} and dtype {dt}")
        return np.frombuffer(raw, dt).reshape(shape, order=order).astype(dt.newbyteorder("="))


def _np_scalar(dtype, data=None):
    dt = dtype.resolve() if isinstance(dtype, _NpDtype) else None
    if dt is None:
        return _opaque("numpy", "scalar", args=(dtype, data))
    if dt.kind == "O":
        return data
    if not isinstance(data, (bytes, bytearray)) or len(data) != dt.itemsize:
        raise PthError(f"numpy scalar data does not match dtype {dt}")
    return np.frombuffer(data, dt).astype(dt.newbyteorder("="))[0]


def _opaque(module: str, name: str, args=(), state=None) -> Opaque:
    obj = _placeholder_class(module, name)(*args)
    obj.__setstate__(state)
    return obj


_PLACEHOLDER_CLASSES: dict[tuple[str, str], type] = {}


def _placeholder_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _PLACEHOLDER_CLASSES:
        _PLACEHOLDER_CLASSES[key] = type(name.rsplit(".", 1)[-1], (Opaque,),
                                         {"module": module, "name": name,
                                          "__module__": __name__})
    return _PLACEHOLDER_CLASSES[key]


# ----------------------------------------------------------------------------------------------
# The restricted unpickler


def _allowed_globals() -> dict[tuple[str, str], Any]:
    g: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "dtype"): _NpDtype,
        ("numpy", "ndarray"): _NDARRAY,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        g[(mod, "_reconstruct")] = _NpArray
        g[(mod, "scalar")] = _np_scalar
    for module, name in _TENSOR_TYPES:
        g[(module, name)] = _Marker(f"{module}.{name}")
    for name, dt in _STORAGE_DTYPES.items():
        for mod in ("torch", "torch.cuda", "torch.storage"):
            g[(mod, name)] = _StorageType(name, dt)
    for name, dt in _TORCH_DTYPES.items():
        g[("torch", name)] = dt
    return g


_ALLOWED = _allowed_globals()
