"""Scan a dependency graph against the offline OSV database, and judge the result by a policy.

`scan` checks every pinned package, direct and transitive, and reports each vulnerability once
(aliases merged) with the paths that pull the package in and the direct requirements that would
have to move. `evaluate` applies a `Policy` (severity threshold + an allowlist whose entries
expire). Renderers: a text table, JSON, CycloneDX 1.6 JSON, SARIF 2.1.0.

Exit codes for the CLI (the errors carry them):
  0  scanned, no finding at or above the threshold (after the allowlist)
  1  findings violate the policy (`VulnerabilitiesFound`)
  2  bad input: an unreadable lock, a bad policy file (`pipeline.errors.InputError`)
  5  could not scan: the database is missing, unreadable or empty (`vulndb.ScanUnavailable`).
     A scan that did not happen is never reported as clean.

Unknown severity (no CVSS v3 vector and no database rating) is never guessed: it fails the
policy at every threshold, because "we do not know how bad" must not pass as "not bad".
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.errors import Error, InputError
from pipeline.scan.deps import DepGraph, format_path, paths_to
from pipeline.scan.osv import RATINGS, Advisory, Severity, match
from pipeline.scan.vulndb import DEFAULT_MAX_AGE, DBInfo, StaleDatabase, VulnDB, check_age

THRESHOLDS = ("low", "medium", "high", "critical")
TOOL = "chainproof"
OSV_URL = "https://osv.dev/vulnerability/"


class VulnerabilitiesFound(Error):
    """The scan found vulnerabilities that the policy does not allow (exit 1)."""

    exit_code = 1


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Finding:
    """One vulnerability in one pinned package, with every path that pulls it in."""

    package: str
    version: str
    advisory: Advisory
    paths: tuple[tuple[tuple[str, str], ...], ...]
    direct: tuple[str, ...]  # the direct requirements whose move would drop or lift it

    @property
    def id(self) -> str:
        return self.advisory.id

    @property
    def severity(self) -> Severity:
        return self.advisory.severity

    @property
    def names(self) -> frozenset[str]:
        """Every identifier this finding answers to (ids and aliases), for allowlists."""
        return frozenset(self.advisory.ids) | frozenset(self.advisory.aliases)


@dataclass(frozen=True)
class ScanResult:
    graph: DepGraph
    db: DBInfo
    findings: tuple[Finding, ...]
    stale: StaleDatabase | None
    scanned_at: str

    @property
    def scanned(self) -> int:
        return len(self.graph.packages)

    @property
    def vulnerable_packages(self) -> tuple[str, ...]:
        return tuple(sorted({f.package for f in self.findings}))


def scan(
    graph: DepGraph,
    db: VulnDB | Path,
    *,
    max_age: timedelta = DEFAULT_MAX_AGE,
    now: datetime | None = None,
) -> ScanResult:
    """Every package of `graph` against `db` (an open VulnDB or the path of a store).

    Raises ScanUnavailable (exit 5) when the store is missing, unreadable or empty.
    """
    if not graph.packages:
        raise InputError(f"{graph.source}: nothing to scan (no pinned packages)")
    if isinstance(db, Path):
        with VulnDB.open(db) as opened:
            return scan(graph, opened, max_age=max_age, now=now)
    now = now or datetime.now(UTC)
    by_package = db.records_for(graph.packages)
    findings = []
    for name, pkg in graph.packages.items():
        advisories = match(by_package.get(name, []), name, pkg.version)
        if not advisories:
            continue
        paths = tuple(tuple(p) for p in paths_to(graph, name))
        direct = tuple(sorted({p[0][0] for p in paths}))
        findings.extend(Finding(name, pkg.version, a, paths, direct) for a in advisories)
    return ScanResult(
        graph=graph,
        db=db.info,
        findings=tuple(findings),
        stale=check_age(db.info, max_age=max_age, now=now),
        scanned_at=now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class AllowEntry:
    """Accept one vulnerability (by id or alias) for a stated reason until `expires` (inclusive)."""

    id: str
    reason: str
    expires: date

    def active(self, today: date) -> bool:
        return today <= self.expires


@dataclass(frozen=True)
class Policy:
    """Findings at or above `threshold` fail unless allowed; unknown severity always fails."""

    threshold: str = "low"
    allow: tuple[AllowEntry, ...] = ()

    def __post_init__(self) -> None:
        if self.threshold not in THRESHOLDS:
            raise InputError(
                f"unknown severity threshold {self.threshold!r}",
                hint=f"use one of {', '.join(THRESHOLDS)}",
            )

    def fails(self, severity: Severity) -> bool:
        if severity.rating not in RATINGS:  # unknown: never let it through unseen
            return True
        return severity.rank >= RATINGS.index(self.threshold)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "policy") -> Policy:
        """`{severity: high, allow: [{id, reason, expires: YYYY-MM-DD}, ...]}`."""
        unknown = set(data) - {"severity", "allow"}
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        entries = data.get("allow") or []
        if not isinstance(entries, list):
            raise InputError(f"{where}: 'allow' must be a list of {{id, reason, expires}}")
        allow = tuple(_allow_entry(e, f"{where}: allow[{i}]") for i, e in enumerate(entries))
        return cls(threshold=str(data.get("severity", "low")).lower(), allow=allow)


def _allow_entry(raw: Any, where: str) -> AllowEntry:
    if not isinstance(raw, Mapping):
        raise InputError(f"{where}: must be a mapping with id, reason, expires")
    missing = [k for k in ("id", "reason", "expires") if not raw.get(k)]
    if missing:
        raise InputError(
            f"{where}: missing {', '.join(missing)}",
            hint="every allowlist entry needs an id, a reason and an expiry date (YYYY-MM-DD)",
        )
    expires = raw["expires"]
    if isinstance(expires, datetime):
        expires = expires.date()
    elif not isinstance(expires, date):
        try:
            expires = date.fromisoformat(str(expires))
        except ValueError as e:
            raise InputError(f"{where}: expires {expires!r} is not a date (YYYY-MM-DD)") from e
    return AllowEntry(id=str(raw["id"]), reason=str(raw["reason"]), expires=expires)


def load_policy(path: Path) -> Policy:
    """A policy from a YAML file (see `Policy.from_mapping` for its shape)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise InputError(f"cannot read policy {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, Mapping):
        raise InputError(f"{path}: a policy is a mapping (severity, allow)")
    return Policy.from_mapping(data, where=str(path))


@dataclass(frozen=True)
class Evaluation:
    violations: tuple[Finding, ...]
    allowed: tuple[tuple[Finding, AllowEntry], ...]
    expired: tuple[AllowEntry, ...]  # past their date: they allow nothing any more
    below_threshold: tuple[Finding, ...]
    policy: Policy = field(default_factory=Policy)

    @property
    def ok(self) -> bool:
        return not self.violations


def evaluate(result: ScanResult, policy: Policy, today: date) -> Evaluation:
    """Sort each finding into violation / allowed / below threshold; list expired entries."""
    active = [e for e in policy.allow if e.active(today)]
    violations, allowed, below = [], [], []
    for f in result.findings:
        if not policy.fails(f.severity):
            below.append(f)
            continue
        names = {n.upper() for n in f.names}  # ids are matched case-insensitively
        entry = next((e for e in active if e.id.upper() in names), None)
        if entry is None:
            violations.append(f)
        else:
            allowed.append((f, entry))
    return Evaluation(
        violations=tuple(violations),
        allowed=tuple(allowed),
        expired=tuple(e for e in policy.allow if not e.active(today)),
        below_threshold=tuple(below),
        policy=policy,
    )


def require_clean(evaluation: Evaluation) -> None:
    """Raise VulnerabilitiesFound when the evaluation has violations."""
    if evaluation.ok:
        return
    n = len(evaluation.violations)
    packages = sorted({f.package for f in evaluation.violations})
    expired = (
        f"; {len(evaluation.expired)} allowlist entry(ies) expired" if evaluation.expired else ""
    )
    raise VulnerabilitiesFound(
        f"{n} vulnerabilit{'y' if n == 1 else 'ies'} at or above severity "
        f"'{evaluation.policy.threshold}' (or of unknown severity) in {', '.join(packages)}"
        f"{expired}",
        hint="upgrade the direct requirements listed, or allowlist an id with a reason and an "
        "expiry date",
    )


# --------------------------------------------------------------------------- renderers


def _fmt_severity(s: Severity) -> str:
    return f"{s.rating} {s.score:.1f}" if s.score is not None else s.rating


def render_table(result: ScanResult, evaluation: Evaluation | None = None) -> str:
    """Human-readable: one row per finding, then its aliases, fix and paths."""
    g, db = result.graph, result.db
    lines = [
        f"scanned {result.scanned} packages from {g.source} ({len(g.roots)} direct) against "
        f"{db.path} ({db.records} OSV records, newest {db.newest_modified or 'unknown'})"
    ]
    if result.stale:
        lines.append(f"warning: {result.stale.message()}")
    if g.unpinned:
        lines.append(f"not scanned (not pinned to a version): {', '.join(g.unpinned)}")
    if not result.findings:
        lines.append("no known vulnerabilities")
        return "\n".join(lines)
    rows = [("PACKAGE", "VERSION", "ID", "SEVERITY", "FIXED IN", "DIRECT REQUIREMENT")]
    for f in result.findings:
        rows.append(
            (
                f.package,
                f.version,
                f.id,
                _fmt_severity(f.severity),
                ", ".join(f.advisory.fixed) or "no fix",
                ", ".join(f.direct),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.append("")
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            continue
        f = result.findings[i - 1]
        if f.advisory.aliases:
            lines.append(f"    aliases: {', '.join(f.advisory.aliases)}")
        if f.advisory.summary:
            lines.append(f"    {f.advisory.summary}")
        for p in f.paths:
            lines.append(f"    path: {format_path(p, g)}")
    n, pk = len(result.findings), len(result.vulnerable_packages)
    lines += ["", f"{n} vulnerabilit{'y' if n == 1 else 'ies'} in {pk} package(s)"]
    if evaluation is not None:
        lines.extend(_render_evaluation(evaluation))
    return "\n".join(lines)


def _render_evaluation(ev: Evaluation) -> list[str]:
    out = [
        f"policy: threshold {ev.policy.threshold} (unknown severity fails): "
        f"{len(ev.violations)} violation(s), {len(ev.allowed)} allowed, "
        f"{len(ev.below_threshold)} below threshold"
    ]
    for f, e in ev.allowed:
        out.append(f"  allowed {f.id} ({f.package}) until {e.expires}: {e.reason}")
    for e in ev.expired:
        out.append(f"  EXPIRED allowlist entry {e.id} (expired {e.expires}): it allows nothing")
    return out


def _finding_dict(f: Finding, graph: DepGraph) -> dict[str, Any]:
    s = f.severity
    return {
        "package": f.package,
        "version": f.version,
        "id": f.id,
        "ids": list(f.advisory.ids),
        "aliases": list(f.advisory.aliases),
        "summary": f.advisory.summary,
        "severity": {"rating": s.rating, "score": s.score, "vector": s.vector, "source": s.source},
        "fixed_versions": list(f.advisory.fixed),
        "direct_requirements": list(f.direct),
        "paths": [[{"name": n, "version": v} for n, v in p] for p in f.paths],
        "paths_text": [format_path(p, graph) for p in f.paths],
    }


def render_json(result: ScanResult, evaluation: Evaluation | None = None) -> str:
    doc: dict[str, Any] = {
        "tool": TOOL,
        "scanned_at": result.scanned_at,
        "source": {"kind": result.graph.kind, "path": result.graph.source},
        "database": result.db.as_dict(),
        "stale": result.stale.message() if result.stale else None,
        "packages_scanned": result.scanned,
        "unpinned": list(result.graph.unpinned),
        "findings": [_finding_dict(f, result.graph) for f in result.findings],
    }
    if evaluation is not None:
        doc["policy"] = {
            "threshold": evaluation.policy.threshold,
            "unknown_severity_fails": True,
            "violations": [f.id for f in evaluation.violations],
            "allowed": [
                {"id": f.id, "entry": e.id, "reason": e.reason, "expires": e.expires.isoformat()}
                for f, e in evaluation.allowed
            ],
            "expired": [
                {"id": e.id, "reason": e.reason, "expires": e.expires.isoformat()}
                for e in evaluation.expired
            ],
            "below_threshold": [f.id for f in evaluation.below_threshold],
        }
    return json.dumps(doc, indent=2, sort_keys=True)


def purl(name: str, version: str) -> str:
    return f"pkg:pypi/{quote(name, safe='')}@{quote(version, safe='')}"


_CDX_METHOD = {"3.0": "CVSSv3", "3.1": "CVSSv31"}


def _cdx_rating(s: Severity) -> dict[str, Any]:
    rating: dict[str, Any] = {"severity": s.rating}
    if s.score is not None:
        rating["score"] = s.score
    if s.vector:
        version = s.vector[5:8]
        rating["method"] = _CDX_METHOD.get(version, "CVSSv4" if version == "4.0" else "other")
        rating["vector"] = s.vector
    return rating


def render_cyclonedx(result: ScanResult) -> str:
    """A CycloneDX 1.6 BOM: every package as a component, the graph, and the vulnerabilities.

    Deterministic: the serial number is derived from the content, the timestamp is the scan's.
    """
    g = result.graph
    refs = {name: purl(name, p.version) for name, p in g.packages.items()}
    components = [
        {"type": "library", "bom-ref": refs[n], "name": n, "version": p.version, "purl": refs[n]}
        for n, p in g.packages.items()
    ]
    dependencies = [
        {"ref": refs[n], "dependsOn": [refs[c] for c in g.requires[n]]} for n in g.packages
    ]
    vulns = [_cdx_vulnerability(f, i, refs, g) for i, f in enumerate(result.findings)]
    body = {"components": components, "dependencies": dependencies, "vulnerabilities": vulns}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, digest)}",
        "version": 1,
        "metadata": {
            "timestamp": result.scanned_at,
            "tools": {"components": [{"type": "application", "name": TOOL}]},
            "properties": [
                {"name": "chainproof:source", "value": g.source},
                {"name": "chainproof:vulndb:digest", "value": result.db.digest},
                {
                    "name": "chainproof:vulndb:newest_modified",
                    "value": result.db.newest_modified or "",
                },
            ],
        },
        **body,
    }
    return json.dumps(bom, indent=2)


def _cdx_vulnerability(
    f: Finding, index: int, refs: Mapping[str, str], graph: DepGraph
) -> dict[str, Any]:
    vuln: dict[str, Any] = {
        "bom-ref": f"vuln-{index}-{f.id}",
        "id": f.id,
        "source": {"name": "OSV", "url": OSV_URL + f.id},
        "references": [
            {"id": other, "source": {"name": "OSV", "url": OSV_URL + other}}
            for other in (*f.advisory.ids[1:], *f.advisory.aliases)
        ],
        "ratings": [_cdx_rating(f.severity)],
        "description": f.advisory.summary or f.id,
        "affects": [
            {"ref": refs[f.package], "versions": [{"version": f.version, "status": "affected"}]}
        ],
        "properties": [
            {"name": "chainproof:path", "value": format_path(p, graph)} for p in f.paths
        ],
    }
    if f.advisory.fixed:
        vuln["recommendation"] = f"upgrade {f.package} to {' or '.join(f.advisory.fixed)}"
    if f.advisory.published:
        vuln["published"] = _rfc3339(f.advisory.published)
    if f.advisory.modified:
        vuln["updated"] = _rfc3339(f.advisory.modified)
    return vuln


def _rfc3339(stamp: str) -> str:
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_SARIF_LEVEL = {
    "critical": "error",
    "high": "error",
    "medium": "warning",
    "low": "note",
    "none": "note",
    "unknown": "warning",
}


def render_sarif(result: ScanResult) -> str:
    """SARIF 2.1.0: one rule per advisory, one result per finding, located at the lock line."""
    g = result.graph
    rules: dict[str, dict[str, Any]] = {}
    results = []
    for f in result.findings:
        if f.id not in rules:
            rules[f.id] = _sarif_rule(f)
        results.append(
            {
                "ruleId": f.id,
                "ruleIndex": list(rules).index(f.id),
                "level": _SARIF_LEVEL.get(f.severity.rating, "warning"),
                "message": {"text": _sarif_message(f, g)},
                "locations": [_sarif_location(f, g)],
                "partialFingerprints": {"chainproof/v1": f"{f.package}@{f.version}:{f.id}"},
            }
        )
    doc = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": TOOL,
                        "informationUri": "https://osv.dev",
                        "rules": list(rules.values()),
                    }
                },
                "results": results,
                "properties": {"vulndb": result.db.digest, "scannedAt": result.scanned_at},
            }
        ],
    }
    return json.dumps(doc, indent=2)


def _sarif_rule(f: Finding) -> dict[str, Any]:
    s = f.severity
    props: dict[str, Any] = {"tags": ["security", "vulnerability", "dependency"]}
    if s.score is not None:
        props["security-severity"] = f"{s.score:.1f}"  # GitHub code scanning reads this
    return {
        "id": f.id,
        "name": f.id.replace("-", ""),
        "shortDescription": {"text": f"{f.id} in {f.package}"},
        "fullDescription": {"text": f.advisory.summary or f.id},
        "helpUri": OSV_URL + f.id,
        "help": {
            "text": f"aliases: {', '.join(f.advisory.aliases) or 'none'}; "
            f"fixed in: {', '.join(f.advisory.fixed) or 'no fix known'}"
        },
        "properties": props,
    }


def _sarif_message(f: Finding, graph: DepGraph) -> str:
    fix = f"fixed in {', '.join(f.advisory.fixed)}" if f.advisory.fixed else "no fix known"
    via = "; ".join(format_path(p, graph) for p in f.paths)
    return (
        f"{f.package} {f.version} is affected by {f.id} ({f.severity.rating}); {fix}. "
        f"Pulled in by: {via}"
    )


def _sarif_location(f: Finding, graph: DepGraph) -> dict[str, Any]:
    line = graph.packages[f.package].line
    physical: dict[str, Any] = {"artifactLocation": {"uri": Path(graph.source).as_posix()}}
    if line:
        physical["region"] = {"startLine": line}
    return {"physicalLocation": physical}


FORMATS = ("table", "json", "cyclonedx", "sarif")


def render(result: ScanResult, fmt: str, evaluation: Evaluation | None = None) -> str:
    """Render `result` as table | json | cyclonedx | sarif (the last two carry no policy)."""
    if fmt == "table":
        return render_table(result, evaluation)
    if fmt == "json":
        return render_json(result, evaluation)
    if fmt == "cyclonedx":
        return render_cyclonedx(result)
    if fmt == "sarif":
        return render_sarif(result)
    raise InputError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
