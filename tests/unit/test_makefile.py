"""The Makefile's set-up step: `make train` starts no interpreter for it when nothing changed,
and reruns the content check when the lock, pyproject.toml, the set-up script or the venv's
interpreter is newer than the stamp (or the stamp is missing). `make -n` on a copy: nothing
here builds anything."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP_LINE = "tools/setup_env.py --venv .venv --lock requirements/main.txt"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copyfile(ROOT / "Makefile", tmp_path / "Makefile")
    for rel in ("requirements/main.txt", "pyproject.toml", "tools/setup_env.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    (tmp_path / ".venv/bin").mkdir(parents=True)
    (tmp_path / ".venv/bin/python").write_text("")
    for i, rel in enumerate(
        ("requirements/main.txt", "pyproject.toml", "tools/setup_env.py", ".venv/bin/python")
    ):
        os.utime(tmp_path / rel, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / ".venv/.chainproof-setup").write_text("stamp\n")
    os.utime(tmp_path / ".venv/.chainproof-setup", (2_000_000, 2_000_000))
    return tmp_path


def dry_train(tree: Path) -> str:
    proc = subprocess.run(
        ["make", "-n", "-C", str(tree), "train"], capture_output=True, text=True, check=True
    )
    return proc.stdout


def test_unchanged_setup_starts_no_check(tree: Path) -> None:
    out = dry_train(tree)
    assert SETUP_LINE not in out
    assert "pipeline/bootstrap.py run configs/digits-cnn.yaml" in out


@pytest.mark.parametrize(
    "rel", ["requirements/main.txt", "pyproject.toml", "tools/setup_env.py", ".venv/bin/python"]
)
def test_a_newer_input_reruns_the_content_check(tree: Path, rel: str) -> None:
    os.utime(tree / rel, (3_000_000, 3_000_000))
    assert SETUP_LINE in dry_train(tree)


def test_no_stamp_or_no_interpreter_reruns_it(tree: Path) -> None:
    (tree / ".venv/.chainproof-setup").unlink()
    assert SETUP_LINE in dry_train(tree)
    (tree / ".venv/.chainproof-setup").write_text("stamp\n")
    (tree / ".venv/bin/python").unlink()
    assert SETUP_LINE in dry_train(tree)


def test_make_setup_always_checks(tree: Path) -> None:
    proc = subprocess.run(
        ["make", "-n", "-C", str(tree), "setup"], capture_output=True, text=True, check=True
    )
    assert SETUP_LINE in proc.stdout
