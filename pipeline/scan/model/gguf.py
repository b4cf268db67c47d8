"""GGUF (llama.cpp) files read with plain struct unpacking: the header, every metadata value
(bounded by the file's size), chat templates that carry Jinja code, tensor offsets and sizes."""

from __future__ import annotations

import io
import re
import struct
from dataclasses import replace
from typing import IO

from pipeline.scan.model.collect import Collector
from pipeline.scan.model.report import Location, Severity

# GGUF value types: fixed sizes, 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS |= {11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_KEY = 1 << 16
MAX_DIMS = 8
# (elements per block, bytes per block) for the ggml types whose layout is fixed and well known;
# other types get only their offset checked.
GGML_SIZES = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    30: (1, 2),  # BF16
}

# What turns a chat template from formatting into code: attribute walks to Python internals
# (the SSTI chain of CVE-2024-34359), Jinja's globals that reach them, escaped underscores.
_TEMPLATE_CODE = re.compile(
    r"__\w*__|\|\s*attr\s*\(|\\x5f|\\u005f|\\137|\blipsum\b|\bcycler\b|\bjoiner\b"
    r"|\burl_for\b|\bget_flashed_messages\b|\bself\s*\.\s*_|\brequest\s*\.\s*application"
    r"|\b(?:popen|subprocess|os\.system|eval|exec|import_module)\b",
    re.IGNORECASE,
)


class _Malformed(Exception):
    pass


class _Reader:
    """Little-endian reads that never go past the file's end (lengths are hostile)."""

    def __init__(self, fh: IO[bytes], size: int, wide: bool) -> None:
        self.fh = fh
        self.size = size
        self.wide = wide  # GGUF v1 wrote 32-bit counts and lengths, v2+ 64-bit

    def left(self) -> int:
        return self.size - self.fh.tell()

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left():
            raise _Malformed(f"{what} claims {n:,} bytes, beyond the end of the file")
        return self.fh.read(n)

    def unpack(self, fmt: str, what: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]
        return value

    def count(self, what: str) -> int:
        return int(self.unpack("<Q" if self.wide else "<I", what))

    def string(self, what: str, limit: int) -> bytes:
        n = self.count(f"{what} length")
        if n > limit:
            raise _Malformed(f"{what} is {n:,} bytes, more than the {limit:,} allowed")
        return self.take(n, what)

    def skip(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise _Malformed(f"{what} claims {n:,} bytes, beyond the end of the file")
        self.fh.seek(n, io.SEEK_CUR)


def scan_gguf(out: Collector, loc: Location, fh: IO[bytes]) -> None:
    size = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    try:
        _scan(out, loc, fh, size)
    except (_Malformed, struct.error, UnicodeDecodeError) as e:
        out.add(Severity.HIGH, "gguf-malformed", f"not a well-formed GGUF file: {e}", loc)


def _scan(out: Collector, loc: Location, fh: IO[bytes], size: int) -> None:
    r = _Reader(fh, size, wide=True)
    if r.take(4, "magic") != b"GGUF":
        raise _Malformed("no GGUF magic")
    version = int(r.unpack("<I", "version"))
    if version not in (1, 2, 3):
        raise _Malformed(f"unknown GGUF version {version}")
    r.wide = version >= 2
    n_tensors, n_kv = r.count("tensor count"), r.count("metadata count")
    # Each entry takes at least a few bytes: counts beyond that are lies (and loops to nowhere).
    if n_tensors > size // 8 or n_kv > size // 8:
        raise _Malformed(f"{n_tensors:,} tensors / {n_kv:,} metadata entries in {size:,} bytes")
    alignment = 32
    doc_cap = out.limits.document_bytes
    for _ in range(n_kv):
        key = r.string("metadata key", MAX_KEY).decode("utf-8")
        vtype = int(r.unpack("<I", f"type of {key}"))
        value = _value(r, vtype, key, doc_cap)
        if key == "general.alignment" and isinstance(value, int):
            if value <= 0 or value & (value - 1):
                raise _Malformed(f"general.alignment {value} is not a power of two")
            alignment = value
        if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."):
            _judge_template(out, replace(loc, key=key), value)
    tensors = [_tensor_info(r) for _ in range(n_tensors)]
    start = -(-fh.tell() // alignment) * alignment
    _check_tensors(tensors, start, size, alignment)


def _value(r: _Reader, vtype: int, key: str, cap: int) -> object:
    if vtype in _SCALARS:
        return r.unpack(_SCALARS[vtype], key)
    if vtype == _STRING:
        return r.string(key, cap).decode("utf-8", "replace")
    if vtype != _ARRAY:
        raise _Malformed(f"{key}: unknown value type {vtype}")
    etype, n = int(r.unpack("<I", f"{key} element type")), r.count(f"{key} length")
    if etype in _SCALARS:
        r.skip(n * struct.calcsize(_SCALARS[etype]), key)  # numbers: nothing to judge
    elif etype == _STRING:
        if n > r.left() // 8:
            raise _Malformed(f"{key}: {n:,} strings cannot fit in the file")
        for _ in range(n):
            r.skip(r.count(f"{key} element length"), key)
    else:
        raise _Malformed(f"{key}: arrays of type {etype} are not GGUF")
    return None


def _tensor_info(r: _Reader) -> tuple[str, int, int, int]:
    """(name, element count, ggml type, offset) of one tensor."""
    name = r.string("tensor name", MAX_KEY).decode("utf-8")
    n_dims = int(r.unpack("<I", f"{name} dims"))
    if n_dims > MAX_DIMS:
        raise _Malformed(f"tensor {name!r} has {n_dims} dimensions")
    elements = 1
    for _ in range(n_dims):
        elements *= r.count(f"{name} dim")
    return name, elements, int(r.unpack("<I", f"{name} type")), r.count(f"{name} offset")


def _check_tensors(
    tensors: list[tuple[str, int, int, int]], start: int, size: int, alignment: int
) -> None:
    """Offsets inside the data section, aligned, and (for known types) not overlapping."""
    data = size - start
    spans = []
    for name, elements, ggml_type, offset in tensors:
        if offset % alignment:
            raise _Malformed(f"tensor {name!r} at offset {offset} is not {alignment}-aligned")
        if offset >= max(data, 1) and elements:
            raise _Malformed(f"tensor {name!r} starts at {offset:,}, past the data ({data:,})")
        if ggml_type in GGML_SIZES:
            block, nbytes = GGML_SIZES[ggml_type]
            length = -(-elements // block) * nbytes
            if offset + length > data:
                raise _Malformed(f"tensor {name!r} ({length:,} bytes at {offset:,}) past the end")
            spans.append((offset, offset + length, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise _Malformed(f"tensors {a!r} and {b!r} overlap")


def _judge_template(out: Collector, loc: Location, template: object) -> None:
    if not isinstance(template, str):
        return
    hit = _TEMPLATE_CODE.search(template)
    if hit is None:
        return
    start = max(0, hit.start() - 40)
    snippet = template[start : hit.end() + 40].replace("\n", " ")
    out.add(
        Severity.CRITICAL,
        "gguf-chat-template-code",
        f"chat template reaches Python internals ({hit.group(0)!r} in …{snippet}…): rendered "
        "outside a sandbox (llama-cpp-python before 0.2.72) it runs code",
        loc,
    )
