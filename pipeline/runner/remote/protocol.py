"""The wire protocol of remote workers: the job a runner sends (header, files), the frames a
worker answers in, and the caps on both; everything read from the other side is bounded."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline import cluster
from pipeline.bounded import loads_json
from pipeline.errors import InputError

PROTOCOL = 1
JOB_MAGIC = b"chainproof-job"
MSG_MAGIC = b"chainproof-msg"
START = b"start\n"
MAX_LINE = 80  # a frame's first line: magic and lengths
MAX_HEADER = 4 << 20  # the job's JSON header (10 000 file entries fit)
MAX_FILES = 10_000
MAX_FILE_BYTES = 8 << 30
MAX_JOB_BYTES = 16 << 30  # all files together: they are written to the worker's disk
MAX_MESSAGE = 1 << 20  # a message's JSON (a fingerprint, or a drift diff)
MAX_LOG = 4 << 20  # each of a report's logs; the rest of a longer log is cut, and says so
MAX_PAYLOAD = 2 * MAX_LOG
MAX_DIFF_LINES = 200
CHUNK = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*){0,7}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class JobRefused(InputError):
    """A job (or a message of the protocol) that is malformed, oversized or does not match
    its own digests: refused before anything runs."""


class ReportRefused(InputError):
    """What a remote worker sent back cannot be accepted (the runner fails the stage)."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


# --------------------------------------------------------------------------- framing


@dataclass
class Reader:
    """Exact reads from a byte stream (a pipe's fd or, in tests, a file object)."""

    read: Callable[[int], bytes]
    buf: bytearray = field(default_factory=bytearray)

    def exact(self, n: int, what: str) -> bytes:
        while len(self.buf) < n:
            chunk = self.read(max(CHUNK, n - len(self.buf)))
            if not chunk:
                raise JobRefused(f"the job ended early: {what} is cut short")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def line(self, what: str) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise JobRefused(f"{what}: its first line is longer than {MAX_LINE} bytes")
            chunk = self.read(CHUNK)
            if not chunk:
                raise JobRefused(f"the job ended early: no {what}")
            self.buf += chunk
        end = self.buf.index(b"\n")
        if end > MAX_LINE:
            raise JobRefused(f"{what}: its first line is longer than {MAX_LINE} bytes")
        out = bytes(self.buf[:end])
        del self.buf[: end + 1]
        return out


def _lengths(line: bytes, magic: bytes, count: int, what: str) -> list[int]:
    parts = line.split(b" ")
    if len(parts) != count + 1 or parts[0] != magic or not all(p.isdigit() for p in parts[1:]):
        raise JobRefused(f"{what}: not a chainproof frame ({line[:40]!r})")
    return [int(p) for p in parts[1:]]


def frame(doc: dict[str, Any], payload: bytes = b"") -> bytes:
    """One worker -> runner message: its JSON, then `payload` raw bytes (a report's logs)."""
    body = json.dumps(doc, sort_keys=True).encode()
    return b"%s %d %d\n" % (MSG_MAGIC, len(body), len(payload)) + body + payload


def split_frame(buf: bytes | bytearray) -> tuple[dict[str, Any], bytes, int] | None:
    """The first complete message in `buf`: (JSON object, payload, bytes used), or None
    while it is incomplete. Malformed or oversized raises ReportRefused."""
    end = buf.find(b"\n", 0, MAX_LINE + 1)
    if end < 0:
        if len(buf) > MAX_LINE:
            raise ReportRefused("the worker's output is not a chainproof message")
        return None
    try:
        size, psize = _lengths(bytes(buf[:end]), MSG_MAGIC, 2, "the worker's message")
    except JobRefused as e:
        raise ReportRefused(e.message) from None
    if size > MAX_MESSAGE or psize > MAX_PAYLOAD:
        raise ReportRefused(
            f"the worker's message is oversized ({size} + {psize} bytes; at most "
            f"{MAX_MESSAGE} + {MAX_PAYLOAD})"
        )
    total = end + 1 + size + psize
    if len(buf) < total:
        return None
    try:
        doc = loads_json(bytes(buf[end + 1 : end + 1 + size]), source="the worker's message")
    except InputError as e:
        raise ReportRefused(e.message) from None
    if not isinstance(doc, dict):
        raise ReportRefused("the worker's message is not a JSON object")
    return doc, bytes(buf[end + 1 + size : total]), total


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class JobFile:
    path: str  # run-relative posix path
    size: int
    sha256: str


@dataclass(frozen=True)
class Job:
    stage: str
    index: int
    cluster: tuple[str, ...]
    module: str
    spec: str  # run-relative path of the stage's spec (a shipped file)
    lock: str  # run-relative path of the lock the worker's environment must match
    timeout: int
    sandbox: bool
    files: tuple[JobFile, ...]
    sha256: str = ""  # of the header's bytes: the report names the job it answers

    def header(self) -> bytes:
        return json.dumps(
            {
                "protocol": PROTOCOL,
                "stage": self.stage,
                "index": self.index,
                "cluster": list(self.cluster),
                "command": ["-I", "-m", self.module, f"../{self.spec}"],
                "lock": self.lock,
                "timeout": self.timeout,
                "sandbox": self.sandbox,
                "files": [dataclasses.asdict(f) for f in self.files],
            },
            sort_keys=True,
        ).encode()


def check_path(path: object, stage: str) -> str:
    """A run-relative path the worker may create: no escape, nothing in the stage's own
    working directory (its outputs), logs or scratch."""
    if (
        not isinstance(path, str)
        or not 0 < len(path) <= 1024
        or path.startswith("/")
        or "\\" in path
        or not path.isprintable()
        or any(p in ("", ".", "..") for p in path.split("/"))
    ):
        raise JobRefused(f"job file path {str(path)[:120]!r} is not a plain run-relative path")
    if path.split("/", 1)[0] in (stage, "logs", "tmp") or "/" not in path:
        raise JobRefused(
            f"job file path {path!r} is not a material: it would land in the stage's "
            "outputs, logs or scratch, or at the run's top"
        )
    return path


def _int(value: object, lo: int, hi: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise JobRefused(f"job {what} {str(value)[:40]} is not an integer in {lo}..{hi}")
    return value


def parse_header(raw: bytes) -> Job:
    """A job header, every field checked (types, bounds, paths, digests)."""
    doc = loads_json(raw, source="the job header")
    if not isinstance(doc, dict):
        raise JobRefused("the job header is not a JSON object")
    known = {"protocol", "stage", "index", "cluster", "command", "lock", "timeout", "sandbox"}
    if set(doc) != known | {"files"}:
        raise JobRefused(f"the job header's fields are {sorted(doc)}, not {sorted(known)}")
    if type(doc["protocol"]) is not int or doc["protocol"] != PROTOCOL:
        raise JobRefused(f"job protocol {doc['protocol']!r}; this worker speaks {PROTOCOL}")
    stage = doc["stage"]
    if not isinstance(stage, str) or not _NAME.match(stage):
        raise JobRefused(f"job stage {str(stage)[:40]!r} is not a stage name")
    addresses = doc["cluster"]
    if not isinstance(addresses, list) or not 2 <= len(addresses) <= 1024:
        raise JobRefused("job cluster is not a list of 2 or more host:port")
    try:
        cluster.check_hosts(addresses, len(addresses))
    except cluster.ClusterConfigError as e:
        raise JobRefused(f"job cluster: {e}") from None
    index = _int(doc["index"], 1, len(addresses) - 1, "index")
    timeout = _int(doc["timeout"], 1, 7 * 24 * 3600, "timeout")
    if not isinstance(doc["sandbox"], bool):
        raise JobRefused("job sandbox is not true or false")
    files = doc["files"]
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise JobRefused(f"job files is not a list of at most {MAX_FILES} entries")
    parsed: list[JobFile] = []
    seen: set[str] = set()
    total = 0
    for entry in files:
        if not isinstance(entry, dict) or set(entry) != {"path", "size", "sha256"}:
            raise JobRefused("a job file entry is not {path, size, sha256}")
        path = check_path(entry["path"], stage)
        if path in seen:
            raise JobRefused(f"job file {path!r} is named twice")
        seen.add(path)
        size = _int(entry["size"], 0, MAX_FILE_BYTES, f"file {path!r} size")
        total += size
        if total > MAX_JOB_BYTES:
            raise JobRefused(f"the job's files exceed {MAX_JOB_BYTES} bytes together")
        sha = entry["sha256"]
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise JobRefused(f"job file {path!r} has no valid sha256")
        parsed.append(JobFile(path, size, sha))
    if any(parent in seen for f in seen for parent in _parents(f)):
        raise JobRefused("a job file is also the directory of another")
    command = doc["command"]
    if (
        not isinstance(command, list)
        or len(command) != 4
        or command[:2] != ["-I", "-m"]
        or not isinstance(command[2], str)
        or not _MODULE.match(command[2])
        or not isinstance(command[3], str)
        or command[3] != f"../specs/{stage}.json"
    ):
        raise JobRefused(
            f"job command {str(command)[:120]} is not `-I -m <module> ../specs/{stage}.json`"
        )
    spec = command[3][3:]
    lock = doc["lock"]
    if not isinstance(lock, str) or not lock.startswith("locks/"):
        raise JobRefused(f"job lock {str(lock)[:80]!r} is not under locks/")
    for need, what in ((spec, "stage spec"), (lock, "lock")):
        if need not in seen:
            raise JobRefused(f"the job does not ship its {what} {need!r}")
    return Job(
        stage=stage,
        index=index,
        cluster=tuple(addresses),
        module=command[2],
        spec=spec,
        lock=lock,
        timeout=timeout,
        sandbox=doc["sandbox"],
        files=tuple(parsed),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def read_job(reader: Reader, run: Path) -> Job:
    """Read one job: its header, then every file into `run` (streamed to disk, re-hashed:
    a byte that differs from the header refuses the job, naming the file)."""
    (size,) = _lengths(reader.line("job header"), JOB_MAGIC, 1, "the job")
    if size > MAX_HEADER:
        raise JobRefused(f"the job header is {size} bytes; at most {MAX_HEADER}")
    job = parse_header(reader.exact(size, "the job header"))
    for f in job.files:
        target = run / f.path
        digest = hashlib.sha256()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL|O_NOFOLLOW: never through a link, never over another file of the job
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
            with os.fdopen(fd, "wb") as out:
                left = f.size
                while left:
                    chunk = reader.exact(min(left, CHUNK), f"job file {f.path!r}")
                    digest.update(chunk)
                    out.write(chunk)
                    left -= len(chunk)
        except OSError as e:
            raise JobRefused(
                f"cannot write job file {f.path!r} under {run}: {e.strerror}",
                hint="free disk space in the worker's TMPDIR, or point TMPDIR elsewhere",
            ) from None
        if digest.hexdigest() != f.sha256:
            raise JobRefused(
                f"job file {f.path!r} has sha256 {digest.hexdigest()[:16]}…, the job header "
                f"{f.sha256[:16]}…: it changed on the way; nothing ran"
            )
    return job


def write_job(out: IO[bytes], job: Job, files: Sequence[tuple[str, Path]]) -> None:
    """The job onto the launcher's stdin: each file streamed (a file that changed since it
    was hashed is refused by the worker: its bytes no longer match the header)."""
    header = job.header()
    write_all(out, b"%s %d\n" % (JOB_MAGIC, len(header)) + header)
    for entry, (_, path) in zip(job.files, files, strict=True):
        left = entry.size
        with open(path, "rb") as f:
            while left:
                chunk = f.read(min(left, CHUNK))
                if not chunk:
                    raise OSError(f"{path} shrank while it was sent")
                write_all(out, chunk)
                left -= len(chunk)
    out.flush()


def write_all(out: IO[bytes], data: bytes) -> None:
    """Every byte, on an unbuffered pipe too (a raw write may take only part of them)."""
    view = memoryview(data)
    while view:
        n = out.write(view)
        view = view[n if n is not None else 0 :]
