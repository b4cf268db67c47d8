"""Workers on other hosts (`distribution.hosts`): the job a runner sends a remote worker, the
`chainproof worker` side that checks and runs it, and the report it sends back.

One job per worker over the launcher's stdin (ssh by default): a header (stage, index,
cluster, command, the lock, every file with its size and sha256) and the files' bytes. The
worker re-hashes every byte, checks its own environment against the shipped lock and answers
`ready` with its fingerprint (or `refused`); only when every worker is ready and matches the
chief does the runner send `start`. At the end one `report` comes back: return value,
duration, fingerprint, the stage's logs (bounded) and their sha256. Its stdin closing at any
time (the runner died or killed the launcher) kills the worker's sandbox: no orphan.
Everything read from the other side is hostile input: bounded, type-checked, and refused
naming what is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from pipeline import cluster
from pipeline.bounded import loads_json
from pipeline.envcheck import Fingerprint, check_environment, parse_lock
from pipeline.errors import EnvironmentDrift, Error, InputError, StageFailed
from pipeline.fsutil import atomic_write_bytes
from pipeline.hashing import hash_files, list_tree
from pipeline.provenance.workers import SAME_ENVIRONMENT
from pipeline.runner import distributed as dist
from pipeline.runner import sandbox as sb
from pipeline.runner import sysmetrics

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
GRACE = 30  # a worker outlives the stage's timeout by this much before killing its own stage
STOP_GRACE = 5  # a stopped worker's time to kill its sandbox and remove its job itself
REPORT_WAIT = 30  # the launcher has exited: its report is all in the pipe
JOB_WAIT = 600  # seconds of silence a worker waits for its job
DEFAULT_CHECKOUT = str(Path(__file__).resolve().parents[2])  # this checkout, same path there
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*){0,7}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FINGERPRINT = {f.name: f.type for f in dataclasses.fields(Fingerprint)}
_TYPES: dict[Any, type] = {"str": str, "int": int, str: str, int: int}


class JobRefused(InputError):
    """A job (or a message of the protocol) that is malformed, oversized or does not match
    its own digests: refused before anything runs."""


class ReportRefused(InputError):
    """What a remote worker sent back cannot be accepted (the runner fails the stage)."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Cluster:
    """The validated `hosts` part of a plan: where each worker listens, how 1..N-1 start."""

    addresses: tuple[str, ...]
    hosts: tuple[str, ...]
    launcher: tuple[str, ...]


def cluster_of(plan: dist.Plan) -> Cluster:
    """Raises InputError naming what is wrong (the stage kind validated it once already;
    this runs again before the run and before any worker: the runner trusts no caller)."""
    try:
        parsed = cluster.check_hosts(plan.hosts, plan.workers)
        if plan.launcher:
            launcher = cluster.check_launcher(plan.launcher)
        else:
            launcher = cluster.default_launcher(plan.checkout or DEFAULT_CHECKOUT)
    except cluster.ClusterConfigError as e:
        raise InputError(
            f"stage '{plan.stage}': distribution: {e}",
            hint="README 'Distributed training' says what hosts, launcher and "
            "remote_checkout accept",
        ) from None
    return Cluster(tuple(plan.hosts), tuple(h for h, _ in parsed), launcher)


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


def job_files(read_only: Sequence[Path], anchor: Path | None, stage: str) -> list[tuple[str, Path]]:
    """(run-relative path, file) for every material the stage sees; a material outside the
    run directory cannot be shipped and is refused."""
    if anchor is None:
        raise InputError(f"stage '{stage}': remote workers need the run directory's materials")
    root = Path(os.path.abspath(anchor))
    out: dict[str, Path] = {}
    for p in read_only:
        p = Path(os.path.abspath(p))
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            raise InputError(
                f"stage '{stage}': material {p} lies outside the run directory, so it cannot "
                "be sent to a remote worker",
                hint="use an input the source stage brings into the run, or drop hosts",
            ) from None
        tree = list_tree(p, prefix=f"{rel}/") if p.is_dir() else {rel: p}
        for name, path in tree.items():
            if name.split("/", 1)[0] not in (stage, "logs", "tmp"):
                out[name] = path
    if len(out) > MAX_FILES:
        raise InputError(f"stage '{stage}' has {len(out)} material files; a job ships {MAX_FILES}")
    return sorted(out.items())


def build_job(
    files: Sequence[tuple[str, Path]],
    digests: dict[Path, str],
    *,
    stage: str,
    index: int,
    addresses: Sequence[str],
    module: str,
    lock: str,
    timeout: int,
    sandbox: bool,
) -> Job:
    entries = tuple(JobFile(n, p.stat().st_size, digests[p]) for n, p in files)
    job = Job(
        stage,
        index,
        tuple(addresses),
        module,
        f"specs/{stage}.json",
        lock,
        timeout,
        sandbox,
        entries,
    )
    parse_header(job.header())  # the runner sends nothing its workers would refuse
    return replace(job, sha256=hashlib.sha256(job.header()).hexdigest())


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


# --------------------------------------------------------------------------- messages


def _fingerprint(value: object, what: str) -> Fingerprint:
    if not isinstance(value, dict) or set(value) != set(_FINGERPRINT):
        raise ReportRefused(f"{what} has no valid environment fingerprint")
    for key, kind in _FINGERPRINT.items():
        v = value[key]
        if type(v) is not _TYPES[kind] or (isinstance(v, str) and len(v) > 4096):
            raise ReportRefused(f"{what}: environment {key} is not a {_TYPES[kind].__name__}")
    return Fingerprint(**value)


def _addressed(doc: dict[str, Any], kind: str, index: int, job_sha256: str) -> None:
    if doc.get("type") != kind and not (kind == "ready" and doc.get("type") == "refused"):
        raise ReportRefused(f"expected the worker's {kind!r}, got {str(doc.get('type'))[:40]!r}")
    if doc.get("index") != index:
        raise ReportRefused(
            f"the message is for worker {str(doc.get('index'))[:20]}, not worker {index}"
        )
    if doc.get("job_sha256") != job_sha256:
        raise ReportRefused("the message answers another job (its job_sha256 differs)")


def printable(text: object, limit: int = 4096) -> str:
    """A string from the other side, safe to show: no terminal control sequences."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in str(text)[:limit])


def differences(chief: Fingerprint, worker: Fingerprint) -> list[str]:
    """What makes the worker's environment another than the chief's (verify's own fields)."""
    a, b = chief.as_dict(), worker.as_dict()
    return [
        f"~ {k}: chief {a[k]}, worker {printable(b[k], 80)}"
        for k in SAME_ENVIRONMENT
        if a[k] != b[k]
    ]


def check_ready(
    doc: dict[str, Any], index: int, job_sha256: str, chief: Fingerprint, where: str
) -> Fingerprint:
    """The worker's answer to its job: its checked environment, the chief's. A refusal
    (drift on that host, a job it would not take) raises, exit 3 for drift."""
    _addressed(doc, "ready", index, job_sha256)
    if doc["type"] == "refused":
        message = printable(doc.get("message"))
        diff = doc.get("diff")
        if doc.get("exit_code") == EnvironmentDrift.exit_code and isinstance(diff, list):
            raise EnvironmentDrift(
                f"the lock on worker {index} ({where})",
                [printable(d, 300) for d in diff[:MAX_DIFF_LINES]] or [message],
                hint=f"no worker was started; rebuild the environment on {where} from the "
                "lock (`make setup` in its checkout) and run again",
            )
        raise ReportRefused(f"worker {index} ({where}) refused its job: {message}")
    fp = _fingerprint(doc.get("environment"), f"worker {index}'s ready")
    diff = differences(chief, fp)
    if diff:
        raise EnvironmentDrift(
            f"the chief's environment, on worker {index} ({where})",
            diff,
            hint=f"no worker was started; build {where}'s environment from the same lock on "
            "the same kind of machine (`make setup` in its checkout)",
        )
    return fp


@dataclass(frozen=True)
class Report:
    return_value: int
    duration_ms: int
    environment: Fingerprint
    stdout: bytes
    stderr: bytes
    truncated: tuple[str, ...]


def check_report(
    doc: dict[str, Any], payload: bytes, index: int, job_sha256: str, chief: Fingerprint
) -> Report:
    """A worker's final report, every field checked: for this worker and this job, logs
    within bounds and matching their sha256, the chief's environment."""
    _addressed(doc, "report", index, job_sha256)
    rv = doc.get("return-value")
    if not isinstance(rv, int) or isinstance(rv, bool) or not -255 <= rv <= 255:
        raise ReportRefused(f"worker {index}'s report has no valid return-value")
    ms = doc.get("duration_ms")
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms < 10**12:
        raise ReportRefused(f"worker {index}'s report has no valid duration_ms")
    fp = _fingerprint(doc.get("environment"), f"worker {index}'s report")
    diff = differences(chief, fp)
    if diff:
        raise ReportRefused(
            f"worker {index}'s report is for another environment than the chief's: "
            + "; ".join(diff)
        )
    logs: dict[str, bytes] = {}
    offset = 0
    truncated = []
    for which in ("stdout", "stderr"):
        entry = doc.get(which)
        if (
            not isinstance(entry, dict)
            or set(entry) != {"size", "sha256", "truncated"}
            or not isinstance(entry["size"], int)
            or isinstance(entry["size"], bool)
            or not 0 <= entry["size"] <= MAX_LOG
            or not isinstance(entry["sha256"], str)
            or not isinstance(entry["truncated"], bool)
        ):
            raise ReportRefused(f"worker {index}'s report has no valid {which} entry")
        data = payload[offset : offset + entry["size"]]
        offset += entry["size"]
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ReportRefused(f"worker {index}'s {which} does not match its size and sha256")
        logs[which] = data
        if entry["truncated"]:
            truncated.append(which)
    if offset != len(payload):
        raise ReportRefused(f"worker {index}'s report carries {len(payload) - offset} extra bytes")
    return Report(rv, ms, fp, logs["stdout"], logs["stderr"], tuple(truncated))


# --------------------------------------------------------------------------- runner side


@dataclass
class Launched:
    """One remote worker's launcher process, its job being written, its answers read."""

    index: int
    host: str
    proc: subprocess.Popen[bytes]
    job: Job
    logs: sb.StageLogs
    buf: bytearray = field(default_factory=bytearray)
    messages: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)
    error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, files: Sequence[tuple[str, Path]]) -> None:
        for target in (self._send, self._read):
            t = threading.Thread(target=target, args=(files,), daemon=True)
            t.start()
            self.threads.append(t)

    def _send(self, files: Sequence[tuple[str, Path]]) -> None:
        assert self.proc.stdin is not None
        # a worker that stops reading (or dies) ends this with a broken pipe, not a hang:
        # the runner's deadline kills the launcher
        with contextlib.suppress(OSError, ValueError):
            write_job(self.proc.stdin, self.job, files)

    def _read(self, _files: object) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, CHUNK)
            except OSError:
                return
            if not chunk:
                return
            with self.lock:
                if self.error:
                    continue  # drained and dropped: memory stays bounded
                self.buf += chunk
                try:
                    while (got := split_frame(self.buf)) is not None:
                        doc, payload, used = got
                        del self.buf[:used]
                        if len(self.messages) >= 2:
                            raise ReportRefused("the worker sent more than a ready and a report")
                        self.messages.append((doc, payload))
                except ReportRefused as e:
                    self.error, self.buf = e.message, bytearray()

    def message(self, n: int) -> tuple[dict[str, Any], bytes] | None:
        with self.lock:
            if self.error:
                raise ReportRefused(self.error)
            return self.messages[n] if len(self.messages) > n else None

    def send_start(self) -> None:
        assert self.proc.stdin is not None
        self.threads[0].join(timeout=REPORT_WAIT)  # all written: it answered after reading
        if self.threads[0].is_alive():
            raise ReportRefused("it answered `ready` before it read its whole job")
        try:
            write_all(self.proc.stdin, START)
        except OSError:
            raise ReportRefused("its stdin closed before `start`") from None

    def stop(self) -> None:
        """Close its stdin: the worker sees EOF, kills its sandbox, removes its job and exits
        (ssh passes that on to the remote host); after STOP_GRACE, SIGKILL the launcher's
        process group whatever it is doing."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_GRACE)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
        self.proc.wait()
        for t in self.threads:
            t.join(timeout=5)


@dataclass
class RemoteStarted(sb.Started):
    """A remote worker under the runner's supervision, as a local one: its process is the
    launcher's; its exit code is the report's return value, once the report is accepted
    and its logs are written where a local worker's would be."""

    launched: Launched | None = None
    chief: Fingerprint | None = None
    where: str = ""
    say: Callable[[str], None] = lambda _m: None

    def exit_code(self, rc: int) -> int:
        assert self.launched is not None and self.chief is not None
        la = self.launched
        la.threads[1].join(timeout=REPORT_WAIT)
        try:
            got = la.message(1)
            if got is None:
                raise ReportRefused("its launcher exited 0 without a report")
            report = check_report(*got, la.index, la.job.sha256, self.chief)
        except ReportRefused as e:
            raise ReportRefused(e.message, index=la.index) from None
        atomic_write_bytes(self.logs.stdout, report.stdout)
        atomic_write_bytes(self.logs.stderr, report.stderr)
        if report.truncated:
            self.say(
                f"[{la.job.stage}] worker {la.index}'s {' and '.join(report.truncated)} "
                f"exceeded {MAX_LOG} bytes: the first {MAX_LOG} came back and are attested"
            )
        return report.return_value

    def kill(self) -> None:
        if self.launched is not None:
            self.launched.stop()


def execute(
    workers: dist.Workers,
    argv: list[str],
    *,
    workdir: Path,
    scratch: Path,
    logs: sb.StageLogs,
    timeout: int,
    sandbox: sb.Sandbox,
    mounts: sb.Mounts,
    packages: Sequence[Path] | None,
    watch: Callable[[], None] | None,
) -> int:
    """`Workers.execute` for a cluster: the chief here (host network), workers 1..N-1 through
    the launcher, all supervised alike (first failure or the timeout stops all)."""
    plan, say = workers.plan, workers.say
    name, n = plan.stage, plan.workers
    spec = cluster_of(plan)
    if sandbox.enabled and mounts.network:
        raise InputError(
            f"stage '{name}' declares network: true; its workers on hosts already get the "
            "host network they need, and nothing more should be declared",
            hint="drop `network: true` from a distributed train stage",
        )
    files = job_files(mounts.read_only, mounts.anchor, name)
    locks = [f for f, _ in files if f.startswith("locks/")]
    say(f"[{name}] checking the environment of the chief before any worker starts")
    chief_fp = workers._checked(1)[0]
    lock = next((f for f in locks if f.endswith("/" + chief_fp.lock)), None)
    if lock is None:
        raise InputError(f"stage '{name}': its lock {chief_fp.lock} is not among its materials")
    digests = hash_files([p for _, p in files])
    if len(argv) != 5 or argv[1:3] != ["-I", "-m"]:
        raise InputError(f"stage '{name}': remote workers run `python -I -m <module> <spec>`")
    module = argv[3]
    t0 = time.monotonic()
    deadline = t0 + timeout
    with contextlib.ExitStack() as stack:
        remote: list[Launched] = []
        for i in range(1, n):
            job = build_job(
                files,
                digests,
                stage=name,
                index=i,
                addresses=spec.addresses,
                module=module,
                lock=lock,
                timeout=timeout,
                sandbox=sandbox.enabled,
            )
            wlogs = dist._worker_logs(logs, i)
            remote.append(stack.enter_context(_launch(spec, i, job, files, wlogs)))
        say(
            f"[{name}] sending the job to {n - 1} remote worker(s): {', '.join(spec.addresses[1:])}"
        )
        fps = _await_ready(remote, spec, chief_fp, deadline, name)
        for la in remote:
            try:
                la.send_start()
            except ReportRefused as e:
                raise _not_started(name, la, e.message) from None
        chief_mounts = replace(mounts, network=True) if sandbox.enabled else mounts
        if not sandbox.enabled:
            say(
                f"WARNING: [{name}] --no-sandbox: the chief's TensorFlow server listens "
                "unauthenticated on the host's interfaces while it trains (recorded)"
            )
        workers.network = (
            "host network (cluster hosts; a private, firewalled network is assumed)"
            if sandbox.enabled
            else "host (unsandboxed; cluster hosts)"
        )
        workers.workers.append(
            dist.Worker(0, spec.addresses[0], logs, chief_fp, host=spec.hosts[0])
        )
        for la, fp in zip(remote, fps, strict=True):
            started = RemoteStarted(
                la.proc,
                dist._worker_logs(logs, la.index),
                launched=la,
                chief=chief_fp,
                where=la.host,
                say=say,
            )
            workers.workers.append(
                dist.Worker(
                    la.index, spec.addresses[la.index], started.logs, fp, started, host=la.host
                )
            )
        say(f"[{name}] starting {n} workers on {', '.join(spec.addresses)}")
        workers.workers[0].started = stack.enter_context(
            sb.spawn(
                argv,
                workdir=workdir,
                scratch=scratch,
                logs=logs,
                sandbox=sandbox,
                mounts=chief_mounts,
                packages=packages,
                env={"TF_CONFIG": dist.tf_config(spec.addresses, 0)},
            )
        )
        chief = workers.workers[0].started
        # the chief's system metrics only: a remote worker's process is not this machine's
        # (its launcher is), and what a host would sample of itself is its own word
        recorder = sysmetrics.Recorder({0: chief.proc.pid} if chief is not None else {})
        try:
            workers._supervise(t0, timeout, watch, recorder)
            workers.metrics = recorder.write({0: dist._metrics_file(logs, 0)})
        except ReportRefused as e:  # a report that cannot be accepted: nothing of it counts
            workers._stop_all()
            bad = workers.workers[e.index if e.index is not None else 0]
            raise workers._failed(bad, f"worker {bad.index} ({bad.host}): {e.message}") from None
    return 0


@contextlib.contextmanager
def _launch(
    spec: Cluster, index: int, job: Job, files: Sequence[tuple[str, Path]], logs: sb.StageLogs
) -> Iterator[Launched]:
    host = spec.hosts[index]
    argv = cluster.launcher_argv(spec.launcher, host)
    logs.stdout.write_bytes(b"")  # replaced by the report's logs once it is accepted
    with open(logs.stderr, "wb") as err:  # until then: the launcher's and the worker's own
        try:
            proc = subprocess.Popen(
                argv,
                bufsize=0,  # raw pipes: stop() can close stdin while the job is being written
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # its own process group: stopping it kills all of it
                preexec_fn=sb._die_with_parent,
            )
        except OSError as e:
            raise InputError(
                f"stage '{job.stage}': the launcher of worker {index} ({host}) cannot be "
                f"started: {argv[0]}: {e.strerror}",
                hint="install it (ssh: openssh-client) or fix distribution.launcher",
            ) from None
    launched = Launched(index, host, proc, job, logs)
    try:
        launched.start(files)
        yield launched
    finally:
        launched.stop()


def _await_ready(
    remote: Sequence[Launched], spec: Cluster, chief: Fingerprint, deadline: float, name: str
) -> list[Fingerprint]:
    """Every remote worker's `ready`, checked against the chief, before anything trains."""
    fps: dict[int, Fingerprint] = {}
    while len(fps) < len(remote):
        for la in remote:
            if la.index in fps:
                continue
            try:
                got = la.message(0)
                if got is None and (rc := la.proc.poll()) is not None:
                    la.threads[1].join(timeout=REPORT_WAIT)  # what it wrote before it exited
                    got = la.message(0)
                    if got is None:
                        raise ReportRefused(f"its launcher exited with code {rc}")
                if got is not None:
                    fps[la.index] = check_ready(got[0], la.index, la.job.sha256, chief, la.host)
            except ReportRefused as e:
                raise _not_started(name, la, e.message) from None
        if time.monotonic() > deadline:
            late = next(la for la in remote if la.index not in fps)
            raise _not_started(name, late, "did not answer its job before the stage's timeout")
        time.sleep(dist.POLL_SECONDS)
    return [fps[la.index] for la in remote]


def _not_started(name: str, la: Launched, why: str) -> StageFailed:
    la.stop()  # its stderr log is complete: the launcher's and the worker's own messages
    return StageFailed(
        name,
        f"worker {la.index} ({la.host}) {why}; no worker trained and no link was written",
        log_tail=la.logs.tail(),
        hint=f"read {la.logs.stderr}: the launcher's and the remote worker's own messages",
    )


# --------------------------------------------------------------------------- worker side


class Aborted(Error):
    """The runner went away (stdin closed) or broke the protocol: the stage was killed."""

    exit_code = 4


def _send(out: IO[bytes], doc: dict[str, Any], payload: bytes = b"") -> None:
    try:
        out.write(frame(doc, payload))
        out.flush()
    except OSError:
        raise Aborted("the runner went away (its end of stdout closed)") from None


def _log_part(path: Path) -> tuple[bytes, bool]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LOG + 1)
    except OSError:
        return b"", False
    return data[:MAX_LOG], len(data) > MAX_LOG


def serve(stdin_fd: int, out: IO[bytes], say: Callable[[str], None]) -> int:
    """`chainproof worker`: one job from `stdin_fd`, answers on `out`. Returns the exit code
    (0 once the report is sent, whatever the stage returned: the report carries it)."""
    deadline = [time.monotonic() + JOB_WAIT]

    def read(n: int) -> bytes:
        # a runner that goes silent (a partitioned network keeps ssh up) is not waited for
        # for ever: JOB_WAIT for the job, then the stage's timeout for `start`
        left = deadline[0] - time.monotonic()
        if left <= 0 or not select.select([stdin_fd], [], [], left)[0]:
            raise Aborted("the runner sent nothing in time; nothing ran")
        return os.read(stdin_fd, n)

    reader = Reader(read)
    root = Path(tempfile.mkdtemp(prefix="chainproof-worker-"))
    job: Job | None = None
    try:
        run = root / "run"
        run.mkdir()
        try:
            job = read_job(reader, run)
            say(f"worker {job.index} of stage '{job.stage}': job {job.sha256[:16]}… received")
            try:
                (run / job.lock).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                raise JobRefused(f"the job's lock {job.lock} is not UTF-8 text") from None
            lock = parse_lock(run / job.lock)
            box = sb.find_bubblewrap() if job.sandbox else sb.NO_SANDBOX
            fp = check_environment(lock, verify_files=True)
        except Error as e:
            if job is not None:  # drift, or no sandbox here: the runner says why
                diff = e.diff[:MAX_DIFF_LINES] if isinstance(e, EnvironmentDrift) else None
                _send(
                    out,
                    {
                        "type": "refused",
                        "index": job.index,
                        "job_sha256": job.sha256,
                        "exit_code": e.exit_code,
                        "message": e.diagnostics()[:4096],
                        "diff": diff,
                    },
                )
            raise
        base = {"index": job.index, "job_sha256": job.sha256, "environment": fp.as_dict()}
        _send(out, {"type": "ready", **base})
        deadline[0] = time.monotonic() + job.timeout
        try:
            go = reader.exact(len(START), "the runner's start")
        except JobRefused:
            raise Aborted("the runner went away before `start`; nothing ran") from None
        if go != START:
            raise Aborted("the runner sent something other than `start`; nothing ran")
        return _run_stage(job, run, box, stdin_fd, reader, out, base)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_stage(
    job: Job,
    run: Path,
    box: sb.Sandbox,
    stdin_fd: int,
    reader: Reader,
    out: IO[bytes],
    base: dict[str, Any],
) -> int:
    workdir = run / job.stage
    workdir.mkdir()
    (run / "logs").mkdir()
    logs = sb.StageLogs(run / "logs" / f"{job.stage}.stdout", run / "logs" / f"{job.stage}.stderr")
    mounts = sb.Mounts(
        read_only=tuple(run / f.path for f in job.files),
        network=True,  # the cluster's: TensorFlow's servers reach the other hosts
        anchor=run,
    )
    t0 = time.monotonic()
    with sb.spawn(
        [sys.executable, "-I", "-m", job.module, f"../{job.spec}"],
        workdir=workdir,
        scratch=run / "tmp" / job.stage,
        logs=logs,
        sandbox=box,
        mounts=mounts,
        packages=sb.package_dirs(("pipeline", job.module.split(".")[0])),
        env={"TF_CONFIG": dist.tf_config(job.cluster, job.index)},
    ) as started:
        if reader.buf:  # anything after `start` is not the protocol
            raise Aborted("the runner sent data after `start`; the stage was killed")
        while (rc := started.proc.poll()) is None:
            ready, _, _ = select.select([stdin_fd], [], [], dist.POLL_SECONDS)
            if ready:
                data = os.read(stdin_fd, 1)
                started.kill()
                raise Aborted(
                    "the runner went away (stdin closed); the stage was killed"
                    if not data
                    else "the runner sent data while the stage ran; the stage was killed"
                )
            if time.monotonic() - t0 > job.timeout + GRACE:
                started.kill()
                raise Aborted(f"the stage ran past its timeout ({job.timeout}s); killed")
        code = started.exit_code(rc) if rc == 0 else rc
    stdout, cut_out = _log_part(logs.stdout)
    stderr, cut_err = _log_part(logs.stderr)
    doc = {
        "type": "report",
        **base,
        "return-value": code,
        "duration_ms": int((time.monotonic() - t0) * 1000),
        "stdout": {"size": len(stdout), "sha256": _sha(stdout), "truncated": cut_out},
        "stderr": {"size": len(stderr), "sha256": _sha(stderr), "truncated": cut_err},
    }
    _send(out, doc, stdout + stderr)
    return 0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
