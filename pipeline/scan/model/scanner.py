"""Model artifact scanning: find code that would run when a model is loaded, without loading it.

`scan_path(path)` reads a model file or directory as data only — pickle opcodes through
`pickletools.genops`, Keras configs as JSON, HDF5 attributes through h5py, SavedModel protobufs
through a private subset schema — and never unpickles, unmarshals, imports or executes anything
the artifact names. What it does not understand it refuses (`unrecognised-format`), never passes.

    from pipeline.scan.model.scanner import scan_path, Severity
    report = scan_path("runs/latest/train/model.keras")
    if not report.ok(Severity.MEDIUM):
        ...  # do not load it

Rules, by severity:
  critical  pickle-dangerous-import, pickle-unresolved-import, keras-lambda,
            keras-lambda-function, tf-unsafe-op (WriteFile, Py*Func, PrintV2 to a file),
            keras-custom-object (when the module is a dangerous one)
  high      pickle-unsafe-import, pickle-extension-registry, pickle-malformed,
            numpy-object-array, numpy-malformed, keras-custom-object, keras-tfsmlayer,
            keras-config-malformed, h5-malformed, tf-unsafe-op (other file, network, debug ops),
            tf-checkpoint-op-outside-saver, savedmodel-malformed, safetensors-malformed,
            json-malformed, zip-slip, zip-symlink, zip-encrypted, zip-malformed, zip-too-deep,
            symlink, unrecognised-format
  medium    tf-unknown-op
  info      savedmodel-asset
"""

from __future__ import annotations

import base64
import binascii
import enum
import io
import json
import os
import pickletools
import re
import stat
import struct
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path, PurePosixPath
from typing import IO, Any

from pipeline.errors import InputError, VerificationError
from pipeline.hashing import hash_files

__all__ = [
    "DEFAULT_FAIL_ON",
    "Finding",
    "Location",
    "ScanReport",
    "ScannedFile",
    "Severity",
    "UnsafeModelError",
    "is_keras_module",
    "judge_global",
    "render_table",
    "scan_path",
]

# --------------------------------------------------------------------------------------------
# Report values
# --------------------------------------------------------------------------------------------


class Severity(enum.IntEnum):
    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str | Severity) -> Severity:
        if isinstance(text, Severity):
            return text
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = "|".join(s.label for s in cls)
            raise InputError(f"unknown severity {text!r}", hint=f"use one of {choices}") from None


# Findings at or above this fail a scan by default: an unknown TF op (medium) is refused until
# someone has looked at it; info/low entries only describe what was seen.
DEFAULT_FAIL_ON = Severity.MEDIUM


@dataclass(frozen=True)
class Location:
    """Where a finding is: the file (relative to the scan target) and, inside it, as much as
    applies — zip member (nested members joined by '!'), Keras layer, TF function and node,
    op or pickle opcode, byte offset of that opcode in its stream, JSON path in a config."""

    file: str
    member: str | None = None
    layer: str | None = None
    function: str | None = None
    node: str | None = None
    op: str | None = None
    offset: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        text = self.file + (f"!{self.member}" if self.member else "")
        parts = [
            f"{label}={value}"
            for label, value in (
                ("layer", self.layer),
                ("function", self.function),
                ("node", self.node),
                ("op", self.op),
                ("offset", self.offset),
                ("key", self.key),
            )
            if value is not None
        ]
        return " ".join([text, *parts])

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Finding:
    severity: Severity
    rule: str
    message: str
    location: Location

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity.label,
            "rule": self.rule,
            "message": self.message,
            "location": self.location.to_dict(),
        }


@dataclass(frozen=True)
class ScannedFile:
    """One file or container member that was read. `sha256` is set for files on disk."""

    path: str
    format: str
    size: int
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "format": self.format, "size": self.size}
        if self.sha256:
            d["sha256"] = self.sha256
        return d


@dataclass(frozen=True)
class ScanReport:
    target: str
    files: tuple[ScannedFile, ...]
    findings: tuple[Finding, ...]
    bytes_scanned: int
    duration_s: float

    @property
    def max_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    def at_or_above(self, threshold: Severity | str = DEFAULT_FAIL_ON) -> list[Finding]:
        level = Severity.parse(threshold)
        return [f for f in self.findings if f.severity >= level]

    def ok(self, threshold: Severity | str = DEFAULT_FAIL_ON) -> bool:
        """True when no finding is at or above `threshold`."""
        return not self.at_or_above(threshold)

    def counts(self) -> dict[str, int]:
        return {s.label: sum(f.severity == s for f in self.findings) for s in Severity}

    def to_dict(self) -> dict[str, Any]:
        top = self.max_severity
        return {
            "target": self.target,
            "files": [f.to_dict() for f in self.files],
            "findings": [f.to_dict() for f in self.findings],
            "bytes_scanned": self.bytes_scanned,
            "duration_s": round(self.duration_s, 6),
            "max_severity": top.label if top is not None else None,
            "counts": self.counts(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class UnsafeModelError(VerificationError):
    """A model scan found something at or above the threshold: do not load the model."""

    def __init__(self, report: ScanReport, threshold: Severity | str = DEFAULT_FAIL_ON) -> None:
        level = Severity.parse(threshold)
        bad = sorted(report.at_or_above(level), key=lambda f: -f.severity)
        worst = bad[0]
        super().__init__(
            f"{len(bad)} finding(s) at or above {level.label} in {report.target}; worst: "
            f"{worst.severity.label} {worst.rule}: {worst.message}",
            check="model-scan",
            rule=worst.rule,
            artifact=str(worst.location),
            hint="do not load this model. Review every finding (`--format json` lists them "
            "all); if they are your own code (e.g. custom layers), vet it and raise --fail-on",
        )
        self.report = report
        self.threshold = level


def render_table(report: ScanReport) -> str:
    """A plain-text summary and one row per finding, worst first."""
    top = report.max_severity
    mib = report.bytes_scanned / (1 << 20)
    lines = [
        f"scanned {report.target}: {len(report.files)} file(s)/member(s), {mib:.2f} MiB "
        f"in {report.duration_s:.2f} s; max severity: {top.label if top is not None else 'none'}"
    ]
    if not report.findings:
        lines.append("no findings")
        return "\n".join(lines)
    rows = [
        (f.severity.label, f.rule, str(f.location), f.message)
        for f in sorted(report.findings, key=lambda f: (-f.severity, f.rule, str(f.location)))
    ]
    w_sev = max(8, *(len(r[0]) for r in rows))
    w_rule = max(4, *(len(r[1]) for r in rows))
    lines.append(f"{'SEVERITY':<{w_sev}}  {'RULE':<{w_rule}}  LOCATION / MESSAGE")
    for sev, rule, loc, msg in rows:
        lines.append(f"{sev:<{w_sev}}  {rule:<{w_rule}}  {loc}")
        lines.append(f"{'':<{w_sev}}  {'':<{w_rule}}    {msg}")
    counts = ", ".join(f"{n} {label}" for label, n in report.counts().items() if n)
    lines.append(f"{len(report.findings)} finding(s): {counts}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The scan: one collector, dispatch by format
# --------------------------------------------------------------------------------------------

MAX_NESTING = 4  # zip in zip in zip...: deeper than any real model format, a bomb otherwise
SNIFF = 16

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
PICKLE_EXTS = {".pkl", ".pickle", ".joblib", ".dill", ".dat", ".data", ".sav"}
TORCH_EXTS = {".pt", ".pth", ".bin", ".ckpt", ".mar"}


@dataclass
class _Collector:
    findings: list[Finding] = field(default_factory=list)
    files: list[ScannedFile] = field(default_factory=list)

    def add(self, severity: Severity, rule: str, message: str, loc: Location) -> None:
        self.findings.append(Finding(severity, rule, message, loc))

    def seen(self, loc: Location, fmt: str, size: int, sha256: str | None = None) -> None:
        name = loc.file + (f"!{loc.member}" if loc.member else "")
        self.files.append(ScannedFile(name, fmt, size, sha256))


def scan_path(path: Path | str, *, progress: Callable[[str], None] | None = None) -> ScanReport:
    """Scan a model file or a directory tree (recursively) and report what loading it would run.

    Raises InputError when `path` does not exist; everything wrong *inside* the artifact is a
    finding in the report, never an exception.
    """
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        raise InputError(f"{target}: no such file or directory", hint="pass a model file or dir")
    started = time.perf_counter()
    out = _Collector()
    files: dict[str, Path] = {}
    if target.is_symlink():
        out.add(Severity.HIGH, "symlink", "refusing to follow a symlink", Location(target.name))
    elif target.is_dir():
        files = _walk_dir(target, out)
    elif target.is_file():
        files = {target.name: target}
    else:  # a FIFO or device would block or never end
        out.add(Severity.HIGH, "unrecognised-format", "not a regular file", Location(target.name))
    digests = hash_files(files.values())
    saved_models = _saved_model_roots(files)
    for name, file in files.items():
        if progress:
            progress(name)
        size = file.stat().st_size
        out.seen(Location(name), _format_label(name, file, saved_models), size, digests[file])
        _scan_file(out, name, file, saved_models)
    return ScanReport(
        target=str(path),
        files=tuple(out.files),
        findings=tuple(out.findings),
        bytes_scanned=sum(f.stat().st_size for f in files.values()),
        duration_s=time.perf_counter() - started,
    )


def _walk_dir(root: Path, out: _Collector) -> dict[str, Path]:
    """Every regular file under root by relative POSIX name; symlinks are findings, not followed."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in [*dirnames, *sorted(filenames)]:
            p = base / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out.add(
                    Severity.HIGH,
                    "symlink",
                    f"symlink to {os.readlink(p)!r} refused: a model must be real files",
                    Location(rel),
                )
            elif name in filenames and p.is_file():
                found[rel] = p
            elif name in filenames:
                out.add(Severity.HIGH, "unrecognised-format", "not a regular file", Location(rel))
        # os.walk does not descend into symlinked dirs; drop them so intent is explicit.
        dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]
    return dict(sorted(found.items()))


def _saved_model_roots(files: dict[str, Path]) -> set[str]:
    """Relative dirs ('' for the root) holding a saved_model.pb or saved_model.pbtxt."""
    roots = set()
    for name in files:
        p = PurePosixPath(name)
        if p.name in ("saved_model.pb", "saved_model.pbtxt"):
            roots.add("" if str(p.parent) == "." else str(p.parent))
    return roots


def _in_saved_model(name: str, roots: set[str]) -> tuple[str, str] | None:
    """(root, path inside it) when `name` belongs to a SavedModel directory."""
    for root in sorted(roots, key=len, reverse=True):
        prefix = f"{root}/" if root else ""
        if name.startswith(prefix):
            return root, name[len(prefix) :]
    return None


def _format_label(name: str, file: Path, roots: set[str]) -> str:
    inside = _in_saved_model(name, roots)
    if inside:
        return f"savedmodel:{inside[1].split('/')[0]}"
    with open(file, "rb") as fh:
        return _detect(name, fh.read(SNIFF)) or "unrecognised"


def _scan_file(out: _Collector, name: str, file: Path, roots: set[str]) -> None:
    loc = Location(name)
    inside = _in_saved_model(name, roots)
    if inside is not None:
        _scan_saved_model_file(out, loc, file, inside[1])
        return
    with open(file, "rb") as fh:
        _scan_stream(out, loc, name, fh, depth=0)


def _detect(name: str, head: bytes) -> str | None:
    """Format by magic bytes first (a renamed file cannot hide), then by extension."""
    ext = PurePosixPath(name).suffix.lower()
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(NPY_MAGIC):
        return "npy"
    if ext == ".safetensors":
        return "safetensors"
    if ext == ".json":
        return "json"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if ext in PICKLE_EXTS or ext in TORCH_EXTS:
        return "pickle"  # protocol 0/1 pickles have no magic
    return None


def _scan_stream(out: _Collector, loc: Location, name: str, fh: IO[bytes], depth: int) -> None:
    """Scan one seekable byte stream (a file or a zip member) of any supported format."""
    head = fh.read(SNIFF)
    fh.seek(0)
    kind = _detect(name, head)
    if kind == "zip":
        _scan_zip(out, loc, name, fh, depth)
    elif kind == "hdf5":
        _scan_h5(out, loc, fh)
    elif kind == "npy":
        _scan_npy(out, loc, fh)
    elif kind == "safetensors":
        _scan_safetensors(out, loc, fh)
    elif kind == "json":
        _scan_json(out, loc, fh)
    elif kind == "pickle":
        _scan_pickle_file(out, loc, fh)
    else:
        out.add(
            Severity.HIGH,
            "unrecognised-format",
            "not a model format this scanner understands (pickle, PyTorch zip, joblib, .keras, "
            ".h5, SavedModel, .npy/.npz, safetensors); refused rather than passed",
            loc,
        )


# --------------------------------------------------------------------------------------------
# Zip containers: .keras, PyTorch .pt/.pth/.bin, .npz, plain .zip
# --------------------------------------------------------------------------------------------

_TORCH_PLAIN = re.compile(r"^(?:[^/]+/)?(?:data/\d+|version|byteorder|\.data/.+)$")


def _scan_zip(out: _Collector, loc: Location, name: str, fh: IO[bytes], depth: int) -> None:
    if depth >= MAX_NESTING:
        out.add(Severity.HIGH, "zip-too-deep", f"zip nested deeper than {MAX_NESTING}", loc)
        return
    try:
        zf = zipfile.ZipFile(fh)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        out.add(Severity.HIGH, "zip-malformed", f"not a readable zip: {e}", loc)
        return
    with zf:
        names = zf.namelist()
        kind = (
            "keras"
            if "config.json" in names
            else ("torch" if any(n.endswith("data.pkl") for n in names) else "zip")
        )
        for info in infos:
            _scan_zip_member(out, loc, zf, info, kind, depth)


def _member_loc(loc: Location, member: str) -> Location:
    return replace(loc, member=f"{loc.member}!{member}" if loc.member else member)


def _scan_zip_member(
    out: _Collector,
    loc: Location,
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    kind: str,
    depth: int,
) -> None:
    mloc = _member_loc(loc, info.filename)
    if _unsafe_member_name(info.filename):
        out.add(
            Severity.HIGH,
            "zip-slip",
            f"member name {info.filename!r} escapes the extraction directory",
            mloc,
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        out.add(Severity.HIGH, "zip-symlink", "zip member is a symlink", mloc)
        return
    if info.is_dir():
        return
    if info.flag_bits & 0x1:
        out.add(Severity.HIGH, "zip-encrypted", "encrypted member cannot be inspected", mloc)
        return
    out.seen(mloc, _member_format(info.filename, kind), info.file_size)
    try:
        with zf.open(info) as member:
            _dispatch_member(out, mloc, info.filename, member, kind, depth)
    # zipfile raises RuntimeError (and its subclasses) for encrypted members and compression
    # methods it does not support: an unreadable member is a finding, never a pass.
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:
        out.add(Severity.HIGH, "zip-malformed", f"member cannot be read: {e}", mloc)


def _is_torch_plain(name: str, kind: str) -> bool:
    return kind == "torch" and bool(_TORCH_PLAIN.match(name)) and not name.endswith(".pkl")


def _member_format(name: str, kind: str) -> str:
    if kind == "keras" and name == "config.json":
        return "keras-config"
    if _is_torch_plain(name, kind):
        return "torch-storage"
    return PurePosixPath(name).suffix.lstrip(".") or "member"


def _dispatch_member(
    out: _Collector, mloc: Location, name: str, member: IO[bytes], kind: str, depth: int
) -> None:
    if kind == "keras" and name == "config.json":
        _scan_keras_json_bytes(out, mloc, member.read())
    elif kind == "keras" and name.startswith("assets/"):
        _scan_asset(out, mloc, name, member, depth + 1)
    elif _is_torch_plain(name, kind):
        pass  # raw tensor storage and version strings: bytes only, never unpickled
    else:
        _scan_stream(out, mloc, name, member, depth + 1)


def _unsafe_member_name(name: str) -> bool:
    parts = re.split(r"[\\/]", name)
    return (
        name.startswith(("/", "\\"))
        or bool(re.match(r"^[A-Za-z]:", name))
        or any(p == ".." for p in parts)
    )


def _scan_asset(out: _Collector, loc: Location, name: str, fh: IO[bytes], depth: int) -> None:
    """Assets (vocabularies, tokenizers) are data read by ops; scan them if we know the format."""
    head = fh.read(SNIFF)
    fh.seek(0)
    if _detect(name, head) is None:
        out.add(Severity.INFO, "savedmodel-asset", "asset file listed, content not inspected", loc)
    else:
        _scan_stream(out, loc, name, fh, depth)


# --------------------------------------------------------------------------------------------
# Pickle: opcodes only, with a symbolic stack so STACK_GLOBAL resolves like the unpickler would
# --------------------------------------------------------------------------------------------


def _names(text: str) -> frozenset[str]:
    """A table written as whitespace-separated names (keeps long data lists readable)."""
    return frozenset(text.split())


# Constructors that rebuild plain data: arrays, tensors, containers. Anything else is a finding.
SAFE_GLOBALS = _names(
    """
    collections.OrderedDict collections.defaultdict collections.deque
    copyreg._reconstructor copy_reg._reconstructor _codecs.encode
    builtins.object builtins.set builtins.frozenset builtins.slice builtins.complex
    builtins.bytearray builtins.bytes builtins.range builtins.int builtins.float builtins.str
    builtins.bool builtins.tuple builtins.list builtins.dict
    __builtin__.object __builtin__.set __builtin__.frozenset __builtin__.slice
    __builtin__.complex __builtin__.bytearray
    datetime.datetime datetime.date datetime.time datetime.timedelta decimal.Decimal
    numpy.ndarray numpy.dtype
    numpy.core.multiarray._reconstruct numpy._core.multiarray._reconstruct
    numpy.core.multiarray.scalar numpy._core.multiarray.scalar
    numpy.core.numeric._frombuffer numpy._core.numeric._frombuffer
    joblib.numpy_pickle.NumpyArrayWrapper
    torch._utils._rebuild_tensor torch._utils._rebuild_tensor_v2 torch._utils._rebuild_tensor_v3
    torch._utils._rebuild_parameter torch._utils._rebuild_parameter_with_state
    torch.Size torch.device
    torch.FloatStorage torch.DoubleStorage torch.HalfStorage torch.BFloat16Storage
    torch.LongStorage torch.IntStorage torch.ShortStorage torch.CharStorage torch.ByteStorage
    torch.BoolStorage torch.ComplexFloatStorage torch.ComplexDoubleStorage torch.UntypedStorage
    torch.float32 torch.float64 torch.float16 torch.bfloat16 torch.int64 torch.int32
    torch.int16 torch.int8 torch.uint8 torch.bool torch.complex64 torch.complex128
    """
)
# (_codecs.encode: protocol 2 spells bytes as _codecs.encode(str, 'latin1').)

# Dotted prefixes that run code, touch files, processes or the network, or load more pickles.
# Matched against "module.qualname", so "os" also covers "os.path.join"; on Linux os.system
# pickles as "posix.system".
_PROCESS = """os posix nt subprocess pty commands popen2 platform.popen"""
_CODE = """
    runpy importlib imp code codeop timeit pdb bdb trace profile cProfile doctest pydoc ctypes
    _ctypes marshal types pip ensurepip venv distutils setuptools numpy.testing numpy.f2py
    numpy.distutils torch._inductor torch.utils.cpp_extension signal threading _thread
    multiprocessing asyncio concurrent
"""
_LOADERS = """
    pickle _pickle cPickle dill cloudpickle shelve joblib.load numpy.load torch.load
    torch.serialization torch.jit torch.hub keras.models.load_model tensorflow
"""
_NETWORK = """
    socket _socket ssl http httplib urllib urllib2 urllib3 requests aiohttp ftplib smtplib
    telnetlib xmlrpc webbrowser paramiko
"""
_FILES = """shutil io _io tempfile pathlib glob fileinput codecs.open zipfile tarfile sys"""
_BUILTINS = " ".join(
    f"{mod}.{fn}"
    for mod in ("builtins", "__builtin__")
    for fn in sorted(
        _names(
            "eval exec execfile compile open file __import__ getattr setattr delattr globals "
            "locals vars breakpoint input apply reload help exit quit"
        )
    )
)
_GADGETS = (
    """operator.attrgetter operator.methodcaller _operator.attrgetter _operator.methodcaller"""
)

DANGEROUS_GLOBALS: dict[str, str] = {
    **dict.fromkeys(_names(_PROCESS), "runs processes or touches the filesystem"),
    **dict.fromkeys(_names(_CODE), "imports or executes Python code"),
    **dict.fromkeys(_names(_LOADERS), "loads another (unscanned) model or pickle"),
    **dict.fromkeys(_names(_NETWORK), "opens network connections"),
    **dict.fromkeys(_names(_FILES), "reads or writes files or interpreter state"),
    **dict.fromkeys(_names(_BUILTINS), "a builtin that runs code or reaches any attribute"),
    **dict.fromkeys(_names(_GADGETS), "calls an arbitrary attribute or method (a gadget)"),
}


def judge_global(module: str, name: str) -> tuple[Severity, str] | None:
    """None for an allowlisted constructor; otherwise the severity and why."""
    full = f"{module}.{name}"
    if full in SAFE_GLOBALS:
        return None
    for prefix, why in DANGEROUS_GLOBALS.items():
        if full == prefix or full.startswith(prefix + "."):
            return Severity.CRITICAL, why
    return Severity.HIGH, "not an allowlisted data constructor; loading would import and call it"


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
        return f"{_describe(self.func)}{_describe(self.args)}"


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


def _describe(value: object, limit: int = 120, nesting: int = 0) -> str:
    if nesting > 6:
        return "…"
    if isinstance(value, str | bytes) and len(value) > limit:
        value = value[:limit]
    if isinstance(value, tuple):
        inner = ", ".join(_describe(v, limit, nesting + 1) for v in value[:16])
        text = f"({inner}{',' if len(value) == 1 else ''})"
    elif isinstance(value, list):
        text = "[" + ", ".join(_describe(v, limit, nesting + 1) for v in value[:16]) + "]"
    elif isinstance(value, dict):
        text = (
            "{"
            + ", ".join(
                f"{_describe(k, limit, nesting + 1)}: {_describe(v, limit, nesting + 1)}"
                for k, v in list(value.items())[:16]
            )
            + "}"
        )
    elif isinstance(value, _Call):
        text = _describe(value.func, limit, nesting + 1) + _describe(value.args, limit, nesting + 1)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _root_global(value: object) -> _Global | None:
    """The imported callable at the bottom of a call chain, e.g. methodcaller(..)(..)."""
    while isinstance(value, _Call):
        value = value.func
    return value if isinstance(value, _Global) else None


_STRING_OPS = _names(
    "UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 STRING BINSTRING SHORT_BINSTRING"
)
_SCALAR_OPS = _names(
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
    out: _Collector
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
            f"STACK_GLOBAL operands are not plain strings ({_describe(module)}, "
            f"{_describe(attr)}): the imported name is computed at load time",
            replace(self.loc, op="STACK_GLOBAL", offset=pos),
        )
        return OPAQUE

    def _call(self, pos: int, opname: str, func: object, args: object) -> object:
        root = _root_global(func)
        if root is not None:
            self.calls.setdefault(root.offset, []).append(
                f"{opname} at offset {pos}: {_describe(func)}{_describe(args)}"
            )
        depth = 1 + max(_depth(func), _depth(args))
        return _Call(func, args, depth) if depth <= MAX_VALUE_DEPTH else OPAQUE

    def report(self) -> None:
        for pos, g in sorted(self.imports.items()):
            verdict = judge_global(g.module, g.name)
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


def _scan_pickle_stream(out: _Collector, loc: Location, fh: IO[bytes]) -> object:
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
        _scan_pickle_stream(machine.out, inner, fh)
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


def _scan_pickle_file(out: _Collector, loc: Location, fh: IO[bytes]) -> None:
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
        value = _scan_pickle_stream(out, where, fh)
        if any(f.rule == "pickle-malformed" for f in out.findings[before:]):
            return
        if streams == 0 and value == TORCH_LEGACY_MAGIC:
            torch_legacy = True
        streams += 1
        if torch_legacy and streams == 5:
            return  # magic, protocol, sys_info, model, storage keys; tensor bytes follow


# --------------------------------------------------------------------------------------------
# NumPy .npy (and .npz members), safetensors, JSON
# --------------------------------------------------------------------------------------------


def _scan_npy(out: _Collector, loc: Location, fh: IO[bytes]) -> None:
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(fh)
        if version == (1, 0):
            _, _, dtype = npformat.read_array_header_1_0(fh)
        else:
            # 3.0 has 2.0's layout with utf-8 field names; read as 2.0 only mangles those
            # names, and the scan needs nothing from the dtype but whether it holds objects.
            _, _, dtype = npformat.read_array_header_2_0(fh)
    except (ValueError, SyntaxError, OSError, EOFError) as e:
        out.add(Severity.HIGH, "numpy-malformed", f"unreadable .npy header: {e}", loc)
        return
    if not dtype.hasobject:
        return
    out.add(
        Severity.HIGH,
        "numpy-object-array",
        f"dtype {dtype.str!r} holds Python objects as a pickle: np.load needs "
        "allow_pickle=True, which runs whatever the pickle says",
        replace(loc, offset=fh.tell()),
    )
    _scan_pickle_stream(out, loc, fh)


def _scan_safetensors(out: _Collector, loc: Location, fh: IO[bytes]) -> None:
    raw = fh.read(8)
    problem = None
    if len(raw) < 8:
        problem = "shorter than its 8-byte header length"
    else:
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            problem = f"header length {n} is implausible"
        else:
            header = fh.read(n)
            problem = _safetensors_header_problem(header, n)
    if problem:
        out.add(Severity.HIGH, "safetensors-malformed", problem, loc)


def _safetensors_header_problem(header: bytes, n: int) -> str | None:
    if len(header) != n:
        return "truncated header"
    try:
        meta = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"header is not JSON: {e}"
    if not isinstance(meta, dict):
        return "header is not a JSON object"
    for name, entry in meta.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            return f"tensor {name!r} has no dtype/shape/data_offsets"
    return None


def _scan_json(out: _Collector, loc: Location, fh: IO[bytes]) -> None:
    """Plain JSON is data; a JSON that looks like a Keras config gets the Keras checks."""
    try:
        doc = json.loads(fh.read())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        out.add(Severity.HIGH, "json-malformed", f"not valid JSON: {e}", loc)
        return
    if isinstance(doc, dict) and "class_name" in doc and "config" in doc:
        _check_keras_config(out, loc, doc)


# --------------------------------------------------------------------------------------------
# Keras configs (.keras config.json, .h5 model_config, SavedModel keras_metadata.pb)
# --------------------------------------------------------------------------------------------

# Keras' own encodings of tensors, arrays, slices...: data, not importable names.
_KERAS_SPECIAL = _names(
    "__keras_tensor__ __tensor__ __numpy__ __bytes__ __ellipsis__ __slice__ __typespec__ "
    "__passive_serialization__"
)


def is_keras_module(module: str) -> bool:
    return module == "keras" or module.startswith("keras.")


def _scan_keras_json_bytes(out: _Collector, loc: Location, data: bytes | str) -> None:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        out.add(Severity.HIGH, "keras-config-malformed", f"config is not valid JSON: {e}", loc)
        return
    _check_keras_config(out, loc, doc)


def _check_keras_config(out: _Collector, loc: Location, doc: object) -> None:
    """Flag Lambda layers, serialized lambdas, TFSMLayer and objects from outside Keras."""
    try:
        _walk_keras(out, loc, doc, "$", layer=None, is_layer=True, in_lambda=False)
    except RecursionError:
        out.add(Severity.HIGH, "keras-config-malformed", "config nested too deeply to check", loc)


def _walk_keras(
    out: _Collector,
    loc: Location,
    node: object,
    path: str,
    layer: str | None,
    is_layer: bool,
    in_lambda: bool,
) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _walk_keras(out, loc, item, f"{path}[{i}]", layer, is_layer, in_lambda)
        return
    if not isinstance(node, dict):
        return
    class_name = node.get("class_name")
    if isinstance(class_name, str):
        inner = node.get("config")
        name = inner.get("name") if isinstance(inner, dict) else None
        if is_layer and isinstance(name, str):
            layer = name
        here = replace(loc, layer=layer, key=f"{loc.key} {path}" if loc.key else path)
        in_lambda = _judge_keras_object(out, here, node, class_name, inner, in_lambda)
    for key, value in node.items():
        child_is_layer = key == "layers" or (key == "layer" and isinstance(value, dict))
        _walk_keras(out, loc, value, f"{path}.{key}", layer, child_is_layer, in_lambda)


def _judge_keras_object(
    out: _Collector,
    loc: Location,
    node: dict[str, Any],
    class_name: str,
    inner: object,
    in_lambda: bool,
) -> bool:
    """Report what this one object would make Keras do; returns the new in-Lambda flag."""
    if class_name == "Lambda":
        fn = inner.get("function") if isinstance(inner, dict) else None
        out.add(
            Severity.CRITICAL,
            "keras-lambda",
            f"Lambda layer: {_describe_lambda_function(fn, inner)}; it runs when the model is "
            "loaded with safe_mode=False or called",
            loc,
        )
        return True
    if class_name == "__lambda__" and not in_lambda:
        out.add(
            Severity.CRITICAL,
            "keras-lambda-function",
            f"serialized Python lambda ({_describe_code(inner)}) used as a function argument",
            loc,
        )
    if class_name == "TFSMLayer":
        target = inner.get("filepath") if isinstance(inner, dict) else None
        out.add(
            Severity.HIGH,
            "keras-tfsmlayer",
            f"TFSMLayer loads an external SavedModel ({target!r}) whose graph this scan "
            "cannot see; scan that SavedModel too",
            loc,
        )
    _judge_keras_module(out, loc, node, class_name, inner)
    return in_lambda


def _judge_keras_module(
    out: _Collector, loc: Location, node: dict[str, Any], class_name: str, inner: object
) -> None:
    module = node.get("module")
    registered = node.get("registered_name")
    if class_name in _KERAS_SPECIAL or class_name == "__lambda__":
        return
    if isinstance(module, str) and not is_keras_module(module):
        attr = inner if class_name == "function" and isinstance(inner, str) else class_name
        verdict = judge_global(module, attr)
        severity = verdict[0] if verdict and verdict[0] is Severity.CRITICAL else Severity.HIGH
        why = f" ({verdict[1]})" if severity is Severity.CRITICAL and verdict else ""
        out.add(
            severity,
            "keras-custom-object",
            f"{class_name!r} resolves to {module}.{attr}, outside Keras{why}: loading imports "
            "that module and runs its code",
            loc,
        )
    elif isinstance(registered, str) and ">" in registered:
        out.add(
            Severity.HIGH,
            "keras-custom-object",
            f"custom registered object {registered!r}: its code comes from whatever package "
            "registers it in the loading process",
            loc,
        )


def _describe_lambda_function(fn: object, inner: object) -> str:
    if isinstance(fn, dict):
        if fn.get("class_name") == "__lambda__":
            return _describe_code(fn.get("config"))
        if fn.get("class_name") == "function":
            return f"calls function {fn.get('module')}.{fn.get('config')}"
    if isinstance(fn, list | tuple) and fn:
        return _describe_code({"code": fn[0]})  # tf.keras 2: [code, defaults, closure]
    if isinstance(fn, str):
        kind = inner.get("function_type") if isinstance(inner, dict) else None
        return _describe_code({"code": fn}) if kind == "lambda" else f"calls function {fn!r}"
    return "function of unknown form"


def _describe_code(config: object) -> str:
    """Say what a serialized lambda holds, by base64-decoding only (never unmarshalling)."""
    code = None
    if isinstance(config, dict):
        code = config.get("code", config.get("value"))
    if not isinstance(code, str):
        return "serialized function"
    try:
        raw = base64.b64decode(code.encode("ascii"), validate=False)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return f"undecodable serialized function ({len(code)} chars)"
    # marshal writes a code object as type byte 'c', with 0x80 set when it is referenced.
    if raw[:1] in (b"c", b"\xe3"):
        return f"holds marshalled Python bytecode ({len(raw)} bytes)"
    return f"holds a serialized function ({len(raw)} bytes)"


# --------------------------------------------------------------------------------------------
# HDF5 (.h5 / .hdf5 / legacy .keras): attributes only
# --------------------------------------------------------------------------------------------


def _scan_h5(out: _Collector, loc: Location, fh: IO[bytes]) -> None:
    import h5py

    # h5py reads a real file through its own driver, much faster than through Python.
    source: Any = fh.name if isinstance(fh, io.BufferedReader) else fh
    try:
        with h5py.File(source, "r") as f:
            configs = {k: f.attrs[k] for k in ("model_config", "training_config") if k in f.attrs}
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        out.add(Severity.HIGH, "h5-malformed", f"unreadable HDF5 file: {e}", loc)
        return
    for key, raw in configs.items():
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        _scan_keras_json_bytes(out, replace(loc, key=key), text)
    # Without model_config it is a weights file: tensors only, nothing Keras would execute.


# --------------------------------------------------------------------------------------------
# TensorFlow SavedModel: protobuf, every node of every graph and function
# --------------------------------------------------------------------------------------------

# Ops judged here by name, attribute or place; generated COMPUTE_OPS excludes all of them.
_TF_WRITES = "WriteFile"
_TF_PYTHON = "PyFunc PyFuncStateless EagerPyFunc"
_TF_READS = """
    ReadFile MatchingFiles MatchingFilesDataset ImmutableConst LoadAndRemapMatrix
    GenerateVocabRemapping InitializeTableFromTextFile InitializeTableFromTextFileV2 RecordInput
    WholeFileReader WholeFileReaderV2 TFRecordReader TFRecordReaderV2 TextLineReader
    TextLineReaderV2 FixedLengthRecordReader FixedLengthRecordReaderV2 LMDBReader IdentityReader
    IdentityReaderV2 TFRecordDataset TFRecordDatasetV2 TextLineDataset FixedLengthRecordDataset
    FixedLengthRecordDatasetV2 CSVDataset CSVDatasetV2 LMDBDataset SqlDataset
    ExperimentalSqlDataset ExperimentalLMDBDataset ExperimentalCSVDataset LoadDataset
"""
_TF_FILE_WRITES = """
    SaveDataset SaveDatasetV2 DistributedSave DatasetToTFRecord ExperimentalDatasetToTFRecord
    SnapshotDataset SnapshotDatasetV2 CacheDataset CacheDatasetV2 CreateSummaryFileWriter
    CreateSummaryDbWriter WriteSummary WriteScalarSummary WriteHistogramSummary
    WriteImageSummary WriteAudioSummary WriteGraphSummary WriteRawProtoSummary
    FileSystemSetConfiguration
"""
_TF_DEBUG = """
    DebugIdentity DebugIdentityV2 DebugIdentityV3 DebugNanCount DebugNumericSummary
    DebugNumericSummaryV2 Copy CopyHost
"""
_TF_NETWORK = """
    DataServiceDataset DataServiceDatasetV2 DataServiceDatasetV3 DataServiceDatasetV4
    RegisterDataset RegisterDatasetV2 RemoteCall
"""
TF_UNSAFE_OPS: dict[str, tuple[Severity, str]] = {
    **dict.fromkeys(_names(_TF_WRITES), (Severity.CRITICAL, "writes a file")),
    **dict.fromkeys(_names(_TF_PYTHON), (Severity.CRITICAL, "calls back into Python")),
    **dict.fromkeys(_names(_TF_READS), (Severity.HIGH, "reads files")),
    **dict.fromkeys(
        _names(_TF_FILE_WRITES), (Severity.HIGH, "writes files or changes filesystem config")
    ),
    **dict.fromkeys(
        _names(_TF_DEBUG), (Severity.HIGH, "debug op that can stream tensors to file:// or grpc://")
    ),
    **dict.fromkeys(_names(_TF_NETWORK), (Severity.HIGH, "talks to other hosts")),
}

# Checkpoint I/O every SavedModel carries in its saver; allowed there and only there.
# StringJoin, StaticRegexFullMatch and Const also appear in savers but are pure compute, so they
# stay allowed everywhere (flagging them would hit every text-processing model).
TF_CHECKPOINT_OPS = _names(
    "SaveV2 RestoreV2 MergeV2Checkpoints ShardedFilename ShardedFilespec Save SaveSlices Restore "
    "RestoreSlice"
)

# Judged by attribute: PrintV2 may print to a file; proto codecs may read a descriptor file.
TF_ATTR_OPS = frozenset({"PrintV2", "DecodeProtoV2", "EncodeProto"})
_PRINT_STREAMS = {b"stderr", b"stdout", b"log(info)", b"log(warning)", b"log(error)"}

TF_RULED_OPS = frozenset(TF_UNSAFE_OPS) | TF_CHECKPOINT_OPS | TF_ATTR_OPS


@cache
def _tf_messages() -> dict[str, Any]:
    """Message classes for the subset of TF's SavedModel schema the scan reads.

    Field numbers match tensorflow/core/protobuf/*.proto; fields not declared here are skipped
    by the parser. Importing TensorFlow's own saved_model_pb2 instead would import all of
    TensorFlow (about 4 s and 1,600 modules on this machine) just to read a protobuf.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="chainproof_tf_subset.proto", package="chainproof.tf", syntax="proto3"
    )
    T = descriptor_pb2.FieldDescriptorProto
    S, B, M = T.TYPE_STRING, T.TYPE_BYTES, T.TYPE_MESSAGE
    OPT, REP = T.LABEL_OPTIONAL, T.LABEL_REPEATED

    def message(name: str, *fields: tuple[str, int, int, int, str | None]) -> Any:
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".chainproof.tf.{type_name}"
        return msg

    def map_entry(msg: Any, entry: str, value_type: str) -> None:
        nested = msg.nested_type.add(name=entry)
        nested.options.map_entry = True
        nested.field.add(name="key", number=1, type=S, label=OPT)
        nested.field.add(
            name="value", number=2, type=M, label=OPT, type_name=f".chainproof.tf.{value_type}"
        )

    message("SavedModel", ("meta_graphs", 2, M, REP, "MetaGraphDef"))
    message(
        "MetaGraphDef",
        ("meta_info_def", 1, M, OPT, "MetaInfoDef"),
        ("graph_def", 2, M, OPT, "GraphDef"),
        ("saver_def", 3, M, OPT, "SaverDef"),
    )
    message("MetaInfoDef", ("tags", 4, S, REP, None))
    message(
        "SaverDef",
        ("filename_tensor_name", 1, S, OPT, None),
        ("save_tensor_name", 2, S, OPT, None),
        ("restore_op_name", 3, S, OPT, None),
    )
    message("GraphDef", ("node", 1, M, REP, "NodeDef"), ("library", 2, M, OPT, "FunctionLib"))
    node = message(
        "NodeDef",
        ("name", 1, S, OPT, None),
        ("op", 2, S, OPT, None),
        ("input", 3, S, REP, None),
        ("attr", 5, M, REP, "NodeDef.AttrEntry"),
    )
    map_entry(node, "AttrEntry", "AttrValue")
    message(
        "AttrValue",
        ("list", 1, M, OPT, "ListValue"),
        ("s", 2, B, OPT, None),
        ("func", 10, M, OPT, "NameAttrList"),
    )
    message("ListValue", ("s", 2, B, REP, None), ("func", 9, M, REP, "NameAttrList"))
    nal = message(
        "NameAttrList", ("name", 1, S, OPT, None), ("attr", 2, M, REP, "NameAttrList.AttrEntry")
    )
    map_entry(nal, "AttrEntry", "AttrValue")
    message("FunctionLib", ("function", 1, M, REP, "FunctionDef"))
    message("FunctionDef", ("signature", 1, M, OPT, "OpDef"), ("node_def", 3, M, REP, "NodeDef"))
    message("OpDef", ("name", 1, S, OPT, None))
    message("SavedMetadata", ("nodes", 1, M, REP, "SavedObject"))
    message(
        "SavedObject",
        ("node_path", 3, S, OPT, None),
        ("identifier", 4, S, OPT, None),
        ("metadata", 5, S, OPT, None),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"chainproof.tf.{name}"))
        for name in ("SavedModel", "SavedMetadata")
    }


def _scan_saved_model_file(out: _Collector, loc: Location, file: Path, inner: str) -> None:
    """One file of a SavedModel directory, judged by its role there."""
    if inner in ("saved_model.pb", "saved_model.pbtxt"):
        _scan_saved_model_proto(out, loc, file.read_bytes(), text=inner.endswith(".pbtxt"))
    elif inner == "keras_metadata.pb":
        _scan_keras_metadata(out, loc, file.read_bytes())
    elif inner == "fingerprint.pb" or re.fullmatch(
        r"variables/variables\.(index|data-\d+-of-\d+)", inner
    ):
        pass  # hashes and a tensor bundle: data the loader never interprets as code
    elif inner.startswith(("assets/", "assets.extra/")):
        with open(file, "rb") as fh:
            _scan_asset(out, loc, inner, fh, depth=0)
    else:
        with open(file, "rb") as fh:
            _scan_stream(out, loc, inner, fh, depth=0)


def _parse_proto(out: _Collector, loc: Location, name: str, data: bytes, text: bool) -> Any:
    from google.protobuf import message as pb_message
    from google.protobuf import text_format

    msg = _tf_messages()[name]()
    try:
        if text:
            text_format.Parse(data.decode("utf-8"), msg, allow_unknown_field=True)
        else:
            msg.ParseFromString(data)
    except (pb_message.DecodeError, text_format.ParseError, UnicodeDecodeError) as e:
        out.add(Severity.HIGH, "savedmodel-malformed", f"cannot parse {name}: {e}", loc)
        return None
    return msg


def _scan_saved_model_proto(
    out: _Collector, loc: Location, data: bytes, *, text: bool = False
) -> None:
    sm = _parse_proto(out, loc, "SavedModel", data, text)
    if sm is None:
        return
    if not sm.meta_graphs:
        out.add(Severity.HIGH, "savedmodel-malformed", "SavedModel without meta graphs", loc)
    for mg in sm.meta_graphs:
        tags = ",".join(mg.meta_info_def.tags) or "untagged"
        _scan_meta_graph(out, replace(loc, key=f"meta_graph[{tags}]"), mg)


def _node_key(ref: str) -> str:
    return ref.lstrip("^").split(":")[0]


def _func_refs(node: Any, library: set[str]) -> set[str]:
    """Functions a node calls: `f`, branches, bodies (any func-typed attr) or a function-op."""
    refs = {node.op} if node.op in library else set()
    for value in node.attr.values():
        if value.func.name:
            refs.add(value.func.name)
        refs.update(f.name for f in value.list.func)
    return refs


def _calls_of(function: Any, library: set[str]) -> set[str]:
    refs: set[str] = set()
    for n in function.node_def:
        refs |= _func_refs(n, library)
    return refs


def _closure(roots: Iterable[str], calls: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(calls.get(name, ()))
    return seen


def _saver_nodes(graph: Any, saver: Any) -> set[str]:
    """Graph nodes that belong to the SaverDef: its save and restore ops and their inputs."""
    by_name = {n.name: n for n in graph.node}
    roots = [saver.save_tensor_name, saver.restore_op_name, saver.filename_tensor_name]
    todo = [_node_key(r) for r in roots if r]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        todo.extend(_node_key(i) for i in by_name[name].input)
    return seen


def _scan_meta_graph(out: _Collector, loc: Location, mg: Any) -> None:
    graph = mg.graph_def
    functions = {f.signature.name: f for f in graph.library.function}
    names = set(functions)
    calls = {name: _calls_of(f, names) for name, f in functions.items()}
    saver_nodes = _saver_nodes(graph, mg.saver_def)
    saver_roots: set[str] = set()
    other_roots: set[str] = set()
    for n in graph.node:
        (saver_roots if n.name in saver_nodes else other_roots).update(_func_refs(n, names))
    saver_fns = _closure(saver_roots, calls)
    # Functions nobody in the saver calls are roots too: the object graph can call them directly.
    other_fns = _closure(other_roots | (names - saver_fns), calls)
    saver_only = saver_fns - other_fns
    unknown: dict[tuple[str, str], list[str]] = {}
    for n in graph.node:
        _judge_node(out, replace(loc, node=n.name), n, n.name in saver_nodes, names, unknown)
    for fname, f in functions.items():
        floc = replace(loc, function=fname)
        for n in f.node_def:
            _judge_node(out, replace(floc, node=n.name), n, fname in saver_only, names, unknown)
    for (where, op), nodes in sorted(unknown.items()):
        more = f" (+{len(nodes) - 1} more)" if len(nodes) > 1 else ""
        out.add(
            Severity.MEDIUM,
            "tf-unknown-op",
            f"op {op!r} is not on the compute allowlist; review what it does before serving",
            replace(loc, function=where, node=f"{nodes[0]}{more}", op=op),
        )


def _judge_node(
    out: _Collector,
    loc: Location,
    node: Any,
    in_saver: bool,
    library: set[str],
    unknown: dict[tuple[str, str], list[str]],
) -> None:
    op = node.op
    at = replace(loc, op=op)
    if op in library or op in _compute_ops():
        return
    if op in TF_UNSAFE_OPS:
        severity, why = TF_UNSAFE_OPS[op]
        out.add(severity, "tf-unsafe-op", f"{op} {why}", at)
    elif op in TF_CHECKPOINT_OPS:
        if not in_saver:
            out.add(
                Severity.HIGH,
                "tf-checkpoint-op-outside-saver",
                f"checkpoint op {op} outside the SaverDef's save/restore functions: it can read "
                "or write files at any path when this code runs",
                at,
            )
    elif op in TF_ATTR_OPS:
        _judge_attr_op(out, at, node)
    else:
        unknown.setdefault((loc.function or "graph", op), []).append(node.name)


@cache
def _compute_ops() -> frozenset[str]:
    from pipeline.scan.model.tfops import COMPUTE_OPS

    return COMPUTE_OPS


def _judge_attr_op(out: _Collector, loc: Location, node: Any) -> None:
    if node.op == "PrintV2":
        stream = node.attr["output_stream"].s if "output_stream" in node.attr else b"stderr"
        if stream not in _PRINT_STREAMS:
            out.add(
                Severity.CRITICAL,
                "tf-unsafe-op",
                f"PrintV2 writes to {stream.decode('utf-8', 'replace')!r}, i.e. to a file",
                loc,
            )
        return
    source = node.attr["descriptor_source"].s if "descriptor_source" in node.attr else b"local://"
    if source != b"local://":
        out.add(
            Severity.HIGH,
            "tf-unsafe-op",
            f"{node.op} reads a proto descriptor from {source.decode('utf-8', 'replace')!r}",
            loc,
        )


def _scan_keras_metadata(out: _Collector, loc: Location, data: bytes) -> None:
    """tf.keras 2 SavedModels keep each layer's Keras config as JSON in keras_metadata.pb."""
    meta = _parse_proto(out, loc, "SavedMetadata", data, text=False)
    if meta is None:
        return
    for node in meta.nodes:
        if not node.metadata:
            continue
        where = replace(loc, layer=node.node_path or None)
        try:
            doc = json.loads(node.metadata)
        except json.JSONDecodeError as e:
            out.add(Severity.HIGH, "keras-config-malformed", f"metadata not JSON: {e}", where)
            continue
        _check_keras_config(out, where, doc)
