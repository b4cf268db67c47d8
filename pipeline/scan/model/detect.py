"""Every format a loader could read a byte stream as: by content (magic bytes wherever the loader
looks for them: HDF5 user blocks, zip central directories at the end) and by extension."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

SNIFF = 64

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
GGUF_MAGIC = b"GGUF"
TAR_MAGIC_OFFSET = 257  # "ustar" in a POSIX/GNU tar header

PICKLE_EXTS = {".pkl", ".pickle", ".joblib", ".dill", ".dat", ".data", ".sav", ".pdparams"}
TORCH_EXTS = {".pt", ".pth", ".bin", ".ckpt", ".mar"}
COMPRESSED_EXTS = {".gz", ".z", ".bz2", ".xz", ".lzma"}
TAR_EXTS = {".tar", ".tgz", ".tbz2", ".txz"}
# Extensions a model loader opens; a file with one of these is a model claim even when its bytes
# are not recognised (then refused). Anything else in a directory that no reading matches is
# reported as "not a model".
MODEL_EXTS = (
    PICKLE_EXTS
    | TORCH_EXTS
    | {".h5", ".hdf5", ".keras", ".npy", ".npz", ".safetensors", ".onnx", ".gguf", ".pb"}
    | {".zip", ".tflite", ".mlmodel", ".nemo"}
)

# Strong content formats: a stream that is two of these at once is a polyglot.
CONTAINER_FORMATS = ("zip", "tar", "hdf5", "npy", "pickle", "gguf")

# Compressed streams joblib.load (and gzip/bz2/xz readers) unwrap by their magic bytes.
_COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x04\x22\x4d\x18", "lz4"),
)
_EOCD = b"PK\x05\x06"
_EOCD_SEARCH = 22 + 0xFFFF  # the EOCD record plus the longest zip comment


# Extensions whose loader opens the file as this format whatever comes first in it.
_LOADER_EXTS = {
    "zip": {".keras", ".npz", ".npy", ".zip", ".nemo", ".mar", *TORCH_EXTS},
    "hdf5": {".h5", ".hdf5"},
}


@dataclass(frozen=True)
class Reading:
    """One way a loader could read the stream: the format and where its structure starts."""

    format: str
    offset: int = 0
    note: str = ""


def extension(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def compression_of(head: bytes) -> str | None:
    for magic, algo in _COMPRESSION_MAGIC:
        if head.startswith(magic):
            return algo
    # A zlib header: CMF 0x78 (deflate, 32 KiB window) and a check value divisible by 31.
    if len(head) >= 2 and head[0] == 0x78 and (head[0] << 8 | head[1]) % 31 == 0:
        return "zlib"
    return None


def is_pickle_magic(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def readings(name: str, fh: IO[bytes], *, deep: bool = True) -> list[Reading]:
    """Every format the bytes of `fh` could be read as, content first; `fh` is left at 0.

    Content is checked where each loader looks: zipfile (and so Keras, torch.load and np.load)
    finds a zip by the end-of-central-directory record at the end, so data may precede it;
    HDF5 finds its superblock at 0, 512, 1024, 2048, ... (a user block before it).
    `deep=False` skips the probes that seek through the stream (for compressed archive members,
    where each seek decompresses).
    """
    fh.seek(0)
    head = fh.read(SNIFF)
    found: list[Reading] = []
    if head.startswith(ZIP_MAGIC):
        found.append(Reading("zip"))
    elif deep:
        prepended = _zip_by_tail(fh)
        if prepended is not None:
            found.append(Reading("zip", prepended, f"{prepended} bytes of other data before it"))
    hdf5 = _hdf5_offset(fh, head, deep)
    if hdf5 is not None:
        found.append(Reading("hdf5", hdf5, f"user block of {hdf5} bytes" if hdf5 else ""))
    if head.startswith(NPY_MAGIC):
        found.append(Reading("npy"))
    if is_pickle_magic(head):
        found.append(Reading("pickle"))
    if head.startswith(GGUF_MAGIC):
        found.append(Reading("gguf"))
    if _is_tar(fh):
        found.append(Reading("tar"))
    ext = extension(name)
    # A structure found after offset 0 (a user block, prepended data) is one a loader reads when
    # it picks that format by extension, or when nothing else starts at 0. Otherwise it is an
    # embedded member (a stored .h5 inside a .keras zip), not a second reading of the file.
    at_zero = any(r.offset == 0 for r in found)
    found = [
        r for r in found if r.offset == 0 or not at_zero or ext in _LOADER_EXTS.get(r.format, ())
    ]
    algo = compression_of(head)
    if algo and not found and (ext in PICKLE_EXTS | COMPRESSED_EXTS | TAR_EXTS):
        found.append(Reading(f"compressed:{algo}"))
    # A loader that goes by name (safetensors, ONNX, GGUF, JSON) reads the file whatever its
    # content says; protocol 0/1 pickles are the one name-only reading kept for bytes nothing
    # else claims.
    seen = {r.format for r in found}
    for r in _by_extension(ext, head):
        if r.format not in seen and (r.format != "pickle" or not found):
            found.append(r)
    fh.seek(0)
    return found


def polyglot(found: list[Reading]) -> list[Reading]:
    """The readings that make a stream two formats at once (empty when it is one)."""
    strong = [r for r in found if r.format in CONTAINER_FORMATS or r.note == BY_NAME]
    return strong if len({r.format for r in strong}) > 1 else []


BY_NAME = "by its name"


def _by_extension(ext: str, head: bytes) -> list[Reading]:
    """Formats without magic bytes, chosen by the loader from the file name."""
    named = {".safetensors": "safetensors", ".json": "json", ".onnx": "onnx", ".gguf": "gguf"}
    if ext in named:
        return [Reading(named[ext], 0, BY_NAME)]
    # Protocol 0/1 pickles have no magic; np.load falls back to pickle for a .npy that is
    # neither npy nor zip.
    if ext in PICKLE_EXTS or ext in TORCH_EXTS or (ext == ".npy" and head):
        return [Reading("pickle")]
    return []


def _zip_by_tail(fh: IO[bytes]) -> int | None:
    """Bytes before a zip that starts after offset 0, when the end record proves one is there."""
    try:
        size = fh.seek(0, io.SEEK_END)
        start = max(0, size - _EOCD_SEARCH)
        fh.seek(start)
        tail = fh.read(size - start)
    except (OSError, ValueError):
        return None
    at = tail.rfind(_EOCD)
    while at >= 0:
        record = tail[at : at + 22]
        if len(record) == 22:
            cd_size, cd_offset = struct.unpack("<II", record[12:20])
            eocd = start + at
            cd_start = eocd - cd_size
            if cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
                return 0 if eocd > 0 else None  # zip64: zipfile finds it; offset not needed
            if cd_start >= 0 and cd_start >= cd_offset and _at(fh, cd_start, b"PK\x01\x02"):
                return cd_start - cd_offset
        at = tail.rfind(_EOCD, 0, at)
    return None


def _hdf5_offset(fh: IO[bytes], head: bytes, deep: bool) -> int | None:
    if head.startswith(HDF5_MAGIC):
        return 0
    if not deep:
        return None
    try:
        size = fh.seek(0, io.SEEK_END)
    except (OSError, ValueError):
        return None
    offset = 512
    while offset + len(HDF5_MAGIC) <= size:
        if _at(fh, offset, HDF5_MAGIC):
            return offset
        offset *= 2
    return None


def _is_tar(fh: IO[bytes]) -> bool:
    return _at(fh, TAR_MAGIC_OFFSET, b"ustar")


def _at(fh: IO[bytes], offset: int, magic: bytes) -> bool:
    try:
        fh.seek(offset)
        return fh.read(len(magic)) == magic
    except (OSError, ValueError):
        return False
