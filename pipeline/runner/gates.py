"""Release gates the runner applies around the stages, each recorded as a signed Statement.

Dependencies: before any stage starts, every lock the pipeline uses is scanned, transitive
dependencies included, against the offline OSV store under the config's policy. A violation
refuses the run, naming the advisory and its dependency path. The result (database digest
and date, lock digests, findings, allowlist applied) becomes `checks/dependencies.intoto.json`
in the run, a material of the deploy step: `verify` proves which database a release was
checked against. Where no database exists nothing pretends: the Statement says "not scanned".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.hashing import sha256_file
from pipeline.provenance.keys import PublicKey
from pipeline.provenance.statements import statement
from pipeline.scan import deps
from pipeline.scan.data.attest import data_screen_statement, recheck_data_screen
from pipeline.scan.vex import VexRejected, VexStatement
from pipeline.scan.vex import load_all as load_vex_all
from pipeline.scan.vulndb import ScanUnavailable
from pipeline.scan.vulns import (
    BY_VERSION,
    AcceptName,
    AllowEntry,
    Finding,
    LookalikeFinding,
    Policy,
    ScanResult,
    VulnerabilitiesFound,
    evaluate,
    scan,
)
from pipeline.workspace import CANDIDATE, CHECKS_DIR, DATA, DEPENDENCIES, MODELS

if TYPE_CHECKING:  # annotations only: the deploy stage imports this module and never a config
    from pipeline.config import DependencyPolicySpec

__all__ = [  # re-exported for stages
    "CANDIDATE",
    "CHECKS_DIR",
    "DATA",
    "DEPENDENCIES",
    "MODELS",
    "data_screen_statement",
    "recheck_data_screen",
]
VULNS_PREDICATE = "https://in-toto.io/attestation/vulns/v0.2"
SCANNER_URI = "https://github.com/chainproof/chainproof#scan-deps"


@dataclass(frozen=True)
class DependencyGate:
    statement: dict[str, Any]
    scanned: bool
    summary: str
    warnings: tuple[str, ...]


def policy_from_spec(
    spec: DependencyPolicySpec, workspace: Path, vex_keys: Sequence[PublicKey] = ()
) -> Policy:
    """The scan policy of a validated config: the spec was checked once, when it was loaded.

    VEX documents are verified here against `vex_keys` (the owner's); one that does not verify
    is kept as rejected, to be shown, and silences nothing.
    """
    statements: tuple[VexStatement, ...] = ()
    rejected: tuple[VexRejected, ...] = ()
    if spec.vex:
        paths = [p if p.is_absolute() else workspace / p for p in map(Path, spec.vex)]
        if vex_keys:
            statements, rejected = load_vex_all(paths, vex_keys)
        else:
            rejected = tuple(VexRejected(str(p), "no trusted owner key to check it") for p in paths)
    return Policy(
        threshold=spec.severity,
        allow=tuple(AllowEntry(id=a.id, reason=a.reason, expires=a.expires) for a in spec.allow),
        accept_names=tuple(
            AcceptName(name=a.name, reason=a.reason, expires=a.expires)
            for a in spec.accept_lookalikes
        ),
        vex=statements,
        vex_rejected=rejected,
    )


def check_dependencies(
    locks: list[Path],
    spec: DependencyPolicySpec,
    workspace: Path,
    *,
    today: date | None = None,
    vex_keys: Sequence[PublicKey] = (),
) -> DependencyGate:
    """Scan `locks` under the config's policy. Raises VulnerabilitiesFound on a violation and
    ScanUnavailable when a scan is required but no database can be read.

    Known-malicious packages (by name and version, or by file hash) and look-alike names that
    the policy does not accept are violations whatever the severity threshold."""
    db = Path(spec.database)
    db = db if db.is_absolute() else workspace / db
    today = today or datetime.now(UTC).date()
    subjects = {p.name: sha256_file(p) for p in locks}
    policy = policy_from_spec(spec, workspace, vex_keys)
    base = {
        "scanner": {"uri": SCANNER_URI, "version": "1", "result": []},
        "metadata": {"scanStartedOn": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
    }
    if not db.is_file():
        if spec.required:
            raise ScanUnavailable(
                f"the config requires a dependency scan, but there is no database at {db}",
                hint="import one: chainproof vulndb import PATH (or vulndb update)",
            )
        predicate = {
            **base,
            "chainproof": {
                "scanned": False,
                "verdict": "not scanned",
                "reason": f"no database at {db}",
            },
        }
        loud = (
            f"DEPENDENCIES WERE NOT SCANNED: no vulnerability database at {db}. "
            "Import one with `chainproof vulndb import PATH`; the release records 'not scanned'."
        )
        return DependencyGate(
            statement(subjects, VULNS_PREDICATE, predicate), False, "not scanned", (loud,)
        )

    max_age = timedelta(days=spec.max_age_days)
    results: list[ScanResult] = []
    violations: list[tuple[Path, Finding, ScanResult]] = []
    warnings: list[str] = []
    per_lock: list[dict[str, Any]] = []
    look_violations: list[tuple[Path, LookalikeFinding, ScanResult]] = []
    warnings += [f"VEX document {r.document} ignored: {r.reason}" for r in policy.vex_rejected]
    for lock in locks:
        result = scan(deps.from_lock(lock), db, max_age=max_age)
        ev = evaluate(result, policy, today)
        results.append(result)
        if result.stale:
            warnings.append(result.stale.message())
        for entry in ev.expired:
            warnings.append(
                f"allowlist entry {entry.id} expired on {entry.expires}: it allows nothing now"
            )
        for s in ev.vex_expired:
            warnings.append(
                f"VEX statement for {s.vulnerability} in {s.package} expired on {s.expires}: "
                "it silences nothing now"
            )
        violations += [(lock, f, result) for f in ev.violations]
        look_violations += [(lock, lf, result) for lf in ev.lookalike_violations]
        per_lock.append(
            {
                "lock": lock.name,
                "sha256": subjects[lock.name],
                "packages": result.scanned,
                "findings": [
                    {
                        "id": f.id,
                        "aliases": sorted(f.advisory.aliases),
                        "package": f.package,
                        "version": f.version,
                        "severity": f.severity.rating,
                        "malicious": f.malicious,
                        "matched_by": f.matched_by,
                        "paths": [deps.format_path(p, result.graph) for p in f.paths],
                    }
                    for f in result.findings
                ],
                "lookalikes": [
                    {
                        "package": lf.package,
                        "version": lf.lookalike.version,
                        "resembles": lf.lookalike.resembles,
                        "how": lf.lookalike.how,
                    }
                    for lf in result.lookalikes
                ],
                "lookalike_violations": [lf.package for lf in ev.lookalike_violations],
                "lookalikes_accepted": [
                    {"name": lf.package, "reason": a.reason, "expires": a.expires.isoformat()}
                    for lf, a in ev.lookalikes_accepted
                ],
                "not_affected": [
                    {"id": f.id, **s.as_dict(), "version": f.version} for f, s in ev.not_affected
                ],
                "violations": [f.id for f in ev.violations],
                "allowed": [
                    {
                        "id": f.id,
                        "entry": e.id,
                        "reason": e.reason,
                        "expires": e.expires.isoformat(),
                    }
                    for f, e in ev.allowed
                ],
                "expired_entries": [e.id for e in ev.expired],
            }
        )
    if violations or look_violations:
        lines = []
        for lock, f, result in violations:
            path = deps.format_path(f.paths[0], result.graph) if f.paths else f.package
            what = "MALICIOUS" if f.malicious else f.severity.rating
            how = f" (matched by {f.matched_by})" if f.matched_by != BY_VERSION else ""
            lines.append(f"{f.id} ({what}) in {f.package} {f.version}{how} [{lock.name}]: {path}")
        for lock, lf, result in look_violations:
            path = deps.format_path(lf.paths[0], result.graph) if lf.paths else lf.package
            lines.append(
                f"look-alike name {lf.package} resembles {lf.lookalike.resembles} "
                f"({lf.lookalike.how}) [{lock.name}]: {path}"
            )
        raise VulnerabilitiesFound(
            "refusing to run: the dependency policy is violated:\n    " + "\n    ".join(lines),
            hint="remove a malicious or look-alike package (and rotate secrets it could read); "
            "upgrade the direct requirement named in the path (chainproof deps fix, make "
            "upgrade); or add an allowlist entry, an accept_lookalikes entry or a signed VEX "
            "statement, each with a reason and an expiry, to security.dependencies",
        )
    info = results[0].db
    scanner_result = [
        {"id": f["id"], "severity": [{"method": "osv", "score": f["severity"]}]}
        for lock in per_lock
        for f in lock["findings"]
    ]
    predicate = {
        "scanner": {
            "uri": SCANNER_URI,
            "version": "1",
            "db": {
                "uri": info.source,
                "version": info.digest,
                "lastUpdate": info.newest_modified or info.imported_at,
            },
            "result": scanner_result,
        },
        "metadata": base["metadata"],
        "chainproof": {
            "scanned": True,
            "verdict": "pass",
            "database": {
                "sha256": info.digest,
                "records": info.records,
                "newest_modified": info.newest_modified,
                "imported_at": info.imported_at,
                "malicious_records": info.malicious,
                "malicious_file_hashes": info.file_hashes,
            },
            "policy": {
                "severity": policy.threshold,
                "unknown_severity_fails": True,
                "malicious_always_fails": True,
                "lookalike_reference": results[0].popular_source,
                "vex_documents": sorted({s.document_sha256 for s in policy.vex}),
            },
            "locks": per_lock,
        },
    }
    n = sum(len(lock["findings"]) for lock in per_lock)
    allowed = sum(len(lock["allowed"]) for lock in per_lock)
    vexed = sum(len(lock["not_affected"]) for lock in per_lock)
    accepted = sum(len(lock["lookalikes_accepted"]) for lock in per_lock)
    summary = (
        f"scanned {sum(lock['packages'] for lock in per_lock)} packages in {len(locks)} lock(s) "
        f"against {info.records} OSV records ({info.malicious} malicious-package records; "
        f"db sha256 {info.digest[:12]}…): {n} finding(s), {allowed} allowed, "
        f"{vexed} not affected (signed VEX), {accepted} look-alike name(s) accepted, "
        "0 violations"
    )
    return DependencyGate(
        statement(subjects, VULNS_PREDICATE, predicate), True, summary, tuple(warnings)
    )


def recheck(stmt: dict[str, Any], *, required: bool, today: date | None = None) -> str:
    """Deploy's second look at the signed scan result; returns a one-line verdict.

    Raises VulnerabilitiesFound when the scan is missing but required, a violation is recorded,
    or an allowlist entry, a look-alike acceptance or a VEX statement that let a finding
    through has expired since the scan. The verdict names every VEX statement relied on.
    """
    today = today or datetime.now(UTC).date()
    cp = stmt.get("predicate", {}).get("chainproof", {})
    if not cp.get("scanned"):
        if required:
            raise VulnerabilitiesFound("the dependency scan is required but was not done")
        return "dependencies NOT scanned (no database; allowed by the config)"
    vexed: list[str] = []
    for lock in cp.get("locks", []):
        if lock.get("violations") or lock.get("lookalike_violations"):
            raise VulnerabilitiesFound(
                f"recorded violations in {lock['lock']}: "
                f"{[*lock.get('violations', []), *lock.get('lookalike_violations', [])]}"
            )
        for a in lock.get("allowed", []):
            _still_valid(a.get("expires"), today, f"allowlist entry {a['entry']} for {a['id']}")
        for a in lock.get("lookalikes_accepted", []):
            _still_valid(a.get("expires"), today, f"acceptance of look-alike name {a['name']}")
        for v in lock.get("not_affected", []):
            what = f"VEX statement (not_affected) for {v['id']} in {v['package']}"
            _still_valid(v.get("expires"), today, what)
            vexed.append(
                f"{v['id']} in {v['package']} {v.get('version')} not affected "
                f"({v.get('justification') or v.get('impact_statement')}; signed by "
                f"{str(v.get('signer', ''))[:12]}…, until {v['expires']})"
            )
    db = cp.get("database", {})
    verdict = f"dependencies scanned against db sha256 {str(db.get('sha256', ''))[:12]}…: pass"
    if vexed:
        verdict += "; signed VEX: " + "; ".join(vexed)
    return verdict


def _still_valid(expires: object, today: date, what: str) -> None:
    try:
        until = date.fromisoformat(str(expires))
    except ValueError:
        raise VulnerabilitiesFound(f"{what} has no valid expiry ({expires!r})") from None
    if until < today:
        raise VulnerabilitiesFound(
            f"{what} expired on {until} since the scan",
            hint="re-run the pipeline (the gate re-scans) after fixing or renewing it",
        )


# --------------------------------------------------------------------------- model files

MODEL_SCAN_PREDICATE = "https://chainproof.dev/attestation/model-scan/v1"
MODEL_SUFFIXES = (
    ".keras",
    ".h5",
    ".hdf5",
    ".pkl",
    ".pickle",
    ".pt",
    ".pth",
    ".bin",
    ".joblib",
    ".npy",
    ".npz",
    ".safetensors",
)


def model_candidates(stage_dir: Path) -> list[Path]:
    """Files and SavedModel directories in a stage's products that a loader could execute."""
    found: list[Path] = []
    saved = sorted(p.parent for p in stage_dir.rglob("saved_model.pb"))
    found += saved
    for path in sorted(stage_dir.rglob("*")):
        if (
            path.is_file()
            and path.suffix in MODEL_SUFFIXES
            and not any(s in path.parents for s in saved)
        ):
            found.append(path)
    return found


def scan_models(stage: str, stage_dir: Path, run_dir: Path, fail_on: str) -> list[dict[str, Any]]:
    """Scan a stage's model-like products; raise UnsafeModelError at or above `fail_on`."""
    from pipeline.scan.model import UnsafeModelError, scan_path

    results = []
    for target in model_candidates(stage_dir):
        report = scan_path(target)
        if not report.ok(fail_on):
            raise UnsafeModelError(report, fail_on)
        results.append(
            {
                "stage": stage,
                "path": target.relative_to(run_dir).as_posix(),
                "files": [f.to_dict() for f in report.files],
                "findings": [f.to_dict() for f in report.findings],
                "max_severity": (
                    report.max_severity.label if report.findings and report.max_severity else "none"
                ),
            }
        )
    return results


def model_scan_statement(results: list[dict[str, Any]], fail_on: str) -> dict[str, Any]:
    subjects = {}
    for r in results:
        for f in r["files"]:
            if f.get("sha256"):
                name = r["path"] if r["path"].endswith(f["path"]) else f"{r['path']}/{f['path']}"
                subjects[name] = f["sha256"]
    predicate = {
        "scanner": {"uri": "https://github.com/chainproof/chainproof#scan-model", "version": "1"},
        "policy": {"fail_on": fail_on},
        "verdict": "pass",
        "scanned": results,
    }
    return statement(subjects, MODEL_SCAN_PREDICATE, predicate)
