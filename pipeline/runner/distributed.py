"""Multi-worker training: the runner starts a stage's N TensorFlow workers, each in the stage's
locked, checked environment and its own sandbox, sharing one loopback-only network; one
worker failing or hanging stops them all, and every worker's record goes into the link.

Under bubblewrap the workers cannot each get a private network (they must reach each other)
nor the host's (it reaches everything). A holder sandbox owns a fresh network namespace with
only `lo` in it; every worker's sandbox is started inside that namespace (nsenter), so they
talk on 127.0.0.1 and reach nothing else: no host service, no other run, no internet.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import StageConfig
from pipeline.envcheck import Fingerprint, LockFile, check_environment
from pipeline.errors import EnvironmentDrift, InputError, StageFailed
from pipeline.runner import sandbox as sb
from pipeline.runner import sysmetrics

STRATEGY = "multi_worker_mirrored"  # the only strategy that needs more than one process
# Inside the private network namespace every port is free: fixed ports, no race with the host.
FIRST_PORT = 23456
POLL_SECONDS = 0.2
HOLDER_TIMEOUT = 20
NO_MOUNTS = sb.Mounts()
NETWORK = "loopback only, shared by the stage's workers (a private network namespace)"


@dataclass(frozen=True)
class Plan:
    """What the stage's params ask for (validated by the stage kind when the config loaded)."""

    stage: str
    workers: int
    hosts: tuple[str, ...] = ()
    launcher: tuple[str, ...] = ()  # argv prefix starting worker i >= 1 on hosts[i]
    checkout: str = ""  # the chainproof checkout on the hosts (the default launcher's)


def plan_for(stage: StageConfig) -> Plan | None:
    """The workers a stage needs started, or None for a single process (`mirrored` too)."""
    d = stage.params.get("distribution")
    if not isinstance(d, dict) or d.get("strategy") != STRATEGY:
        return None
    return Plan(
        stage.name,
        int(d.get("workers", 1)),
        tuple(d.get("hosts") or ()),
        tuple(d.get("launcher") or ()),
        str(d.get("remote_checkout") or ""),
    )


def check_hosts(plan: Plan) -> None:
    """A cluster config is checked whole (hosts, launcher, checkout) before the run, from
    the layout's pins, and again before any worker: never half-run (runner/remote/launch.py)."""
    if plan.hosts:
        from pipeline.runner import remote  # it builds on this module

        remote.cluster_of(plan)


def worker_counts(stages: Sequence[StageConfig]) -> dict[str, int]:
    """{step: workers} for the layout's pins: the owner signs how many workers each step has."""
    plans = [plan for s in stages if (plan := plan_for(s)) is not None]
    for plan in plans:
        check_hosts(plan)
    return {plan.stage: plan.workers for plan in plans}


def tf_config(addresses: Sequence[str], index: int) -> str:
    return json.dumps(
        {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}},
        sort_keys=True,
    )


def free_ports(n: int) -> list[int]:
    """Ports free on the host's 127.0.0.1 (the unsandboxed path only; a short race remains)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def loopback_network(box: sb.Sandbox) -> Iterator[list[str]]:
    """A network namespace with only loopback, held open while the block runs; yields the
    command prefix that starts a process inside it (nsenter into the holder's namespaces)."""
    nsenter = shutil.which("nsenter", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if nsenter is None or box.path is None:
        raise sb.SandboxUnavailable(
            "multi-worker training under bubblewrap needs nsenter (util-linux) to share one "
            "loopback-only network between the workers",
            hint="install util-linux, or run with --no-sandbox (recorded)",
        )
    read_end, write_end = os.pipe()
    holder = subprocess.Popen(
        [
            str(box.path),
            "--unshare-user",
            "--unshare-net",
            "--die-with-parent",
            *sb._system_args(),
            "--info-fd",
            str(write_end),
            "--",
            "cat",  # blocks on the runner's pipe; ends when the runner closes it or dies
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=[write_end],
        start_new_session=True,
        preexec_fn=sb._die_with_parent,
        env={"PATH": "/usr/bin:/bin"},
    )
    os.close(write_end)
    try:
        pid = _holder_pid(read_end, holder)
        yield [nsenter, f"--target={pid}", "--user", "--net", "--preserve-credentials", "--"]
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        holder.communicate()


def _holder_pid(fd: int, holder: subprocess.Popen[bytes]) -> int:
    """The holder's namespaced child, from bubblewrap's --info-fd (bounded in time and size)."""
    raw = b""
    deadline = time.monotonic() + HOLDER_TIMEOUT
    while time.monotonic() < deadline and len(raw) < 1 << 16:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            raw += chunk
            with contextlib.suppress(ValueError):
                info = json.loads(raw)
                if isinstance(info, dict) and isinstance(info.get("child-pid"), int):
                    return int(info["child-pid"])
        elif holder.poll() is not None:
            break
    why = ""
    if holder.poll() is not None and holder.stderr is not None:
        why = holder.stderr.read(4096).decode(errors="replace").strip()
    raise sb.SandboxUnavailable(
        f"bubblewrap could not create the workers' loopback network: {why or 'no answer'}",
        hint="unprivileged user and network namespaces must be allowed; or --no-sandbox",
    )


@dataclass
class Worker:
    index: int
    address: str
    logs: sb.StageLogs
    fingerprint: Fingerprint
    started: sb.Started | None = None
    return_value: int | None = None
    seconds: float = 0.0
    host: str = ""  # a cluster's host (runner/remote/); "" on this machine's loopback


def environment_check(
    lock: LockFile, python: Path, *, verify_files: bool
) -> Callable[[], Fingerprint]:
    """A fresh check of the workers' environment (never the run's cached one)."""
    own = None if Path(os.path.abspath(python)) == Path(os.path.abspath(sys.executable)) else python
    return lambda: check_environment(lock, python=own, verify_files=verify_files)


@dataclass
class Workers:
    """Starts and supervises the workers of one stage run; `execute` has sandbox.execute's
    shape, so the runner calls one or the other. The chief (worker 0) runs exactly the
    stage's own process (its workdir and logs); the others get private working directories
    (under bubblewrap) and logs beside the chief's."""

    plan: Plan
    check: Callable[[], Fingerprint]  # the worker environment's check; drift raises
    say: Callable[[str], None] = lambda _msg: None
    workers: list[Worker] = field(default_factory=list)
    network: str = ""
    metrics: dict[int, Path] = field(default_factory=dict)  # index -> its system-metrics file

    def execute(
        self,
        argv: list[str],
        *,
        workdir: Path,
        scratch: Path,
        logs: sb.StageLogs,
        timeout: int,
        sandbox: sb.Sandbox = sb.NO_SANDBOX,
        mounts: sb.Mounts = NO_MOUNTS,
        packages: Sequence[Path] | None = None,
        watch: Callable[[], None] | None = None,
    ) -> int | None:
        """Every worker to exit 0 -> 0. A worker that fails, or a run past `timeout`, stops
        every worker (process groups killed, none left behind) and raises StageFailed."""
        name, n = self.plan.stage, self.plan.workers
        if self.plan.hosts:  # a cluster: workers 1..N-1 on other hosts
            from pipeline.runner import remote

            return remote.execute(
                self,
                argv,
                workdir=workdir,
                scratch=scratch,
                logs=logs,
                timeout=timeout,
                sandbox=sandbox,
                mounts=mounts,
                packages=packages,
                watch=watch,
            )
        self.say(f"[{name}] checking the environment of {n} worker(s) before any starts")
        fingerprints = self._checked(n)
        with contextlib.ExitStack() as stack:
            if sandbox.enabled and not mounts.network:
                prefix = stack.enter_context(loopback_network(sandbox))
                ports = [FIRST_PORT + i for i in range(n)]
                self.network = NETWORK
                # --share-net inside the holder's namespace shares only its loopback
                mounts = replace(mounts, network=True)
            elif sandbox.enabled:  # the stage declared `network: true`
                # TensorFlow's worker servers listen on every interface and authenticate no
                # one: on the host's network any local user or LAN host could run graph ops
                # (WriteFile into the chief's outputs) before the products are hashed.
                raise InputError(
                    f"stage '{name}' declares network: true, and its {n} TensorFlow workers "
                    "would then listen unauthenticated on the host's network",
                    hint="drop `network: true` from a distributed train stage: its workers "
                    "share a private loopback-only network (fetch data in the source stage)",
                )
            else:
                prefix, ports = [], free_ports(n)
                self.network = "host (unsandboxed: the workers listen on the host)"
                self.say(
                    f"WARNING: [{name}] --no-sandbox: the {n} TensorFlow workers listen "
                    "unauthenticated on the host's interfaces while they train (recorded)"
                )
            addresses = [f"127.0.0.1:{p}" for p in ports]
            for i in range(n):
                wlogs = logs if i == 0 else _worker_logs(logs, i)
                self.workers.append(Worker(i, addresses[i], wlogs, fingerprints[i]))
            self.say(f"[{name}] starting {n} workers on {', '.join(addresses)}")
            t0 = time.monotonic()
            for w in self.workers:
                own = scratch if w.index == 0 else scratch.with_name(f"{scratch.name}.w{w.index}")
                wmounts = mounts
                if w.index and sandbox.enabled:  # its own working dir, seen at the chief's path
                    private = own.with_name(own.name + ".work")
                    shutil.rmtree(private, ignore_errors=True)
                    private.mkdir(parents=True)
                    stack.callback(shutil.rmtree, private, True)
                    wmounts = replace(mounts, workdir_source=private)
                w.started = stack.enter_context(
                    sb.spawn(
                        argv,
                        workdir=workdir,
                        scratch=own,
                        logs=w.logs,
                        sandbox=sandbox,
                        mounts=wmounts,
                        packages=packages,
                        env={"TF_CONFIG": tf_config(addresses, w.index)},
                        prefix=prefix,
                    )
                )
            recorder = sysmetrics.Recorder(
                {w.index: w.started.proc.pid for w in self.workers if w.started is not None}
            )
            self._supervise(t0, timeout, watch, recorder)
            self.metrics = recorder.write(
                {w.index: _metrics_file(logs, w.index) for w in self.workers}
            )
        return 0

    def _checked(self, n: int) -> list[Fingerprint]:
        """Each worker's environment, checked now (not the run's earlier check): on this
        machine the workers share one interpreter, so one fresh check covers them all."""
        try:
            fp = self.check()
        except EnvironmentDrift as e:
            raise EnvironmentDrift(
                e.lock,
                e.diff,
                hint=f"no worker of stage '{self.plan.stage}' was started; rebuild the "
                "environment from the lock (`make setup`) and run again",
            ) from e
        return [fp] * n

    def _supervise(
        self,
        t0: float,
        timeout: int,
        watch: Callable[[], None] | None,
        recorder: sysmetrics.Recorder | None = None,
    ) -> None:
        deadline = t0 + timeout
        while True:
            if watch is not None:  # the chief's progress lines, as the single-process path
                watch()
            if recorder is not None:
                recorder.tick()
            running = False
            for w in self.workers:
                assert w.started is not None
                if w.return_value is not None:
                    continue
                rc = w.started.proc.poll()
                if rc is None:
                    running = True
                    continue
                w.seconds = time.monotonic() - t0
                # 0 from bubblewrap is confirmed by its status (the command ran); any other
                # code fails the stage whichever process it came from.
                w.return_value = w.started.exit_code(rc) if rc == 0 else rc
                if w.return_value != 0:
                    self._stop_all()
                    raise self._failed(w, f"worker {w.index} exited with code {w.return_value}")
            if not running:
                if watch is not None:  # the lines written since the last look
                    watch()
                return
            if time.monotonic() > deadline:
                self._stop_all()
                hung = [str(w.index) for w in self.workers if w.return_value is None]
                raise self._failed(
                    self.workers[int(hung[0])] if hung else self.workers[0],
                    f"timed out after {timeout}s with worker(s) {', '.join(hung)} still running",
                )
            time.sleep(POLL_SECONDS)

    def _stop_all(self) -> None:
        for w in self.workers:
            if w.started is not None:
                w.started.kill()

    def _failed(self, w: Worker, why: str) -> StageFailed:
        return StageFailed(
            self.plan.stage,
            f"{why}; every worker was stopped and no link was written",
            log_tail=w.logs.tail(),
            hint=f"read {w.logs.stderr} and fix the cause, then run again",
        )

    def byproducts(self, digest: Callable[[dict[str, Path]], dict[str, dict[str, str]]]) -> dict:
        """What the link records of the workers: each one's address, environment
        fingerprint, exit status and log digests (run-relative paths)."""
        records = []
        for w in self.workers:
            files = {k: getattr(w.logs, k) for k in ("stdout", "stderr")}
            if w.index in self.metrics:
                files[sysmetrics.RECORD_KEY] = self.metrics[w.index]
            names = {k: f"logs/{f.name}" for k, f in files.items()}
            digests = digest({names[k]: files[k] for k in names})
            records.append(
                {
                    "index": w.index,
                    "address": w.address,
                    **({"host": w.host} if w.host else {}),
                    "return-value": w.return_value,
                    "duration_ms": int(w.seconds * 1000),
                    "environment": w.fingerprint.as_dict(),
                    **{k: {"path": n, **digests[n]} for k, n in names.items()},
                }
            )
        return {
            "distribution": {
                "strategy": STRATEGY,
                "workers": self.plan.workers,
                "network": self.network,
            },
            "workers": records,
        }


def _metrics_file(chief: sb.StageLogs, index: int) -> Path:
    stem = chief.stdout.name.rpartition(".")[0]
    return chief.stdout.with_name(f"{stem}.worker-{index}.system-metrics.json")


def _worker_logs(chief: sb.StageLogs, index: int) -> sb.StageLogs:
    def beside(p: Path) -> Path:
        stem, _, ext = p.name.rpartition(".")
        return p.with_name(f"{stem}.worker-{index}.{ext}")

    return sb.StageLogs(stdout=beside(chief.stdout), stderr=beside(chief.stderr))


def describe(byproducts: dict[str, Any]) -> str:
    """One line for the runner's progress output."""
    d = byproducts.get("distribution") or {}
    return f"{d.get('workers')} workers, network: {d.get('network')}"
