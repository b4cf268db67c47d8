"""NumPy .npy headers (object arrays hold a pickle), safetensors headers and plain JSON."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from typing import IO

from pipeline.scan.model.keras import check_keras_config
from pipeline.scan.model.pickle import scan_pickle_stream
from pipeline.scan.model.report import Collector, Location, Severity


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
    scan_pickle_stream(out, loc, fh)


def scan_safetensors(out: Collector, loc: Location, fh: IO[bytes]) -> None:
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


def scan_json(out: Collector, loc: Location, fh: IO[bytes]) -> None:
    """Plain JSON is data; a JSON that looks like a Keras config gets the Keras checks."""
    try:
        doc = json.loads(fh.read())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        out.add(Severity.HIGH, "json-malformed", f"not valid JSON: {e}", loc)
        return
    if isinstance(doc, dict) and "class_name" in doc and "config" in doc:
        check_keras_config(out, loc, doc)
