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

from eqr_jax.pth.reader import load
from eqr_jax.pth.standins import PLACEHOLDER_MODULES, Opaque, PthError, UnsafePickleError

__all__ = ["load", "Opaque", "PthError", "UnsafePickleError", "PLACEHOLDER_MODULES"]
