"""The worker's side (`chainproof worker` on a cluster host): read and check one job, check
this host's environment against its lock, train when told to, send one report, leave nothing."""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pipeline.envcheck import check_environment, parse_lock
from pipeline.errors import EnvironmentDrift, Error
from pipeline.runner import distributed as dist
from pipeline.runner import sandbox as sb
from pipeline.runner.remote.protocol import (
    MAX_DIFF_LINES,
    MAX_LOG,
    START,
    Job,
    JobRefused,
    Reader,
    frame,
    read_job,
)

GRACE = 30  # a worker outlives the stage's timeout by this much before killing its own stage
JOB_WAIT = 600  # seconds of silence a worker waits for its job


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
