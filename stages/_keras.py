"""Byte-stable `.keras` files: the same weights and architecture give the same bytes.

Keras stamps the save time into metadata.json, Python object ids (`shared_object_id`) into
config.json, and the wall clock into the zip entries. The weights file inside is already
deterministic; this rewrites the other three so that two identical trainings produce
identical files (and identical sha256 in their links). The file still loads with
keras.saving.load_model(..., safe_mode=True).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from pipeline.fsutil import atomic_write_bytes

FIXED_TIME = (1980, 1, 1, 0, 0, 0)
FIXED_DATE_SAVED = "1980-01-01@00:00:00"


def _renumber_shared_ids(node: Any, ids: dict[int, int]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "shared_object_id" and isinstance(value, int):
                out[key] = ids.setdefault(value, len(ids) + 1)
            else:
                out[key] = _renumber_shared_ids(value, ids)
        return out
    if isinstance(node, list):
        return [_renumber_shared_ids(v, ids) for v in node]
    return node


def canonicalize_keras_file(path: Path) -> None:
    with zipfile.ZipFile(path) as zin:
        members = [(info, zin.read(info.filename)) for info in zin.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zout:
        for info, data in members:
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta["date_saved"] = FIXED_DATE_SAVED
                data = json.dumps(meta, sort_keys=True).encode()
            elif info.filename == "config.json":
                config = _renumber_shared_ids(json.loads(data), {})
                data = json.dumps(config, sort_keys=True).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=FIXED_TIME)
            fixed.compress_type = info.compress_type
            fixed.external_attr = 0o644 << 16
            zout.writestr(fixed, data)
    atomic_write_bytes(path, buf.getvalue())
