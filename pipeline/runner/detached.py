"""Lineage off the critical path: one run's MLflow logging, inline or in a detached process.

`spawn` starts `chainproof lineage detached RUN` in its own session (its output in
logs/lineage.log) and returns at once; that process logs the run directory and records the
outcome in run.json (`lineage: {logged: ...}`) exactly as an inline log would.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import LineageSpec
from pipeline.errors import Error, InputError
from pipeline.lineage import DEFAULT_TRACKING_URI, LineageError, resolve_tracking_uri, sink_for
from pipeline.runner.record import RunRecord
from pipeline.workspace import RUN_RECORD

LOG_NAME = "logs/lineage.log"
LOCK_NAME = ".lineage.lock"  # in the workspace: one writer at a time into its MLflow store
WAIT_SECONDS = 600.0


@dataclass(frozen=True)
class Logged:
    """What an inline log said, and how long MLflow took (None: nothing was logged)."""

    summary: str
    seconds: float | None


def record_lineage(
    run_dir: Path,
    spec: LineageSpec,
    workspace: Path,
    pipeline: str,
    *,
    published: bool,
    say: Callable[[str], None],
) -> Logged:
    """Log the run to MLflow and record the outcome in run.json; a failure never raises.

    `published`: the runner verified the chain and published the release (only then may the
    model version be tagged verified and made production, as before).
    """
    sink = sink_for(spec, workspace, pipeline, verified=lambda _run_dir: published)
    t0 = time.perf_counter()
    try:
        with _store_lock(workspace):
            result = sink.sync(run_dir)
    except LineageError as e:
        _record(run_dir, {"logged": False, "error": e.message})
        say(f"WARNING: {e.message}\n  {e.hint}")
        return Logged(f"NOT logged ({e.hint})", None)
    seconds = time.perf_counter() - t0
    if result is None:
        return Logged("disabled in the config", None)
    _record(
        run_dir,
        {
            "logged": True,
            "tracking_uri": result.tracking_uri,
            "parent_run_id": result.parent_run_id,
            "model_version": result.model_version,
            "production_alias": result.alias_set,
        },
    )
    alias = ", alias production" if result.alias_set else ""
    version = f", model version {result.model_version}{alias}" if result.model_version else ""
    return Logged(f"{result.tracking_uri} (MLflow run {result.parent_run_id}{version})", seconds)


def _record(run_dir: Path, lineage: dict[str, object]) -> None:
    record = RunRecord(run_dir / RUN_RECORD)
    if record.path.is_file():  # a run refused before run.json existed has nothing to update
        record.update(lineage=lineage)


class _store_lock:
    """An exclusive flock on the workspace's lineage lock: two runs finishing together would
    otherwise race on the SQLite store (and its first-use schema migration)."""

    def __init__(self, workspace: Path) -> None:
        self.path = workspace / LOCK_NAME
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)  # releases the lock


@dataclass(frozen=True)
class Pending:
    """A detached lineage log: where it will appear, and its process (to wait for)."""

    tracking_uri: str
    experiment: str
    log: Path
    process: subprocess.Popen[bytes]

    def describe(self, shown: Callable[[Path], str] = str) -> str:
        return (
            f"logging in the background to {self.tracking_uri}, experiment "
            f"'{self.experiment}' (log {shown(self.log)}; run.json's lineage field records "
            "the MLflow run when it is done; run --wait-lineage waits for it)"
        )

    def wait(self, timeout: float = WAIT_SECONDS) -> int:
        return self.process.wait(timeout)


def spawn(
    run_dir: Path, workspace: Path, spec: LineageSpec, pipeline: str, *, published: bool
) -> Pending:
    """Start the detached lineage process for a finished run; returns without waiting.

    It is started like the CLI (isolated, its environment checked first), in a new session so
    Ctrl-C or the terminal closing after `run` returns does not cut it off.
    """
    from pipeline import envmanifest

    log = run_dir / LOG_NAME
    log.parent.mkdir(exist_ok=True)
    command = [
        *envmanifest.isolated_command(sys.executable),
        "lineage",
        "detached",
        str(run_dir),
        "--workspace",
        str(workspace),
        *(["--published"] if published else []),
    ]
    with open(log, "ab") as out, open(os.devnull, "rb") as devnull:
        process = subprocess.Popen(
            command,
            stdin=devnull,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workspace,
            start_new_session=True,
            close_fds=True,
        )
    return Pending(
        resolve_tracking_uri(spec.tracking_uri or DEFAULT_TRACKING_URI, workspace),
        spec.experiment or pipeline,
        log,
        process,
    )


def log_detached(run_dir: Path, workspace: Path, *, published: bool) -> str:
    """The detached process's work: log RUN to MLflow, record the outcome in run.json.

    Whatever stops it (MLflow down, a run directory it cannot read) is recorded as
    `lineage: {logged: false, error}`, since no one sees this process's exit code.
    """
    run_dir = run_dir.resolve()
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 (into the log file)
    try:
        spec, pipeline = _recorded_spec(run_dir)
        if published:
            # The flag is only the runner's word, and anyone can start this command: the
            # alias moves only for a run whose chain and release verify now, as `lineage
            # sync` asks (off the critical path, so the second verify costs nobody a wait).
            from pipeline.release.verify import verified_release

            published = verified_release(run_dir, workspace)
        logged = record_lineage(run_dir, spec, workspace, pipeline, published=published, say=say)
    except Error as e:
        _record(run_dir, {"logged": False, "error": e.message})
        raise
    return f"lineage: {logged.summary}"


def _recorded_spec(run_dir: Path) -> tuple[LineageSpec, str]:
    from pydantic import ValidationError

    from pipeline.lineage import recorded_config

    config = recorded_config(run_dir)
    name = config.get("name")
    if not isinstance(name, str):
        raise InputError(f"{run_dir / 'config.yaml'}: name: missing or not text")
    try:
        return LineageSpec.model_validate(config.get("lineage") or {}), name
    except ValidationError as e:
        raise InputError(f"{run_dir / 'config.yaml'}: lineage: {e}") from e


def wait_for_lineage(run_dir: Path, timeout: float = WAIT_SECONDS) -> dict[str, object]:
    """Wait until run.json records the lineage outcome (for tools that read MLflow next)."""
    path = run_dir / RUN_RECORD
    deadline = time.monotonic() + timeout
    while True:
        try:
            lineage = json.loads(path.read_text(encoding="utf-8")).get("lineage")
        except (OSError, ValueError):
            lineage = None
        if isinstance(lineage, dict):
            return lineage
        if time.monotonic() > deadline:
            raise InputError(
                f"{path} records no lineage after {timeout:.0f} s",
                hint=f"read {run_dir / LOG_NAME}; `chainproof lineage sync {run_dir}` logs it",
            )
        time.sleep(0.2)
