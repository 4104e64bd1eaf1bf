"""Read PyTorch ``.pth`` files without PyTorch and without running any code they name.

``torch.save`` writes a pickle whose tensors point at raw storage records. Two layouts exist:

* **zip** (torch >= 1.6, the default): ``<archive>/data.pkl`` (the pickle),
  ``<archive>/data/<key>`` (one uncompressed record per storage) and ``<archive>/byteorder``;
* **legacy** (``_use_new_zipfile_serialization=False``): five pickles in a row (magic number,
  protocol version, system info, the object, the list of storage keys), then for each storage
  key in that order an int64 element count and the raw bytes.

A pickle is a small program: every class or function it names is looked up and called while it
loads, which is how a downloaded checkpoint can run ``os.system``. Here every name goes through
`_Unpickler.find_class`, which never imports anything. It answers with this module's own
stand-ins:

* **tensors** (``torch._utils._rebuild_tensor_v2`` / ``_v3`` / ``_rebuild_parameter``, the
  ``torch.*Storage`` types, ``torch.<dtype>``): rebuilt as NumPy arrays of the stored dtype
  (bfloat16 and float8 through ``ml_dtypes``), honouring the view's offset and strides, checked
  against the storage bounds; every array owns its memory;
* **plain data**: ``collections.OrderedDict``, ``set``, ``frozenset``, ``slice``, ``complex``,
  ``torch.Size`` (a tuple), ``torch.device`` (its string), ``_codecs.encode`` (latin-1 only, as
  protocol-2 pickles use it for bytes), and NumPy arrays / scalars of simple dtypes (a NumPy RNG
  state, for instance);
* **classes from known data-only namespaces** (`PLACEHOLDER_MODULES`: the reference training
  code's own packages such as ``models.eqr.ModelCarry``, pydantic): inert `Opaque` placeholders
  that record the constructor arguments and state the pickle gave them, so the tensors inside a
  pickled dataclass are still reachable;

and refuses any other name (``os.system``, ``builtins.eval``, ``subprocess.Popen``, an
unsupported torch function, ...) with `UnsafePickleError` naming it, before anything is called.

Typical use::

    obj = pth.load("step_5000.pth")          # dicts, lists, numbers, NumPy arrays, Opaque
    obj["model"]["model.inner.lm_head.weight"].shape
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import os
import pickle
import re
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

__all__ = ["load", "Opaque", "PthError", "UnsafePickleError", "PLACEHOLDER_MODULES"]

# Modules whose classes load as `Opaque` placeholders: the reference's own top-level packages
# (its carry dataclasses live in ``models.eqr``; ``__main__`` is its training script) and the
# pydantic machinery its run config uses. Nothing from them is imported or called.
PLACEHOLDER_MODULES = ("models", "utils", "config", "dataset", "evaluators", "pretrain",
                       "evaluate", "__main__", "pydantic", "pydantic_core")

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


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


def _load_build(self):
    # BUILD sets pickled state on the object below it. Only the reader's own per-load objects
    # accept state: allowing it on an allow-listed function or type would let a file change
    # this module's behaviour for later loads.
    state = self.stack.pop()
    inst = self.stack[-1]
    if not isinstance(inst, (Opaque, _NpDtype, _NpArray)):
        raise UnsafePickleError(f"{self._where}: the pickle sets state on {inst!r:.60}, which "
                                "this reader does not allow")
    inst.__setstate__(state)


class _Unpickler(pickle._Unpickler):
    """Answers every global from `_ALLOWED`, with a placeholder, or refuses it.

    The pure-Python unpickler, so that BUILD can be restricted too (`_load_build`); the pickles
    of checkpoints are small (tensor bytes live outside them), so its speed does not matter.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build

    def __init__(self, file, *, placeholder_modules: Iterable[str], storage: Callable,
                 where: str):
        super().__init__(file)
        self._placeholders = tuple(placeholder_modules)
        self._storage = storage
        self._where = where

    def find_class(self, module, name):
        if self.proto < 3:  # Python 2 spellings (__builtin__.set, ...): a table look-up only
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if any(module == m or module.startswith(m + ".") for m in self._placeholders):
            return _placeholder_class(module, name)
        raise UnsafePickleError(
            f"{self._where}: the pickle names {module}.{name}, which is not on this reader's "
            "allow-list; refusing to load it (nothing from the file was run). Only load "
            "checkpoints you trust with torch.load(weights_only=False).")

    def persistent_load(self, pid):
        return self._storage(pid)


def _check_storage_pid(pid, where: str) -> tuple[_StorageType, str, int, Any]:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
        raise PthError(f"{where}: unsupported persistent reference {pid!r:.80}")
    stype, key, _location, numel = pid[1:5]
    if isinstance(stype, np.dtype):  # very old files name the dtype itself
        stype = _StorageType(str(stype), stype)
    if not isinstance(stype, _StorageType):
        raise PthError(f"{where}: storage of unsupported type {stype!r}")
    if not isinstance(numel, int) or numel < 0:
        raise PthError(f"{where}: storage {key!r} has a bad element count {numel!r}")
    return stype, str(key), numel, pid[5] if len(pid) > 5 else None


def _resolve(obj, memo: dict) -> Any:
    """Replace tensor refs, storages and NumPy builders by arrays, in place where possible."""
    oid = id(obj)
    if oid in memo:
        return memo[oid]
    if isinstance(obj, _TensorRef):
        out = memo[oid] = obj.materialize()
    elif isinstance(obj, _Storage):
        out = memo[oid] = np.array(obj.array(), copy=True)
    elif isinstance(obj, _NpArray):
        obj.state = _resolve(obj.state, memo)  # an object array's items
        out = memo[oid] = obj.finish()
    elif isinstance(obj, tuple):
        memo[oid] = obj  # a cycle back into this tuple keeps the original
        out = memo[oid] = type(obj)(_resolve(v, memo) for v in obj) if type(obj) is tuple \
            else obj
    elif isinstance(obj, list):
        memo[oid] = out = obj
        obj[:] = [_resolve(v, memo) for v in obj]
    elif isinstance(obj, dict):
        memo[oid] = out = obj
        for k in list(obj):
            obj[k] = _resolve(obj[k], memo)
    elif isinstance(obj, Opaque):
        memo[oid] = out = obj
        for attr in ("args", "kwargs", "state", "items", "listitems"):
            object.__setattr__(obj, attr, _resolve(getattr(obj, attr), memo))
    else:
        out = obj
    return out


def _finish(obj, where: str):
    try:
        return _resolve(obj, {})
    except PthError:
        raise
    except RecursionError:
        raise PthError(f"{where}: the pickled object is nested too deeply") from None
    except Exception as e:  # objects the pickle built without their arguments, ...
        raise PthError(f"{where}: malformed object ({type(e).__name__}: {e})") from None


def _unpickle(data: bytes | io.BufferedIOBase, where: str, storage: Callable,
              placeholder_modules) -> Any:
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        return _Unpickler(f, placeholder_modules=placeholder_modules, storage=storage,
                          where=where).load()
    except PthError:
        raise
    except EOFError:
        raise PthError(f"{where}: the pickle ends early (the file is truncated)") from None
    except pickle.UnpicklingError as e:
        if "truncated" in str(e):
            raise PthError(f"{where}: the pickle ends early (the file is truncated)") from None
        raise PthError(f"{where}: cannot unpickle ({e})") from None
    except Exception as e:  # malformed opcodes, wrong argument counts, ...
        raise PthError(f"{where}: cannot unpickle ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# The two file layouts


def _load_zip(path: str, placeholder_modules) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise PthError(f"{path}: truncated or corrupt zip archive ({e}); torch writes the "
                       "archive's directory last, so an interrupted download looks like this"
                       ) from None
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pkls:
            if any(n.endswith("/constants.pkl") for n in names):
                raise PthError(f"{path}: a TorchScript archive, not a checkpoint of tensors")
            raise PthError(f"{path}: a zip archive without <archive>/data.pkl; not a torch "
                           "checkpoint")
        if len(pkls) > 1:
            raise PthError(f"{path}: several pickles in one archive ({pkls})")
        prefix = pkls[0][: -len("data.pkl")]
        where = f"{path}:{pkls[0]}"

        def read(name: str) -> bytes:
            try:
                return zf.read(name)
            except KeyError:
                raise PthError(f"{path}: record {name!r} is missing") from None
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                raise PthError(f"{path}: record {name!r} is corrupt ({e})") from None

        order = "little"
        if prefix + "byteorder" in names:
            order = read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise PthError(f"{path}: unknown byte order {order!r}")
        storages: dict[str, _Storage] = {}

        def storage(pid):
            stype, key, numel, _ = _check_storage_pid(pid, where)
            if key not in storages:
                name = f"{prefix}data/{key}"
                storages[key] = _Storage(key, stype.dtype, numel, _fetcher(read, name, order,
                                                                            stype.dtype))
            elif storages[key].dtype != stype.dtype:
                raise PthError(f"{where}: storage {key!r} is read as two dtypes")
            return storages[key]

        obj = _unpickle(read(pkls[0]), where, storage, placeholder_modules)
        return _finish(obj, where)


def _fetcher(read: Callable[[str], bytes], name: str, order: str, dtype: np.dtype):
    def fetch() -> bytes:
        raw = read(name)
        if order != sys.byteorder and dtype.itemsize > 1:
            raw = np.frombuffer(raw, dtype).byteswap().tobytes()
        return raw
    return fetch


def _load_legacy(path: str, placeholder_modules) -> Any:
    with open(path, "rb") as f:
        head = lambda what: _unpickle(f, f"{path} ({what})", _no_storage(path),
                                      placeholder_modules)
        if head("magic number") != _LEGACY_MAGIC:
            raise PthError(f"{path}: a pickle, but not a torch checkpoint (no torch magic number)")
        version = head("protocol version")
        if version != _LEGACY_PROTOCOL:
            raise PthError(f"{path}: legacy torch format version {version!r} is not supported")
        info = head("system info")
        little = info.get("little_endian", True) if isinstance(info, dict) else True
        order = "little" if little else "big"
        storages: dict[str, _Storage] = {}
        views: list[tuple[_Storage, str, int]] = []
        where = f"{path} (object)"

        def storage(pid):
            stype, key, numel, view = _check_storage_pid(pid, where)
            if key not in storages:
                storages[key] = _Storage(key, stype.dtype, numel, lambda k=key: _pending(k))
            root = storages[key]
            if view is None:
                return root
            # (view key, offset, size) in elements: a storage that is a slice of another.
            vkey, offset, size = view
            if not (isinstance(offset, int) and isinstance(size, int) and offset >= 0
                    and size >= 0):
                raise PthError(f"{where}: bad storage view {view!r}")
            if str(vkey) not in storages:
                storages[str(vkey)] = _Storage(str(vkey), stype.dtype, size, lambda: b"")
                views.append((storages[str(vkey)], key, offset))
            return storages[str(vkey)]

        def _pending(key: str) -> bytes:
            if key not in pending:
                raise PthError(f"{path}: storage {key!r} is used but its data is not in the file")
            return pending[key]

        obj = _unpickle(f, where, storage, placeholder_modules)
        keys = head("storage keys")
        if not isinstance(keys, list):
            raise PthError(f"{path}: malformed storage key list")
        pending: dict[str, bytes] = {}
        for key in keys:
            key = str(key)
            if key not in storages:
                raise PthError(f"{path}: storage {key!r} is listed but never used")
            st = storages[key]
            count = f.read(8)
            if len(count) != 8:
                raise PthError(f"{path}: truncated before the data of storage {key!r}")
            n = struct.unpack("<q" if little else ">q", count)[0]
            if n != st.numel:
                raise PthError(f"{path}: storage {key!r} has {n} elements on disk, the pickle "
                               f"says {st.numel}")
            raw = f.read(n * st.dtype.itemsize)
            if len(raw) != n * st.dtype.itemsize:
                raise PthError(f"{path}: truncated in the data of storage {key!r}")
            if order != sys.byteorder and st.dtype.itemsize > 1:
                raw = np.frombuffer(raw, st.dtype).byteswap().tobytes()
            pending[key] = raw
        for view, root_key, offset in views:
            item = view.dtype.itemsize
            data = _pending(root_key)[offset * item:(offset + view.numel) * item]
            view._fetch = lambda d=data: d
        return _finish(obj, where)


def _no_storage(path: str):
    def refuse(pid):
        raise PthError(f"{path}: unexpected storage reference in a header pickle")
    return refuse


def load(path: str | os.PathLike, *, placeholder_modules: Iterable[str] = PLACEHOLDER_MODULES
         ) -> Any:
    """Load a ``torch.save`` file (zip or legacy layout) as plain Python and NumPy objects.

    Args:
      path: the ``.pth`` / ``.pt`` file.
      placeholder_modules: module prefixes whose classes become `Opaque` placeholders (default
        `PLACEHOLDER_MODULES`); any other name outside the allow-list is refused.
    Returns:
      The saved object: dicts (``OrderedDict`` where torch used one), lists, tuples, numbers,
      strings, NumPy arrays (tensors keep their dtype and shape; bfloat16 / float8 via
      ``ml_dtypes``), `Opaque` placeholders.
    Raises:
      FileNotFoundError: no file at ``path``.
      UnsafePickleError: the pickle names a callable outside the allow-list (nothing is run).
      PthError: truncated, corrupt or unsupported files; the message names the file and part.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":
        return _load_zip(path, tuple(placeholder_modules))
    if magic[:1] == b"\x80":
        return _load_legacy(path, tuple(placeholder_modules))
    if not magic:
        raise PthError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        f.seek(257)
        if f.read(5) == b"ustar":
            raise PthError(f"{path}: the tar-based torch format (before torch 0.4) is not "
                           "supported")
    raise PthError(f"{path}: not a PyTorch checkpoint (starts with {magic!r}, expected a zip "
                   "archive or a pickle)")
