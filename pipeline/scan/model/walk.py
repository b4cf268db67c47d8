"""The scan's front: walk a file or directory, find every reading a loader could make of each
stream, and dispatch each reading to its format module; polyglots and non-models reported."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO

from pipeline.errors import InputError
from pipeline.hashing import hash_files
from pipeline.scan.model.archive import scan_compressed, scan_tar, scan_zip
from pipeline.scan.model.arrays import scan_json, scan_npy, scan_safetensors
from pipeline.scan.model.collect import Collector, LimitExceeded
from pipeline.scan.model.detect import MODEL_EXTS, Reading, extension, polyglot, readings
from pipeline.scan.model.gguf import scan_gguf
from pipeline.scan.model.keras import scan_h5
from pipeline.scan.model.onnx import scan_onnx
from pipeline.scan.model.pickle import scan_pickle_file
from pipeline.scan.model.policy import ScanLimits, ScanPolicy
from pipeline.scan.model.report import Location, ScanReport, Severity
from pipeline.scan.model.savedmodel import scan_saved_model_file

SUPPORTED = (
    "pickle, PyTorch zip, joblib (raw or compressed), .keras, .h5, SavedModel, .npy/.npz, "
    "safetensors, ONNX, GGUF, zip/tar"
)


def scan_path(
    path: Path | str,
    *,
    progress: Callable[[str], None] | None = None,
    profiles: Iterable[str] | None = None,
    limits: ScanLimits | None = None,
) -> ScanReport:
    """Scan a model file or a directory tree (recursively) and report what loading it would run.

    `profiles` names the pickle allowlist profiles (numpy always; torch by default; sklearn on
    request); `limits` bounds what is read. Raises InputError when `path` does not exist or a
    profile is unknown; everything wrong *inside* the artifact is a finding, never an exception.
    """
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        raise InputError(f"{target}: no such file or directory", hint="pass a model file or dir")
    started = time.perf_counter()
    out = Collector(
        policy=ScanPolicy.of(profiles, limits), dispatch=_scan_stream, dispatch_asset=_scan_asset
    )
    files: dict[str, Path] = {}
    in_dir = target.is_dir() and not target.is_symlink()
    if target.is_symlink():
        out.add(Severity.HIGH, "symlink", "refusing to follow a symlink", Location(target.name))
    elif in_dir:
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
        _scan_file(out, name, file, digests[file], saved_models, in_dir)
    return ScanReport(
        target=str(path),
        files=tuple(out.files),
        findings=tuple(out.findings),
        bytes_scanned=sum(f.stat().st_size for f in files.values()),
        duration_s=time.perf_counter() - started,
    )


MAX_DEPTH = 64  # as pipeline.hashing's: no model format nests deeper


def _walk_dir(root: Path, out: Collector) -> dict[str, Path]:
    """Every regular file under root by relative POSIX name; symlinks are findings, not followed."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        if dirnames and len(base.relative_to(root).parts) >= MAX_DEPTH:
            # os.walk recurses: a hostile tree ~1000 deep would crash the scan; stop here
            out.add(
                Severity.HIGH,
                "nested-too-deep",
                f"directories nested more than {MAX_DEPTH} deep are not scanned",
                Location(base.relative_to(root).as_posix()),
            )
            dirnames[:] = []
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


def _scan_file(
    out: Collector, name: str, file: Path, sha256: str, roots: set[str], in_dir: bool
) -> None:
    loc = Location(name)
    size = file.stat().st_size
    inside = _in_saved_model(name, roots)
    if inside is not None:
        out.seen(loc, f"savedmodel:{inside[1].split('/')[0]}", size, sha256)
        _guarded(out, loc, lambda: scan_saved_model_file(out, loc, file, inside[1]))
        return
    with open(file, "rb") as fh:
        found = readings(name, fh)
        out.seen(loc, "+".join(r.format for r in found) or _unmodelled(name, in_dir), size, sha256)
        if not found and in_dir and extension(name) not in MODEL_EXTS:
            out.add(
                Severity.INFO,
                "not-a-model",
                "no model loader reads this file (by name or content); listed, not judged",
                loc,
            )
            return
        _scan_readings(out, loc, name, fh, found, depth=0)


def _unmodelled(name: str, in_dir: bool) -> str:
    return "not-a-model" if in_dir and extension(name) not in MODEL_EXTS else "unrecognised"


def _scan_stream(
    out: Collector, loc: Location, name: str, fh: IO[bytes], depth: int, deep: bool = True
) -> None:
    """Scan one seekable byte stream (a file or an archive member) in every reading it has."""
    _scan_readings(out, loc, name, fh, readings(name, fh, deep=deep), depth)


def _scan_readings(
    out: Collector, loc: Location, name: str, fh: IO[bytes], found: list[Reading], depth: int
) -> None:
    if not found:
        out.add(
            Severity.HIGH,
            "unrecognised-format",
            f"not a model format this scanner understands ({SUPPORTED}); refused rather "
            "than passed",
            loc,
        )
        return
    strong = polyglot(found)
    if strong:
        described = ", ".join(f"{r.format}{f' ({r.note})' if r.note else ''}" for r in strong)
        out.add(
            Severity.HIGH,
            "polyglot",
            f"a loader could read these bytes as {described}: one choosing by name and one "
            "choosing by content read different things; every reading is judged",
            loc,
        )
    for reading in found:
        fh.seek(0)
        _guarded(out, loc, partial(_scan_reading, out, loc, name, fh, reading, depth))


def _guarded(out: Collector, loc: Location, scan: Callable[[], None]) -> None:
    """Run one format scan; a limit it hits becomes a finding naming the cap."""
    try:
        scan()
    except LimitExceeded as e:
        out.add(
            Severity.HIGH,
            e.rule,
            f"{e}: refused, not read further; raise the cap if this is a real model",
            loc,
        )


def _scan_reading(
    out: Collector, loc: Location, name: str, fh: IO[bytes], reading: Reading, depth: int
) -> None:
    kind = reading.format
    if kind == "zip":
        scan_zip(out, loc, name, fh, depth)
    elif kind == "tar":
        scan_tar(out, loc, name, fh, depth)
    elif kind.startswith("compressed:"):
        scan_compressed(out, loc, name, fh, kind.partition(":")[2], depth)
    elif kind == "hdf5":
        scan_h5(out, loc, fh)
    elif kind == "npy":
        scan_npy(out, loc, fh)
    elif kind == "safetensors":
        scan_safetensors(out, loc, fh)
    elif kind == "json":
        scan_json(out, loc, fh)
    elif kind == "onnx":
        scan_onnx(out, loc, fh)
    elif kind == "gguf":
        scan_gguf(out, loc, fh)
    elif kind == "pickle":
        scan_pickle_file(out, loc, fh)


def _scan_asset(
    out: Collector, loc: Location, name: str, fh: IO[bytes], depth: int, deep: bool = True
) -> None:
    """Assets (vocabularies, tokenizers) are data read by ops; scan them if we know the format."""
    found = readings(name, fh, deep=deep)
    if not found:
        out.add(Severity.INFO, "savedmodel-asset", "asset file listed, content not inspected", loc)
    else:
        _scan_readings(out, loc, name, fh, found, depth)
