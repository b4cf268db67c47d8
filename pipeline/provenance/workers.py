"""The check on distributed steps: every training worker the layout pins is in its step's link,
ran in the step's environment, exited 0, and its logs on disk are the ones it signed.

A worker record is whatever the runner signed, read here as hostile data: every field is
type-checked before it is compared, so a malformed record is a named verification failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import VerificationError
from pipeline.hashing import hash_files

if TYPE_CHECKING:
    from in_toto.models.link import Link

    from pipeline.provenance.chain import VerifyReport

CHECK = "workers"
# The fields that make two environments the same lock's, on the same kind of machine.
SAME_ENVIRONMENT = (
    "lock_sha256",
    "distributions_sha256",
    "manifest_sha256",
    "python",
    "implementation",
    "machine",
)
# A worker's system metrics (sampled by the runner), when recorded: checked on disk like its logs.
METRICS_KEY = "system-metrics"
MAX_WORKERS = 1024  # a bound on what a record may claim before anything iterates it


def _fail(message: str, step: str, rule: str, **kw: Any) -> VerificationError:
    return VerificationError(message, check=CHECK, step=step, rule=rule, **kw)


def _log(record: dict[str, Any], which: str, step: str, index: int) -> tuple[str, str]:
    entry = record.get(which)
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("path"), str)
        or not isinstance(entry.get("sha256"), str)
        or not entry["path"].startswith("logs/")
        or ".." in Path(entry["path"]).parts
    ):
        raise _fail(
            f"step '{step}': worker {index} records no valid {which} log digest",
            step,
            f"every worker's {which} log digest is recorded",
        )
    return entry["path"], entry["sha256"]


def verify_workers(
    reduced: dict[str, Link], report: VerifyReport, disk_root: Path | None = None
) -> None:
    """Per distributed step: as many worker records as the layout pins, indices 0..N-1 once
    each, every one exited 0 in the step's own environment, worker 0 is the link's own
    process; with `disk_root`, each worker log present there matches its signed digest."""
    pinned = dict(report.pins.workers) if report.pins is not None else {}
    checked = 0
    logs: dict[str, tuple[str, str, int]] = {}  # run-relative path -> (sha256, step, worker)
    for step, link in reduced.items():
        records = link.byproducts.get("workers")
        want = pinned.get(step)
        if records is None and want is None:
            continue
        if want is None:
            raise _fail(
                f"step '{step}' records training workers, but the layout pins none for it",
                step,
                "workers only where the owner's layout pins them",
            )
        if not isinstance(records, list) or len(records) != want:
            got = len(records) if isinstance(records, list) else "no"
            raise _fail(
                f"step '{step}' records {got} worker(s); the layout pins {want}",
                step,
                "every pinned worker is in the link",
            )
        if want > MAX_WORKERS or not all(isinstance(r, dict) for r in records):
            raise _fail(f"step '{step}': malformed worker records", step, "worker records")
        indices = sorted(r.get("index") for r in records if isinstance(r.get("index"), int))
        if indices != list(range(want)):
            raise _fail(
                f"step '{step}': worker indices {indices} are not 0..{want - 1} once each",
                step,
                "one record per worker",
            )
        env = link.environment
        for r in records:
            i = r["index"]
            if r.get("return-value") != 0:
                raise _fail(
                    f"step '{step}': worker {i} recorded return value {r.get('return-value')!r}",
                    step,
                    "every worker's return-value == 0",
                )
            wenv = r.get("environment")
            if not isinstance(wenv, dict):
                raise _fail(f"step '{step}': worker {i} records no environment", step, "env")
            for key in SAME_ENVIRONMENT:
                if wenv.get(key) != env.get(key):
                    raise _fail(
                        f"step '{step}': worker {i} ran with {key} {str(wenv.get(key))[:16]}…, "
                        f"the step with {str(env.get(key))[:16]}…",
                        step,
                        "every worker ran in the step's locked environment",
                    )
            for which in ("stdout", "stderr"):
                path, sha = _log(r, which, step, i)
                if i == 0 and link.byproducts.get(which, {}).get("sha256") != sha:
                    raise _fail(
                        f"step '{step}': worker 0's {which} log is not the step's own",
                        step,
                        "worker 0 is the step's own process",
                    )
                logs[path] = (sha, step, i)
            if METRICS_KEY in r:
                path, sha = _log(r, METRICS_KEY, step, i)
                logs[path] = (sha, step, i)
        checked += want
    if disk_root is not None and logs:
        root = disk_root.resolve()
        present = {
            p: disk_root / p
            for p in logs
            if (disk_root / p).is_file() and root in (disk_root / p).resolve().parents
        }
        digests = hash_files(present.values())
        for name, file in present.items():
            want_sha, step, i = logs[name]
            if digests[file] != want_sha:
                raise _fail(
                    f"{name} (worker {i} of step '{step}') on disk has sha256 "
                    f"{digests[file][:16]}…, but the link signed {want_sha[:16]}…",
                    step,
                    "worker logs recorded in the signed link",
                    artifact=str(file),
                    hint="the log was changed after it was attested",
                )
    if checked:
        report.passed(
            CHECK, f"{checked} worker(s) pinned by the layout: each exited 0 in its step's lock"
        )
