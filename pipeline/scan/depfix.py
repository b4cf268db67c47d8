"""The smallest fix: which direct-requirement changes clear a lock's findings.

From the dependency graph and the records' `fixed` versions only (offline): for each
vulnerable package, the lowest fixed version that no record of that package affects (a fix
for one advisory can still be hit by another). One change per vulnerable package, and none
for the rest, is the least a fix can move without an index to consult:

- a direct requirement is raised to that version (`requests>=2.20.0`);
- a transitive package gets a floor of its own in the `.in` file (`urllib3>=1.24.2`), the
  pip-compile idiom for "whatever pulls it in, not below this";
- a known-malicious package has no safe version: a direct one is removed, and a transitive
  one is reported with the direct requirements that pull it in (no automatic fix);
- a package whose records list no fixed version is reported as having no fix.

`apply_to_graph` predicts the result (the graph with the new versions) so the caller can
re-scan it; `apply_to_in` writes the plan into the `.in` file, which `make upgrade` then
compiles and gates (the real resolver has the last word on whether the floors can be met).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_text
from pipeline.scan.deps import DepGraph, Package
from pipeline.scan.osv import is_affected, parse_version
from pipeline.scan.vulns import Finding, ScanResult

RAISE, ADD, REMOVE, NO_FIX = "raise", "add", "remove", "no fix"


@dataclass(frozen=True)
class Change:
    """One change to the direct requirements, and the findings it clears."""

    package: str
    current: str
    target: str | None  # the lowest version that clears every finding; None: none does
    kind: str  # RAISE | ADD | REMOVE | NO_FIX
    clears: tuple[str, ...]  # the finding ids
    pulled_in_by: tuple[str, ...]  # the direct requirements that bring the package in

    def describe(self) -> str:
        ids = ", ".join(self.clears)
        if self.kind == RAISE:
            return f"raise {self.package} {self.current} -> >={self.target} (clears {ids})"
        if self.kind == ADD:
            via = ", ".join(self.pulled_in_by)
            return (
                f"add {self.package}>={self.target} (now {self.current}, pulled in by {via}; "
                f"clears {ids})"
            )
        if self.kind == REMOVE:
            return f"remove {self.package} {self.current}: known-malicious ({ids})"
        via = ", ".join(self.pulled_in_by) or self.package
        return f"NO FIX for {self.package} {self.current} ({ids}): {self._why()} (via {via})"

    def _why(self) -> str:
        return (
            "known-malicious and pulled in transitively; remove or replace the requirement "
            "that brings it in"
            if self.target is None and any(i.startswith("MAL-") for i in self.clears)
            else "no fixed version is known that every advisory spares"
        )


@dataclass(frozen=True)
class FixPlan:
    changes: tuple[Change, ...]

    @property
    def fixable(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.kind != NO_FIX)

    @property
    def unfixable(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.kind == NO_FIX)

    @property
    def moved(self) -> int:
        """How many packages the plan moves (raised, added or removed)."""
        return len(self.fixable)


def plan_fix(result: ScanResult, records: Mapping[str, list[dict[str, Any]]]) -> FixPlan:
    """The smallest set of changes for `result`'s findings; `records` are the store's records
    per canonical package name (`VulnDB.records_for`)."""
    by_package: dict[str, list[Finding]] = {}
    for f in result.findings:
        by_package.setdefault(f.package, []).append(f)
    changes = []
    graph = result.graph
    for name in sorted(by_package):
        findings = by_package[name]
        ids = tuple(sorted({f.id for f in findings}))
        pkg = graph.packages[name]
        direct = name in graph.roots
        via = tuple(sorted({d for f in findings for d in f.direct} - {name}))
        if any(f.malicious for f in findings):
            kind = REMOVE if direct else NO_FIX
            changes.append(Change(name, pkg.version, None, kind, ids, via))
            continue
        target = lowest_clean(name, pkg.version, records.get(name, []), findings)
        if target is None:
            changes.append(Change(name, pkg.version, None, NO_FIX, ids, via))
        else:
            changes.append(Change(name, pkg.version, target, RAISE if direct else ADD, ids, via))
    return FixPlan(tuple(changes))


def lowest_clean(
    name: str, current: str, records: Iterable[dict[str, Any]], findings: Iterable[Finding]
) -> str | None:
    """The lowest fixed version above `current` that no (non-withdrawn) record affects."""
    records = [r for r in records if not r.get("withdrawn")]
    now = parse_version(current)
    candidates: dict[Version, str] = {}
    for f in findings:
        for text in f.advisory.fixed:
            v = parse_version(text)
            if v is not None and (now is None or v > now):
                candidates.setdefault(v, text)
    for record in records:  # a later advisory's fix may be the first version clear of all
        for affected in record.get("affected") or []:
            for rng in (affected or {}).get("ranges") or []:
                for event in rng.get("events") or []:
                    v = parse_version(event.get("fixed")) if "fixed" in event else None
                    if v is not None and (now is None or v > now):
                        candidates.setdefault(v, str(event["fixed"]))
    for v in sorted(candidates):
        text = candidates[v]
        if not any(is_affected(r, name, text) for r in records):
            return text
    return None


def apply_to_graph(graph: DepGraph, plan: FixPlan) -> DepGraph:
    """The graph as it would be with the plan applied: raised/added packages at their target,
    removed ones gone. A prediction for a re-scan: the resolver may pick higher versions."""
    packages = dict(graph.packages)
    for c in plan.fixable:
        if c.kind == REMOVE:
            packages.pop(c.package, None)
        elif c.target is not None:
            packages[c.package] = Package(c.package, c.target, packages[c.package].line)
    requires = {n: tuple(k for k in cs if k in packages) for n, cs in graph.requires.items()}
    return dataclasses.replace(
        graph,
        packages=packages,
        requires={n: requires[n] for n in packages},
        roots={n: r for n, r in graph.roots.items() if n in packages},
    )


def apply_to_in(in_path: Path, plan: FixPlan, *, write: bool = True) -> str:
    """The `.in` file with the plan applied (written in place when `write`); returns its text.

    A direct requirement keeps its extras, markers and the specifiers the target still
    satisfies; the others are replaced by `>=target`. Transitive floors are appended.
    """
    try:
        lines = in_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {in_path}: {e}") from e
    todo = {c.package: c for c in plan.fixable}
    done: set[str] = set()
    out = []
    for line in lines:
        text, _, comment = line.partition("#")
        req = _requirement(text.strip())
        change = todo.get(canonicalize_name(req.name)) if req is not None else None
        if req is None or change is None:
            out.append(line)
            continue
        done.add(change.package)
        note = f"  # chainproof deps fix: {', '.join(change.clears)}"
        if comment.strip():
            note += f"; {comment.strip()}"
        if change.kind == REMOVE:
            out.append(f"# removed by chainproof deps fix ({', '.join(change.clears)}): {line}")
            continue
        out.append(_raised(req, str(change.target)) + note)
    for c in plan.fixable:
        if c.package not in done and c.kind in (ADD, RAISE):
            via = f", pulled in by {', '.join(c.pulled_in_by)}" if c.pulled_in_by else ""
            out.append(
                f"{c.package}>={c.target}  # chainproof deps fix: {', '.join(c.clears)}"
                f" (was {c.current}{via})"
            )
    text = "\n".join(out) + "\n"
    if write:
        atomic_write_text(in_path, text)
    return text


def _requirement(text: str) -> Requirement | None:
    if not text or text.startswith("-"):
        return None
    try:
        return Requirement(text)
    except InvalidRequirement:
        return None


def _raised(req: Requirement, target: str) -> str:
    # Upper bounds and exclusions the target satisfies stay; every lower bound gives way to
    # the new floor (which is above it: the old pin was below the fix).
    kept = [
        s
        for s in req.specifier
        if s.operator in ("<", "<=", "!=") and s.contains(target, prereleases=True)
    ]
    spec = SpecifierSet(",".join([*map(str, kept), f">={target}"]))
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{req.name}{extras}{spec}{marker}"
