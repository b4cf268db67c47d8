"""The scan's front: walk a file or directory, detect each stream's format, dispatch it to the
format modules, and open zip containers member by member."""

from __future__ import annotations

import os
import re
import stat
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import IO

from pipeline.errors import InputError
from pipeline.hashing import hash_files
from pipeline.scan.model.arrays import scan_json, scan_npy, scan_safetensors
from pipeline.scan.model.keras import scan_h5, scan_keras_json_bytes
from pipeline.scan.model.pickle import scan_pickle_file
from pipeline.scan.model.report import Collector, Location, ScanReport, Severity
from pipeline.scan.model.savedmodel import scan_saved_model_file

MAX_NESTING = 4  # zip in zip in zip...: deeper than any real model format, a bomb otherwise
SNIFF = 16

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
PICKLE_EXTS = {".pkl", ".pickle", ".joblib", ".dill", ".dat", ".data", ".sav"}
TORCH_EXTS = {".pt", ".pth", ".bin", ".ckpt", ".mar"}


def scan_path(path: Path | str, *, progress: Callable[[str], None] | None = None) -> ScanReport:
    """Scan a model file or a directory tree (recursively) and report what loading it would run.

    Raises InputError when `path` does not exist; everything wrong *inside* the artifact is a
    finding in the report, never an exception.
    """
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        raise InputError(f"{target}: no such file or directory", hint="pass a model file or dir")
    started = time.perf_counter()
    out = Collector(dispatch=_scan_stream, dispatch_asset=_scan_asset)
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


def _walk_dir(root: Path, out: Collector) -> dict[str, Path]:
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


def _scan_file(out: Collector, name: str, file: Path, roots: set[str]) -> None:
    loc = Location(name)
    inside = _in_saved_model(name, roots)
    if inside is not None:
        scan_saved_model_file(out, loc, file, inside[1])
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


def _scan_stream(out: Collector, loc: Location, name: str, fh: IO[bytes], depth: int) -> None:
    """Scan one seekable byte stream (a file or a zip member) of any supported format."""
    head = fh.read(SNIFF)
    fh.seek(0)
    kind = _detect(name, head)
    if kind == "zip":
        _scan_zip(out, loc, name, fh, depth)
    elif kind == "hdf5":
        scan_h5(out, loc, fh)
    elif kind == "npy":
        scan_npy(out, loc, fh)
    elif kind == "safetensors":
        scan_safetensors(out, loc, fh)
    elif kind == "json":
        scan_json(out, loc, fh)
    elif kind == "pickle":
        scan_pickle_file(out, loc, fh)
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


def _scan_zip(out: Collector, loc: Location, name: str, fh: IO[bytes], depth: int) -> None:
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
    out: Collector,
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
    out: Collector, mloc: Location, name: str, member: IO[bytes], kind: str, depth: int
) -> None:
    if kind == "keras" and name == "config.json":
        scan_keras_json_bytes(out, mloc, member.read())
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


def _scan_asset(out: Collector, loc: Location, name: str, fh: IO[bytes], depth: int) -> None:
    """Assets (vocabularies, tokenizers) are data read by ops; scan them if we know the format."""
    head = fh.read(SNIFF)
    fh.seek(0)
    if _detect(name, head) is None:
        out.add(Severity.INFO, "savedmodel-asset", "asset file listed, content not inspected", loc)
    else:
        _scan_stream(out, loc, name, fh, depth)
