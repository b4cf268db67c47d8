"""The commands a reviewer runs most start light: `--version`, `verify` and `status` import
none of the heavy libraries (the isolated start is a cost every command pays)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import CHAINPROOF, ROOT

pytestmark = pytest.mark.slow

HEAVY = {
    "mlflow",
    "tensorflow",
    "keras",
    "numpy",
    "sklearn",
    "scipy",
    "pandas",
    "sqlalchemy",
    "matplotlib",
    "cyclonedx",
    "jsonschema",
    "rfc3987_syntax",
    "lark",
}


def imported_by(
    *args: str | Path, cwd: Path = ROOT
) -> tuple[set[str], subprocess.CompletedProcess]:
    """Top-level packages the real isolated start imports for `chainproof ARGS`."""
    proc = subprocess.run(
        [*CHAINPROOF[:1], "-X", "importtime", *CHAINPROOF[1:], *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return names, proc


def test_version_imports_nothing_heavy() -> None:
    names, proc = imported_by("--version")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "click" in names, "the probe sees the CLI's imports"
    assert names & HEAVY == set()


def test_verify_of_a_signed_run_imports_nothing_heavy(tmp_path: Path) -> None:
    from bench.bench_verify import build

    run, fingerprint, _, _ = build(tmp_path / "w", 20)
    names, proc = imported_by("verify", run, "--owner-key", fingerprint)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verified: ok" in proc.stdout
    assert "in_toto" in names
    assert names & HEAVY == set()


def test_status_imports_nothing_heavy(tmp_path: Path) -> None:
    names, proc = imported_by(
        "status", ROOT / "configs" / "digits-cnn.yaml", "--workspace", tmp_path, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pydantic" in names, "the config was loaded"
    assert names & HEAVY == set()
