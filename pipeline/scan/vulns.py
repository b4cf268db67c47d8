"""Scan a dependency graph against the offline OSV database, and judge the result by a policy.

`scan` checks every pinned package, direct and transitive, and reports each vulnerability once
(aliases merged) with the paths that pull the package in and the direct requirements that would
have to move. `evaluate` applies a `Policy` (severity threshold + an allowlist whose entries
expire). The report formats live in `vulns_render`.

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

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.errors import Error, InputError
from pipeline.scan.deps import DepGraph, paths_to
from pipeline.scan.osv import RATINGS, Advisory, Severity, match
from pipeline.scan.vulndb import DEFAULT_MAX_AGE, DBInfo, StaleDatabase, VulnDB, check_age

THRESHOLDS = ("low", "medium", "high", "critical")


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
    findings: list[Finding] = []
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
    violations: list[Finding] = []
    allowed: list[tuple[Finding, AllowEntry]] = []
    below: list[Finding] = []
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
