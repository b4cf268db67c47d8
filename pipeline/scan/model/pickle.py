"""Pickle streams judged without unpickling: a symbolic stack machine over `pickletools.genops`
and the globals policy (which imported callables rebuild data, which run code)."""

from __future__ import annotations

import io
import pickletools
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import IO, Any

from pipeline.scan.model.collect import Collector
from pipeline.scan.model.policy import judge_global
from pipeline.scan.model.report import Location, Severity, names

__all__ = ["judge_global", "scan_pickle_file", "scan_pickle_stream"]


class _Mark:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MARK"


MARK = _Mark()


class _Opaque:
    """A value the scanner does not model (lists, bytes, results of unknown calls)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "…"


OPAQUE = _Opaque()


@dataclass(frozen=True)
class _Global:
    module: str
    name: str
    offset: int
    opcode: str

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class _Call:
    func: object
    args: object
    depth: int = 0

    def __repr__(self) -> str:
        return f"{describe(self.func)}{describe(self.args)}"


# Symbolic containers carry their nesting depth. A crafted pickle can nest tuples a million
# deep; past this depth values become OPAQUE, so hashing and describing them stay bounded.
MAX_VALUE_DEPTH = 32


class _Tuple(tuple[object, ...]):
    depth = 0


class _List(list[object]):
    depth = 0


class _Dict(dict[object, object]):
    depth = 0


def _depth(value: object) -> int:
    return int(getattr(value, "depth", 0))


def _container(kind: type, items: list[object], *, pairs: bool = False) -> object:
    depth = 1 + max((_depth(v) for v in items), default=0)
    if depth > MAX_VALUE_DEPTH:
        return OPAQUE
    made = kind(zip(items[0::2], items[1::2], strict=False)) if pairs else kind(items)
    made.depth = depth
    return made


def describe(value: object, limit: int = 120, nesting: int = 0) -> str:
    if nesting > 6:
        return "…"
    if isinstance(value, str | bytes) and len(value) > limit:
        value = value[:limit]
    if isinstance(value, tuple):
        inner = ", ".join(describe(v, limit, nesting + 1) for v in value[:16])
        text = f"({inner}{',' if len(value) == 1 else ''})"
    elif isinstance(value, list):
        text = "[" + ", ".join(describe(v, limit, nesting + 1) for v in value[:16]) + "]"
    elif isinstance(value, dict):
        text = (
            "{"
            + ", ".join(
                f"{describe(k, limit, nesting + 1)}: {describe(v, limit, nesting + 1)}"
                for k, v in list(value.items())[:16]
            )
            + "}"
        )
    elif isinstance(value, _Call):
        text = describe(value.func, limit, nesting + 1) + describe(value.args, limit, nesting + 1)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _root_global(value: object) -> _Global | None:
    """The imported callable at the bottom of a call chain, e.g. methodcaller(..)(..)."""
    while isinstance(value, _Call):
        value = value.func
    return value if isinstance(value, _Global) else None


_STRING_OPS = names(
    "UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 STRING BINSTRING SHORT_BINSTRING"
)
_SCALAR_OPS = names(
    "INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT NONE NEWTRUE NEWFALSE"
)
_TUPLE_OPS = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"}
_CALL_OPS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class PickleFormatError(Exception):
    """The opcode stream is not a well-formed pickle (or lies about its stack)."""

    def __init__(self, message: str, offset: int | None) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass
class _PickleMachine:
    """Replays a pickle's stack effects with symbolic values: nothing is imported or called."""

    loc: Location
    out: Collector
    stack: list[object] = field(default_factory=list)
    memo: dict[int, object] = field(default_factory=dict)
    imports: dict[int, _Global] = field(default_factory=dict)
    calls: dict[int, list[str]] = field(default_factory=dict)
    last_build_state: object = None

    def pop(self, pos: int) -> object:
        if not self.stack:
            raise PickleFormatError("stack underflow", pos)
        return self.stack.pop()

    def pop_mark(self, pos: int) -> list[object]:
        items: list[object] = []
        while True:
            value = self.pop(pos)
            if value is MARK:
                return items[::-1]
            items.append(value)

    def step(self, opcode: pickletools.OpcodeInfo, arg: Any, pos: int) -> object:
        """Apply one opcode; returns the value it pushed (or None)."""
        name = opcode.name
        if name in _PUT_OPS or name == "MEMOIZE":
            # These only peek at the top (pickletools models MEMOIZE as pop-and-push).
            if not self.stack or self.stack[-1] is MARK:
                raise PickleFormatError(f"{name} with nothing to store", pos)
            self.memo[len(self.memo) if name == "MEMOIZE" else int(arg)] = self.stack[-1]
            return None
        before = opcode.stack_before
        if pickletools.markobject in before:
            marked = self.pop_mark(pos)
            below = [self.pop(pos) for _ in range(before.index(pickletools.markobject))][::-1]
            popped = [*below, *marked]
        else:
            popped = [self.pop(pos) for _ in before][::-1]
        value = self._value(name, arg, pos, popped)
        for kind in opcode.stack_after:
            self.stack.append(MARK if kind is pickletools.markobject else value)
        return value

    def _value(self, name: str, arg: Any, pos: int, popped: list[object]) -> object:
        if name in _STRING_OPS or name in _SCALAR_OPS:
            return arg
        if name in _TUPLE_OPS:
            return _container(_Tuple, popped)
        if name in _GET_OPS:
            if int(arg) not in self.memo:
                raise PickleFormatError(f"{name} of memo slot {arg} never stored", pos)
            return self.memo[int(arg)]
        if name == "DUP":
            return popped[0]
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            g = self._import(module, attr, pos, name)
            return self._call(pos, name, g, tuple(popped)) if name == "INST" else g
        if name == "STACK_GLOBAL":
            return self._stack_global(popped, pos)
        if name in ("EXT1", "EXT2", "EXT4"):
            self.out.add(
                Severity.HIGH,
                "pickle-extension-registry",
                f"{name} {arg} names a callable through copyreg's extension registry; what it "
                "resolves to depends on the loading process and cannot be checked",
                replace(self.loc, op=name, offset=pos),
            )
            return OPAQUE
        if name in _CALL_OPS:
            func = popped[0]
            args = popped[1] if name != "OBJ" else tuple(popped[1:])
            return self._call(pos, name, func, args)
        if name == "BUILD":
            self.last_build_state = popped[1]
            return popped[0]
        if name == "STOP":
            return popped[0]
        if name in ("EMPTY_LIST", "LIST"):
            return _container(_List, popped)
        if name in ("EMPTY_DICT", "DICT"):
            return _container(_Dict, popped, pairs=True) if _hashable(popped[0::2]) else OPAQUE
        if name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS"):
            return _extend(popped[0], popped[1:])
        return OPAQUE

    def _import(self, module: str, attr: str, pos: int, opcode: str) -> _Global:
        g = _Global(module, attr, pos, opcode)
        self.imports.setdefault(pos, g)
        return g

    def _stack_global(self, popped: list[object], pos: int) -> object:
        module, attr = popped
        if isinstance(module, str) and isinstance(attr, str):
            return self._import(module, attr, pos, "STACK_GLOBAL")
        self.out.add(
            Severity.CRITICAL,
            "pickle-unresolved-import",
            f"STACK_GLOBAL operands are not plain strings ({describe(module)}, "
            f"{describe(attr)}): the imported name is computed at load time",
            replace(self.loc, op="STACK_GLOBAL", offset=pos),
        )
        return OPAQUE

    def _call(self, pos: int, opname: str, func: object, args: object) -> object:
        root = _root_global(func)
        if root is not None:
            self.calls.setdefault(root.offset, []).append(
                f"{opname} at offset {pos}: {describe(func)}{describe(args)}"
            )
        depth = 1 + max(_depth(func), _depth(args))
        return _Call(func, args, depth) if depth <= MAX_VALUE_DEPTH else OPAQUE

    def report(self) -> None:
        for pos, g in sorted(self.imports.items()):
            verdict = judge_global(g.module, g.name, self.out.policy.profiles)
            if verdict is None:
                continue
            severity, why = verdict
            calls = self.calls.get(pos, [])
            called = f"; called by {'; '.join(calls[:3])}" if calls else "; imported, not called"
            self.out.add(
                severity,
                "pickle-dangerous-import"
                if severity is Severity.CRITICAL
                else "pickle-unsafe-import",
                f"imports {g.module}.{g.name} ({why}){called}",
                replace(self.loc, op=g.opcode, offset=pos),
            )


def _extend(target: object, items: list[object]) -> object:
    """APPEND(S)/SETITEM(S): grow a modelled list or dict in place (it may be memoized)."""
    if isinstance(target, _List | _Dict):
        if any(_depth(v) >= MAX_VALUE_DEPTH for v in items):
            items = [OPAQUE if _depth(v) >= MAX_VALUE_DEPTH else v for v in items]
        if isinstance(target, _List):
            target.extend(items)
        elif _hashable(items[0::2]):
            target.update(zip(items[0::2], items[1::2], strict=False))
        target.depth = max(target.depth, 1 + max((_depth(v) for v in items), default=0))
    return target


def _hashable(values: Iterable[object]) -> bool:
    try:
        for v in values:
            hash(v)
    except TypeError:
        return False
    return True


def scan_pickle_stream(out: Collector, loc: Location, fh: IO[bytes]) -> object:
    """Walk one pickle stream from the current position to its STOP; return its top value.

    Stops early (with a finding) on anything malformed. joblib's raw array buffers, which
    interrupt its pickle stream, are skipped exactly as joblib's unpickler would read them.
    """
    machine = _PickleMachine(loc, out)
    try:
        return _run_machine(machine, fh)
    except PickleFormatError as e:
        out.add(
            Severity.HIGH,
            "pickle-malformed",
            f"malformed pickle stream ({e}); a loader may still act on the part before it",
            replace(loc, offset=e.offset),
        )
    finally:
        machine.report()
    return None


def _run_machine(machine: _PickleMachine, fh: IO[bytes]) -> object:
    """Drive genops to STOP and return the pickled top value (symbolic)."""
    while True:
        resumed = False
        try:
            for opcode, arg, pos in pickletools.genops(fh):
                pos = pos if pos is not None else -1
                value = machine.step(opcode, arg, pos)
                if opcode.name == "STOP":
                    return value
                if opcode.name == "BUILD" and _skip_joblib_array(machine, fh, pos):
                    resumed = True
                    break
        except PickleFormatError:
            raise
        except (ValueError, EOFError, struct.error, OverflowError, MemoryError) as e:
            # MemoryError: a length prefix claiming exabytes, which genops tries to read.
            raise PickleFormatError(f"{type(e).__name__}: {e}", _tell(fh)) from None
        if not resumed:
            raise PickleFormatError("stream ended without STOP", _tell(fh))


def _tell(fh: IO[bytes]) -> int | None:
    try:
        return fh.tell()
    except (OSError, ValueError):
        return None


def _skip_joblib_array(machine: _PickleMachine, fh: IO[bytes], pos: int) -> bool:
    """After BUILD of a joblib NumpyArrayWrapper the array's bytes follow in the raw file.

    Object arrays are a nested pickle (scanned); others are `padding + count*itemsize` bytes
    (skipped, never interpreted). Returns True when the stream position moved.
    """
    top = machine.stack[-1] if machine.stack else None
    root = _root_global(top)
    if root is None or f"{root.module}.{root.name}" != "joblib.numpy_pickle.NumpyArrayWrapper":
        return False
    state = _joblib_state(machine, pos)
    if state is None:
        return False
    itemsize, is_object, count, aligned = state
    if is_object:
        inner = replace(machine.loc, key=f"joblib object array @ {pos}")
        scan_pickle_stream(machine.out, inner, fh)
        return True
    if aligned:
        pad = fh.read(1)
        if len(pad) != 1:
            raise PickleFormatError("joblib array padding missing", _tell(fh))
        _skip(fh, pad[0])
    _skip(fh, count * itemsize)
    return True


def _joblib_state(machine: _PickleMachine, pos: int) -> tuple[int, bool, int, bool] | None:
    """(itemsize, is_object, element count, aligned) from the state BUILD just applied."""
    state = machine.last_build_state
    if not isinstance(state, dict):
        return None
    dtype, shape = state.get("dtype"), state.get("shape")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise PickleFormatError("joblib array with a shape the scanner cannot read", pos)
    itemsize, is_object = _dtype_itemsize(dtype, pos)
    count = 1
    for n in shape:
        count *= n
    return itemsize, is_object, count, state.get("numpy_array_alignment_bytes") is not None


def _dtype_itemsize(dtype: object, pos: int) -> tuple[int, bool]:
    """Itemsize from a symbolic numpy.dtype(str, False, True) call, without unpickling it."""
    if isinstance(dtype, _Call) and isinstance(dtype.args, tuple) and dtype.args:
        spec = dtype.args[0]
        if isinstance(spec, str) and re.fullmatch(r"[<>|=]?[a-zA-Z]\d*", spec):
            import numpy as np

            dt = np.dtype(spec)  # a type code string: parsed, not unpickled
            if dt.hasobject:
                return 0, True
            if dt.itemsize:
                return dt.itemsize, False
    raise PickleFormatError("joblib array with a dtype the scanner cannot size", pos)


def _skip(fh: IO[bytes], n: int) -> None:
    if n <= 0:
        return
    try:
        fh.seek(n, io.SEEK_CUR)
    except (OSError, ValueError, io.UnsupportedOperation):
        while n > 0:
            chunk = fh.read(min(n, 1 << 20))
            if not chunk:
                break
            n -= len(chunk)


def scan_pickle_file(out: Collector, loc: Location, fh: IO[bytes]) -> None:
    """A file of one or more pickle streams (legacy torch.save writes five, then raw bytes)."""
    streams = 0
    torch_legacy = False
    while True:
        start = fh.tell()
        if not fh.read(1):
            return
        fh.seek(start)
        before = len(out.findings)
        where = replace(loc, key=f"pickle stream {streams}") if streams else loc
        value = scan_pickle_stream(out, where, fh)
        if any(f.rule == "pickle-malformed" for f in out.findings[before:]):
            return
        if streams == 0 and value == TORCH_LEGACY_MAGIC:
            torch_legacy = True
        streams += 1
        if torch_legacy and streams == 5:
            return  # magic, protocol, sys_info, model, storage keys; tensor bytes follow
