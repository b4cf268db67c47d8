"""Scan a dependency graph against the offline OSV database, and judge the result by a policy.

`scan` checks every pinned package, direct and transitive, and reports each vulnerability once
(aliases merged) with the paths that pull the package in and the direct requirements that would
have to move. Known-malicious packages (OpenSSF `MAL-` records) are matched by name and version
and also by the sha256 of their files, so a renamed copy is still caught; every locked name is
checked against the shipped list of popular projects for look-alikes (`lookalike`).
`evaluate` applies a `Policy`: a severity threshold, an allowlist whose entries expire, accepted
look-alike names (with a reason and an expiry), and signed OpenVEX `not_affected` statements
(`vex`). The report formats live in `vulns_render`.

Exit codes for the CLI (the errors carry them):
  0  scanned, no finding at or above the threshold (after the allowlist and VEX)
  1  findings violate the policy (`VulnerabilitiesFound`)
  2  bad input: an unreadable lock, a bad policy file (`pipeline.errors.InputError`)
  5  could not scan: the database is missing, unreadable or empty (`vulndb.ScanUnavailable`).
     A scan that did not happen is never reported as clean.

Unknown severity (no CVSS v3 vector and no database rating) is never guessed: it fails the
policy at every threshold, because "we do not know how bad" must not pass as "not bad".
A malicious package fails at every threshold and no allowlist entry or VEX statement can
accept it: there is no unreachable part of malware.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import Error, InputError
from pipeline.scan.deps import DepGraph, paths_to
from pipeline.scan.lookalike import Lookalike, PopularNames, load_popular
from pipeline.scan.osv import RATINGS, Advisory, Severity, advisory_of, match
from pipeline.scan.vulndb import DEFAULT_MAX_AGE, DBInfo, StaleDatabase, VulnDB, check_age

if TYPE_CHECKING:  # vex imports the signing stack; a scan without VEX never needs it
    from pipeline.scan.vex import VexRejected, VexStatement

# (every path from a root to a package, the direct requirements those paths start from)
Located = tuple[tuple[tuple[tuple[str, str], ...], ...], tuple[str, ...]]

THRESHOLDS = ("low", "medium", "high", "critical")
# The one default: `scan deps` and the run's dependency gate (config
# security.dependencies.severity, which defaults to this too) fail at the same findings.
DEFAULT_THRESHOLD = "high"
BY_VERSION = "name and version"


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
    # How it matched: BY_VERSION, or "sha256 <hex> (<file> of <name>)" for a malicious file
    # found under another name or version.
    matched_by: str = BY_VERSION

    @property
    def id(self) -> str:
        return self.advisory.id

    @property
    def severity(self) -> Severity:
        return self.advisory.severity

    @property
    def malicious(self) -> bool:
        return self.advisory.malicious

    @property
    def names(self) -> frozenset[str]:
        """Every identifier this finding answers to (ids and aliases), for allowlists."""
        return frozenset(self.advisory.ids) | frozenset(self.advisory.aliases)


@dataclass(frozen=True)
class LookalikeFinding:
    """A locked name that imitates a popular project, with the paths that pull it in."""

    lookalike: Lookalike
    paths: tuple[tuple[tuple[str, str], ...], ...]
    direct: tuple[str, ...]

    @property
    def package(self) -> str:
        return self.lookalike.name


@dataclass(frozen=True)
class ScanResult:
    graph: DepGraph
    db: DBInfo
    findings: tuple[Finding, ...]
    stale: StaleDatabase | None
    scanned_at: str
    lookalikes: tuple[LookalikeFinding, ...] = ()
    popular_source: str = ""  # the reference list: "<source>, <date>" ("" if not checked)

    @property
    def scanned(self) -> int:
        return len(self.graph.packages)

    @property
    def vulnerable_packages(self) -> tuple[str, ...]:
        return tuple(sorted({f.package for f in self.findings}))


_DEFAULT_POPULAR: list[PopularNames] = []


def default_popular() -> PopularNames:
    """The shipped reference list, loaded once per process."""
    if not _DEFAULT_POPULAR:
        _DEFAULT_POPULAR.append(load_popular())
    return _DEFAULT_POPULAR[0]


def scan(
    graph: DepGraph,
    db: VulnDB | Path,
    *,
    max_age: timedelta = DEFAULT_MAX_AGE,
    now: datetime | None = None,
    popular: PopularNames | None | bool = True,
) -> ScanResult:
    """Every package of `graph` against `db` (an open VulnDB or the path of a store).

    `popular`: the reference list for look-alike names (True: the shipped one; False/None:
    no look-alike check). Raises ScanUnavailable (exit 5) when the store is missing,
    unreadable or empty.
    """
    if not graph.packages:
        raise InputError(f"{graph.source}: nothing to scan (no pinned packages)")
    if isinstance(db, Path):
        with VulnDB.open(db) as opened:
            return scan(graph, opened, max_age=max_age, now=now, popular=popular)
    now = now or datetime.now(UTC)
    by_package = db.records_for(graph.packages)
    findings: list[Finding] = []
    where: dict[str, Located] = {}

    def located(name: str) -> Located:
        if name not in where:
            paths = tuple(tuple(p) for p in paths_to(graph, name))
            where[name] = (paths, tuple(sorted({p[0][0] for p in paths})))
        return where[name]

    for name, pkg in graph.packages.items():
        advisories = match(by_package.get(name, []), name, pkg.version)
        if advisories:
            paths, direct = located(name)
            findings.extend(Finding(name, pkg.version, a, paths, direct) for a in advisories)
    findings.extend(_by_file_hash(graph, db, findings, located))
    reference = default_popular() if popular is True else popular or None
    lookalikes: tuple[LookalikeFinding, ...] = ()
    if reference is not None:
        hits = reference.check({n: p.version for n, p in graph.packages.items()})
        lookalikes = tuple(LookalikeFinding(h, *located(h.name)) for h in hits)
    return ScanResult(
        graph=graph,
        db=db.info,
        findings=tuple(findings),
        stale=check_age(db.info, max_age=max_age, now=now),
        scanned_at=now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        lookalikes=lookalikes,
        popular_source=f"{reference.source}, {reference.date}" if reference else "",
    )


def _by_file_hash(
    graph: DepGraph, db: VulnDB, already: list[Finding], located: Callable[[str], Located]
) -> list[Finding]:
    """Malicious files by sha256: a record's file found in a pin of any name or version."""
    owners: dict[str, list[str]] = {}
    for name, pkg in graph.packages.items():
        for h in pkg.hashes:
            owners.setdefault(h, []).append(name)
    if not owners:
        return []
    seen = {(f.package, rid) for f in already for rid in f.advisory.ids}
    out: list[Finding] = []
    for digest, hits in sorted(db.records_for_hashes(owners).items()):
        for record, published_as, filename in hits:
            if record.get("withdrawn"):
                continue  # a withdrawn record accuses nobody, by name or by hash
            for name in owners[digest]:
                if (name, record["id"]) in seen:
                    continue
                seen.add((name, record["id"]))
                pkg = graph.packages[name]
                paths, direct = located(name)
                how = f"sha256 {digest} ({filename or 'a file'} of {published_as})"
                advisory = advisory_of([record], published_as, pkg.version)
                out.append(Finding(name, pkg.version, advisory, paths, direct, how))
    return out


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
class AcceptName:
    """Accept a look-alike name on purpose, for a stated reason, until `expires` (inclusive)."""

    name: str
    reason: str
    expires: date

    def active(self, today: date) -> bool:
        return today <= self.expires


@dataclass(frozen=True)
class Policy:
    """Findings at or above `threshold` fail unless allowed; unknown severity always fails.

    Malicious packages always fail. Look-alike names fail unless accepted. `vex` holds the
    signed not_affected statements that verified; `vex_rejected` the documents that did not
    (kept to be shown: a statement that counts for nothing must not look as if it counted).
    """

    threshold: str = DEFAULT_THRESHOLD
    allow: tuple[AllowEntry, ...] = ()
    accept_names: tuple[AcceptName, ...] = ()
    vex: tuple[VexStatement, ...] = ()
    vex_rejected: tuple[VexRejected, ...] = ()

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
        """`{severity: high, allow: [{id, reason, expires}], accept_lookalikes: [{name, reason,
        expires}]}`, dates as YYYY-MM-DD."""
        unknown = set(data) - {"severity", "allow", "accept_lookalikes"}
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        allow = tuple(
            AllowEntry(*_dated(e, "id", f"{where}: allow[{i}]"))
            for i, e in enumerate(_entries(data, "allow", "{id, reason, expires}", where))
        )
        accept = tuple(
            AcceptName(*_dated(e, "name", f"{where}: accept_lookalikes[{i}]"))
            for i, e in enumerate(
                _entries(data, "accept_lookalikes", "{name, reason, expires}", where)
            )
        )
        return cls(
            threshold=str(data.get("severity", DEFAULT_THRESHOLD)).lower(),
            allow=allow,
            accept_names=accept,
        )


def _entries(data: Mapping[str, Any], key: str, shape: str, where: str) -> list[Any]:
    entries = data.get(key) or []
    if not isinstance(entries, list):
        raise InputError(f"{where}: '{key}' must be a list of {shape}")
    return entries


def _dated(raw: Any, key: str, where: str) -> tuple[str, str, date]:
    if not isinstance(raw, Mapping):
        raise InputError(f"{where}: must be a mapping with {key}, reason, expires")
    missing = [k for k in (key, "reason", "expires") if not raw.get(k)]
    if missing:
        raise InputError(
            f"{where}: missing {', '.join(missing)}",
            hint=f"every entry needs a {key}, a reason and an expiry date (YYYY-MM-DD)",
        )
    expires = raw["expires"]
    if isinstance(expires, datetime):
        expires = expires.date()
    elif not isinstance(expires, date):
        try:
            expires = date.fromisoformat(str(expires))
        except ValueError as e:
            raise InputError(f"{where}: expires {expires!r} is not a date (YYYY-MM-DD)") from e
    return str(raw[key]), str(raw["reason"]), expires


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
        raise InputError(f"{path}: a policy is a mapping (severity, allow, accept_lookalikes)")
    return Policy.from_mapping(data, where=str(path))


@dataclass(frozen=True)
class Evaluation:
    violations: tuple[Finding, ...]
    allowed: tuple[tuple[Finding, AllowEntry], ...]
    expired: tuple[AllowEntry, ...]  # past their date: they allow nothing any more
    below_threshold: tuple[Finding, ...]
    policy: Policy = field(default_factory=Policy)
    not_affected: tuple[tuple[Finding, VexStatement], ...] = ()  # silenced by a signed VEX
    vex_expired: tuple[VexStatement, ...] = ()
    lookalike_violations: tuple[LookalikeFinding, ...] = ()
    lookalikes_accepted: tuple[tuple[LookalikeFinding, AcceptName], ...] = ()
    accept_expired: tuple[AcceptName, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations and not self.lookalike_violations


def evaluate(result: ScanResult, policy: Policy, today: date) -> Evaluation:
    """Sort each finding into violation / not affected (VEX) / below threshold / allowed."""
    active = [e for e in policy.allow if e.active(today)]
    vex = [s for s in policy.vex if s.active(today)]
    violations: list[Finding] = []
    allowed: list[tuple[Finding, AllowEntry]] = []
    below: list[Finding] = []
    silenced: list[tuple[Finding, VexStatement]] = []
    for f in result.findings:
        if f.malicious:
            violations.append(f)  # nothing accepts malware: see the module docstring
            continue
        statement = next((s for s in vex if s.covers(f.names, f.package, f.version)), None)
        if statement is not None:
            silenced.append((f, statement))
            continue
        if not policy.fails(f.severity):
            below.append(f)
            continue
        names = {n.upper() for n in f.names}  # ids are matched case-insensitively
        entry = next((e for e in active if e.id.upper() in names), None)
        if entry is None:
            violations.append(f)
        else:
            allowed.append((f, entry))
    accepting = [a for a in policy.accept_names if a.active(today)]
    look_bad: list[LookalikeFinding] = []
    look_ok: list[tuple[LookalikeFinding, AcceptName]] = []
    for lf in result.lookalikes:
        accepted = next((a for a in accepting if _same_name(a.name, lf.package)), None)
        if accepted is None:
            look_bad.append(lf)
        else:
            look_ok.append((lf, accepted))
    return Evaluation(
        violations=tuple(violations),
        allowed=tuple(allowed),
        expired=tuple(e for e in policy.allow if not e.active(today)),
        below_threshold=tuple(below),
        policy=policy,
        not_affected=tuple(silenced),
        vex_expired=tuple(s for s in policy.vex if not s.active(today)),
        lookalike_violations=tuple(look_bad),
        lookalikes_accepted=tuple(look_ok),
        accept_expired=tuple(a for a in policy.accept_names if not a.active(today)),
    )


def _same_name(a: str, b: str) -> bool:
    from packaging.utils import canonicalize_name

    return canonicalize_name(a) == canonicalize_name(b)


def require_clean(evaluation: Evaluation) -> None:
    """Raise VulnerabilitiesFound when the evaluation has violations."""
    if evaluation.ok:
        return
    parts = []
    malicious = sorted({f.package for f in evaluation.violations if f.malicious})
    if malicious:
        parts.append(f"KNOWN-MALICIOUS package(s) {', '.join(malicious)}")
    vulns = [f for f in evaluation.violations if not f.malicious]
    if vulns:
        n = len(vulns)
        packages = sorted({f.package for f in vulns})
        parts.append(
            f"{n} vulnerabilit{'y' if n == 1 else 'ies'} at or above severity "
            f"'{evaluation.policy.threshold}' (or of unknown severity) in {', '.join(packages)}"
        )
    if evaluation.lookalike_violations:
        parts.append(
            "look-alike name(s) "
            + ", ".join(
                f"{lf.package} (resembles {lf.lookalike.resembles})"
                for lf in evaluation.lookalike_violations
            )
        )
    expired = (
        f"; {len(evaluation.expired)} allowlist entry(ies) expired" if evaluation.expired else ""
    )
    raise VulnerabilitiesFound(
        "; ".join(parts) + expired,
        hint="remove a malicious package and rotate any secret its environment could read; "
        "upgrade the direct requirements listed (chainproof deps fix); allowlist an id, or "
        "accept a look-alike name you meant, with a reason and an expiry date",
    )
