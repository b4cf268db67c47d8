"""The runner's side of remote workers: the cluster of a plan, the job built from a stage's
materials, and `execute`, which launches workers 1..N-1 and supervises them with the chief."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline import cluster
from pipeline.envcheck import Fingerprint
from pipeline.errors import InputError, StageFailed
from pipeline.fsutil import atomic_write_bytes
from pipeline.hashing import hash_files, list_tree
from pipeline.runner import distributed as dist
from pipeline.runner import sandbox as sb
from pipeline.runner import sysmetrics
from pipeline.runner.remote.messages import check_ready, check_report
from pipeline.runner.remote.protocol import (
    CHUNK,
    MAX_FILES,
    MAX_LOG,
    START,
    Job,
    JobFile,
    ReportRefused,
    parse_header,
    split_frame,
    write_all,
    write_job,
)

STOP_GRACE = 5  # a stopped worker's time to kill its sandbox and remove its job itself
REPORT_WAIT = 30  # the launcher has exited: its report is all in the pipe
DEFAULT_CHECKOUT = str(Path(__file__).resolve().parents[3])  # this checkout, same path there


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
