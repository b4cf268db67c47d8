"""The code that runs a pipeline, as a digest: chainproof's own package and each stage package.

A manifest lists every source file of those packages (sorted POSIX path relative to the
package's parent, sha256); its digest is what a layout pins and every link records, so code
edited after the owner signed the layout is refused, and a chain says which code made it.
Compiled caches (`__pycache__`) are not source and are left out.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline.errors import InputError
from pipeline.hashing import hash_files, sha256_bytes

SKIP_DIRS = {"__pycache__"}


@dataclass(frozen=True)
class CodeManifest:
    files: MappingProxyType[str, str]  # "pipeline/runner/run.py" -> sha256
    sha256: str

    def diff(self, pinned: dict[str, str]) -> list[str]:
        """What differs from a pinned manifest, one line per file (empty when equal)."""
        out = []
        for name in sorted(set(pinned) | set(self.files)):
            have, want = self.files.get(name), pinned.get(name)
            if want is None:
                out.append(f"+ {name}: not in the pinned code")
            elif have is None:
                out.append(f"- {name}: pinned, missing here")
            elif have != want:
                out.append(f"! {name}: sha256 {have[:12]}…, pinned {want[:12]}…")
        return out


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"cannot find the package {package!r} to digest its code")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def code_manifest(packages: tuple[str, ...]) -> CodeManifest:
    """The manifest of `packages` (top-level package names, e.g. ("pipeline", "stages"))."""
    named: dict[str, Path] = {}
    for package in sorted(set(packages)):
        root = package_dir(package)
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root.parent)
            if path.is_file() and not SKIP_DIRS.intersection(rel.parts):
                named[rel.as_posix()] = path
    digests = hash_files(named.values())
    files = {name: digests[path] for name, path in sorted(named.items())}
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    return CodeManifest(MappingProxyType(files), sha256_bytes(canonical))


def pipeline_packages(modules: tuple[str, ...]) -> tuple[str, ...]:
    """chainproof's own package plus the top-level package of each stage module."""
    return tuple(sorted({"pipeline", *(m.split(".", 1)[0] for m in modules)}))


def git_state(directory: Path) -> dict[str, Any]:
    """The commit of the repository holding `directory`, and whether its tree was dirty."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=30
        )

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
