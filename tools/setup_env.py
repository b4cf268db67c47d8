"""Build the project's virtualenv from the hash-pinned lock; a no-op when nothing changed.

Idempotent and content-keyed (not mtime-keyed, so a fresh clone is not "newer"): the venv
records the sha256 of the lock and of pyproject.toml it was built from. A changed lock
rebuilds from scratch, so nothing stale survives. Every build ends with `chainproof env seal`:
byte-compile site-packages and seal a manifest of every file in it. Standard library only:
this runs before any dependency exists.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ".chainproof-manifest.json"  # pipeline.envmanifest.MANIFEST_NAME (stdlib-only here)


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def install_project(py: str) -> None:
    """chainproof itself, editable, with the locked setuptools and no dependencies."""
    run(py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", str(ROOT))


def seal(py: str, lock: Path) -> None:
    """Record and seal the manifest of every installed file, right after the build (so the
    environment check compares against what the hash-pinned wheels installed, not RECORD)."""
    bootstrap = str(ROOT / "pipeline" / "bootstrap.py")
    run(py, "-I", "-S", bootstrap, "env", "seal", "--force", "--lock", str(lock))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", default=".venv")
    ap.add_argument("--lock", default="requirements/main.txt")
    ap.add_argument(
        "--no-project", action="store_true", help="only the lock (the dev tools' environment)"
    )
    args = ap.parse_args()
    venv, lock = ROOT / args.venv, ROOT / args.lock
    stamp = venv / ".chainproof-setup"
    want_lock, want_project = digest(lock), digest(ROOT / "pyproject.toml")
    have = stamp.read_text().split() if stamp.is_file() else []
    py = str(venv / "bin/python")
    if have[:1] == [want_lock] and (venv / "bin/python").exists():
        if args.no_project:
            return 0
        if have[1:2] == [want_project]:
            if not (venv / MANIFEST).is_file():  # built before environments were sealed
                seal(py, lock)
            return 0
        # Only the project's metadata changed (entry points, scripts): reinstall it alone.
        install_project(py)
        seal(py, lock)
        stamp.write_text(f"{want_lock} {want_project}\n")
        return 0
    if sys.version_info[:2] != (3, 11):
        print(
            f"error: the lock is compiled for Python 3.11; this is {sys.version.split()[0]}."
            " Run with PYTHON=python3.11 make ...",
            file=sys.stderr,
        )
        return 2
    print(f"setting up {venv} from {lock} (a minute or two) ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    run(sys.executable, "-m", "venv", str(venv))
    py = str(venv / "bin/python")
    run(
        py,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--require-hashes",
        "-r",
        str(lock),
    )
    # The project itself, without dependencies: the lock already supplied every one of them.
    if not args.no_project:
        install_project(py)
        seal(py, lock)
    stamp.write_text(f"{want_lock} {want_project}\n")
    print(f"{venv} is ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
