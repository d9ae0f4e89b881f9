"""Reading a CIFAR-10 python batch without unpickling: a whitelisted stack machine over pickle opcodes.

A restricted `pickle.Unpickler` that admits only numpy's array rebuilders is not enough: those
rebuilders trust the state they are given, and a file can forge a dtype's flags (declaring it holds
object pointers) around raw bytes, so numpy dereferences the file's bytes as pointers and the
process segfaults. This reader never calls numpy's (or anything's) reconstruction. It walks the
opcodes with `pickletools.genops` and runs a tiny stack machine that knows exactly the official
batch structure: a dict whose keys are byte strings and whose values are byte strings, text,
ints, floats, lists of those, and ndarrays of plain uint8. A global may only name numpy's array
or dtype rebuilders (and `_codecs.encode` for Python 3 protocol-2 bytes); calling them only
builds a stub, and the array is made by `np.frombuffer` from the raw bytes once its declared
shape has been checked against the number of bytes actually present. Anything else is a
ValueError naming the opcode and its offset.

Accepted writers: Python 2 cPickle (the official files, protocol 2, numpy 1 module names) and
Python 3 pickle protocols 2-5 with numpy 1 or 2.
"""

from __future__ import annotations

import io
import math
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAX_FILE_BYTES = 1 << 28  # 256 MiB; an official batch is ~31 MB
_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}
_NDARRAY = ("numpy", "ndarray")
_DTYPE = ("numpy", "dtype")
_ENCODE = ("_codecs", "encode")
# The one dtype state numpy pickles for a plain uint8: version 3, byte order '|', no subarray, no
# field names or fields, elsize -1, alignment -1, flags 0. Forged flags (object pointers) differ.
_UINT8_STATE = (3, "|", None, None, None, -1, -1, 0)
_UINT8_CODES = ("u1", "uint8", "B")


class CifarPickleError(ValueError):
    """The file is not a CIFAR batch this reader accepts; the message names opcode and offset."""


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass
class _DtypeStub:
    code: str
    checked: bool = False


@dataclass
class _ArrayStub:
    array: np.ndarray | None = None


class _Mark:
    pass


_MARK = _Mark()
_SCALAR_LEAVES = (bytes, str, int, float, bool, type(None))


def read_batch(path: Path) -> dict:
    """The batch dict of `path`; CifarPickleError (a ValueError) for anything but the official shape."""
    size = Path(path).stat().st_size
    if size > MAX_FILE_BYTES:
        raise CifarPickleError(f"{size} bytes, more than a CIFAR batch ({MAX_FILE_BYTES} at most)")
    # Read whole: every length an opcode declares is then bounded by what is really there.
    with open(path, "rb") as f:
        raw = f.read()
    return parse_batch(raw)


def parse_batch(raw: bytes) -> dict:
    try:
        result = _Machine().run(raw)
    except CifarPickleError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError, EOFError) as exc:
        # pickletools' own complaints (truncated argument, bad text) or a malformed stack
        raise CifarPickleError(f"corrupt pickle stream ({type(exc).__name__}: {exc})") from None
    if not isinstance(result, dict):
        raise CifarPickleError(f"expected a dict at the top, got {type(result).__name__}")
    return result


class _Machine:
    def __init__(self):
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    def run(self, raw: bytes) -> Any:
        for opcode, arg, pos in pickletools.genops(io.BytesIO(raw)):
            self.pos = pos
            name = opcode.name
            if name == "STOP":
                if len(self.stack) != 1 or self.marks:
                    self.fail(name, "unbalanced stack at STOP")
                return self.stack.pop()
            handler = getattr(self, f"op_{name}", None)
            if handler is None:
                self.fail(name, "opcode not allowed in a CIFAR batch")
            handler(arg)
        raise CifarPickleError("truncated: no STOP opcode")

    def fail(self, opcode: str, why: str):
        raise CifarPickleError(f"{why} ({opcode} at byte {self.pos})")

    def pop(self, opcode: str) -> Any:
        if not self.stack:
            self.fail(opcode, "stack underflow")
        value = self.stack.pop()
        if value is _MARK:
            self.fail(opcode, "unexpected MARK")
        return value

    def pop_mark(self, opcode: str) -> list[Any]:
        if not self.marks:
            self.fail(opcode, "no MARK")
        items, self.stack = self.stack, self.marks.pop()
        return items

    # framing, marks, memo
    def op_PROTO(self, arg):
        if not 2 <= arg <= 5:
            self.fail("PROTO", f"protocol {arg} not accepted")

    def op_FRAME(self, arg):
        pass

    def op_MARK(self, arg):
        self.marks.append(self.stack)
        self.stack = []

    def _put(self, index):
        if not self.stack:
            self.fail("PUT", "stack underflow")
        self.memo[index] = self.stack[-1]

    op_PUT = op_BINPUT = op_LONG_BINPUT = _put

    def op_MEMOIZE(self, arg):
        self._put(len(self.memo))

    def _get(self, index):
        if index not in self.memo:
            self.fail("GET", f"memo key {index} unset")
        self.stack.append(self.memo[index])

    op_GET = op_BINGET = op_LONG_BINGET = _get

    # leaves
    def _push(self, arg):
        self.stack.append(arg)

    op_BININT = op_BININT1 = op_BININT2 = op_LONG1 = op_BINFLOAT = _push
    op_BINSTRING = op_SHORT_BINSTRING = _push  # Python 2 str: pickletools hands back text
    op_BINUNICODE = op_SHORT_BINUNICODE = op_BINUNICODE8 = _push
    op_BINBYTES = op_SHORT_BINBYTES = op_BINBYTES8 = op_BYTEARRAY8 = _push

    def op_INT(self, arg):  # protocol 0/1 text ints; Python 2 writes bools this way
        self.stack.append(arg)

    def op_NONE(self, arg):
        self.stack.append(None)

    def op_NEWTRUE(self, arg):
        self.stack.append(True)

    def op_NEWFALSE(self, arg):
        self.stack.append(False)

    # containers
    def op_EMPTY_DICT(self, arg):
        self.stack.append({})

    def op_EMPTY_LIST(self, arg):
        self.stack.append([])

    def op_EMPTY_TUPLE(self, arg):
        self.stack.append(())

    def op_TUPLE(self, arg):
        items = self.pop_mark("TUPLE")  # first: pop_mark replaces self.stack
        self.stack.append(tuple(items))

    def op_TUPLE1(self, arg):
        self.stack.append((self.pop("TUPLE1"),))

    def op_TUPLE2(self, arg):
        b, a = self.pop("TUPLE2"), self.pop("TUPLE2")
        self.stack.append((a, b))

    def op_TUPLE3(self, arg):
        c, b, a = self.pop("TUPLE3"), self.pop("TUPLE3"), self.pop("TUPLE3")
        self.stack.append((a, b, c))

    def op_LIST(self, arg):
        items = self._leaves("LIST", self.pop_mark("LIST"))
        self.stack.append(items)

    def op_APPEND(self, arg):
        value = self.pop("APPEND")
        self._target("APPEND", list).extend(self._leaves("APPEND", [value]))

    def op_APPENDS(self, arg):
        items = self.pop_mark("APPENDS")
        self._target("APPENDS", list).extend(self._leaves("APPENDS", items))

    def op_DICT(self, arg):
        d: dict = {}
        items = self.pop_mark("DICT")
        self._set_items("DICT", d, items)
        self.stack.append(d)

    def op_SETITEM(self, arg):
        value, key = self.pop("SETITEM"), self.pop("SETITEM")
        self._set_items("SETITEM", self._target("SETITEM", dict), [key, value])

    def op_SETITEMS(self, arg):
        items = self.pop_mark("SETITEMS")
        self._set_items("SETITEMS", self._target("SETITEMS", dict), items)

    def _target(self, opcode: str, kind: type):
        if not self.stack or not isinstance(self.stack[-1], kind):
            self.fail(opcode, f"no {kind.__name__} to add to")
        return self.stack[-1]

    def _leaves(self, opcode: str, items: list) -> list:
        # Lists hold labels and file names only: no nested containers, arrays or stubs.
        for item in items:
            if not isinstance(item, _SCALAR_LEAVES):
                self.fail(opcode, f"a list may hold only numbers and strings, not {type(item).__name__}")
        return items

    def _set_items(self, opcode: str, d: dict, items: list) -> None:
        if len(items) % 2:
            self.fail(opcode, "odd number of items")
        for key, value in zip(items[::2], items[1::2], strict=True):
            if not isinstance(key, (bytes, str)):
                self.fail(opcode, f"dict key must be a string, got {type(key).__name__}")
            if isinstance(value, _ArrayStub):
                if value.array is None:
                    self.fail(opcode, "array never given its state")
                value = value.array
            elif isinstance(value, list):
                self._leaves(opcode, value)
            elif not isinstance(value, _SCALAR_LEAVES):
                self.fail(opcode, f"dict value of type {type(value).__name__} not allowed")
            d[key.encode("latin1") if isinstance(key, str) else key] = value

    # the numpy array, rebuilt from raw bytes only
    def op_GLOBAL(self, arg):
        module, _, name = arg.partition(" ")
        self._global("GLOBAL", module, name)

    def op_STACK_GLOBAL(self, arg):
        name, module = self.pop("STACK_GLOBAL"), self.pop("STACK_GLOBAL")
        if not (isinstance(module, str) and isinstance(name, str)):
            self.fail("STACK_GLOBAL", "module and name must be strings")
        self._global("STACK_GLOBAL", module, name)

    def _global(self, opcode: str, module: str, name: str):
        key = (module, name)
        if key not in _RECONSTRUCT | _FROMBUFFER | {_NDARRAY, _DTYPE, _ENCODE}:
            self.fail(
                opcode,
                f"refusing to load {module}.{name}: a CIFAR batch may only hold uint8 arrays, "
                "dicts, lists, numbers and strings",
            )
        self.stack.append(_Global(module, name))

    def op_REDUCE(self, arg):
        args, func = self.pop("REDUCE"), self.pop("REDUCE")
        if not isinstance(func, _Global) or not isinstance(args, tuple):
            self.fail("REDUCE", "only a named rebuilder may be called, with a tuple")
        key = (func.module, func.name)
        if key in _RECONSTRUCT:
            if not (len(args) == 3 and args[0] == _Global(*_NDARRAY) and args[1] == (0,)):
                self.fail("REDUCE", "_reconstruct must rebuild a plain ndarray")
            self.stack.append(_ArrayStub())
        elif key == _DTYPE:
            plain = len(args) == 3 and args[1] in (0, False) and args[2] in (1, True)
            if not (plain and args[0] in _UINT8_CODES):
                self.fail("REDUCE", f"only a uint8 dtype is accepted, got dtype{args!r:.80}")
            self.stack.append(_DtypeStub(args[0]))
        elif key == _ENCODE:
            if not (len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1")):
                self.fail("REDUCE", "_codecs.encode only of text to latin1")
            self.stack.append(args[0].encode("latin1"))
        elif key in _FROMBUFFER:
            if len(args) != 4 or args[3] != "C":
                self.fail("REDUCE", "_frombuffer(buffer, dtype, shape, 'C') expected")
            stub = _ArrayStub()
            stub.array = self._array("REDUCE", args[0], args[1], args[2])
            self.stack.append(stub)
        else:
            self.fail("REDUCE", f"{func.module}.{func.name} may not be called")

    def op_BUILD(self, arg):
        state, target = self.pop("BUILD"), self.pop("BUILD")
        if isinstance(target, _DtypeStub):
            if target.checked or state != _UINT8_STATE:
                self.fail("BUILD", f"dtype state {state!r:.80} is not a plain uint8's")
            target.checked = True
        elif isinstance(target, _ArrayStub):
            if target.array is not None or not (isinstance(state, tuple) and len(state) == 5):
                self.fail("BUILD", "ndarray state must be (version, shape, dtype, fortran, bytes)")
            version, shape, dtype, fortran, data = state
            if version != 1 or fortran not in (0, False):
                self.fail("BUILD", f"ndarray state version {version!r}, fortran {fortran!r} not accepted")
            if isinstance(data, str):  # Python 2 str under a text decoding
                data = data.encode("latin1")
            target.array = self._array("BUILD", data, dtype, shape)
        else:
            self.fail("BUILD", f"cannot set the state of {type(target).__name__}")
        self.stack.append(target)

    def _array(self, opcode: str, data: Any, dtype: Any, shape: Any) -> np.ndarray:
        if not (isinstance(dtype, _DtypeStub) and dtype.checked):
            self.fail(opcode, "array dtype must be a checked uint8")
        if not (
            isinstance(shape, tuple)
            and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n for n in shape)
        ):
            self.fail(opcode, f"array shape must be 2 non-negative ints, got {shape!r:.80}")
        if not isinstance(data, (bytes, bytearray)):
            self.fail(opcode, f"array data must be bytes, got {type(data).__name__}")
        declared = math.prod(shape)
        if declared != len(data):
            self.fail(opcode, f"array shape {shape} declares {declared} bytes, the file holds {len(data)}")
        return np.frombuffer(bytes(data), dtype=np.uint8).reshape(shape)
