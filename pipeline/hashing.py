"""Parallel, streaming sha256 of artifacts: the hot path that grows with the data.

Files are hashed concurrently (hashlib releases the GIL on large updates), each read in 1 MiB
blocks into a per-thread buffer, and each distinct file at most once per call. Small files are
handed to the threads in batches, so a tree of many tiny files is not dominated by task
overhead. Paths in results are POSIX, relative to the given root, which is exactly how in-toto
links name artifacts.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.errors import InputError

BLOCK = 1 << 20
ALGORITHM = "sha256"


_local = threading.local()
# A file at least this big is a task of its own; smaller ones are batched up to this size.
BATCH_BYTES = 8 << 20
BATCH_FILES = 256


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of one file, streamed in large blocks."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(BLOCK)
    view = memoryview(buf)
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# Files up to this size are read with one read() and hashed in one call: for the ~50k small
# files of an environment, open/fstat/readinto-loop/close per file is the larger cost.
SMALL = 64 << 10


def _sha256_small(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, SMALL + 1)
    finally:
        os.close(fd)
    if len(data) > SMALL:  # it grew since it was sized: stream it like any big file
        return sha256_file(path)
    return hashlib.sha256(data).hexdigest()


def _hash_batch(batch: list[tuple[str, int]]) -> list[str]:
    return [_sha256_small(p) if size <= SMALL else sha256_file(p) for p, size in batch]


def hash_many(
    paths: Sequence[str], sizes: Sequence[int], *, max_workers: int | None = None
) -> list[str]:
    """Hex digests of `paths` (same order), hashed by a thread pool in size-aware batches."""
    if len(paths) <= 1:
        return _hash_batch(list(zip(paths, sizes, strict=True)))
    order = sorted(range(len(paths)), key=lambda i: -sizes[i])  # big first: no idle core at the end
    batches: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for i in order:
        if sizes[i] >= BATCH_BYTES:
            batches.append([i])
            continue
        current.append(i)
        current_bytes += sizes[i]
        if current_bytes >= BATCH_BYTES or len(current) >= BATCH_FILES:
            batches.append(current)
            current, current_bytes = [], 0
    if current:
        batches.append(current)
    out = [""] * len(paths)
    with ThreadPoolExecutor(max_workers=max_workers or workers()) as pool:
        for batch, digests in zip(
            batches,
            pool.map(_hash_batch, ([(paths[i], sizes[i]) for i in b] for b in batches)),
            strict=True,
        ):
            for i, d in zip(batch, digests, strict=True):
                out[i] = d
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def workers() -> int:
    return max(2, os.cpu_count() or 1)


# (dev, ino, size, mtime_ns, ctime_ns) -> hex sha256, for this process only. ctime cannot be
# set from user space, so a file rewritten since it was hashed always misses.
_SEEN: dict[tuple[int, int, int, int, int], str] = {}
_SEEN_MAX = 1_000_000


def hash_files(paths: Iterable[Path], *, max_workers: int | None = None) -> dict[Path, str]:
    """Hash many files concurrently; identical paths, and files this process already hashed
    and that have not changed since, are read once."""
    unique = list(dict.fromkeys(Path(p) for p in paths))
    out: dict[Path, str] = {}
    todo: list[tuple[Path, tuple[int, int, int, int, int], int]] = []
    for p in unique:
        st = p.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in _SEEN:
            out[p] = _SEEN[key]
        else:
            todo.append((p, key, st.st_size))
    digests = hash_many([str(t[0]) for t in todo], [t[2] for t in todo], max_workers=max_workers)
    if len(_SEEN) > _SEEN_MAX:
        _SEEN.clear()
    for (p, key, _), digest in zip(todo, digests, strict=True):
        _SEEN[key] = out[p] = digest
    return {p: out[p] for p in unique}


def _scan(directory: str, rel: str, out: list[tuple[str, str, int]]) -> None:
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.is_symlink():
            raise InputError(
                f"{entry.path} is a symlink; artifacts must be regular files inside the run",
                hint="write a real file instead of linking to one",
            )
        name = f"{rel}{entry.name}"
        if entry.is_dir():
            _scan(entry.path, f"{name}/", out)
        elif entry.is_file():
            out.append((name, entry.path, entry.stat().st_size))


def scan_tree(root: Path, *, prefix: str = "") -> list[tuple[str, str, int]]:
    """(relative posix name, path, size) of every regular file under `root`, sorted.

    Symlinks are refused rather than followed: an artifact must be a real file inside the
    run, never a pointer to something outside it. A missing root is an empty tree.
    """
    out: list[tuple[str, str, int]] = []
    if root.is_dir():
        _scan(str(root), prefix, out)
    return sorted(out)


def list_tree(root: Path, *, prefix: str = "") -> dict[str, Path]:
    """Every regular file under `root` as {relative posix name: path}, sorted."""
    return {name: Path(path) for name, path, _ in scan_tree(root, prefix=prefix)}


def hash_tree(root: Path, *, prefix: str = "") -> dict[str, dict[str, str]]:
    """in-toto artifact dict {name: {"sha256": hex}} for every file under `root`."""
    entries = scan_tree(root, prefix=prefix)
    digests = hash_many([e[1] for e in entries], [e[2] for e in entries])
    return {e[0]: {ALGORITHM: d} for e, d in zip(entries, digests, strict=True)}


def hash_artifacts(named: Mapping[str, Path]) -> dict[str, dict[str, str]]:
    """{name: path} -> in-toto artifact dict {name: {"sha256": hex}}."""
    digests = hash_files(named.values())
    return {name: {ALGORITHM: digests[Path(path)]} for name, path in sorted(named.items())}
