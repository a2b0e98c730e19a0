"""Reading pickled checkpoints (``torch.save`` files) without running their code or exhausting memory.

:func:`read_checkpoint` is the one reader of ``.ckpt``/``.pt``/``.bin`` files in esolm:

1. **scan** (:func:`scan_pickle`): the pickle opcode stream (``data.pkl`` of the zip archive, or the leading
   pickles of a legacy file) is walked with :mod:`pickletools` — nothing is built. It refuses, with the
   name of the global, a file that calls into modules that run code (``os``, ``subprocess``,
   ``builtins.exec`` ...); a call that would allocate a buffer from a number in the file
   (``bytearray(2_300_000_000)`` is executed by ``torch.load`` itself); a tensor storage larger than the
   file; and an object graph that expands past :data:`MAX_OBJECTS` nodes (shared references counted every
   time they are reached, as copying the result would);
2. **load**: ``torch.load(weights_only=True)`` (not memory-mapped: torch checks each tensor record's size
   only when it reads it; the memory used is bounded by the file's size). Globals ``weights_only``
   does not know (omegaconf containers, tokenizers, ``typing.Any`` ...) are rebuilt as inert
   :class:`InertObject` records: their class is never imported and nothing of theirs runs;
3. **walk** the result once more with the same budget, refusing cycles and nesting deeper than
   :data:`MAX_DEPTH`, then convert omegaconf records to plain dicts/lists (plain ``${a.b}``
   interpolations resolved).

Every failure is a one-line :class:`~esolm.errors.CheckpointError`.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path
from typing import Any

import torch

from esolm.errors import CheckpointError

MAX_OBJECTS = 1_000_000  # nodes of the expanded object tree (containers and their elements)
MAX_DEPTH = 100  # nesting of containers
MAX_PICKLE_BYTES = 64 << 20  # the pickle stream itself (tensor data is not part of it)
MAX_CALL_INT = 1 << 20  # largest number an allocating constructor (bytearray, storages) may be called with

# Globals whose call runs code or touches the system: a file naming one is refused outright. (Every other
# global the weights_only unpickler does not allow becomes an inert record and is never called.)
_CODE_MODULES = (
    "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "runpy", "pickle", "_pickle", "marshal",
    "types", "code", "codeop", "ctypes", "socket", "pty", "webbrowser", "io", "_io", "functools", "operator",
    "pathlib", "tempfile", "signal", "multiprocessing", "asyncio", "threading", "glob", "platform", "pdb",
    "timeit", "cProfile", "profile", "trace", "pydoc", "inspect", "compileall", "py_compile", "zipimport",
    "pkgutil", "site", "sysconfig", "urllib", "http", "ftplib", "smtplib", "xmlrpc", "dill", "cloudpickle",
    "joblib", "numpy.testing", "torch.hub", "torch.jit", "torch.package", "torch.load", "torch.save",
    "torch.ops", "torch._C", "torch._dynamo",
)
_CODE_BUILTINS = {f"builtins.{n}" for n in (
    "eval", "exec", "execfile", "compile", "open", "file", "__import__", "getattr", "setattr", "delattr",
    "globals", "locals", "vars", "input", "raw_input", "breakpoint", "exit", "quit", "help", "reload", "apply",
    "print", "memoryview", "type", "super", "classmethod", "staticmethod", "property", "map", "filter", "iter",
    "next", "reversed", "sorted", "zip", "enumerate", "callable", "dir", "id", "hash")}
_HARMLESS = {f"pathlib.{n}" for n in ("Path", "PurePath", "PosixPath", "PurePosixPath", "WindowsPath",
                                       "PureWindowsPath")}
# Allowlisted constructors that allocate a buffer of the size they are called with.
_ALLOCATING = re.compile(r"^(builtins\.bytearray|torch\.(cuda\.)?(storage\.)?\w*Storage|torch\.(cuda\.)?\w*Tensor)$")

_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation of torch.load")


def cause_line(exc: BaseException) -> str:
    """The informative line of an exception, prefixed with its type (torch's weights_only errors bury it under
    boilerplate); :func:`esolm.errors.one_line` shows a whole message on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_BOILERPLATE)]
    text = (useful or lines or [""])[0]
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def runs_code(name: str) -> bool:
    """Whether the pickled global ``name`` (``module.qualname``) is one whose call runs code."""
    if name.startswith("builtins."):
        return name in _CODE_BUILTINS or name.count(".") > 1  # e.g. builtins.str.format
    return name not in _HARMLESS and any(name == m or name.startswith(m + ".") for m in _CODE_MODULES)


# --------------------------------------------------------------------------------------------------
# 1. Scan: the opcode stream, nothing built
# --------------------------------------------------------------------------------------------------


class _Refused(Exception):
    pass


class _Node:
    """Stand-in for an object the pickle would build: its expanded size, a tuple's items, a global's name."""

    __slots__ = ("size", "items", "name")

    def __init__(self, size: int = 1, items: tuple | None = None, name: str | None = None):
        self.size, self.items, self.name = size, items, name


def _size(v: Any) -> int:
    return v.size if isinstance(v, _Node) else 1


class _Scan:
    """The state of one scan over one or more pickles (budgets are shared)."""

    def __init__(self, file_bytes: int):
        self.file_bytes = file_bytes
        self.created = 0
        self.memo_puts = 0
        self.globals: set[str] = set()

    def new(self, size: int = 1, items: tuple | None = None, name: str | None = None) -> _Node:
        self.created += 1
        if self.created > MAX_OBJECTS:
            raise _Refused(f"it holds more than {MAX_OBJECTS:,} objects")
        return self.grow(_Node(size, items, name), 0)

    @staticmethod
    def grow(node: Any, by: int) -> Any:
        if isinstance(node, _Node):
            node.size += by
            if node.size > MAX_OBJECTS:
                raise _Refused(f"its object graph expands to more than {MAX_OBJECTS:,} objects "
                               "(shared references)")
        return node

    def global_(self, name: str) -> _Node:
        if runs_code(name):
            raise _Refused(f"loading it would run code (it calls {name})")
        self.globals.add(name)
        return self.new(name=name)

    def call(self, func: Any, args: Any) -> _Node:
        name = func.name if isinstance(func, _Node) else None
        items = args.items if isinstance(args, _Node) and args.items is not None else ()
        if name and _ALLOCATING.match(name):
            big = [a for a in items if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_CALL_INT]
            if big:
                raise _Refused(f"it calls {name}({big[0]}), which would allocate that much memory while loading")
        return self.new(1 + _size(args))

    def persistent(self, pid: Any) -> _Node:
        items = pid.items if isinstance(pid, _Node) and pid.items else ()
        if len(items) >= 5 and items[0] == "storage" and isinstance(items[4], int) and items[4] > self.file_bytes:
            raise _Refused(f"a tensor storage claims {items[4]:,} elements but the file has only "
                           f"{self.file_bytes:,} bytes")
        return self.new(_size(pid))

    def pickle(self, stream: Any) -> None:
        """Simulate one pickle (up to its STOP) on abstract values."""
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}

        def pop_mark() -> list:
            if not marks:
                raise ValueError("MARK missing")
            at = marks.pop()
            items = stack[at:]
            del stack[at:]
            return items

        def pop() -> Any:
            if not stack:
                raise ValueError("stack underflow")
            return stack.pop()

        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in ("PROTO", "FRAME", "STOP"):
                continue
            if name == "MARK":
                marks.append(len(stack))
            elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
                stack.append(arg if isinstance(arg, int) else self.new())
            elif name in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
                          "SHORT_BINSTRING"):
                stack.append(arg if isinstance(arg, str) and len(arg) <= 512 else self.new())
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                stack.append(self.new())
            elif name == "EMPTY_TUPLE":
                stack.append(self.new(items=()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3", "TUPLE"):
                n = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(name)
                items = pop_mark() if n is None else [pop() for _ in range(n)][::-1]
                stack.append(self.new(1 + sum(map(_size, items)), items=tuple(items)))
            elif name in ("LIST", "DICT", "FROZENSET"):
                stack.append(self.new(1 + sum(map(_size, pop_mark()))))
            elif name == "APPEND":
                v = pop()
                self.grow(stack[-1] if stack else None, _size(v))
            elif name == "SETITEM":
                v, k = pop(), pop()
                self.grow(stack[-1] if stack else None, _size(k) + _size(v))
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
                items = pop_mark()
                self.grow(stack[-1] if stack else None, sum(map(_size, items)))
            elif name == "POP":
                pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1] if stack else self.new())
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                self.memo_puts += 1
                if self.memo_puts > 2 * MAX_OBJECTS:
                    raise _Refused(f"it memoizes more than {2 * MAX_OBJECTS:,} objects")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise ValueError(f"memo key {arg} missing")
                stack.append(memo[arg])
            elif name == "GLOBAL":
                stack.append(self.global_(_global_name(arg)))
            elif name == "STACK_GLOBAL":
                attr, module = pop(), pop()
                stack.append(self.global_(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str)
                                          else "?"))
            elif name == "INST":
                self.global_(_global_name(arg))
                stack.append(self.new(1 + sum(map(_size, pop_mark()))))
            elif name == "OBJ":
                items = pop_mark()
                stack.append(self.call(items[0] if items else None, self.new(items=tuple(items[1:]))))
            elif name in ("REDUCE", "NEWOBJ"):
                args = pop()
                stack.append(self.call(pop(), args))
            elif name == "NEWOBJ_EX":
                kwargs, args = pop(), pop()
                stack.append(self.call(pop(), args))
                self.grow(stack[-1], _size(kwargs))
            elif name == "BUILD":
                state = pop()
                self.grow(stack[-1] if stack else None, _size(state))
            elif name == "BINPERSID":
                stack.append(self.persistent(pop()))
            else:  # other constants (None, bools, floats, bytes) and the rare rest: generic stack effect
                before = op.stack_before
                if pickletools.markobject in before:
                    pop_mark()
                else:
                    for _ in before:
                        pop()
                stack.extend(self.new() for _ in op.stack_after)


def _global_name(arg: str) -> str:
    """``module.name`` of a GLOBAL/INST argument, with Python 2 names mapped as unpicklers map them."""
    module, _, name = str(arg).partition(" ")
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    else:
        module = IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


class _Bounded:
    """A read-only view of a binary file that never reads past its end (a length field in a hostile pickle
    cannot make ``read`` allocate more than the file holds) and reads lines of at most 64 KiB."""

    def __init__(self, fh: Any, size: int):
        self.fh, self.left = fh, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        data = self.fh.readline(min(self.left, 1 << 16))
        self.left -= len(data)
        return data

    def tell(self) -> int:
        return self.fh.tell()


def _is_zip(path: Path) -> bool:
    """Whether ``torch.load`` reads ``path`` as a zip archive (its test: the first four bytes)."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _zip_data_pkl(path: Path) -> bytes:
    """The ``data.pkl`` record of a ``torch.save`` zip archive, read by torch's own archive reader (the very
    bytes ``torch.load`` unpickles), after checking its size."""
    reader = torch._C.PyTorchFileReader(str(path))
    if not reader.has_record("data.pkl"):
        raise ValueError("no data.pkl in the zip archive (not a torch.save file)")
    size = reader.get_record_size("data.pkl")
    if size > MAX_PICKLE_BYTES:
        raise _Refused(f"its pickle is {size:,} bytes (more than {MAX_PICKLE_BYTES:,})")
    return reader.get_record("data.pkl")


def scan_pickle(path: str | os.PathLike) -> set[str]:
    """Check the pickle stream of a ``torch.save`` file (see the module docstring) without unpickling it;
    returns the globals it names. Raises :class:`CheckpointError`."""
    path = Path(path)
    size = path.stat().st_size
    scan = _Scan(size)
    try:
        if _is_zip(path):
            data = _zip_data_pkl(path)
            scan.pickle(_Bounded(io.BytesIO(data), len(data)))
        else:  # legacy format: magic number, protocol, sys info, the object, storage keys; then raw data
            with open(path, "rb") as fh:
                stream = _Bounded(fh, min(size, MAX_PICKLE_BYTES))
                for _ in range(5):
                    if stream.left == 0:
                        break
                    scan.pickle(stream)
    except _Refused as exc:
        raise CheckpointError(f"{path}: refused: {exc}") from None
    except (ValueError, EOFError, IndexError, KeyError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{path}: checkpoint is corrupted or truncated ({cause_line(exc)})") from None
    return scan.globals


# --------------------------------------------------------------------------------------------------
# 2. Load with inert stand-ins for unknown globals
# --------------------------------------------------------------------------------------------------


class InertObject:
    """Record of a pickled object whose class we refuse to import.

    The restricted unpickler calls ``cls(*args)`` (REDUCE), ``cls.__new__(cls, *args)`` (NEWOBJ) and
    ``obj.__setstate__(state)`` (BUILD); each is recorded here and nothing else happens.
    ``qualname`` is the pickled global (e.g. ``omegaconf.dictconfig.DictConfig``).
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


def _empty_dict(*args, **kwargs) -> dict:
    """Stand-in for ``collections.defaultdict``: the unpickler only fills plain dicts."""
    return {}


def _inert_globals(names: list[str]) -> list[tuple[Any, str]]:
    out = []
    for name in names:
        if name == "collections.defaultdict":
            out.append((_empty_dict, name))
        else:
            out.append((type(name.rsplit(".", 1)[-1], (InertObject,), {"qualname": name}), name))
    return out


def _torch_load(path: Path, names: set[str], map_location: Any) -> Any:
    from torch._weights_only_unpickler import _get_allowed_globals

    unsafe = sorted(names - set(_get_allowed_globals()))
    try:
        with torch.serialization.safe_globals(_inert_globals(unsafe)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise CheckpointError(f"{path}: refused: loading it needs more memory than is available") from None
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file, blocked global, ...
        text = cause_line(exc)
        if "GLOBAL" in text or "reduce for unrecognized" in text:
            raise CheckpointError(f"{path}: refused: loading it would need a global that weights_only loading "
                                  f"does not allow ({text})") from None
        raise CheckpointError(f"{path}: checkpoint is corrupted or truncated ({text})") from None


# --------------------------------------------------------------------------------------------------
# 3. Walk the result, then convert omegaconf records to plain data
# --------------------------------------------------------------------------------------------------


def _children(obj: Any) -> tuple | list | None:
    if isinstance(obj, dict):
        return [x for kv in obj.items() for x in kv]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, InertObject):
        return [obj.args, obj.kwargs, obj.state]
    return None


def check_graph(obj: Any, where: str) -> None:
    """Refuse (one line) a loaded object that nests deeper than :data:`MAX_DEPTH` or whose expansion (each
    shared reference counted where it is reached) exceeds :data:`MAX_OBJECTS`. A reference back to an
    ancestor (omegaconf nodes point to their parents) is counted and not followed."""
    count = 0
    on_path: set[int] = set()
    todo: list[tuple[Any, int, bool]] = [(obj, 0, False)]
    while todo:
        node, depth, leaving = todo.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        count += 1
        if count > MAX_OBJECTS:
            raise CheckpointError(f"{where}: refused: its contents expand to more than {MAX_OBJECTS:,} objects")
        kids = _children(node)
        if kids is None or id(node) in on_path:
            continue
        if depth >= MAX_DEPTH:
            raise CheckpointError(f"{where}: refused: its contents nest deeper than {MAX_DEPTH} levels")
        on_path.add(id(node))
        todo.append((node, depth, True))
        todo.extend((k, depth + 1, False) for k in kids)


def _is_inert(obj: Any, *suffixes: str) -> bool:
    return isinstance(obj, InertObject) and obj.qualname.rsplit(".", 1)[-1] in suffixes


_OMEGACONF_TYPES = (
    "DictConfig", "ListConfig", "AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
    "EnumNode", "BytesNode", "PathNode", "InterpolationResultNode", "ValueNode",
)
_INTERP = re.compile(r"^\$\{(\.*)([A-Za-z_][\w.]*)\}$")


def _plain(obj: Any, where: str, active: set[int] | None = None) -> Any:
    """``obj`` with omegaconf records replaced by plain values (other inert records are kept as they are).
    A container met again inside itself is refused."""
    active = set() if active is None else active
    if isinstance(obj, (InertObject, dict, list, tuple)):
        if id(obj) in active:
            raise CheckpointError(f"{where}: refused: it holds a container that contains itself")
        active.add(id(obj))
    if isinstance(obj, InertObject):
        out: Any = obj
        if obj.qualname.startswith("omegaconf.") and _is_inert(obj, *_OMEGACONF_TYPES):
            state = obj.state if isinstance(obj.state, dict) else {}
            if _is_inert(obj, "DictConfig"):
                out = _resolve_interpolations(_plain(state.get("_content"), where, active), where)
            else:
                out = _plain(state.get("_content") if _is_inert(obj, "ListConfig") else state.get("_val"), where,
                             active)
    elif isinstance(obj, dict):
        out = type(obj)((k, _plain(v, where, active)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_plain(v, where, active) for v in obj) if type(obj) in (list, tuple) else obj
    else:
        return obj
    active.discard(id(obj))
    return out


def _resolve_interpolations(root: Any, where: str) -> Any:
    """Resolve omegaconf interpolations that are plain references (``${a.b}``, ``${.x}``, ``${..y}``).

    Anything else (resolvers like ``${oc.env:...}``, string templates) is left as written. The copies made
    count against :data:`MAX_OBJECTS`.
    """
    if not isinstance(root, dict):
        return root
    made = [0]

    def lookup(path: list[str]) -> Any:
        node = root
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise KeyError(key)
            node = node[key]
        return node

    def resolve(value: Any, at: list[str], depth: int = 0) -> Any:
        made[0] += 1
        if made[0] > MAX_OBJECTS:
            raise CheckpointError(f"{where}: refused: its config's interpolations expand to more than "
                                  f"{MAX_OBJECTS:,} values")
        if isinstance(value, dict):
            return {k: resolve(v, at + [k], depth) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, at, depth) for v in value]
        if isinstance(value, str) and depth < 16:
            m = _INTERP.match(value)
            if m:
                dots, ref = len(m.group(1)), m.group(2).split(".")
                base = at[: len(at) - dots] if dots else []
                try:
                    target = lookup(base + ref)
                except KeyError:
                    return value
                return resolve(target, base + ref[:-1], depth + 1)
        return value

    return resolve(root, [])


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """The object a ``torch.save`` file holds, read safely (scan, ``weights_only`` load, walk; see the
    module docstring); omegaconf containers come back as plain dicts/lists. Raises :class:`CheckpointError`
    with one line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    names = scan_pickle(path)
    obj = _torch_load(path, names, map_location)
    check_graph(obj, str(path))
    try:
        return _plain(obj, str(path))
    except RecursionError:
        raise CheckpointError(f"{path}: refused: its contents nest too deeply") from None


__all__ = ["read_checkpoint", "scan_pickle", "check_graph", "InertObject", "runs_code", "cause_line",
           "MAX_OBJECTS", "MAX_DEPTH"]
