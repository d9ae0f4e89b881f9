"""Unpickling data files without running their code: only the globals that numpy arrays need.

`pickle.load` calls whatever callables a file names (`builtins.exec`, `os.system`, ...), so a
downloaded dataset file that is a pickle (the CIFAR-10 python batches) could run anything. This
unpickler resolves a global only when it is in `ALLOWED`, the few callables that rebuild a plain
numpy array from its pickled form, as written by Python 2 (the official CIFAR-10 files) and by
Python 3 with every protocol; every other global is an UnpicklingError naming it, raised before
anything is called. dicts, lists, ints and byte strings need no global at all.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

# numpy 2 moved numpy.core to numpy._core; files written by numpy 1 (and Python 2) name the old
# module. Both names map to the objects of the installed numpy, without importing the deprecated one.
_np_core = getattr(np, "_core", None) or np.core


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes under protocols 0-2 as `_codecs.encode(text, "latin1")`. Other codecs
    # are refused: a codec name is looked up among importable modules.
    if encoding not in ("latin1", "latin-1", "iso8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _np_core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_core.multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_core.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_core.numeric._frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` admits only ALLOWED; `persistent_load` is refused too."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a data file may only hold numpy arrays, "
                "dicts, lists, numbers and strings"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id: a data file may not reference objects")


def load_data_pickle(path: Path, *, encoding: str = "bytes") -> Any:
    """Unpickle `path` with NumpyOnlyUnpickler. `encoding="bytes"` keeps Python 2 str as bytes
    (the CIFAR-10 keys are b"data", b"labels"). Raises what pickle raises; never runs file code."""
    with open(path, "rb") as f:
        return NumpyOnlyUnpickler(f, encoding=encoding).load()
