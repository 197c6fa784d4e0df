"""Reading detectron2 ``.pkl`` checkpoints without running code from them.

detectron2's model zoo (and Caffe2 / Detectron1 ImageNet models) ship weights as pickles, and
``pickle.load`` executes whatever a crafted file asks for. :func:`load_pkl` unpickles with an
allow-list: containers, strings and numbers are built in by pickle itself; the only globals a
file may name are numpy's array and dtype reconstructors (and ``collections.OrderedDict``).
Anything else is refused with an error naming the file and the global, before it is called.

The allowed numpy globals are themselves guarded, because numpy trusts its pickles:

* dtypes: only plain numbers, booleans and fixed-size strings (no object, void, structured or
  sub-array dtypes, whose raw bytes numpy could read as object pointers), and each dtype's
  state is set at most once and only to the state numpy's own pickles write for it (another
  could turn a checked dtype into another, or give it a size or flags numpy's C code misreads);
* arrays: built only as numpy's own pickles build them, with a checked dtype, and no array or
  sum of arrays may be larger than the file (a 300-byte file cannot ask for gigabytes);
* lengths: no string, bytes, integer or frame may declare more bytes than the file holds
  (pickle allocates what an opcode declares before it reads);
* memory: every opcode's work is counted as it runs (each object it builds at its size, the
  growth of the container it fills, each memo entry, each mark), and a file whose count passes
  eight times its size plus 192 KB is refused: memory is bounded by construction, whatever the
  opcodes (four million ``EMPTY_SET`` in a 4 MB file would take over a gigabyte);
* after loading, every array and numpy scalar of the result is checked again.

Arbitrary pickles (e.g. a file of your own that holds other Python objects) load only when the
environment variable ``MASKD_ALLOW_UNSAFE_PICKLE=1`` is set, for every process of the run: it
means trusting the file as you would trust code.
"""

import codecs
import collections
import functools
import logging
import math
import os
import pickle
import struct
import sys
from typing import Any

import numpy as np

__all__ = ["load_pkl", "UnsafePickleError", "DamagedPickleError", "UNSAFE_PICKLE_ENV"]

logger = logging.getLogger(__name__)

UNSAFE_PICKLE_ENV = "MASKD_ALLOW_UNSAFE_PICKLE"

# (module, name) pairs that model-zoo pickles contain: numpy arrays, their dtypes and scalars.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes in Python 3 pickles of protocol < 3: latin1 only
}
# dtype kinds a weights file may hold: bool, signed/unsigned integers, floats, complex, and
# fixed-size byte and unicode strings.
ALLOWED_DTYPE_KINDS = "biufcSU"
_LATIN1 = ("latin1", "latin-1")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside :data:`ALLOWED_GLOBALS`, or asks the allowed ones for
    something a weights file does not need (an unsafe dtype, a second dtype state, an array
    larger than the file)."""


# The memory a load may build: this many times the file's size, plus this much.
MEMORY_FACTOR, MEMORY_SLACK = 8, 192 << 10
# What one stack slot, one memo entry and one mark cost (a pointer; a dict entry and its key; a
# list).
_SLOT, _MEMO_KEY, _MARK = 8, 32, 64


def _opcodes(*names: str) -> frozenset:
    return frozenset(getattr(pickle, name)[0] for name in names if hasattr(pickle, name))


# opcodes that push an object the load already holds, store in the memo, open a mark, or add
# to the container left on the stack
_REFERENCES = _opcodes("GET", "BINGET", "LONG_BINGET", "DUP")
_MEMOS = _opcodes("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")
_MARKS = _opcodes("MARK")
_FILLS = _opcodes("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS")
# opcodes that close the mark: the stack below the mark comes back (its objects were counted
# when they were pushed) and the one new object is the one built from the items above the mark
_FROM_MARK = _opcodes("TUPLE", "LIST", "DICT", "FROZENSET", "OBJ", "INST")
_POP_MARK = _opcodes("POP_MARK")
# sets the state of the object below it (a dtype or an array: counted when it was built; an
# array's data is counted by the arrays' budget, :meth:`_RestrictedUnpickler.allocate`)
_BUILD = _opcodes("BUILD")


def _size(obj) -> int:
    """The memory a new object on the stack takes: none for Python's shared constants (None,
    True, False, the small ints, the empty tuple), which no opcode allocates."""
    if obj is None or obj is True or obj is False or (type(obj) is tuple and not obj):
        return 0
    if type(obj) is int and -5 <= obj <= 256:
        return 0
    return sys.getsizeof(obj)


def _filled(self, code: int):
    """The container that the filling opcode ``code`` is about to add to."""
    if code in _opcodes("APPEND"):
        return self.stack[-2] if len(self.stack) >= 2 else None
    if code in _opcodes("SETITEM"):
        return self.stack[-3] if len(self.stack) >= 3 else None
    return self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None


def _counted(code: int, handler):
    """``handler`` of opcode ``code``, with what it builds counted (:func:`_run_counted`)."""
    return functools.partial(_run_counted, code=code, handler=handler)


def _run_counted(self, code: int, handler) -> None:
    """Run ``handler`` of opcode ``code`` and count what it builds (:meth:`charge`): each new
    object on the stack at its size (once: an opcode that closes a mark brings back the stack
    below it, whose objects were counted when pushed), the growth of the container it fills, a
    memo entry, a mark, a reference."""
    if code in _REFERENCES:
        self.charge(_SLOT)
        return handler(self)
    if code in _MEMOS:  # the memo dict's growth and a key (an int object) per new entry
        entries, size = len(self.memo), sys.getsizeof(self.memo)
        handler(self)
        grown = max(0, sys.getsizeof(self.memo) - size)
        return self.charge(grown + _MEMO_KEY * (len(self.memo) - entries))
    if code in _MARKS:
        self.charge(_MARK)
        return handler(self)
    if code in _FILLS:
        container = _filled(self, code)
        before = sys.getsizeof(container)
        handler(self)
        return self.charge(max(0, sys.getsizeof(container) - before) + _SLOT)
    if code in _FROM_MARK:
        handler(self)
        return self.charge(_size(self.stack[-1]) + _SLOT)
    if code in _POP_MARK or code in _BUILD:
        return handler(self)
    depth = len(self.stack)
    top = self.stack[-1] if self.stack else None
    handler(self)
    if len(self.stack) > depth:  # pushed: each new object
        self.charge(sum(_size(o) for o in self.stack[depth:]) + _SLOT)
    elif self.stack and self.stack[-1] is not top:  # a result replaced its arguments
        self.charge(_size(self.stack[-1]))


class _RestrictedUnpickler(pickle._Unpickler):
    """pickle's Python unpickler with the allow-list and the numpy guards of this module.

    The Python implementation (not the C one) because its opcodes can be overridden: REDUCE,
    BUILD, NEWOBJ and INST/OBJ go through the checks here."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: str, size: int):
        super().__init__(file, encoding="latin1")
        self.path = path
        self.size = size
        self.budget = size  # bytes that arrays may still take: the file's size
        # the memory the load may build: counted opcode by opcode (:meth:`charge`)
        self.memory_left = MEMORY_FACTOR * size + MEMORY_SLACK
        # the dtypes whose state was set, by id; held here, so that no other object takes an id
        # of theirs while the file loads (a pickle need not memoize them)
        self.built_dtypes = {}

    def refuse(self, what: str):
        raise UnsafePickleError(
            f"'{self.path}' {what}, which a weights file does not need (model-zoo pickles hold "
            "only dicts, strings, numbers and numpy arrays of plain numbers); refused, nothing "
            f"of it was run. If you trust this file as you would trust code, set "
            f"{UNSAFE_PICKLE_ENV}=1"
        )

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        self.refuse(f"asks to load the Python global '{module}.{name}'")

    # --- memory, counted opcode by opcode ---------------------------------------------------

    def charge(self, nbytes: int) -> None:
        self.memory_left -= nbytes
        if self.memory_left < 0:
            self.refuse(
                f"builds more objects than {MEMORY_FACTOR} times its size (plus "
                f"{MEMORY_SLACK >> 10} KB) in memory"
            )

    # --- the guards -------------------------------------------------------------------------

    def check_dtype(self, dtype) -> np.dtype:
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            self.refuse(f"names an array type numpy does not know ({dtype!r})")
        if (
            dtype.kind not in ALLOWED_DTYPE_KINDS
            or dtype.fields is not None
            or dtype.subdtype is not None
            or dtype.hasobject
        ):
            self.refuse(f"asks for the numpy dtype '{dtype.str}' (kind '{dtype.kind}')")
        return dtype

    def plain_dtype_state(self, dtype: np.dtype, state) -> tuple:
        """The state numpy's own pickles write for ``dtype`` in the byte order ``state`` names,
        if ``state`` is exactly that; refused otherwise.

        A dtype's state can set its item size, alignment and flags to anything, including values
        numpy never writes (a negative size, the "use getitem" flag on a string type) on which
        numpy's C code reads out of bounds. Only the one state of a plain dtype is set, so the
        dtype the constructor made (and :meth:`check_dtype` checked) changes at most its byte
        order: ``(3, byteorder, None, None, None, elsize, alignment, flags)``.
        """
        plain = (int, str, type(None))
        if (
            not isinstance(state, tuple)
            or len(state) != 8
            or not all(type(v) in plain for v in state)
            or state[1] not in ("<", ">", "|")
        ):
            self.refuse(f"sets the state of a numpy dtype to {state!r:.120}")
        ordered = dtype if state[1] == "|" else dtype.newbyteorder(state[1])
        expected = ordered.__reduce__()[2]
        if len(expected) != 8 or any(
            type(a) is not type(b) or a != b for a, b in zip(state, expected)
        ):
            self.refuse(
                f"sets the state of the numpy dtype '{dtype.str}' to {state!r:.120}, where "
                f"numpy's pickles write {expected!r}"
            )
        return expected

    def allocate(self, shape, dtype: np.dtype) -> None:
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            self.refuse(f"declares an array of shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.budget:
            self.refuse(
                f"declares arrays of more bytes ({nbytes} for shape {shape}) than the file holds"
            )
        self.budget -= nbytes

    def call(self, func, args):
        """What REDUCE and INST/OBJ do, ``func(*args)``, for the allowed callables only."""
        if not isinstance(args, tuple):
            self.refuse("calls a global without an argument tuple")
        if func is np.dtype:
            # a copy, as numpy's pickles ask: BUILD must never change numpy's shared dtypes
            return np.dtype(self.check_dtype(args[0] if args else None), copy=True)
        if func in _RECONSTRUCT:
            if len(args) != 3 or args[0] is not np.ndarray:
                self.refuse("rebuilds an array other than as numpy's own pickles do")
            self.allocate(args[1], self.check_dtype(args[2]))
            return func(*args)
        if func is np.ndarray:
            if not 1 <= len(args) <= 2:
                self.refuse("constructs an array with buffer or stride arguments")
            self.allocate(args[0], self.check_dtype(args[1] if len(args) > 1 else float))
            return func(*args)
        if func in _SCALAR:
            if len(args) != 2 or not isinstance(args[0], np.dtype):
                self.refuse("builds a numpy scalar without a dtype")
            self.check_dtype(args[0])
            return func(*args)
        if func is collections.OrderedDict:
            return func(*args)
        if func is codecs.encode:
            if len(args) != 2 or not isinstance(args[0], str) or args[1] not in _LATIN1:
                self.refuse("encodes text other than as Python 3's pickles of bytes do (latin1)")
            return func(*args)
        self.refuse(f"calls {func!r}")

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args)

    def _instantiate(self, klass, args):
        self.append(self.call(klass, tuple(args)))

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack[-1]
        if cls is not collections.OrderedDict:
            self.refuse(f"creates {getattr(cls, '__name__', cls)!r} objects without calling them")
        self.stack[-1] = cls.__new__(cls, *args)

    def load_newobj_ex(self):
        self.refuse("creates objects with keyword arguments (NEWOBJ_EX)")

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            if id(inst) in self.built_dtypes:
                self.refuse("sets the state of a numpy dtype a second time")
            self.built_dtypes[id(inst)] = inst
            inst.__setstate__(self.plain_dtype_state(inst, state))
            self.check_dtype(inst)
            return
        if isinstance(inst, np.ndarray):
            if not isinstance(state, tuple) or len(state) != 5:
                self.refuse("sets an array's state in a form numpy's pickles do not use")
            _, shape, dtype, _, data = state
            if not isinstance(dtype, np.dtype) or id(dtype) not in self.built_dtypes:
                self.refuse("fills an array with a dtype the file did not declare")
            self.allocate(shape, self.check_dtype(dtype))
            if not isinstance(data, (bytes, str)):
                self.refuse("fills an array from something other than raw bytes")
            inst.__setstate__(state)
            return
        if isinstance(inst, np.generic):
            self.refuse("sets the state of a numpy scalar")
        self.refuse(f"sets the state of a {type(inst).__name__} object")

    # --- lengths: no opcode may declare more bytes than the file holds --------------------
    # (pickle would allocate them first: a 12-byte BYTEARRAY8 of 2 GB zero-fills 2 GB)

    def declared(self, fmt: str, what: str) -> int:
        """Read the length field ``fmt`` of an opcode; refuse one larger than the file."""
        (n,) = struct.unpack(fmt, self.read(struct.calcsize(fmt)))
        if n < 0 or n > self.size:
            self.refuse(f"declares a {what} of {n} bytes in a file of {self.size}")
        return n

    def load_binstring(self):
        self.append(self._decode_string(self.read(self.declared("<i", "string"))))

    def load_binunicode(self):
        self.append(str(self.read(self.declared("<I", "string")), "utf-8", "surrogatepass"))

    def load_binunicode8(self):
        self.append(str(self.read(self.declared("<Q", "string")), "utf-8", "surrogatepass"))

    def load_binbytes(self):
        self.append(self.read(self.declared("<I", "bytes object")))

    def load_binbytes8(self):
        self.append(self.read(self.declared("<Q", "bytes object")))

    def load_bytearray8(self):
        data = bytearray(self.declared("<Q", "bytearray"))
        self.readinto(data)
        self.append(data)

    def load_long4(self):
        self.append(pickle.decode_long(self.read(self.declared("<i", "integer"))))

    def load_frame(self):
        self._unframer.load_frame(self.declared("<Q", "frame"))

    for _opcode, _load in (
        (pickle.BINSTRING, load_binstring),
        (pickle.BINUNICODE, load_binunicode),
        (pickle.BINUNICODE8, load_binunicode8),
        (pickle.BINBYTES, load_binbytes),
        (pickle.BINBYTES8, load_binbytes8),
        (pickle.BYTEARRAY8, load_bytearray8),
        (pickle.LONG4, load_long4),
        (pickle.FRAME, load_frame),
    ):
        dispatch[_opcode[0]] = _load
    del _opcode, _load

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch = {code: _counted(code, handler) for code, handler in dispatch.items()}

    def check_result(self, obj, seen=None) -> None:
        """Every array and numpy scalar reachable from ``obj`` has an allowed dtype."""
        seen = set() if seen is None else seen
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (np.ndarray, np.generic)):
            self.check_dtype(obj.dtype)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                self.check_result(key, seen)
                self.check_result(value, seen)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for value in obj:
                self.check_result(value, seen)


def _numpy_functions(name: str):
    found = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_RECONSTRUCT = _numpy_functions("_reconstruct")
_SCALAR = _numpy_functions("scalar")


def unsafe_pickle_allowed() -> bool:
    """Whether the opt-in to arbitrary pickles is set."""
    return os.environ.get(UNSAFE_PICKLE_ENV, "") == "1"


class DamagedPickleError(ValueError):
    """A pickle stream that pickle or numpy cannot read (nothing of it ran)."""


def load_pkl(path: str, file=None) -> Any:
    """Unpickle a weights file with the allow-list (latin1 strings, as detectron2 reads them).

    Args:
        path: the local file (also named in errors).
        file: an open binary file of it, if already open.

    Raises:
        UnsafePickleError: the file names a global outside the allow-list, or asks the allowed
            numpy globals for an unsafe dtype, a second dtype state or more bytes than it holds
            (unless the opt-in is set).
        DamagedPickleError: the stream is not a pickle that can be read (naming the file).
    """
    if file is None:
        with open(path, "rb") as f:
            return load_pkl(path, f)
    if unsafe_pickle_allowed():
        logger.warning("%s=1: unpickling '%s' without restrictions", UNSAFE_PICKLE_ENV, path)
        return pickle.load(file, encoding="latin1")
    size = os.fstat(file.fileno()).st_size
    unpickler = _RestrictedUnpickler(file, path, size)
    try:
        result = unpickler.load()
    except (UnsafePickleError, MemoryError):
        raise
    except Exception as e:  # pickle's and numpy's errors on a damaged stream
        raise DamagedPickleError(
            f"'{path}' is not a readable pickle (damaged, cut short, or not a weights file): "
            f"{type(e).__name__}: {e}"
        ) from None
    unpickler.check_result(result)
    return result
