"""Zip containers: member names, symlinks, nesting and unknown members."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest

from pipeline.scan.model import ScanReport, Severity, scan_path
from pipeline.scan.model.report import Finding
from tests import model_samples as ms

ROOT = Path(__file__).resolve().parents[4]


def _only(report: ScanReport, rule: str) -> list[Finding]:
    return [f for f in report.findings if f.rule == rule]


@pytest.mark.parametrize("member", ["../../etc/cron.d/x", "/abs/path.pkl", "a/../../b.pkl"])
def test_zip_slip_member_names(tmp_path: Path, member: str) -> None:
    (tmp_path / "z.zip").write_bytes(ms.zip_with({member: pickle.dumps([1, 2])}))
    hits = _only(scan_path(tmp_path / "z.zip"), "zip-slip")
    assert hits and hits[0].location.member == member


def test_zip_symlink_member(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("link")
    info.external_attr = (0o120777 << 16) | 0
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    assert _only(scan_path(tmp_path / "z.zip"), "zip-symlink")


def test_nested_zip_location(tmp_path: Path, sentinel: Path) -> None:
    inner = ms.torch_zip(ms.pickle_os_system(sentinel), prefix="model")
    (tmp_path / "outer.zip").write_bytes(ms.zip_with({"inner.pt": inner}))
    report = scan_path(tmp_path / "outer.zip")
    crit = [f for f in report.findings if f.severity is Severity.CRITICAL]
    assert crit[0].location.member == "inner.pt!model/data.pkl"


def test_unknown_member_in_a_zip_is_refused(tmp_path: Path) -> None:
    (tmp_path / "z.zip").write_bytes(ms.zip_with({"run.sh": b"#!/bin/sh\nrm -rf /\n"}))
    (hit,) = scan_path(tmp_path / "z.zip").findings
    assert hit.rule == "unrecognised-format" and hit.location.member == "run.sh"
