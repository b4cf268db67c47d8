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
- R's chain verifies, and its published bundle verifies offline under the workspace's owner key
  (signatures, expiry, every file of the bundle re-hashed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError, VerificationError
from pipeline.provenance.keys import PublicKey
from pipeline.provenance.statements import read_verified_statement
from pipeline.runner.reuse import earlier_runs
from pipeline.workspace import DEPENDENCIES, Workspace, read_run_record

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.provenance.chain import VerifyReport


@dataclass(frozen=True)
class Current:
    """The run whose release is still what this config would give, and how each stage maps."""

    run_id: str
    run_dir: Path
    release: Path
    report: VerifyReport  # the bundle's offline verification, just done
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
    code_sha256: str,
    functionary: PublicKey,
    dependency_statement: dict[str, Any],
    sandbox: bool,
) -> Current | None:
    """The current run (see the module's doc), or None: then `run` runs, reusing what it can."""
    from pipeline.release.verify import verify_bundle, verify_run
    from pipeline.runner.status import stage_status

    run_id = _latest_succeeded(ws)
    if run_id is None:
        return None
    run_dir = ws.runs / run_id
    try:
        record = read_run_record(run_dir)
    except (InputError, OSError):
        return None
    names = [s.name for s in config.stages]
    release = record.get("release")
    if (
        record.get("config_sha256") != config.sha256
        or record.get("stages") != names
        or record.get("layout_signed_by") != "runner"
        or (record.get("code") or {}).get("sha256") != code_sha256
        or not isinstance(release, str)
        or not release
    ):
        return None
    try:
        earlier = read_verified_statement(run_dir / DEPENDENCIES, [functionary])
    except (VerificationError, InputError, OSError):
        return None
    if _scan_outcome(earlier) != _scan_outcome(dependency_statement):
        return None
    report = stage_status(config, ws, sandbox=sandbox)
    stages: dict[str, dict[str, str]] = {}
    for stage, verdict in zip(config.stages, report.verdicts, strict=True):
        if stage.impl.publishes:
            continue
        if verdict.earlier is None or verdict.earlier.run_id != run_id:
            return None
        stages[stage.name] = verdict.earlier.record(ws.root)
    bundle = Path(release)
    try:
        run = verify_run(run_dir, workspace=ws.root)
        released = verify_bundle(
            bundle,
            local_owner=ws.keys / "owner.pub",
            expected_version=bundle.name,
            # it verified when this workspace published it; the manifest re-hashes its bytes
            recheck_model_signature=False,
        )
    except (VerificationError, InputError, OSError):
        return None
    if released.run_id != run.run_id or run.run_id != run_id:
        return None
    return Current(run_id, run_dir, bundle, released, stages, record.get("lineage"))


def _latest_succeeded(ws: Workspace) -> str | None:
    """The newest run of the workspace that finished; a later failed attempt does not count."""
    for run_id in earlier_runs(ws):
        try:
            status = read_run_record(ws.runs / run_id).get("status")
        except (InputError, OSError):
            continue
        if status == "succeeded":
            return run_id
        if status == "running":  # another run is under way here: not a question to answer now
            return None
    return None
