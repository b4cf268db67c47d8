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

protocol.py owns the wire (the job, the frames, their caps), messages.py the runner's checks
of a worker's answers, launch.py the runner's side (`execute`), worker.py the worker's
(`serve`); what callers and tests use is re-exported here.
"""

from __future__ import annotations

from pipeline.runner.remote.launch import (
    DEFAULT_CHECKOUT,
    REPORT_WAIT,
    STOP_GRACE,
    Cluster,
    Launched,
    RemoteStarted,
    build_job,
    cluster_of,
    execute,
    job_files,
)
from pipeline.runner.remote.messages import (
    Report,
    check_ready,
    check_report,
    differences,
    printable,
)
from pipeline.runner.remote.protocol import (
    CHUNK,
    JOB_MAGIC,
    MAX_DIFF_LINES,
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_HEADER,
    MAX_JOB_BYTES,
    MAX_LINE,
    MAX_LOG,
    MAX_MESSAGE,
    MAX_PAYLOAD,
    MSG_MAGIC,
    PROTOCOL,
    START,
    Job,
    JobFile,
    JobRefused,
    Reader,
    ReportRefused,
    check_path,
    frame,
    parse_header,
    read_job,
    split_frame,
    write_all,
    write_job,
)
from pipeline.runner.remote.worker import GRACE, JOB_WAIT, Aborted, serve

__all__ = [
    "CHUNK",
    "DEFAULT_CHECKOUT",
    "GRACE",
    "JOB_MAGIC",
    "JOB_WAIT",
    "MAX_DIFF_LINES",
    "MAX_FILE_BYTES",
    "MAX_FILES",
    "MAX_HEADER",
    "MAX_JOB_BYTES",
    "MAX_LINE",
    "MAX_LOG",
    "MAX_MESSAGE",
    "MAX_PAYLOAD",
    "MSG_MAGIC",
    "PROTOCOL",
    "REPORT_WAIT",
    "START",
    "STOP_GRACE",
    "Aborted",
    "Cluster",
    "Job",
    "JobFile",
    "JobRefused",
    "Launched",
    "Reader",
    "RemoteStarted",
    "Report",
    "ReportRefused",
    "build_job",
    "check_path",
    "check_ready",
    "check_report",
    "cluster_of",
    "differences",
    "execute",
    "frame",
    "job_files",
    "parse_header",
    "printable",
    "read_job",
    "serve",
    "split_frame",
    "write_all",
    "write_job",
]
