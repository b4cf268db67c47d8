"""Build the project's virtualenv from the hash-pinned lock; a no-op when nothing changed.

Idempotent and content-keyed (not mtime-keyed, so a fresh clone is not "newer"): the venv
records the sha256 of the lock and of pyproject.toml it was built from. A changed lock
rebuilds from scratch, so nothing stale survives. Standard library only: this runs before
any dependency exists. Every build ends with `chainproof env seal`: byte-compile
site-packages and seal a manifest of every file in it.

Wheels only (`--only-binary :all:`): building an sdist would run its setup.py, code nobody
checked, during installation. Before any package is installed, a pip dry run confirms that every
pin has a wheel for this platform and names the first that does not. pip's installation
report (which file, with which sha256, each distribution came from) is kept as
`<venv>/.chainproof-install-report.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS_ONLY = ("--only-binary", ":all:")
INSTALL_REPORT = ".chainproof-install-report.json"
MANIFEST = ".chainproof-manifest.json"  # pipeline.envmanifest.MANIFEST_NAME (stdlib-only here)


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def check_wheels(py: str, lock: Path) -> str | None:
    """None when every pin of `lock` has a wheel for `py`; else why not (nothing is built)."""
    with tempfile.TemporaryDirectory(prefix="chainproof-wheels-") as tmp:
        proc = subprocess.run(
            [
                py,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--require-hashes",
                *WHEELS_ONLY,
                "--report",
                str(Path(tmp) / "report.json"),
                "-r",
                str(lock),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    if proc.returncode == 0:
        return None
    missing = re.findall(r"No matching distribution found for (\S+)", proc.stderr)
    if missing:
        return (
            f"{', '.join(missing)} has no wheel for this platform: installing it would build "
            "its sdist and run its setup.py. Pin a version with a wheel, or replace it."
        )
    return "pip could not check the lock's wheels:\n" + proc.stderr[-2000:]


def install_project(py: str) -> None:
    """chainproof itself, editable, with the locked setuptools and no dependencies."""
    run(py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", str(ROOT))


def apt_install(package: str, binary: str, why: str) -> bool:
    """Install a Debian package when its binary is missing and we may (root, apt-get: CI on a
    fresh machine). Never fails setup: returns whether the binary is there afterwards."""
    if shutil.which(binary):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"{package} ({binary}) is missing; installing it {why}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", package]):
                print("+", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, env=env)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"warning: could not install {package} ({e})", file=sys.stderr)
    return shutil.which(binary) is not None


def ensure_bubblewrap() -> None:
    """Stages run under bubblewrap: install it from Debian's packages when it is missing and
    we may; otherwise say how, and carry on (a run then refuses with the same advice, or runs
    with an explicit, recorded --no-sandbox)."""
    if apt_install("bubblewrap", "bwrap", "for the stage sandbox"):
        return
    print(
        "warning: bubblewrap (bwrap) is not installed, and stages run inside it.\n"
        "  install it: sudo apt-get install -y bubblewrap   (or run `make setup` as root)\n"
        "  or run without isolation, recorded as such: chainproof run --no-sandbox CONFIG",
        file=sys.stderr,
    )


def ensure_chromium() -> None:
    """The MLflow UI test reads the lineage pages in a real (headless) browser: Debian's
    chromium. Optional: without it only that test skips, naming this command."""
    if apt_install("chromium", "chromium", "for the MLflow UI test (headless)"):
        return
    print(
        "note: chromium is not installed; the MLflow UI test will skip.\n"
        "  install it: sudo apt-get install -y chromium   (or run `make setup` as root)",
        file=sys.stderr,
    )


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
    ap.add_argument(
        "--browser",
        action="store_true",
        help="also install chromium (only `make test` asks: the MLflow UI test's browser)",
    )
    args = ap.parse_args()
    if not args.no_project:
        ensure_bubblewrap()
    if args.browser:
        ensure_chromium()
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
    # Before any package is fetched for real: does every pin have a wheel here?
    problem = check_wheels(py, lock)
    if problem:
        shutil.rmtree(venv, ignore_errors=True)
        print(f"error: refusing to set up {venv} from {lock}: {problem}", file=sys.stderr)
        return 2
    run(
        py,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--require-hashes",
        *WHEELS_ONLY,
        "--report",
        str(venv / INSTALL_REPORT),
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
