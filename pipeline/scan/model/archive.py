"""Containers opened member by member: zip (.keras, PyTorch, .npz), tar, and compressed streams
(joblib's zlib/gzip/bz2/xz). Every member is judged by its content, streamed, never read whole,
within the size, ratio, count and nesting limits; a bomb is a finding."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import replace
from pathlib import PurePosixPath
from typing import IO, Any, cast

from pipeline.scan.model.arrays import scan_json, scan_npy
from pipeline.scan.model.collect import Collector, LimitExceeded, read_document
from pipeline.scan.model.detect import NPY_MAGIC, TORCH_EXTS, extension
from pipeline.scan.model.keras import scan_keras_json_bytes
from pipeline.scan.model.report import Location, Severity

# Members torch.save writes next to data.pkl: raw storage bytes and version strings, which
# torch.load reads as bytes, never unpickles. `.format_version`, `.storage_alignment` and
# `.data/serialization_id` come from torch >= 2.1.
_TORCH_PLAIN = re.compile(
    r"^(?:[^/]+/)?(?:data/\d+|version|byteorder|\.format_version|\.storage_alignment|\.data/.+)$"
)
# Members up to this size are probed end to end (zip end record, HDF5 user blocks). zipfile
# seeks inside a member by reading up to the target, so probing a big member would read it all
# just to sniff it; bigger members get the head checks only.
_DEEP_PROBE_BYTES = 8 << 20


def member_loc(loc: Location, member: str) -> Location:
    return replace(loc, member=f"{loc.member}!{member}" if loc.member else member)


def unsafe_member_name(name: str) -> bool:
    parts = re.split(r"[\\/]", name)
    return (
        name.startswith(("/", "\\"))
        or bool(re.match(r"^[A-Za-z]:", name))
        or any(p == ".." for p in parts)
    )


def _too_deep(out: Collector, loc: Location, kind: str, depth: int) -> bool:
    if depth >= out.limits.nesting:
        out.add(
            Severity.HIGH,
            f"{kind}-too-deep",
            f"{kind} nested deeper than {out.limits.nesting} (limit nesting): refused, not read",
            loc,
        )
        return True
    return False


def _bomb(out: Collector, loc: Location, message: str, cap: str) -> None:
    out.add(
        Severity.HIGH,
        "zip-bomb",
        f"{message} (limit {cap}): not read; a loader would spend that memory or disk",
        loc,
    )


# --------------------------------------------------------------------------------------------
# Zip
# --------------------------------------------------------------------------------------------


def scan_zip(out: Collector, loc: Location, name: str, fh: IO[bytes], depth: int) -> None:
    if _too_deep(out, loc, "zip", depth):
        return
    try:
        zf = zipfile.ZipFile(fh)
        infos = zf.infolist()
    # zipfile raises a RuntimeError subclass for a directory entry claiming a zip version from the
    # future; zipfile refuses it, and so does the scan.
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as e:
        out.add(Severity.HIGH, "zip-malformed", f"not a readable zip: {e}", loc)
        return
    with zf:
        limits = out.limits
        if len(infos) > limits.members:
            _bomb(out, loc, f"{len(infos):,} members, more than {limits.members:,}", "members")
            return
        if _overlapping(infos):
            _bomb(out, loc, "members share compressed data (overlapping entries)", "overlap")
            return
        layout = _layout(name, [i.filename for i in infos])
        total = 0
        for info in infos:
            total += info.file_size
            if total > limits.total_bytes:
                _bomb(
                    out,
                    loc,
                    f"members expand to more than {limits.total_bytes:,} bytes in total",
                    "total_bytes",
                )
                return
            _scan_zip_member(out, loc, zf, info, layout, depth)


def _overlapping(infos: list[zipfile.ZipInfo]) -> bool:
    """Entries whose local data overlap: the non-recursive zip bomb (one kernel, many names)."""
    spans = sorted((i.header_offset, i.header_offset + 30 + i.compress_size) for i in infos)
    return any(b[0] < a[1] and b[0] >= a[0] for a, b in zip(spans, spans[1:], strict=False))


def _layout(name: str, names: list[str]) -> str:
    """How a loader will read the archive: by extension first, then by what it holds."""
    ext = extension(name)
    has_config = "config.json" in names
    has_torch = any(PurePosixPath(n).name == "data.pkl" for n in names)
    if ext == ".keras" or (ext not in TORCH_EXTS and ext != ".npz" and has_config):
        return "keras"
    if ext == ".npz":
        return "npz"  # np.load: every member is an .npy (or raw bytes), whatever else it holds
    if has_torch:
        return "torch"
    return "zip"


def _is_torch_plain(name: str, layout: str) -> bool:
    return layout == "torch" and bool(_TORCH_PLAIN.match(name)) and not name.endswith(".pkl")


def _member_format(name: str, layout: str) -> str:
    if layout == "keras" and name == "config.json":
        return "keras-config"
    if _is_torch_plain(name, layout):
        return "torch-storage"
    return PurePosixPath(name).suffix.lstrip(".") or "member"


def _scan_zip_member(
    out: Collector,
    loc: Location,
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    layout: str,
    depth: int,
) -> None:
    mloc = member_loc(loc, info.filename)
    if unsafe_member_name(info.filename):
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
    limits = out.limits
    if info.file_size > limits.member_bytes:
        _bomb(
            out,
            mloc,
            f"member expands to {info.file_size:,} bytes, more than {limits.member_bytes:,}",
            "member_bytes",
        )
        return
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > limits.ratio_floor and ratio > limits.ratio:
        _bomb(out, mloc, f"member expands {ratio:,.0f}x, more than {limits.ratio}x", "ratio")
        return
    out.seen(mloc, _member_format(info.filename, layout), info.file_size)
    deep = info.file_size <= _DEEP_PROBE_BYTES
    try:
        with zf.open(info) as member:
            _dispatch_member(out, mloc, info.filename, member, layout, depth, deep)
    # zipfile raises RuntimeError (and its subclasses) for encrypted members and compression
    # methods it does not support: an unreadable member is a finding, never a pass.
    except (
        zipfile.BadZipFile,
        OSError,
        EOFError,
        RuntimeError,
        ValueError,
        zlib.error,
        lzma.LZMAError,
    ) as e:
        out.add(Severity.HIGH, "zip-malformed", f"member cannot be read: {e}", mloc)


def _dispatch_member(
    out: Collector,
    mloc: Location,
    name: str,
    member: IO[bytes],
    layout: str,
    depth: int,
    deep: bool,
) -> None:
    if layout == "keras" and name == "config.json":
        what = f"Keras config {mloc}"
        scan_keras_json_bytes(out, mloc, read_document(member, out.limits.document_bytes, what))
    elif layout == "keras" and name == "metadata.json":
        scan_json(out, mloc, member)
    elif layout == "keras" and name.startswith("assets/"):
        out.nested_asset(mloc, name, member, depth + 1)
    elif _is_torch_plain(name, layout):
        # Raw storage is never interpreted, but the same archive opened by np.load would read a
        # member with the .npy magic (and unpickle an object array): judge it by content.
        if member.read(len(NPY_MAGIC)) == NPY_MAGIC:
            member.seek(0)
            scan_npy(out, mloc, member)
    else:
        out.nested(mloc, name, member, depth + 1, deep=deep)


# --------------------------------------------------------------------------------------------
# Tar
# --------------------------------------------------------------------------------------------


def scan_tar(out: Collector, loc: Location, name: str, fh: IO[bytes], depth: int) -> None:
    """A tar (optionally gzip/bz2/xz compressed); every regular member judged by content."""
    if _too_deep(out, loc, "tar", depth):
        return
    limits = out.limits
    compressed = _size(fh)
    count = total = 0
    try:
        with tarfile.open(fileobj=fh, mode="r:*") as tf:
            for ti in tf:
                count += 1
                total += ti.size
                if count > limits.members:
                    _bomb(out, loc, f"more than {limits.members:,} members", "members")
                    return
                if total > limits.total_bytes or (
                    total > limits.ratio_floor and total > limits.ratio * max(compressed, 1)
                ):
                    _bomb(out, loc, f"members expand to {total:,} bytes", "total_bytes/ratio")
                    return
                _scan_tar_member(out, loc, tf, ti, depth)
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:
        out.add(Severity.HIGH, "tar-malformed", f"not a readable tar: {e}", loc)


def _scan_tar_member(
    out: Collector, loc: Location, tf: tarfile.TarFile, ti: tarfile.TarInfo, depth: int
) -> None:
    mloc = member_loc(loc, ti.name)
    if unsafe_member_name(ti.name):
        out.add(Severity.HIGH, "tar-slip", f"member name {ti.name!r} escapes the directory", mloc)
    if ti.issym() or ti.islnk():
        out.add(
            Severity.HIGH,
            "tar-link",
            f"member is a {'symlink' if ti.issym() else 'hard link'} to {ti.linkname!r}",
            mloc,
        )
        return
    if ti.isdir():
        return
    if not ti.isreg():
        out.add(Severity.HIGH, "tar-special", "member is a device, FIFO or other special", mloc)
        return
    if ti.size > out.limits.member_bytes:
        _bomb(out, mloc, f"member is {ti.size:,} bytes", "member_bytes")
        return
    member = tf.extractfile(ti)
    if member is None:
        return
    out.seen(mloc, PurePosixPath(ti.name).suffix.lstrip(".") or "member", ti.size)
    with member:
        out.nested(mloc, ti.name, member, depth + 1)


def _size(fh: IO[bytes]) -> int:
    try:
        end = fh.seek(0, io.SEEK_END)
        fh.seek(0)
        return end
    except (OSError, ValueError):
        return 0


# --------------------------------------------------------------------------------------------
# Compressed streams (joblib.dump(..., compress=...), .gz/.bz2/.xz)
# --------------------------------------------------------------------------------------------


class _ZlibReader(io.RawIOBase):
    """A raw zlib stream (joblib's 'zlib' compressor) as a readable file, decompressed lazily."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._z = zlib.decompressobj()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._pending:
            if self._z.eof:
                return 0
            data = self._z.unconsumed_tail or self._fh.read(1 << 16)
            if not data:
                raise EOFError("zlib stream ends before its end marker")
            # max_length keeps one call's output bounded, however much the input expands.
            self._pending = self._z.decompress(data, 1 << 16)
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class _Bounded(io.RawIOBase):
    """Counts what a decompressor yields and stops at the cap (a bomb is refused, not read)."""

    def __init__(self, inner: IO[bytes], cap: int, cap_name: str, what: str) -> None:
        self._inner = inner
        self._cap = cap
        self._cap_name = cap_name
        self._what = what
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        self.produced += len(data)
        if self.produced > self._cap:
            raise LimitExceeded("decompression-bomb", self._cap_name, self._cap, self._what)
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)


def open_compressed(fh: IO[bytes], algo: str) -> IO[bytes] | None:
    """A decompressing reader for `algo`, or None when the scanner cannot decompress it."""
    opened: Any = None
    if algo == "gzip":
        opened = gzip.GzipFile(fileobj=fh, mode="rb")
    elif algo == "bz2":
        opened = bz2.BZ2File(fh, mode="rb")
    elif algo in ("xz", "lzma"):
        opened = lzma.LZMAFile(fh, mode="rb", format=lzma.FORMAT_AUTO)  # noqa: SIM115 (caller closes)
    elif algo == "zlib":
        opened = io.BufferedReader(_ZlibReader(fh))
    return cast(IO[bytes] | None, opened)  # lz4 needs a package the project does not lock


def scan_compressed(
    out: Collector, loc: Location, name: str, fh: IO[bytes], algo: str, depth: int
) -> None:
    """Unwrap a compressed stream as joblib.load would, then judge what is inside."""
    if _too_deep(out, loc, "compressed", depth):
        return
    inner = open_compressed(fh, algo)
    if inner is None:
        out.add(
            Severity.HIGH,
            "compressed-unsupported",
            f"{algo}-compressed stream cannot be decompressed here (no {algo} module is "
            "locked); refused rather than passed",
            loc,
        )
        return
    limits = out.limits
    compressed = max(_size(fh), 1)
    by_ratio = max(limits.ratio * compressed, limits.ratio_floor)
    cap, cap_name = min(
        (limits.decompressed_bytes, "decompressed_bytes"), (by_ratio, "ratio"), key=lambda c: c[0]
    )
    what = f"{algo} stream {loc}"
    stream = cast(IO[bytes], io.BufferedReader(_Bounded(inner, cap, cap_name, what), 1 << 16))
    inner_name = name[: -len(PurePosixPath(name).suffix)] if _strip(name) else name
    try:
        with inner:
            _scan_decompressed(out, loc, inner_name, stream, depth)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        out.add(Severity.HIGH, "compressed-malformed", f"{algo} stream is corrupt: {e}", loc)


def _scan_decompressed(
    out: Collector, loc: Location, name: str, stream: IO[bytes], depth: int
) -> None:
    readable = cast(IO[bytes], io.BufferedReader(_Seekable(stream), 1 << 13))
    out.nested(loc, name, readable, depth + 1, deep=False)


def _strip(name: str) -> bool:
    return extension(name) in {".gz", ".z", ".bz2", ".xz", ".lzma"}


class _Seekable(io.RawIOBase):
    """A forward-only stream made seekable enough for the scan: the head (which the format sniff
    reads and rewinds over) is kept, everything after it can only be skipped forwards."""

    _HEAD = 1 << 16

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self._head = inner.read(self._HEAD)
        self._pos = 0
        self._inner_pos = len(self._head)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos < len(self._head):
            n = min(len(view), len(self._head) - self._pos)
            view[:n] = self._head[self._pos : self._pos + n]
        else:
            data = self._inner.read(len(view))
            n = len(data)
            view[:n] = data
            self._inner_pos += n
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            raise io.UnsupportedOperation("a compressed stream has no known end")
        target = offset if whence == io.SEEK_SET else self._pos + offset
        consumed_past_head = self._inner_pos > len(self._head)
        if target < 0 or (target < self._inner_pos and consumed_past_head):
            raise io.UnsupportedOperation("a compressed stream only seeks forwards")
        while self._inner_pos < target:
            chunk = self._inner.read(min(target - self._inner_pos, 1 << 20))
            if not chunk:
                target = self._inner_pos
                break
            self._inner_pos += len(chunk)
        self._pos = target
        return self._pos
