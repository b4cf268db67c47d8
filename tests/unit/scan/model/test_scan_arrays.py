"""NumPy .npy/.npz and safetensors: object arrays and malformed headers are findings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
