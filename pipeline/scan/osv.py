"""Does an OSV record affect `name==version`? Matching as the OSV schema's evaluation defines it.

Owned here: PyPI version matching (PEP 503 names, PEP 440 ordering), alias merging (one
vulnerability = one advisory even when PYSEC-x and GHSA-y describing it are both stored), and
severity (CVSS v3.x base score computed from the vector; never guessed).

Rules, each from the OSV schema (https://ossf.github.io/osv-schema/#evaluation):
- a version is affected if it is listed in `affected[].versions` or lies in any range;
- only `ECOSYSTEM` ranges are evaluated: `GIT` ranges need a repository and `SEMVER` ordering
  is not PyPI's, so both are ignored (the `versions` list still applies);
- events are evaluated sorted by version, `introduced: "0"` sorting before everything; at equal
  versions `introduced` is applied first, so `fixed`/`last_affected` at that version win;
- `last_affected: v` keeps `v` affected and clears everything above it; `limit` events bound
  the range (a version must be below some limit), `"*"` meaning infinity;
- a range whose event versions are not PEP 440 cannot be ordered and is skipped (its
  `versions` list is still used);
- `withdrawn` records never match.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ECOSYSTEM = "PyPI"
MALICIOUS_PREFIX = "MAL-"
RATINGS = ("none", "low", "medium", "high", "critical")  # ascending; "unknown" is outside it
UNKNOWN = "unknown"

Record = Mapping[str, Any]


# --------------------------------------------------------------------------- shape


def record_problem(record: Record) -> str | None:
    """What makes `record` unusable for matching (a wrong type where a list or an object must
    be), or None. Records are hostile input: checked once, at import, so matching can rely on
    the shapes below instead of guarding every access."""
    for key in ("aliases", "related", "severity", "affected"):
        if record.get(key) is not None and not isinstance(record.get(key), list):
            return f"'{key}' is not a list"
    if not all(isinstance(s, Mapping) for s in record.get("severity") or []):
        return "'severity' holds something that is not an object"
    for i, affected in enumerate(record.get("affected") or []):
        where = f"affected[{i}]"
        if not isinstance(affected, Mapping):
            return f"{where} is not an object"
        if affected.get("package") is not None and not isinstance(affected["package"], Mapping):
            return f"{where}.package is not an object"
        for key in ("versions", "ranges", "severity"):
            if affected.get(key) is not None and not isinstance(affected[key], list):
                return f"{where}.{key} is not a list"
        if not all(isinstance(s, Mapping) for s in affected.get("severity") or []):
            return f"{where}.severity holds something that is not an object"
        for j, rng in enumerate(affected.get("ranges") or []):
            if not isinstance(rng, Mapping):
                return f"{where}.ranges[{j}] is not an object"
            events = rng.get("events")
            if events is not None and not isinstance(events, list):
                return f"{where}.ranges[{j}].events is not a list"
            if not all(isinstance(e, Mapping) for e in events or []):
                return f"{where}.ranges[{j}].events holds something that is not an object"
    return None


# --------------------------------------------------------------------------- versions


def parse_version(text: object) -> Version | None:
    """PEP 440 version of `text`, or None when it is not one."""
    return _parse_version(str(text))


# Advisories for one package repeat the same long `versions` lists (hundreds of TensorFlow
# records list the same releases), so parsing is cached.
@functools.lru_cache(maxsize=1 << 16)
def _parse_version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _in_versions(version: str, parsed: Version | None, versions: Iterable[object]) -> bool:
    for listed in versions:
        listed = str(listed)
        if listed == version:
            return True
        # PEP 440 equality also normalises spelling: "1.0" == "1.0.0", "2.0RC1" == "2.0rc1".
        if parsed is not None and parse_version(listed) == parsed:
            return True
    return False


_ORDER = {"introduced": 0, "fixed": 1, "last_affected": 1, "limit": 2}


def _event_key(event: Mapping[str, Any]) -> tuple[str, str] | None:
    for kind in ("introduced", "fixed", "last_affected", "limit"):
        if kind in event:
            return kind, str(event[kind])
    return None


def in_range(version: Version, events: Sequence[Mapping[str, Any]]) -> bool | None:
    """The schema's IncludedInRanges for one ECOSYSTEM range; None if it cannot be ordered."""
    keyed: list[tuple[tuple[int, Version | None], str]] = []
    limits: list[Version | None] = []  # None = "*", infinity
    for event in events:
        key = _event_key(event)
        if key is None:
            continue
        kind, raw = key
        if kind == "limit":
            if "*" in raw:
                limits.append(None)
                continue
            bound = parse_version(raw)
            if bound is None:
                return None
            limits.append(bound)
            continue
        if kind == "introduced" and raw == "0":
            keyed.append(((-1, None), kind))  # "0" sorts before any version, pre-releases too
            continue
        at = parse_version(raw)
        if at is None:
            return None
        keyed.append(((0, at), kind))
    if limits and not any(bound is None or version < bound for bound in limits):
        return False
    vulnerable = False
    ordered = sorted(keyed, key=lambda k: (k[0][0], k[0][1] or Version("0"), _ORDER[k[1]]))
    for (_, at), kind in ordered:
        if kind == "introduced":
            vulnerable = vulnerable or at is None or version >= at
        elif at is not None and (version >= at if kind == "fixed" else version > at):
            vulnerable = False  # at or past the fix, or past the last affected version
    return vulnerable


def _entries_for(record: Record, name: str) -> list[Mapping[str, Any]]:
    canon = canonicalize_name(name)
    out = []
    for affected in record.get("affected") or []:
        pkg = (affected or {}).get("package") or {}
        if pkg.get("ecosystem") == ECOSYSTEM and canonicalize_name(str(pkg.get("name"))) == canon:
            out.append(affected)
    return out


def _entry_affects(entry: Mapping[str, Any], version: str, parsed: Version | None) -> bool:
    if _in_versions(version, parsed, entry.get("versions") or []):
        return True
    if parsed is None:
        return False  # an unparseable pin can only match an explicit versions[] entry
    for rng in entry.get("ranges") or []:
        if rng.get("type") == "ECOSYSTEM" and in_range(parsed, rng.get("events") or []):
            return True
    return False


def is_affected(record: Record, name: str, version: str) -> bool:
    """IsVulnerable(name, version, record); withdrawn records never affect anything."""
    if record.get("withdrawn"):
        return False
    parsed = parse_version(version)
    return any(_entry_affects(e, version, parsed) for e in _entries_for(record, name))


def fixed_versions(records: Iterable[Record], name: str, version: str) -> tuple[str, ...]:
    """The `fixed` versions above `version` in the ECOSYSTEM ranges for `name`, ascending."""
    parsed = parse_version(version)
    found: dict[Version, str] = {}
    for record in records:
        for entry in _entries_for(record, name):
            for rng in entry.get("ranges") or []:
                if rng.get("type") != "ECOSYSTEM":
                    continue
                for event in rng.get("events") or []:
                    fixed = parse_version(event.get("fixed")) if "fixed" in event else None
                    if fixed is not None and (parsed is None or fixed > parsed):
                        found.setdefault(fixed, str(event["fixed"]))
    return tuple(found[v] for v in sorted(found))


# --------------------------------------------------------------------------- severity


@dataclass(frozen=True)
class Severity:
    """A rating (none|low|medium|high|critical|unknown), with the score and vector behind it."""

    rating: str
    score: float | None = None
    vector: str | None = None
    source: str = ""  # "CVSS_V3", "database_specific", ...

    @property
    def rank(self) -> int:
        """0..4 for known ratings; unknown ranks above critical so it can never hide."""
        return RATINGS.index(self.rating) if self.rating in RATINGS else len(RATINGS)


SEVERITY_UNKNOWN = Severity(UNKNOWN)

_CVSS3_WEIGHTS: dict[str, dict[str, float]] = {
    "AV": {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2},
    "AC": {"L": 0.77, "H": 0.44},
    "UI": {"N": 0.85, "R": 0.62},
    "C": {"H": 0.56, "L": 0.22, "N": 0.0},
    "I": {"H": 0.56, "L": 0.22, "N": 0.0},
    "A": {"H": 0.56, "L": 0.22, "N": 0.0},
}
# Privileges Required weighs more when the scope changes (CVSS v3.x spec, table 16).
_CVSS3_PR = {"U": {"N": 0.85, "L": 0.62, "H": 0.27}, "C": {"N": 0.85, "L": 0.68, "H": 0.5}}
_CVSS3_PREFIX = re.compile(r"^CVSS:3\.([01])/")


def _roundup_30(x: float) -> float:
    return math.ceil(x * 10) / 10


def _roundup_31(x: float) -> float:
    # CVSS v3.1 Appendix A: integer arithmetic, so 4.000000001 does not become 4.1.
    i = round(x * 100_000)
    return i / 100_000.0 if i % 10_000 == 0 else (math.floor(i / 10_000) + 1) / 10.0


def cvss3_base_score(vector: str) -> float:
    """The CVSS v3.0/v3.1 base score of a vector string; ValueError if it is not one."""
    m = _CVSS3_PREFIX.match(vector)
    if not m:
        raise ValueError(f"not a CVSS v3 vector: {vector!r}")
    metrics: dict[str, str] = {}
    for part in vector[m.end() :].split("/"):
        key, sep, value = part.partition(":")
        if not sep or key in metrics:
            raise ValueError(f"malformed CVSS v3 vector: {vector!r}")
        metrics[key] = value
    try:
        scope = metrics["S"]
        w = {k: table[metrics[k]] for k, table in _CVSS3_WEIGHTS.items()}
        pr = _CVSS3_PR[scope][metrics["PR"]]
    except KeyError as e:
        raise ValueError(f"CVSS v3 vector lacks or misstates a base metric: {vector!r}") from e
    roundup = _roundup_31 if m.group(1) == "1" else _roundup_30
    iss = 1 - (1 - w["C"]) * (1 - w["I"]) * (1 - w["A"])
    changed = scope == "C"
    impact = 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15 if changed else 6.42 * iss
    exploitability = 8.22 * w["AV"] * w["AC"] * pr * w["UI"]
    if impact <= 0:
        return 0.0
    if scope == "U":
        return roundup(min(impact + exploitability, 10))
    return roundup(min(1.08 * (impact + exploitability), 10))


def rating_for_score(score: float) -> str:
    """The CVSS v3/v4 qualitative rating of a base score."""
    if score == 0:
        return "none"
    if score < 4.0:
        return "low"
    if score < 7.0:
        return "medium"
    if score < 9.0:
        return "high"
    return "critical"


# GitHub's advisory database says MODERATE where CVSS says medium.
_DB_RATINGS = {
    "low": "low",
    "moderate": "medium",
    "medium": "medium",
    "high": "high",
    "critical": "critical",
    "none": "none",
}


def _db_rating(record: Record) -> str | None:
    specific = record.get("database_specific")
    if isinstance(specific, Mapping) and isinstance(specific.get("severity"), str):
        return _DB_RATINGS.get(specific["severity"].strip().lower())
    return None


def severity_of(record: Record, name: str | None = None) -> Severity:
    """Severity of one record (for `name`'s affected entries when given).

    Order: a CVSS v3 vector (computed; the highest if several); else the database's own rating
    (GHSA's `database_specific.severity`, which is also how a CVSS v4 vector gets a rating: v4
    scoring is not computed here); else unknown. CVSS v2 vectors are not scored either.
    """
    entries = _entries_for(record, name) if name else []
    scored = [s for e in entries for s in (e.get("severity") or [])]
    scored += list(record.get("severity") or [])
    best: Severity | None = None
    v4: str | None = None
    for item in scored:
        kind, vector = str(item.get("type", "")), str(item.get("score", ""))
        if kind == "CVSS_V3":
            try:
                score = cvss3_base_score(vector)
            except ValueError:
                continue
            if best is None or score > (best.score or 0.0):
                best = Severity(rating_for_score(score), score, vector, "CVSS_V3")
        elif kind == "CVSS_V4":
            v4 = vector
    if best is not None:
        return best
    rating = _db_rating(record)
    if rating is not None:
        return Severity(rating, None, v4, "database_specific")
    return Severity(UNKNOWN, None, v4, "CVSS_V4 (not computed)" if v4 else "")


def worst(severities: Iterable[Severity]) -> Severity:
    """The highest known severity; unknown only when none is known."""
    known = [s for s in severities if s.rating in RATINGS]
    if not known:
        return SEVERITY_UNKNOWN
    return max(known, key=lambda s: (s.rank, s.score or 0.0))


# --------------------------------------------------------------------------- advisories


@dataclass(frozen=True)
class Advisory:
    """One vulnerability of one package version, merged over records that alias each other."""

    id: str  # the preferred id (PYSEC, then GHSA, then any other)
    ids: tuple[str, ...]  # every matching record id
    aliases: tuple[str, ...]  # other names (CVE, GHSA, ...) not among `ids`
    summary: str
    severity: Severity
    fixed: tuple[str, ...]
    published: str | None
    modified: str | None

    @property
    def malicious(self) -> bool:
        """An OpenSSF Malicious Packages record (MAL- id): the package is malware, not buggy."""
        return any(i.startswith(MALICIOUS_PREFIX) for i in (*self.ids, *self.aliases))


def _prefer(record_id: str) -> tuple[int, str]:
    order = ("PYSEC-", "GHSA-")
    rank = next((i for i, p in enumerate(order) if record_id.startswith(p)), len(order))
    return rank, record_id


def _summary(record: Record) -> str:
    text = str(record.get("summary") or "").strip()
    if not text:
        text = str(record.get("details") or "").strip().split("\n\n", 1)[0].replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def _groups(records: Sequence[Record]) -> list[list[Record]]:
    """Union-find over ids and aliases: records sharing any identifier are one vulnerability."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in records:
        for alias in r.get("aliases") or []:
            parent[find(str(alias))] = find(r["id"])
        find(r["id"])
    grouped: dict[str, list[Record]] = {}
    for r in records:
        grouped.setdefault(find(r["id"]), []).append(r)
    return list(grouped.values())


def match(records: Iterable[Record], name: str, version: str) -> list[Advisory]:
    """The advisories for `name==version` among `records`, aliases merged, sorted by id."""
    hits = [r for r in records if is_affected(r, name, version)]
    out = [advisory_of(group, name, version) for group in _groups(hits)]
    return sorted(out, key=lambda a: _prefer(a.id))


def advisory_of(group: list[Record], name: str, version: str) -> Advisory:
    """One Advisory from records that describe the same vulnerability of `name`."""
    group = sorted(group, key=lambda r: _prefer(r["id"]))
    ids = tuple(sorted((r["id"] for r in group), key=_prefer))
    aliases = sorted({str(a) for r in group for a in r.get("aliases") or []} - set(ids))
    return Advisory(
        id=ids[0],
        ids=ids,
        aliases=tuple(aliases),
        summary=next((s for s in map(_summary, group) if s), ""),
        severity=worst(severity_of(r, name) for r in group),
        fixed=fixed_versions(group, name, version),
        published=min((str(r["published"]) for r in group if r.get("published")), default=None),
        modified=max((str(r["modified"]) for r in group if r.get("modified")), default=None),
    )
