"""Up to date: when the run that made the latest release would be reproduced stage for stage,
and its release still verifies, `run` makes no new run and says so (`dvc repro` on an unchanged
pipeline). Nothing is trusted for being there: every question a run would ask is asked again.

The latest succeeded run R is current when all of these hold:
- the config file is byte-identical to R's, the chainproof code digest is R's, and R's layout
  was signed by this runner (a pre-signed `--layout` always makes a run);
- every stage but the publishing one is reusable, by the same checks as `run` (runner/reuse.py:
  signature, command, spec, materials, lock, code, sandbox, products re-hashed), from R itself;
- today's dependency scan says exactly what R's signed one said (the database, the findings),
  apart from when it was started: a new advisory or database makes a new release;
- R's chain verifies, and its published bundle verifies offline under this run's owner key
  (signatures, expiry at least a day away, the OpenSSF model signature, every file re-hashed),
  and its layout names the release key a new run would (a rotated key makes a new release).

R is the run of the newest release directory, which `latest` names: a run.json (unsigned)
never chooses the bundle, its path or which run is newest.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError, VerificationError
from pipeline.provenance.keys import PublicKey, load_public_key
from pipeline.provenance.statements import read_verified_statement
from pipeline.runner.bundlecheck import BundleCheck, newest_release, verified_bundle
from pipeline.runner.reuse import earlier_runs
from pipeline.workspace import DEPENDENCIES, Workspace, read_run_record

if TYPE_CHECKING:
    from pipeline.codedigest import CodeManifest
    from pipeline.config import PipelineConfig
    from pipeline.provenance.chain import VerifyReport
    from pipeline.runner.sandbox import Sandbox


MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")  # what run.json's lineage may name, to be printed


@dataclass(frozen=True)
class Current:
    """The run whose release is still what this config would give, and how each stage maps."""

    run_id: str
    run_dir: Path
    release: Path
    report: VerifyReport  # R's chain, verified just now (its bundle too, offline)
    stages: dict[str, dict[str, str]]  # stage -> {run_id, link}: R's own links
    lineage: Any  # R's run.json lineage field (the MLflow run, or why it was not logged)


def _scan_outcome(stmt: dict[str, Any]) -> Any:
    """A dependency-scan Statement without the one field every run changes (its start time)."""
    predicate = dict(stmt.get("predicate") or {})
    metadata = dict(predicate.get("metadata") or {})
    metadata.pop("scanStartedOn", None)
    predicate["metadata"] = metadata
    return {**stmt, "predicate": predicate}


def latest_current(
    config: PipelineConfig,
    ws: Workspace,
    *,
    code: CodeManifest,
    owner: PublicKey,
    functionary: PublicKey,
    release_key: PublicKey | None,
    dependency_statement: dict[str, Any],
    sandbox: bool | Sandbox,
    bundle_check: BundleCheck | None = None,
) -> Current | None:
    """The current run (see the module's doc), or None: then `run` runs, reusing what it can.

    R is found from the releases, never from an unsigned run.json: the newest release
    directory of the pipeline, a real directory that its `latest` alias names. The bundle's
    verification is `bundle_check`'s, when it was started for R (see BundleCheck)."""
    from pipeline.release.verify import verify_run
    from pipeline.runner.status import stage_status

    if config.release_version:  # one fixed version, rewritten by every run: always run
        return None
    releases = ws.root / config.release_dir / config.name
    run_id = newest_release(releases)
    if run_id is None or not _nothing_newer(ws, run_id):
        return None
    run_dir, bundle = ws.runs / run_id, releases / run_id
    try:
        if not stat.S_ISDIR(os.lstat(run_dir).st_mode):
            return None
        record = read_run_record(run_dir)
        if load_public_key(ws.keys / "owner.pub").keyid != owner.keyid:
            return None  # verify_run trusts the workspace's owner key: it must be this run's
    except (InputError, OSError):
        return None
    names = [s.name for s in config.stages]
    if (
        record.get("status") != "succeeded"
        or record.get("release") != str(bundle)
        or record.get("config_sha256") != config.sha256
        or record.get("stages") != names
        or record.get("layout_signed_by") != "runner"
        or (record.get("code") or {}).get("sha256") != code.sha256
    ):
        return None
    try:
        earlier = read_verified_statement(run_dir / DEPENDENCIES, [functionary])
    except (VerificationError, InputError, OSError):
        return None
    if _scan_outcome(earlier) != _scan_outcome(dependency_statement):
        return None
    report = stage_status(config, ws, sandbox=sandbox, code=code)
    if report.functionary != functionary.keyid:
        return None
    stages: dict[str, dict[str, str]] = {}
    for stage, verdict in zip(config.stages, report.verdicts, strict=True):
        if stage.impl.publishes:
            continue
        if verdict.earlier is None or verdict.earlier.run_id != run_id:
            return None
        stages[stage.name] = verdict.earlier.record(ws.root)
    try:
        run = verify_run(run_dir, workspace=ws.root)
    except (VerificationError, InputError, OSError):
        return None
    if run.run_id != run_id:
        return None
    if bundle_check is not None and bundle_check.run_id == run_id:
        released = bundle_check.result()
    else:
        released = verified_bundle(bundle, owner.keyid, run_id)
    want = sorted([release_key.keyid] if release_key is not None else [])
    if (
        released is None
        or released.get("run_id") != run_id
        or released.get("owner") != owner.keyid
        or released.get("release_keys") != want  # a new (or dropped) release key
        or _expires_soon(str(released.get("expires")))
    ):
        return None
    return Current(run_id, run_dir, bundle, run, stages, record.get("lineage"))


def _nothing_newer(ws: Workspace, run_id: str) -> bool:
    """No later run that is under way, or whose record cannot be read (one starting now):
    a later run that finished without a release (it failed) does not hide R."""
    for other in earlier_runs(ws):
        if other <= run_id:
            return True
        try:
            if read_run_record(ws.runs / other).get("status") in (None, "running"):
                return False
        except (InputError, OSError):
            return False
    return True


def _expires_soon(expires: str) -> bool:
    """Within a day of the layout's expiry a new run is made (with a fresh layout), so the
    release named "up to date" is not one that stops verifying minutes later."""
    try:
        when = datetime.fromisoformat(str(expires).replace("Z", "+00:00"))
    except ValueError:
        return True
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when - datetime.now(UTC) < timedelta(days=1)
