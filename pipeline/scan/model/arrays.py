"""NumPy .npy headers (object arrays hold a pickle), safetensors headers and plain JSON."""

from __future__ import annotations

import io
import json
import struct
import tokenize
from dataclasses import replace
from typing import IO

from pipeline.scan.model.collect import Collector, read_document
from pipeline.scan.model.keras import check_keras_config
from pipeline.scan.model.pickle import scan_pickle_stream
from pipeline.scan.model.report import Location, Severity


def scan_npy(out: Collector, loc: Location, fh: IO[bytes]) -> None:
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(fh)
        if version == (1, 0):
            _, _, dtype = npformat.read_array_header_1_0(fh)
        else:
            # 3.0 has 2.0's layout with utf-8 field names; read as 2.0 only mangles those
            # names, and the scan needs nothing from the dtype but whether it holds objects.
            _, _, dtype = npformat.read_array_header_2_0(fh)
    # numpy parses the header dict with ast, whose tokenizer raises TokenError on some garbage.
    except (ValueError, SyntaxError, OSError, EOFError, tokenize.TokenError) as e:
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
    scan_pickle_stream(out, loc, fh)


# Bits per element of every dtype the safetensors format defines.
SAFETENSORS_BITS = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 8),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 16),
    **dict.fromkeys(("I32", "U32", "F32"), 32),
    **dict.fromkeys(("I64", "U64", "F64", "C64"), 64),
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def scan_safetensors(out: Collector, loc: Location, fh: IO[bytes]) -> None:
    """Validate the header as the reference loader does, and more: every tensor's dtype and
    shape must match its byte span, spans must tile the data exactly (no overlap, no hidden gap
    or trailer), and the header must be a bounded, well-formed JSON object."""
    size = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    raw = fh.read(8)
    problem = None
    if len(raw) < 8:
        problem = "shorter than its 8-byte header length"
    else:
        (n,) = struct.unpack("<Q", raw)
        cap = out.limits.document_bytes
        if n > cap:
            problem = f"header length {n:,} exceeds the document_bytes limit ({cap:,})"
        elif n > size - 8:
            problem = f"header length {n:,} runs past the end of the file ({size:,} bytes)"
        else:
            problem = _safetensors_header_problem(fh.read(n), n, size - 8 - n)
    if problem:
        out.add(Severity.HIGH, "safetensors-malformed", problem, loc)


def _safetensors_header_problem(header: bytes, n: int, data_size: int) -> str | None:
    if len(header) != n:
        return "truncated header"
    try:
        meta = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return f"header is not JSON: {e}"
    if not isinstance(meta, dict):
        return "header is not a JSON object"
    spans: list[tuple[int, int, str]] = []
    for name, entry in meta.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return "__metadata__ must map strings to strings"
            continue
        problem = _tensor_problem(name, entry, data_size)
        if problem:
            return problem
        begin, end = entry["data_offsets"]
        spans.append((begin, end, name))
    spans.sort()
    at = 0
    for begin, end, name in spans:
        if begin < at:
            return f"tensor {name!r} overlaps the tensor before it (bytes {begin}..{end})"
        if begin > at:
            return f"{begin - at:,} bytes before tensor {name!r} belong to no tensor"
        at = end
    if at != data_size:
        return f"{data_size - at:,} bytes after the last tensor belong to no tensor"
    return None


def _tensor_problem(name: str, entry: object, data_size: int) -> str | None:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return f"tensor {name!r} has no dtype/shape/data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_BITS:
        return f"tensor {name!r} has unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return f"tensor {name!r} has a shape that is not a list of sizes: {shape!r}"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        return f"tensor {name!r} data_offsets must be [begin, end]"
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        return f"tensor {name!r} spans bytes {begin}..{end}, outside the data ({data_size:,})"
    elements = 1
    for d in shape:
        elements *= d
    expected = -(-elements * SAFETENSORS_BITS[dtype] // 8)
    if end - begin != expected:
        return (
            f"tensor {name!r}: {dtype} x {shape} needs {expected:,} bytes, its span has "
            f"{end - begin:,}"
        )
    return None


def scan_json(out: Collector, loc: Location, fh: IO[bytes]) -> None:
    """Plain JSON is data; a JSON that looks like a Keras config gets the Keras checks."""
    try:
        doc = json.loads(read_document(fh, out.limits.document_bytes, f"JSON {loc}"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        out.add(Severity.HIGH, "json-malformed", f"not valid JSON: {e}", loc)
        return
    if isinstance(doc, dict) and "class_name" in doc and "config" in doc:
        check_keras_config(out, loc, doc)
