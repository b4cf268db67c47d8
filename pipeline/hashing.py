"""Parallel, streaming sha256 of artifacts: the hot path that grows with the data.

Files are hashed concurrently (hashlib releases the GIL on large updates), each read in 1 MiB
blocks, and each distinct file at most once per call. Paths in results are POSIX, relative to
the given root, which is exactly how in-toto links name artifacts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.errors import InputError

BLOCK = 1 << 20
ALGORITHM = "sha256"


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of one file, streamed in large blocks."""
    h = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def workers() -> int:
    return max(2, (os.cpu_count() or 1) * 2)


def hash_files(paths: Iterable[Path], *, max_workers: int | None = None) -> dict[Path, str]:
    """Hash many files concurrently; identical paths are hashed once."""
    unique = list(dict.fromkeys(Path(p) for p in paths))
    if not unique:
        return {}
    if len(unique) == 1:
        return {unique[0]: sha256_file(unique[0])}
    # Big files first so one large file does not start last and leave a core idle.
    unique.sort(key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(max_workers=max_workers or workers()) as pool:
        return dict(zip(unique, pool.map(sha256_file, unique), strict=True))


def list_tree(root: Path, *, prefix: str = "") -> dict[str, Path]:
    """Every regular file under `root` as {relative posix name: path}, sorted.

    Symlinks are refused rather than followed: an artifact must be a real file inside the
    run, never a pointer to something outside it.
    """
    found: dict[str, Path] = {}
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in list(dirnames) + sorted(filenames):
            p = base / name
            if p.is_symlink():
                raise InputError(
                    f"{p} is a symlink; artifacts must be regular files inside the run",
                    hint="write a real file instead of linking to one",
                )
        for name in sorted(filenames):
            p = base / name
            rel = p.relative_to(root).as_posix()
            found[f"{prefix}{rel}"] = p
    return dict(sorted(found.items()))


def hash_artifacts(named: Mapping[str, Path]) -> dict[str, dict[str, str]]:
    """{name: path} -> in-toto artifact dict {name: {"sha256": hex}}."""
    digests = hash_files(named.values())
    return {name: {ALGORITHM: digests[Path(path)]} for name, path in sorted(named.items())}
