"""The restricted unpickler and the two ``torch.save`` file layouts (zip and legacy) of
`eqr_jax.pth`: every global goes through the allow-list of `eqr_jax.pth.standins`."""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import struct
import sys
import zipfile
import zlib
from typing import Any, Callable, Iterable

import numpy as np

from eqr_jax.pth.standins import (_ALLOWED, PLACEHOLDER_MODULES, Opaque, PthError,
                                  UnsafePickleError, _NpArray, _NpDtype, _placeholder_class,
                                  _Storage, _StorageType, _TensorRef)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


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
