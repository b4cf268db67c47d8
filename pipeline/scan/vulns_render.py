"""Report formats of a dependency scan: table, JSON, CycloneDX 1.6, SARIF 2.1.0.

Each format is one `VulnerabilityFormat` (one method, `format`); `FORMATS` maps every
`--format` choice of `chainproof scan deps` to exactly one of them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.errors import InputError
from pipeline.scan.deps import DepGraph, format_path
from pipeline.scan.osv import Severity
from pipeline.scan.vulns import BY_VERSION, Evaluation, Finding, ScanResult

TOOL = "chainproof"
OSV_URL = "https://osv.dev/vulnerability/"


class VulnerabilityFormat(ABC):
    """One report format. `evaluation` (the policy's verdict) is shown where the format can."""

    name: str

    @abstractmethod
    def format(self, result: ScanResult, evaluation: Evaluation | None = None) -> str:
        """The whole report as text."""


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
    lines.extend(_render_lookalikes(result))
    if not result.findings:
        lines.append("no known vulnerabilities or malicious packages")
        if evaluation is not None:
            lines.extend(_render_evaluation(evaluation))
        return "\n".join(lines)
    rows = [("PACKAGE", "VERSION", "ID", "SEVERITY", "FIXED IN", "DIRECT REQUIREMENT")]
    for f in result.findings:
        rows.append(
            (
                f.package,
                f.version,
                f.id,
                "MALICIOUS" if f.malicious else _fmt_severity(f.severity),
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
        if f.matched_by != BY_VERSION:
            lines.append(f"    matched by file hash: {f.matched_by}")
        if f.advisory.aliases:
            lines.append(f"    aliases: {', '.join(f.advisory.aliases)}")
        if f.advisory.summary:
            lines.append(f"    {f.advisory.summary}")
        for p in f.paths:
            lines.append(f"    path: {format_path(p, g)}")
    n, pk = len(result.findings), len(result.vulnerable_packages)
    mal = sum(1 for f in result.findings if f.malicious)
    n -= mal
    counts = [f"{n} vulnerabilit{'y' if n == 1 else 'ies'}"] if n else []
    counts += [f"{mal} KNOWN-MALICIOUS"] if mal else []
    lines += ["", f"{' and '.join(counts)} in {pk} package(s)"]
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
    for f, s in ev.not_affected:
        out.append(
            f"  not affected (signed VEX, until {s.expires}): {f.id} in {f.package} "
            f"{f.version}: {s.justification or 'no justification'}; {s.impact}"
        )
    for s in ev.vex_expired:
        out.append(
            f"  EXPIRED VEX statement {s.vulnerability} for {s.package} (expired {s.expires}): "
            "it silences nothing"
        )
    for r in ev.policy.vex_rejected:
        out.append(f"  IGNORED VEX document {r.document}: {r.reason}")
    for lf, a in ev.lookalikes_accepted:
        out.append(f"  accepted look-alike {lf.package} until {a.expires}: {a.reason}")
    for a in ev.accept_expired:
        out.append(f"  EXPIRED look-alike acceptance {a.name} (expired {a.expires})")
    malicious = [f for f in ev.violations if f.malicious]
    if malicious:
        out.append(
            f"  {len(malicious)} KNOWN-MALICIOUS finding(s): blocking at any threshold; "
            "no allowlist entry or VEX statement accepts malware"
        )
    return out


def _render_lookalikes(result: ScanResult) -> list[str]:
    if not result.lookalikes:
        return []
    out = [f"look-alike names (reference: {result.popular_source}):"]
    for lf in result.lookalikes:
        look = lf.lookalike
        out.append(f"  {look.name} {look.version} resembles {look.resembles}: {look.how}")
        for p in lf.paths:
            out.append(f"    path: {_path(p, result.graph)}")
    return out


def _path(p: tuple[tuple[str, str], ...], graph: DepGraph) -> str:
    return format_path(p, graph)


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
        "malicious": f.malicious,
        "matched_by": f.matched_by,
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
        "lookalikes": [
            {
                "package": lf.lookalike.name,
                "version": lf.lookalike.version,
                "resembles": lf.lookalike.resembles,
                "how": lf.lookalike.how,
                "paths_text": [format_path(p, result.graph) for p in lf.paths],
            }
            for lf in result.lookalikes
        ],
        "lookalike_reference": result.popular_source,
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
            "malicious_always_fail": True,
            "not_affected": [
                {"id": f.id, "package": f.package, "version": f.version, **s.as_dict()}
                for f, s in evaluation.not_affected
            ],
            "vex_expired": [s.as_dict() for s in evaluation.vex_expired],
            "vex_rejected": [
                {"document": r.document, "reason": r.reason} for r in evaluation.policy.vex_rejected
            ],
            "lookalike_violations": [lf.package for lf in evaluation.lookalike_violations],
            "lookalikes_accepted": [
                {"name": lf.package, "reason": a.reason, "expires": a.expires.isoformat()}
                for lf, a in evaluation.lookalikes_accepted
            ],
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
        "properties": [{"name": "chainproof:path", "value": format_path(p, graph)} for p in f.paths]
        + ([{"name": "chainproof:malicious", "value": "true"}] if f.malicious else [])
        + (
            [{"name": "chainproof:matched-by", "value": f.matched_by}]
            if f.matched_by != BY_VERSION
            else []
        ),
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
                "level": "error" if f.malicious else _SARIF_LEVEL.get(f.severity.rating, "warning"),
                "message": {"text": _sarif_message(f, g)},
                "locations": [_sarif_location(f.package, g)],
                "partialFingerprints": {"chainproof/v1": f"{f.package}@{f.version}:{f.id}"},
            }
        )
    for lf in result.lookalikes:
        if LOOKALIKE_RULE["id"] not in rules:
            rules[LOOKALIKE_RULE["id"]] = LOOKALIKE_RULE
        look = lf.lookalike
        results.append(
            {
                "ruleId": LOOKALIKE_RULE["id"],
                "ruleIndex": list(rules).index(LOOKALIKE_RULE["id"]),
                "level": "error",
                "message": {
                    "text": f"{look.name} {look.version} resembles the popular project "
                    f"{look.resembles} ({look.how}); pulled in by: "
                    + "; ".join(format_path(p, g) for p in lf.paths)
                },
                "locations": [_sarif_location(look.name, g)],
                "partialFingerprints": {"chainproof/v1": f"{look.name}:lookalike"},
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


LOOKALIKE_RULE: dict[str, Any] = {
    "id": "chainproof-lookalike-name",
    "name": "LookalikePackageName",
    "shortDescription": {"text": "a dependency's name imitates a popular PyPI project"},
    "fullDescription": {
        "text": "Typosquatting: a near miss of a popular name (one edit, separators, affixes, "
        "digits or Unicode confusables for letters) is how malicious packages get installed."
    },
    "properties": {"tags": ["security", "supply-chain", "typosquatting"]},
}


def _sarif_location(package: str, graph: DepGraph) -> dict[str, Any]:
    line = graph.packages[package].line
    physical: dict[str, Any] = {"artifactLocation": {"uri": Path(graph.source).as_posix()}}
    if line:
        physical["region"] = {"startLine": line}
    return {"physicalLocation": physical}


# --------------------------------------------------------------------------- the formats


class TableFormat(VulnerabilityFormat):
    name = "table"

    def format(self, result: ScanResult, evaluation: Evaluation | None = None) -> str:
        return render_table(result, evaluation)


class JsonFormat(VulnerabilityFormat):
    name = "json"

    def format(self, result: ScanResult, evaluation: Evaluation | None = None) -> str:
        return render_json(result, evaluation)


class CycloneDxFormat(VulnerabilityFormat):
    """CycloneDX carries the findings, not the policy's verdict: `evaluation` is not shown."""

    name = "cyclonedx"

    def format(self, result: ScanResult, evaluation: Evaluation | None = None) -> str:
        return render_cyclonedx(result)


class SarifFormat(VulnerabilityFormat):
    """SARIF carries the findings, not the policy's verdict: `evaluation` is not shown."""

    name = "sarif"

    def format(self, result: ScanResult, evaluation: Evaluation | None = None) -> str:
        return render_sarif(result)


FORMATS: Mapping[str, VulnerabilityFormat] = {
    f.name: f for f in (TableFormat(), JsonFormat(), CycloneDxFormat(), SarifFormat())
}


def render(result: ScanResult, fmt: str, evaluation: Evaluation | None = None) -> str:
    """Render `result` in format `fmt` (one of `FORMATS`)."""
    try:
        formatter = FORMATS[fmt]
    except KeyError:
        raise InputError(
            f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}"
        ) from None
    return formatter.format(result, evaluation)
