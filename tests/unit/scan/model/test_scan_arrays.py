"""NumPy .npy/.npz and safetensors: object arrays and malformed headers are findings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.scan.model import ScanReport, Severity, scan_path
from pipeline.scan.model.report import Finding
from tests import model_samples as ms

ROOT = Path(__file__).resolve().parents[4]


def _only(report: ScanReport, rule: str) -> list[Finding]:
    return [f for f in report.findings if f.rule == rule]


def test_object_npy_without_imports_is_still_high(tmp_path: Path) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([1, "two"], dtype=object), allow_pickle=True)
    (tmp_path / "o.npy").write_bytes(buf.getvalue())
    report = scan_path(tmp_path / "o.npy")
    assert [f.rule for f in report.findings] == ["numpy-object-array"]
    assert report.max_severity is Severity.HIGH


def test_npz_member_with_object_array(tmp_path: Path, sentinel: Path) -> None:
    data = ms.zip_with({"w.npy": ms.clean_npy(), "evil.npy": ms.object_npy(sentinel)})
    (tmp_path / "m.npz").write_bytes(data)
    report = scan_path(tmp_path / "m.npz")
    crit = [f for f in report.findings if f.severity is Severity.CRITICAL]
    assert crit and crit[0].location.member == "evil.npy"


def test_safetensors_header_checked(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(ms.safetensors_bytes(ok=False))
    (hit,) = scan_path(tmp_path / "bad.safetensors").findings
    assert hit.rule == "safetensors-malformed"


# --- safetensors headers checked against the file ----------------------------------------------


def _st(header: dict, data: bytes) -> bytes:
    import json
    import struct

    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


_DATA = bytes(24)  # room for 6 float32


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_safetensors_clean_with_metadata_and_two_tensors(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "a": _entry("F32", [2, 2], 0, 16),
        "b": _entry("BF16", [4], 16, 24),
    }
    (tmp_path / "m.safetensors").write_bytes(_st(header, _DATA))
    assert scan_path(tmp_path / "m.safetensors").findings == ()


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ({"a": _entry("F32", [2, 3], 0, 32)}, "outside the data"),
        ({"a": _entry("F32", [2, 2], 0, 16), "b": _entry("F32", [2, 2], 8, 24)}, "overlaps"),
        ({"a": _entry("F32", [2, 3], 0, 16)}, "needs 24 bytes"),
        ({"a": _entry("F32", [2, 2], 0, 16)}, "after the last tensor"),
        ({"a": _entry("F32", [2], 8, 16), "b": _entry("F32", [2], 16, 24)}, "before tensor"),
        ({"a": _entry("Q4", [6], 0, 24)}, "unknown dtype"),
        ({"a": _entry("F32", [-6], 0, 24)}, "not a list of sizes"),
        ({"__metadata__": {"x": 1}, "a": _entry("F32", [6], 0, 24)}, "strings to strings"),
    ],
)
def test_safetensors_header_lies_are_malformed(tmp_path: Path, header: dict, why: str) -> None:
    (tmp_path / "m.safetensors").write_bytes(_st(header, _DATA))
    (hit,) = scan_path(tmp_path / "m.safetensors").findings
    assert hit.rule == "safetensors-malformed" and why in hit.message, hit.message


def test_safetensors_header_length_cap_and_file_size(tmp_path: Path) -> None:
    import struct

    from pipeline.scan.model import ScanLimits

    (tmp_path / "big.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    (hit,) = scan_path(tmp_path / "big.safetensors").findings
    assert "document_bytes" in hit.message
    (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    (hit,) = scan_path(tmp_path / "short.safetensors").findings
    assert "past the end of the file" in hit.message
    ok = ms.safetensors_bytes()
    (tmp_path / "ok.safetensors").write_bytes(ok)
    assert scan_path(tmp_path / "ok.safetensors", limits=ScanLimits(document_bytes=8)).findings
