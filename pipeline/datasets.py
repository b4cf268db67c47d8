"""A dataset of files (a folder, a .zip, a .tar[.gz]) as one pinned value: its canonical
manifest (every file's relative path, size and sha256), that manifest's digest, and the
difference between two manifests. Everything here reads hostile input within caps.

Imports only the standard library and pipeline's own hashing: the source stage and
`chainproof data digest` pay no TensorFlow, Pillow or numpy import for it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from pipeline import bounded
from pipeline.errors import InputError
from pipeline.hashing import hash_many, sha256_bytes

FORMAT = "chainproof.dataset-manifest/v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_CHUNK = 1 << 20
# What zipfile, tarfile and gzip raise for a container that is not what it claims to be:
# truncated (EOFError), corrupt (BadZipFile, ReadError, zlib.error, gzip's BadGzipFile, an
# OSError), or naming a compression this Python cannot read (NotImplementedError,
# CompressionError), or a zip claiming a version from the future (a RuntimeError subclass).
_BROKEN = (
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
    ValueError,
)

Progress = Callable[[int, int], None]  # (files done, files in all)


class DatasetError(InputError):
    """A dataset that cannot be pinned or read: names the file and what to do."""


class DatasetMismatch(DatasetError):
    """The dataset is not the one pinned: both digests, and (when the pinned manifest is at
    hand) the files that were added, removed or changed."""

    def __init__(
        self,
        where: str,
        *,
        expected: str,
        actual: str,
        added: tuple[str, ...] = (),
        removed: tuple[str, ...] = (),
        changed: tuple[str, ...] = (),
        compared: bool = False,
        pinned_by: str = "the config pins",
    ) -> None:
        self.expected, self.actual = expected, actual
        self.added, self.removed, self.changed = added, removed, changed
        lines = [f"{where} has manifest digest sha256:{actual}, but {pinned_by} sha256:{expected}"]
        for label, names in (("added", added), ("removed", removed), ("changed", changed)):
            shown = names[:20]
            lines += [f"  {label}: {n}" for n in shown]
            if len(names) > len(shown):
                lines.append(f"  {label}: ... and {len(names) - len(shown)} more")
        if compared and not (added or removed or changed):
            lines.append("  (the same files as the pinned manifest: its bytes are not canonical)")
        hint = (
            "the data changed; check where it came from, then pin the new digest "
            "(`chainproof data digest PATH --write-manifest FILE`)"
        )
        if not compared:
            hint += "; give the source `manifest:` (the pinned manifest file) to see which files"
        super().__init__("\n".join(lines), hint=hint)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative POSIX path inside the dataset
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Every file of a dataset, sorted by path; `digest` is the pin."""

    files: tuple[FileEntry, ...]

    def canonical_bytes(self) -> bytes:
        """The pinned bytes: compact JSON, keys sorted, ASCII only, files sorted by path.

        Exactly `json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`
        of {"files": [{"path", "sha256", "size"}...], "format"} plus a newline, written one
        entry at a time (100k files as dicts would be the largest thing the stage holds).
        """
        return self._canonical

    @cached_property
    def _canonical(self) -> bytes:
        entries = ",".join(
            f'{{"path":{json.dumps(f.path, ensure_ascii=True)},"sha256":"{f.sha256}",'
            f'"size":{int(f.size)}}}'
            for f in self.files
        )
        return f'{{"files":[{entries}],"format":"{FORMAT}"}}\n'.encode("ascii")

    @cached_property
    def digest(self) -> str:
        return sha256_bytes(self._canonical)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}


def diff(old: Manifest, new: Manifest) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(added, removed, changed) paths going from `old` to `new`, each sorted."""
    a, b = old.by_path(), new.by_path()
    added = tuple(sorted(set(b) - set(a)))
    removed = tuple(sorted(set(a) - set(b)))
    changed = tuple(
        sorted(p for p in set(a) & set(b) if (a[p].sha256, a[p].size) != (b[p].sha256, b[p].size))
    )
    return added, removed, changed


def check_pin(
    where: str,
    got: Manifest,
    pin: str,
    pinned: Manifest | None,
    *,
    pinned_by: str = "the config pins",
) -> None:
    """Refuse `got` unless its digest is `pin`; name the differing files when `pinned` (the
    manifest whose digest is the pin) is given."""
    actual = got.digest
    if actual == pin:
        return
    if pinned is None:
        raise DatasetMismatch(where, expected=pin, actual=actual, pinned_by=pinned_by)
    added, removed, changed = diff(pinned, got)
    raise DatasetMismatch(
        where,
        expected=pin,
        actual=actual,
        added=added,
        removed=removed,
        changed=changed,
        compared=True,
        pinned_by=pinned_by,
    )


# --------------------------------------------------------------------------- names


def check_name(name: str, where: str) -> str:
    """A member or file name as a safe relative POSIX path, or a DatasetError naming it:
    no absolute path, no drive, no `..`, no backslash, no control character, valid UTF-8."""
    shown = name.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:300]
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
        or any(p in ("..", "") for p in parts)
    ):
        raise DatasetError(
            f"{where}: member {shown!r} escapes the dataset (absolute, '..', or a drive)",
            hint="an archive's members must be relative paths inside it; do not use this file",
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise DatasetError(
            f"{where}: file name {shown!r} has control characters or is not UTF-8",
            hint="rename the file",
        )
    if len(name.encode("utf-8")) > 4096:
        raise DatasetError(f"{where}: file name {shown[:80]!r}… is longer than 4096 bytes")
    return str(PurePosixPath(*parts))


def _strip_top(names: list[str]) -> str:
    """The one top-level directory every member sits in ('' when there is none): an archive
    of a folder is read as that folder, so both have the same manifest digest."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return next(iter(tops)) + "/"
    return ""


# --------------------------------------------------------------------------- sources


def container_of(path: str) -> str:
    """'zip', 'tar' or 'folder', by the name alone (a config is validated before it exists)."""
    lower = path.lower().split("?", 1)[0]
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    return "folder"


class DatasetSource:
    """The files of a folder or an archive: listed and checked once, then hashed or read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.container = "folder" if path.is_dir() else container_of(path.name)
        if self.container == "folder" and not path.is_dir():
            raise DatasetError(
                f"{path} is not a directory, a .zip or a .tar[.gz]",
                hint="point the source at a folder of class sub-folders, or an archive of one",
            )
        self._entries = self._list()

    # ------------------------------------------------------------- listing

    def _list(self) -> list[tuple[str, int, Any]]:
        if self.container == "folder":
            return self._list_folder()
        if self.container == "zip":
            return self._list_zip()
        return self._list_tar()

    def _caps(self) -> tuple[int, int, int]:
        return (
            bounded.DATASET_FILES.value(),
            bounded.DATASET_FILE_BYTES.value(),
            bounded.DATASET_BYTES.value(),
        )

    def _count(self, n: int, cap: int) -> None:
        if n > cap:
            raise DatasetError(
                f"{self.path} holds more than {cap:,} files, {bounded.DATASET_FILES.describe(cap)}",
                hint=f"split the dataset, or raise ${bounded.DATASET_FILES.env} if it is genuine",
            )

    def _sizes(self, name: str, size: int, total: int, file_cap: int, total_cap: int) -> None:
        if size > file_cap:
            raise DatasetError(
                f"{self.path}: {name} is {size:,} bytes, more than "
                f"{bounded.DATASET_FILE_BYTES.describe(file_cap)}",
                hint="an image file is kilobytes to megabytes; do not trust this one",
            )
        if total > total_cap:
            raise DatasetError(
                f"{self.path}: its files add up to more than "
                f"{bounded.DATASET_BYTES.describe(total_cap)}",
                hint=f"raise ${bounded.DATASET_BYTES.env} if the dataset is genuine",
            )

    def _list_folder(self) -> list[tuple[str, int, Any]]:
        files_cap, file_cap, total_cap = self._caps()
        out: list[tuple[str, int, Any]] = []
        total = 0
        stack = [(str(self.path), "")]
        while stack:
            directory, rel = stack.pop()
            try:
                with os.scandir(directory) as it:
                    entries = list(it)
            except OSError as e:
                raise DatasetError(f"cannot list {directory}: {e.strerror}") from e
            for entry in entries:
                name = check_name(f"{rel}{entry.name}", str(self.path))
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((entry.path, f"{name}/"))
                elif stat.S_ISREG(st.st_mode):
                    total += st.st_size
                    self._sizes(name, st.st_size, total, file_cap, total_cap)
                    out.append((name, st.st_size, entry.path))
                    self._count(len(out), files_cap)
                else:
                    what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                    raise DatasetError(
                        f"{self.path}: {name} is {what}; a dataset holds regular files only",
                        hint="replace it by the file itself, or remove it",
                    )
        out.sort(key=lambda e: e[0])
        return out

    def _list_zip(self) -> list[tuple[str, int, Any]]:
        files_cap, file_cap, total_cap = self._caps()
        ratio = bounded.ARCHIVE_RATIO.value()
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
        except _BROKEN as e:
            raise DatasetError(f"{self.path} is not a readable zip: {_why(e)}") from e
        self._count(len(infos), files_cap)
        spans = sorted((i.header_offset, i.header_offset + 30 + i.compress_size) for i in infos)
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
            raise DatasetError(
                f"{self.path}: members share compressed data (overlapping entries, a zip bomb)",
                hint="do not use this archive",
            )
        raw: list[tuple[str, int, Any]] = []
        total = 0
        for info in infos:
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            name = info.filename
            if info.is_dir():
                continue
            if kind not in (0, stat.S_IFREG):
                what = "a symlink" if kind == stat.S_IFLNK else "not a regular file"
                raise DatasetError(
                    f"{self.path}: member {name} is {what}; a dataset holds regular files only",
                    hint="do not use this archive",
                )
            if info.flag_bits & 0x1:
                raise DatasetError(f"{self.path}: member {name} is encrypted")
            total += info.file_size
            self._sizes(name, info.file_size, total, file_cap, total_cap)
            if info.file_size > _CHUNK and info.file_size > ratio * max(info.compress_size, 1):
                raise DatasetError(
                    f"{self.path}: member {name} expands {info.file_size:,} bytes from "
                    f"{info.compress_size:,}, more than {bounded.ARCHIVE_RATIO.describe(ratio)}"
                    " (a zip bomb)",
                    hint="do not use this archive",
                )
            raw.append((name, info.file_size, info))
        return self._named(raw)

    def _named(self, raw: list[tuple[str, int, Any]]) -> list[tuple[str, int, Any]]:
        for name, _, _ in raw:  # the names as stored, before the top directory is stripped
            check_name(name, str(self.path))
        top = _strip_top([r[0] for r in raw])
        out = [(check_name(n[len(top) :], str(self.path)), s, h) for n, s, h in raw]
        out.sort(key=lambda e: e[0])
        for a, b in zip(out, out[1:], strict=False):
            if a[0] == b[0]:
                raise DatasetError(
                    f"{self.path}: member {a[0]} appears twice; which one a reader gets differs",
                    hint="do not use this archive",
                )
        return out

    def _open_tar(self) -> tuple[tarfile.TarFile, IO[bytes]]:
        raw = open(self.path, "rb")  # noqa: SIM115 - closed by the caller with the tarfile
        try:
            head = raw.read(2)
            raw.seek(0)
            stream: IO[bytes] = raw
            if head == b"\x1f\x8b":
                stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
            capped = _Capped(
                stream,
                compressed=os.fstat(raw.fileno()).st_size,
                ratio=bounded.ARCHIVE_RATIO.value(),
                max_read=bounded.DATASET_FILE_BYTES.value() + (1 << 16),
                where=str(self.path),
            )
            return tarfile.open(fileobj=cast(IO[bytes], capped), mode="r:"), raw
        except BaseException:
            raw.close()
            raise

    def _list_tar(self) -> list[tuple[str, int, Any]]:
        files_cap, file_cap, total_cap = self._caps()
        raw: list[tuple[str, int, Any]] = []
        total = 0
        try:
            tf, fh = self._open_tar()
            with fh, tf:
                count = 0
                for member in tf:
                    count += 1
                    self._count(count, files_cap)
                    if member.isdir():
                        continue
                    if not member.isreg():
                        what = (
                            "a symlink"
                            if member.issym()
                            else "a hard link"
                            if member.islnk()
                            else "a device or FIFO"
                        )
                        raise DatasetError(
                            f"{self.path}: member {member.name} is {what}; a dataset holds "
                            "regular files only",
                            hint="do not use this archive",
                        )
                    total += member.size
                    self._sizes(member.name, member.size, total, file_cap, total_cap)
                    raw.append((member.name, member.size, member.name))
        except DatasetError:
            raise
        except _BROKEN as e:
            raise DatasetError(f"{self.path} is not a readable tar archive: {_why(e)}") from e
        return self._named(raw)

    # ------------------------------------------------------------- reading

    @property
    def names(self) -> list[str]:
        return [e[0] for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def manifest(self, progress: Progress | None = None) -> Manifest:
        """Hash every file: in parallel for a folder, streamed once for an archive."""
        if self.container == "folder":
            digests = hash_many([e[2] for e in self._entries], [e[1] for e in self._entries])
            if progress:
                progress(len(digests), len(digests))
            return Manifest(
                tuple(
                    FileEntry(name, size, d)
                    for (name, size, _), d in zip(self._entries, digests, strict=True)
                )
            )
        files = []
        for i, (name, data) in enumerate(self.read_all()):
            files.append(FileEntry(name, len(data), hashlib.sha256(data).hexdigest()))
            if progress and (i % 1000 == 0 or i + 1 == len(self._entries)):
                progress(i + 1, len(self._entries))
        files.sort(key=lambda f: f.path)
        return Manifest(tuple(files))

    def read_all(self) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of every file, in the order the container reads fastest; each read
        is bounded by the size the listing promised."""
        sizes = {n: s for n, s, _ in self._entries}
        try:
            if self.container == "folder":
                for name, size, path in self._entries:
                    with open(path, "rb") as plain:
                        data = _read_exact(plain, size, f"{self.path}/{name}")
                    yield name, data
            elif self.container == "zip":
                with zipfile.ZipFile(self.path) as zf:
                    for name, size, info in self._entries:
                        with zf.open(info) as member_fh:
                            data = _read_exact(member_fh, size, f"{self.path}!{name}")
                        yield name, data
            else:
                # the listing's names, by the member names as stored (before the top
                # directory was stripped)
                stored = {str(h): n for n, _, h in self._entries}
                tf, raw = self._open_tar()
                with raw, tf:
                    for member in tf:
                        known = stored.get(member.name)
                        if known is None or not member.isreg():
                            continue
                        extracted = tf.extractfile(member)
                        if extracted is None:
                            continue
                        with extracted:
                            data = _read_exact(extracted, sizes[known], f"{self.path}!{known}")
                        yield known, data
        except DatasetError:
            raise
        except _BROKEN as e:
            raise DatasetError(f"cannot read {self.path}: {_why(e)}") from e


def _read_exact(fh: IO[bytes], size: int, where: str) -> bytes:
    """Exactly `size` bytes, or a DatasetError: a file that grew or shrank since it was
    listed (or a member whose header lies about its size) is not what was pinned."""
    data = fh.read(size + 1)
    if len(data) != size:
        raise DatasetError(
            f"{where} changed size while it was read ({size} bytes listed, {len(data)} read)",
            hint="nothing may write the dataset while a run reads it; run again",
        )
    return data


class _Capped(io.RawIOBase):
    """A (decompressed) tar stream held to a ratio of the archive's size and to a largest
    single read, so a gzip bomb or a huge pax header is refused, not buffered."""

    def __init__(
        self, inner: IO[bytes], *, compressed: int, ratio: int, max_read: int, where: str
    ) -> None:
        self.inner = inner
        self.limit = max(compressed * ratio, 64 << 20)
        self.max_read = max_read
        self.where = where

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.inner.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == io.SEEK_SET:  # a header's size, checked before gzip inflates up to it
            self._check(offset)
        target = self.inner.seek(offset, whence)
        self._check(target)
        return target

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self.max_read:
            raise DatasetError(
                f"{self.where}: a tar header asks to read {size:,} bytes at once, more than any "
                "file the dataset may hold",
                hint="a malformed or hostile archive; do not use it",
            )
        data = self.inner.read(size)
        self._check(self.inner.tell())
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _check(self, position: int) -> None:
        if position > self.limit:
            ratio = bounded.ARCHIVE_RATIO
            raise DatasetError(
                f"{self.where} expands to more than {self.limit:,} bytes, "
                f"{ratio.describe(ratio.value())} of its compressed size (a decompression bomb)",
                hint="do not use this archive",
            )


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 300 else text[:300] + "…"


# --------------------------------------------------------------------------- manifest files


def read_manifest(path: Path) -> Manifest:
    """A manifest file as `data digest --write-manifest` writes it, checked field by field."""
    doc = bounded.read_json(path, what="dataset manifest", max_bytes=bounded.DATASET_MANIFEST_BYTES)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DatasetError(
            f"{path} is not a dataset manifest (expected an object with format {FORMAT!r})",
            hint="write it with `chainproof data digest PATH --write-manifest FILE`",
        )
    files = doc.get("files")
    if not isinstance(files, list):
        raise DatasetError(f"{path}: 'files' is not a list")
    out = []
    for i, f in enumerate(files):
        if (
            not isinstance(f, dict)
            or not isinstance(f.get("path"), str)
            or not isinstance(f.get("size"), int)
            or isinstance(f.get("size"), bool)
            or not isinstance(f.get("sha256"), str)
            or not _HEX64.fullmatch(f["sha256"])
            or f["size"] < 0
        ):
            raise DatasetError(f"{path}: files[{i}] is not {{path: text, size: int, sha256: hex}}")
        out.append(FileEntry(check_name(f["path"], str(path)), f["size"], f["sha256"]))
    out.sort(key=lambda e: e.path)
    return Manifest(tuple(out))


def digest_path(path: Path, progress: Progress | None = None) -> tuple[DatasetSource, Manifest]:
    """`chainproof data digest`: the source and its manifest."""
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    source = DatasetSource(path)
    return source, source.manifest(progress)
