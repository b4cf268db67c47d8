"""Shared fixtures: the project's paths, config writers, and one real pipeline run per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAIN_LOCK = ROOT / "requirements" / "main.txt"
SMALL_LOCK = ROOT / "tests" / "data" / "locks" / "small.txt"
SHARED = ROOT.parent / "shared"
# Consumers record the newest release they verified (rollback protection): keep the tests'
# record apart from the user's, for this process and every CLI it starts.
os.environ.setdefault("CHAINPROOF_STATE_DIR", tempfile.mkdtemp(prefix="chainproof-state-"))

# As the console script starts it: isolated, site-packages checked before it is importable.
CHAINPROOF = [sys.executable, "-I", "-S", str(ROOT / "pipeline" / "bootstrap.py")]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Real stages run under bubblewrap: where it is unusable, skip them and say why."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    if not slow:
        return
    from pipeline.runner.sandbox import SandboxUnavailable, find_bubblewrap

    try:
        find_bubblewrap()
    except SandboxUnavailable as e:
        skip = pytest.mark.skip(
            reason=f"stages run under bubblewrap, which is not usable here ({e.message}); "
            "`make setup` as root installs it"
        )
        for item in slow:
            item.add_marker(skip)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: Path, body: str, *, name: str = "pipeline.yaml") -> Path:
    """A config file with the project's main lock filled in."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(body).lstrip().replace("@MAIN_LOCK@", str(MAIN_LOCK)))
    return path


def chainproof(*args: str | Path, cwd: Path | None = None, timeout: int = 900):
    """Run the CLI as a user would; returns the CompletedProcess (never raises on exit code)."""
    return subprocess.run(
        [*CHAINPROOF, *map(str, args)],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


FAST_PIPELINE = """
schema: 1
name: digits-fast
lock: @MAIN_LOCK@
layout:
  expires_days: 7
stages:
  - name: source
    kind: source
    params: {dataset: sklearn-digits, seed: 7}
  - name: train
    kind: train
    needs: [source]
    params: {epochs: 2, seed: 7}
  - name: package
    kind: package
    needs: [train]
  - name: deploy
    kind: deploy
    needs: [package]
"""


OSV_SNAPSHOT = SHARED / "osv" / "pypa-advisory-database"


@pytest.fixture(scope="session")
def osv_db(tmp_path_factory) -> Path:
    """The real PyPA advisory snapshot from ../shared, imported once into a store."""
    if not OSV_SNAPSHOT.is_dir():
        pytest.skip(f"the OSV snapshot {OSV_SNAPSHOT} is absent (it ships in ../shared)")
    from pipeline.scan.vulndb import import_osv

    db = tmp_path_factory.mktemp("osv") / "vulndb.sqlite"
    import_osv(OSV_SNAPSHOT, db)
    return db


RUN_OUTPUT = "cli-output"  # in the completed workspace: the run command's stdout and stderr


@pytest.fixture(scope="session")
def completed_workspace(tmp_path_factory) -> Path:
    """One real end-to-end run of a small four-stage pipeline; tests copy it, never edit it."""
    ws = tmp_path_factory.mktemp("ws-complete")
    cfg = write_config(ws / "configs", FAST_PIPELINE)
    # waits for lineage: tests copy this workspace, and its MLflow store must be complete
    proc = chainproof("run", cfg, "--workspace", ws, "--wait-lineage")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "verified: ok" in proc.stdout
    # what the terminal showed, for the tests of the CLI's output (beside, not in, the runs)
    (ws / RUN_OUTPUT).mkdir()
    (ws / RUN_OUTPUT / "stdout").write_text(proc.stdout)
    (ws / RUN_OUTPUT / "stderr").write_text(proc.stderr)
    return ws


@pytest.fixture
def workspace_copy(completed_workspace, tmp_path) -> Path:
    """A private copy of the completed workspace, free to tamper with."""
    dest = tmp_path / "ws"
    shutil.copytree(completed_workspace, dest, symlinks=True)
    return dest
