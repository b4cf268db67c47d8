"""The runner's checks of what a remote worker answers: its `ready` (or refusal) and its final
report, each for this worker and this job, in the chief's environment, within bounds."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from pipeline.envcheck import Fingerprint
from pipeline.errors import EnvironmentDrift
from pipeline.provenance.workers import SAME_ENVIRONMENT
from pipeline.runner.remote.protocol import MAX_DIFF_LINES, MAX_LOG, ReportRefused

_FINGERPRINT = {f.name: f.type for f in dataclasses.fields(Fingerprint)}
_TYPES: dict[Any, type] = {"str": str, "int": int, str: str, int: int}


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
