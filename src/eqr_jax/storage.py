"""Where a run's files live: local paths or Cloud Storage (``gs://bucket/...``), through one layer.

Every path a command touches (``--out``, ``--data``, ``--init-from``, ``--checkpoint``,
``--reference``, ``--compile-cache``, results and plots, TensorBoard logs) goes through `path`:

* a local path stays a `pathlib.Path`, and behaves exactly as before;
* a ``gs://`` URL becomes an `etils.epath.Path`, the path type Orbax itself takes, backed by
  fsspec/gcsfs (file API) while Orbax writes the arrays through TensorStore;
* any other scheme (``s3://``, ``http://``) is refused in one line (`StorageError`), before a
  library could turn ``gs://b/run`` into a local folder ``gs:/b/run``.

Both path types share the calls used here (``/``, ``name``, ``parent``, ``exists``, ``is_dir``,
``iterdir``, ``open``, ``read_text``, ``write_text``, ``mkdir``, ``unlink``). What differs is
handled by the functions of this module:

* writes are atomic either way (`write_text`, `write_bytes`): a temporary file and a rename
  locally; one object upload on a bucket (an object appears whole or not at all);
* libraries that need a real local file or folder (matplotlib, tensorboardX, the profiler,
  memory-mapped datasets) write into, or read from, a local staging copy (`local_file`,
  `local_copy`, `upload_tree`).

Clients are pointed at an emulator (tests) by ``STORAGE_EMULATOR_HOST`` (gcsfs) and
``TENSORSTORE_GCS_HTTP_URL`` (TensorStore); on a real bucket they use the machine's
credentials (a TPU VM's service account, or ``gcloud auth application-default login``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union

from eqr_jax.config import URL_SCHEMES, ConfigError, url_refusal, url_scheme

SCHEMES = URL_SCHEMES
CACHE_ENV = "EQR_CACHE_DIR"
_COPY_CHUNK = 16 << 20

if TYPE_CHECKING:
    from etils import epath

AnyPath = Union[Path, "epath.Path"]


class StorageError(ConfigError):
    """A path that cannot be used: an unsupported URL scheme, or gs:// without its client."""


def is_remote(value) -> bool:
    """Whether ``value`` (a str or a path) names an object in a bucket (``gs://...``)."""
    return url_scheme(str(value)) in SCHEMES


def check(name: str, value) -> None:
    """Raise `StorageError` naming ``name`` unless ``value`` is a local path or a gs:// URL."""
    message = url_refusal(f"{name}=", str(value))
    if message:
        raise StorageError(message)


_configured = False


def _configure_gcs() -> None:
    """Check gcsfs is there and configure it once (before its first file system is made)."""
    global _configured
    if _configured:
        return
    if importlib.util.find_spec("gcsfs") is None:
        raise StorageError("gs:// paths need the gcsfs package: pip install 'eqr-jax[gcs]'")
    import fsspec

    # Several processes write one run directory: a listing cached by one of them would hide
    # the steps another has committed since.
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # An emulator does not answer gcsfs's gRPC bucket-type probe: each new bucket would
        # stall 60 s before gcsfs falls back to the plain JSON API.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    _configured = True


def path(value, *, name: str = "path") -> AnyPath:
    """``value`` as a path object: `pathlib.Path` for a local path (``~`` expanded),
    `etils.epath.Path` for ``gs://``. Raises `StorageError` (naming ``name``) for another
    scheme, or for gs:// without gcsfs installed."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path or URL, got {type(value).__name__}")
    text = os.fspath(value) if not _is_epath(value) else str(value)
    if is_remote(text):
        _configure_gcs()
        from etils import epath

        return epath.Path(text)
    check(name, text)
    return Path(text).expanduser()


def absolute(value, *, name: str = "path") -> AnyPath:
    """`path`, made absolute when local (a URL is absolute already)."""
    p = path(value, name=name)
    return p if is_remote(p) else p.absolute()


def _is_epath(value) -> bool:
    return type(value).__module__.startswith("etils.")


def makedirs(p: AnyPath) -> None:
    """Create folder ``p`` (and its parents); on a bucket there is nothing to create."""
    if not is_remote(p):
        Path(p).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _writing(p: AnyPath) -> Iterator:
    """A binary file to write ``p`` through that appears whole or not at all: locally a
    temporary file beside it, flushed to disk and renamed over ``p`` on a clean exit (removed on
    an error); on a bucket one object, uploaded when the file is closed."""
    if is_remote(p):
        with p.open("wb") as f:
            yield f
        return
    p = Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(p: AnyPath, data: bytes) -> None:
    """Write ``data`` to ``p`` atomically: readers see the old content or the new, never a part
    (`_writing`)."""
    with _writing(p) as f:
        f.write(data)


def write_text(p: AnyPath, text: str) -> None:
    """`write_bytes` of ``text`` in UTF-8."""
    write_bytes(p, text.encode("utf-8"))


def read_text(p: AnyPath) -> str:
    with p.open("rb") as f:
        return f.read().decode("utf-8")


def copy_file(src: AnyPath, dst: AnyPath) -> None:
    """Copy one file between any two places (local or bucket), streamed in chunks; the
    destination appears whole (`_writing`)."""
    with src.open("rb") as f, _writing(dst) as out:
        shutil.copyfileobj(f, out, _COPY_CHUNK)


def files(root: AnyPath) -> list[str]:
    """Every file under folder ``root``, as paths relative to it (``a/b.npy``), sorted."""
    out = []

    def walk(d, prefix):
        for child in sorted(d.iterdir(), key=lambda c: c.name):
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, rel + "/")
            else:
                out.append(rel)

    walk(root, "")
    return out


def copy_tree(src: AnyPath, dst: AnyPath) -> list[str]:
    """Copy every file under ``src`` to the same relative place under ``dst`` (either may be a
    bucket); returns the relative paths copied."""
    names = files(src)
    for rel in names:
        copy_file(src / rel, dst / rel)
    return names


def cache_root() -> Path:
    """Where copies of bucket data are kept on this host: ``$EQR_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/eqr-jax`` (``~/.cache/eqr-jax``)."""
    if os.environ.get(CACHE_ENV):  # absolute: processes may run in other working directories
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eqr-jax"


def cache_dir_for(url: AnyPath, kind: str) -> Path:
    """This host's cache folder for bucket folder ``url`` (stable per URL): ``<cache>/<kind>/
    <last name>-<hash of the URL>``."""
    text = str(url).rstrip("/")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return cache_root() / kind / f"{text.rsplit('/', 1)[-1] or 'root'}-{digest}"


def cached_file(p: AnyPath, kind: str) -> Path:
    """A local copy of file ``p`` for readers that need one (the ``.pth`` reader): ``p`` itself
    when local; for a bucket object, this host's cached copy (`cache_dir_for`), downloaded when
    absent or of another size than the object."""
    if not is_remote(p):
        return Path(p)
    local = cache_dir_for(p, kind) / p.name
    if not (local.is_file() and size(local) == size(p)):
        copy_file(p, local)
    return local


def size(p: AnyPath) -> int:
    """The size in bytes of file ``p`` (local, or a bucket object)."""
    st = p.stat()
    return int(st.length if is_remote(p) else st.st_size)


@contextlib.contextmanager
def local_file(p: AnyPath) -> Iterator[Path]:
    """A local file name to write ``p`` through, for libraries that need one (matplotlib,
    NumPy): ``p`` itself when local; else a temporary file uploaded to ``p`` on a clean exit."""
    if not is_remote(p):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        yield Path(p)
        return
    with tempfile.TemporaryDirectory(prefix="eqr-upload-") as tmp:
        local = Path(tmp) / p.name
        yield local
        if local.exists():
            copy_file(local, p)


def upload_tree(local_dir: Path, remote: AnyPath, *, only_changed: dict | None = None
                ) -> list[str]:
    """Copy the files under ``local_dir`` to ``remote``. With ``only_changed`` (a dict this
    function keeps of sizes and modification times between calls) only files that changed since
    the last call are copied; returns the relative paths copied."""
    copied = []
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        return copied
    for rel in files(local_dir):
        f = local_dir / rel
        st = f.stat()
        key = (st.st_size, st.st_mtime_ns)
        if only_changed is not None and only_changed.get(rel) == key:
            continue
        copy_file(f, remote / rel)
        if only_changed is not None:
            # Recorded only once copied: a failed upload is tried again on the next call.
            only_changed[rel] = key
        copied.append(rel)
    return copied


def listing(root: AnyPath) -> dict[str, tuple[int, str]]:
    """Every file under folder ``root`` as ``{relative path: (size in bytes, version)}``, sorted,
    in one pass (one listing request on a bucket; ``{}`` when nothing is there). ``version``
    changes when the content may have: a bucket object's CRC32C (else its MD5, else its
    generation), a local file's modification time in nanoseconds."""
    if is_remote(root):
        _configure_gcs()
        import fsspec

        prefix = str(root)[len("gs://"):].rstrip("/")
        out = {}
        for name, info in fsspec.filesystem("gs").find(prefix, detail=True).items():
            # Keys ending in "/" are folder placeholders some tools create, not files.
            if info.get("type") != "file" or name.endswith("/") or \
                    not name.startswith(prefix + "/"):
                continue
            version = info.get("crc32c") or info.get("md5Hash") or info.get("generation") or ""
            out[name[len(prefix) + 1:]] = (int(info["size"]), str(version))
        return dict(sorted(out.items()))
    root = Path(root)
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(d, n))
            out[Path(d, n).relative_to(root).as_posix()] = (st.st_size, str(st.st_mtime_ns))
    return dict(sorted(out.items()))
