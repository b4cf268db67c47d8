"""Parallel, streaming sha256 of artifacts: the hot path that grows with the data.

Files are hashed concurrently (hashlib releases the GIL on large updates), each read in 1 MiB
blocks into a per-thread buffer, and each distinct file at most once per call. Small files are
handed to the threads in batches, so a tree of many tiny files is not dominated by task
overhead. Paths in results are POSIX, relative to the given root, which is exactly how in-toto
links name artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    digests = hash_stated([(str(p), p.stat()) for p in unique], max_workers=max_workers)
    return dict(zip(unique, digests, strict=True))


def hash_stated(
    files: Sequence[tuple[str, os.stat_result]], *, max_workers: int | None = None
) -> list[str]:
    """Digests of (path, its stat) pairs, same order, using the stat the caller already has
    (a tree walk's): a file this process hashed and that is unchanged since is not read."""
    out = [""] * len(files)
    todo: list[tuple[int, tuple[int, int, int, int, int]]] = []
    for i, (_, st) in enumerate(files):
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        seen = _SEEN.get(key)
        if seen is not None:
            out[i] = seen
        else:
            todo.append((i, key))
    digests = hash_many(
        [files[i][0] for i, _ in todo], [k[2] for _, k in todo], max_workers=max_workers
    )
    if len(_SEEN) > _SEEN_MAX:
        _SEEN.clear()
    for (i, key), digest in zip(todo, digests, strict=True):
        _SEEN[key] = out[i] = digest
    return out


@dataclass(frozen=True)
class Walk:
    """One pass over a tree: every entry by relative POSIX name, symlinks never followed.

    `files` are regular files with the lstat the walk took (hash them with hash_stated);
    `symlinks` and `others` (FIFOs, sockets, devices) are named so a verifier can refuse or
    ignore them exactly as it decides. Directories that cannot be read are skipped, as
    os.walk and Path.rglob skip them.
    """

    root: Path
    files: dict[str, os.stat_result] = field(default_factory=dict)
    symlinks: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def stated(self, names: Iterable[str]) -> list[tuple[str, os.stat_result]]:
        return [(self.path(n), self.files[n]) for n in names]

    def under(self, prefix: str) -> Walk:
        """The part below `prefix` ("artifacts/"), renamed relative to it: no second walk."""
        cut = len(prefix)
        return Walk(
            self.root / prefix,
            {n[cut:]: st for n, st in self.files.items() if n.startswith(prefix)},
            [n[cut:] for n in self.symlinks if n.startswith(prefix)],
            [n[cut:] for n in self.others if n.startswith(prefix)],
        )


MAX_DEPTH = 64  # directory levels under an artifact root (a SavedModel uses 3)


def walk_tree(root: Path, *, digest_small: bool = False) -> Walk:
    """os.scandir recursion over `root` (which must not itself be a symlink; callers check).

    One lstat per regular file (the DirEntry's cached one), none per directory or link: the
    type comes from the directory entry itself. `digest_small`: also hash each regular file
    of up to SMALL bytes as it is met, opened relative to its directory (no path lookup) and
    read once, into the stat-keyed cache, for a caller that is about to hash the tree anyway
    (a verifier): hash_stated then reads none of them again. Bigger files are left to
    hash_stated's threads, where hashlib releases the GIL.
    """
    walk = Walk(root)
    if root.is_dir() and not root.is_symlink():
        _walk(str(root), "", walk, digest_small)
    return walk


# A regular file is opened without following a link and without blocking, so one swapped for
# a symlink or a FIFO after the walk's lstat fails to open (and is hashed later, as before).
_OPEN_SMALL = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _walk(directory: str, rel: str, walk: Walk, digest_small: bool = False, depth: int = 0) -> None:
    _too_deep(directory, depth)
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except OSError:  # unreadable (or gone): skipped, as os.walk and rglob do
        return
    dir_fd = -1
    if digest_small:  # unopenable: nothing here is hashed early; hash_stated does it later
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for entry in entries:
            name = rel + entry.name
            if entry.is_symlink():
                walk.symlinks.append(name)
            elif entry.is_dir(follow_symlinks=False):
                _walk(entry.path, name + "/", walk, digest_small, depth + 1)
            else:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed while walking: it is not there
                    continue
                if stat.S_ISREG(st.st_mode):
                    walk.files[name] = st
                    if dir_fd >= 0 and st.st_size <= SMALL:
                        _digest_small(dir_fd, entry.name, st)
                else:
                    walk.others.append(name)
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)


def _digest_small(dir_fd: int, name: str, st: os.stat_result) -> None:
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _SEEN:
        return
    try:
        fd = os.open(name, _OPEN_SMALL, dir_fd=dir_fd)
    except OSError:
        return
    try:
        data = os.read(fd, st.st_size + 1)
    except OSError:
        return
    finally:
        os.close(fd)
    if len(data) == st.st_size:  # otherwise it changed since its lstat: hashed later
        if len(_SEEN) > _SEEN_MAX:
            _SEEN.clear()
        _SEEN[key] = hashlib.sha256(data).hexdigest()


def _too_deep(directory: str, depth: int) -> None:
    if depth > MAX_DEPTH:  # hostile nesting: refused before Python's recursion limit (exit 70)
        raise InputError(
            f"{directory} is nested more than {MAX_DEPTH} directories deep",
            hint="an artifact tree this deep is not a model or a dataset; flatten it",
        )


def _scan(directory: str, rel: str, out: list[tuple[str, str, int]], depth: int = 0) -> None:
    _too_deep(directory, depth)
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
            _scan(entry.path, f"{name}/", out, depth + 1)
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
