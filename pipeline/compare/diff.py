"""`chainproof diff A B`: what changed between two runs or release bundles, group by group.

Each side is read into a `Lineage` (`recorded.py`, as recorded, NOT verified) and compared:
dependencies (per lock, with the path that pulls each changed distribution in), vulnerabilities
(from the signed scan Statements, or a rescan of both locks against one database), data, base
model, config, environment, metrics and the released model. The report formats (table, JSON)
are in `render.py`; the names other modules have always imported from here still resolve here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from pipeline.compare.changes import (
    Change,
    ClassDelta,
    ConfigDiff,
    Delta,
    DependencyChange,
    DependencyDiff,
    EnvChange,
    EnvDiff,
    FieldsDiff,
    LineageDiff,
    LockDiff,
    MetricsDiff,
    ParamChange,
    Side,
    VulnChange,
    VulnDiff,
)
from pipeline.compare.recorded import (
    BUNDLE,
    FRAMEWORK_FIELDS,
    NOT_VERIFIED,
    RUN,
    Lineage,
    LockRecord,
    ScanRecord,
    StageRecord,
    VulnFinding,
    flatten,
    load_lineage,
    short,
)
from pipeline.compare.render import render, render_json, render_table
from pipeline.errors import InputError
from pipeline.scan import deps

# Link environment fields worth comparing; run ids, counts and timings differ on every run.
ENV_FIELDS = (
    "python",
    "implementation",
    "platform",
    "machine",
    "lock",
    "lock_sha256",
    "distributions_sha256",
    "stage_environment",
)
PATHS_SHOWN = 3  # paths kept per changed distribution (their number can grow exponentially)


def diff(a: Lineage, b: Lineage, *, db: Path | None = None) -> LineageDiff:
    """Compare two lineages, A the baseline and B the candidate.

    With `db`, both sides' locks are rescanned against that one OSV store so that new and
    fixed vulnerabilities reflect the dependencies, not two databases of different ages;
    without it the comparison uses each side's own signed scan Statement.
    """
    return LineageDiff(
        a=_side(a),
        b=_side(b),
        dependencies=diff_dependencies(a, b),
        vulnerabilities=diff_vulnerabilities(a, b, db=db),
        data=_fields(a.dataset, b.dataset),
        base_model=_fields(a.base_model, b.base_model, absent_is_none=True),
        config=diff_config(a, b),
        environment=diff_environment(a, b),
        metrics=diff_metrics(a.metrics, b.metrics),
        model=_fields(a.model, b.model),
    )


def _side(x: Lineage) -> Side:
    return Side(x.kind, x.label, str(x.path), x.pipeline, x.run_id, x.source_commit, x.status)


def _fields(
    a: Mapping[str, Any], b: Mapping[str, Any], *, absent_is_none: bool = False
) -> FieldsDiff:
    """Differences in values known on both sides (or, with absent_is_none, on either)."""
    changes = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va != vb and (absent_is_none or (va is not None and vb is not None)):
            changes.append(Change(key, va, vb))
    return FieldsDiff(dict(a), dict(b), tuple(changes))


# --------------------------------------------------------------------------- dependencies


def diff_dependencies(a: Lineage, b: Lineage) -> DependencyDiff:
    """Per lock (paired by name; a lone renamed lock on each side is paired too)."""
    notes = [f"{side} ships no lock files" for side, x in (("A", a), ("B", b)) if not x.locks]
    pairs = [(a.locks[n], b.locks[n]) for n in sorted(set(a.locks) & set(b.locks))]
    only_a = [a.locks[n] for n in sorted(set(a.locks) - set(b.locks))]
    only_b = [b.locks[n] for n in sorted(set(b.locks) - set(a.locks))]
    if len(only_a) == 1 and len(only_b) == 1:
        pairs.append((only_a.pop(), only_b.pop()))
    out = [_lock_diff(la, lb) for la, lb in pairs]
    out += [_one_sided(x, here="A", recorded=_recorded_locks(b).get(x.name)) for x in only_a]
    out += [_one_sided(x, here="B", recorded=_recorded_locks(a).get(x.name)) for x in only_b]
    return DependencyDiff(tuple(out), tuple(notes))


def _one_sided(x: LockRecord, *, here: str, recorded: str | None) -> LockDiff:
    """A lock file only one side ships; the other side's links may still name its digest."""
    mine = (x.name, x.sha256)
    theirs = (x.name, recorded) if recorded else (None, None)
    (a_name, a_sha), (b_name, b_sha) = (mine, theirs) if here == "A" else (theirs, mine)
    gap = None if recorded is None else ("B" if here == "A" else "A")
    return LockDiff(a_name, b_name, a_sha, b_sha, len(x.graph.packages), (), gap)


def _recorded_locks(x: Lineage) -> dict[str, str]:
    """Lock name -> the sha256 the links recorded for it (when every link agrees)."""
    seen: dict[str, set[str]] = {}
    for s in x.stages:
        name, digest = s.environment.get("lock"), s.environment.get("lock_sha256")
        if name and digest:
            seen.setdefault(str(name), set()).add(str(digest))
    return {name: next(iter(d)) for name, d in seen.items() if len(d) == 1}


def _lock_diff(la: LockRecord, lb: LockRecord) -> LockDiff:
    ga, gb = la.graph, lb.graph
    changes = []
    for name in sorted(set(ga.packages) | set(gb.packages)):
        pa, pb = ga.packages.get(name), gb.packages.get(name)
        if pa is None:
            assert pb is not None  # the name came from one of the two graphs
            changes.append(_dep_change(name, "added", None, pb.version, gb))
        elif pb is None:
            changes.append(_dep_change(name, "removed", pa.version, None, ga))
        else:
            kind = _compare_versions(pa.version, pb.version)
            ha, hb = la.hashes.get(name), lb.hashes.get(name)
            if kind is None and ha and hb and ha != hb:
                kind = "rehashed"  # same version, other artifacts: worth a look
            if kind is not None:
                changes.append(_dep_change(name, kind, pa.version, pb.version, gb))
    return LockDiff(la.name, lb.name, la.sha256, lb.sha256, len(gb.packages), tuple(changes))


def _compare_versions(a: str, b: str) -> str | None:
    """upgraded / downgraded by PEP 440; "changed" if either is not a PEP 440 version."""
    try:
        va, vb = Version(a), Version(b)
    except InvalidVersion:
        return None if a == b else "changed"
    if va == vb:
        return None
    return "upgraded" if vb > va else "downgraded"


def _dep_change(
    name: str, change: str, a: str | None, b: str | None, graph: deps.DepGraph
) -> DependencyChange:
    paths = deps.paths_to(graph, name, limit=PATHS_SHOWN)
    return DependencyChange(
        package=name,
        change=change,
        a_version=a,
        b_version=b,
        direct=name in graph.roots,
        paths=tuple(deps.format_path(p, graph) for p in paths),
    )


# --------------------------------------------------------------------------- vulnerabilities


def diff_vulnerabilities(a: Lineage, b: Lineage, *, db: Path | None = None) -> VulnDiff:
    if db is not None:
        sa, sb = _rescan_both(a, b, db)
        basis = f"rescanned both sides' locks against {db} (db {short(sa.database)})"
        notes = [f"signed statements: A {a.scan.describe()}; B {b.scan.describe()}"]
    else:
        sa, sb = a.scan, b.scan
        basis = "each side's signed dependency-scan statement"
        notes = []
        if sa.state == sb.state == "scanned" and sa.database != sb.database:
            notes.append(
                f"A was scanned against db {short(sa.database)}, B against "
                f"{short(sb.database)}: a 'new' finding may be a new advisory rather than a new "
                "dependency; pass --db PATH to compare both against one database"
            )
    unscanned = tuple(side for side, x in (("A", a), ("B", b)) if x.scan.state != "scanned")
    if db is not None:
        notes += [
            f"{side}'s own dependency gate did NOT scan it (its signed statement says "
            f"{x.scan.describe()}): these findings come from this rescan alone"
            for side, x in (("A", a), ("B", b))
            if side in unscanned
        ]
    both = sa.state == sb.state == "scanned"
    out = VulnDiff(
        basis=basis,
        a_scan=sa.describe(),
        b_scan=sb.describe(),
        compared=both,
        not_scanned=unscanned,
    )
    if both:
        new, fixed, still = _match_findings(sa.findings, sb.findings)
        return replace(out, new=new, fixed=fixed, still=still, notes=tuple(notes))
    for side, scan in (("A", sa), ("B", sb)):
        if scan.state != "scanned":
            what = "was NOT scanned" if scan.state == "not scanned" else "has no scan statement"
            notes.append(f"{side} {what}: new and fixed cannot be told apart")
    if db is None:
        notes.append("to compare anyway, pass --db PATH: both locks are rescanned against it")
    unknown: tuple[VulnChange, ...] = ()
    for side, scan in (("a", sa), ("b", sb)):
        if scan.state == "scanned":
            unknown = tuple(_vuln(g, side=side) for g in _grouped(scan.findings))
    return replace(out, unknown=unknown, notes=tuple(notes))


def _rescan_both(a: Lineage, b: Lineage, db: Path) -> tuple[ScanRecord, ScanRecord]:
    from pipeline.scan.vulndb import ScanUnavailable, VulnDB

    try:
        opened = VulnDB.open(db)
    except ScanUnavailable as e:
        raise InputError(
            f"cannot rescan against {db}: {e.message}",
            hint="pass --db with a store made by `chainproof vulndb import`, or omit --db to "
            "compare the signed scan statements",
        ) from e
    with opened:
        return _rescan(a, opened), _rescan(b, opened)


def _rescan(side: Lineage, db: Any) -> ScanRecord:
    from pipeline.scan.vulns import scan

    if not side.locks:
        return ScanRecord("not scanned", "it ships no lock files to rescan", None)
    findings = []
    for lock in side.locks.values():
        result = scan(lock.graph, db)
        findings += [
            VulnFinding(
                id=f.id,
                aliases=tuple(sorted(f.advisory.aliases)),
                package=f.package,
                version=f.version,
                severity=f.severity.rating,
                lock=lock.name,
                paths=tuple(deps.format_path(p, result.graph) for p in f.paths[:PATHS_SHOWN]),
            )
            for f in result.findings
        ]
    return ScanRecord("scanned", "rescanned", db.info.digest, tuple(findings))


def _grouped(findings: Iterable[VulnFinding]) -> list[list[VulnFinding]]:
    """One group per (package, advisory), however many locks it appears in."""
    groups: dict[tuple[str, str], list[VulnFinding]] = {}
    for f in findings:
        groups.setdefault((f.package, f.id), []).append(f)
    return [groups[k] for k in sorted(groups)]


def _match_findings(
    fa: Iterable[VulnFinding], fb: Iterable[VulnFinding]
) -> tuple[tuple[VulnChange, ...], tuple[VulnChange, ...], tuple[VulnChange, ...]]:
    """Same package and a shared id or alias: the same vulnerability (databases re-key)."""
    ga, gb = _grouped(fa), _grouped(fb)
    unmatched = list(ga)
    new, still = [], []
    for group in gb:
        names = frozenset().union(*(f.names for f in group))
        match = next(
            (g for g in unmatched if g[0].package == group[0].package and g[0].names & names),
            None,
        )
        if match is None:
            new.append(_vuln(group, side="b"))
        else:
            unmatched.remove(match)
            still.append(_vuln(group, side="b", other=match))
    fixed = [_vuln(g, side="a") for g in unmatched]
    return tuple(new), tuple(fixed), tuple(still)


def _vuln(
    group: list[VulnFinding], *, side: str, other: list[VulnFinding] | None = None
) -> VulnChange:
    """One vulnerability as found on `side` ("a" or "b"), with `other` the other side's."""
    f = group[0]
    here = ", ".join(sorted({g.version for g in group}))
    there = ", ".join(sorted({g.version for g in other})) if other else None
    aliases = {x for g in group + (other or []) for x in g.names} - {f.id}
    return VulnChange(
        id=f.id,
        aliases=tuple(sorted(aliases)),
        package=f.package,
        a_version=here if side == "a" else there,
        b_version=here if side == "b" else there,
        severity=f.severity,
        locks=tuple(sorted({g.lock for g in group})),
        paths=tuple(dict.fromkeys(p for g in group for p in g.paths)),
    )


# --------------------------------------------------------------------------- config


def diff_config(a: Lineage, b: Lineage) -> ConfigDiff:
    names_a, names_b = [s.name for s in a.stages], [s.name for s in b.stages]
    common = [n for n in names_a if n in names_b]
    kinds, params, notes = [], [], []
    unrecorded: dict[str, list[str]] = {}
    for name in common:
        sa, sb = a.stage(name), b.stage(name)
        assert sa is not None and sb is not None
        if sa.kind != sb.kind and None not in (sa.kind, sb.kind):  # unknown is not a change
            kinds.append(Change(name, sa.kind, sb.kind))
        if sa.params is None or sb.params is None:
            where = (
                "on either side"
                if sa.params is sb.params
                else "in A"
                if sa.params is None
                else "in B"
            )
            unrecorded.setdefault(where, []).append(name)
            continue
        params += _param_changes(name, sa.params, sb.params)
    for where, stages in unrecorded.items():
        notes.append(f"parameters of {', '.join(stages)} not recorded {where}")
    settings: list[ParamChange] = []
    if a.config is not None and b.config is not None:
        settings = _settings_changes(a.config, b.config, common)
    elif a.config is not None or b.config is not None:
        notes.append("config.yaml is recorded in runs only: settings outside params not compared")
    return ConfigDiff(
        a_sha256=a.config_sha256,
        b_sha256=b.config_sha256,
        stages_added=tuple(n for n in names_b if n not in names_a),
        stages_removed=tuple(n for n in names_a if n not in names_b),
        kinds=tuple(kinds),
        params=tuple(params),
        settings=tuple(settings),
        notes=tuple(notes),
    )


def _param_changes(scope: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> list[ParamChange]:
    fa, fb = flatten(a), flatten(b)
    out = []
    for key in sorted(set(fa) | set(fb)):
        if key not in fa:
            out.append(ParamChange(scope, key, "added", None, fb[key]))
        elif key not in fb:
            out.append(ParamChange(scope, key, "removed", fa[key], None))
        elif fa[key] != fb[key]:
            out.append(ParamChange(scope, key, "changed", fa[key], fb[key]))
    return out


def _settings_changes(
    a: Mapping[str, Any], b: Mapping[str, Any], common: list[str]
) -> list[ParamChange]:
    """config.yaml outside the stage params: top-level keys, and stage fields but params."""
    top = lambda c: {k: v for k, v in c.items() if k != "stages"}  # noqa: E731
    out = _param_changes("(pipeline)", top(a), top(b))

    def stage(c: Mapping[str, Any], name: str) -> dict[str, Any]:
        for s in c.get("stages") or []:
            if isinstance(s, Mapping) and s.get("name") == name:
                return {k: v for k, v in s.items() if k not in ("name", "params")}
        return {}

    for name in common:
        out += _param_changes(name, stage(a, name), stage(b, name))
    return out


# --------------------------------------------------------------------------- environment


def _env_values(x: Lineage) -> dict[str, dict[str, Any]]:
    """field -> stage -> value, for every linked stage; frameworks under the pseudo-stage "*"."""
    out: dict[str, dict[str, Any]] = {}
    for s in x.stages:
        if not s.linked:
            continue
        env = {k: s.environment.get(k) for k in ENV_FIELDS}
        env.update(flatten(s.environment.get("determinism") or {}, "determinism"))
        for k, v in env.items():
            out.setdefault(k, {})[s.name] = v
    for k in FRAMEWORK_FIELDS:
        out[k] = {"*": x.framework.get(k)}
    return out


def _summary_value(per_stage: Mapping[str, Any]) -> Any:
    values = {json.dumps(v, sort_keys=True, default=str) for v in per_stage.values()}
    if len(values) <= 1:
        return next(iter(per_stage.values()), None)
    return ", ".join(f"{s}: {v}" for s, v in per_stage.items())


def diff_environment(a: Lineage, b: Lineage) -> EnvDiff:
    ea, eb = _env_values(a), _env_values(b)
    changes = []
    for key in dict.fromkeys([*ENV_FIELDS, *FRAMEWORK_FIELDS, *sorted(set(ea) | set(eb))]):
        va, vb = ea.get(key, {}), eb.get(key, {})
        common = [s for s in va if s in vb]
        groups: dict[str, list[str]] = {}
        pair_of: dict[str, tuple[Any, Any]] = {}
        for s in common:
            if va[s] != vb[s] and not (s == "*" and (va[s] is None or vb[s] is None)):
                tag = json.dumps([va[s], vb[s]], sort_keys=True, default=str)
                groups.setdefault(tag, []).append(s)
                pair_of[tag] = (va[s], vb[s])
        for tag, stages in groups.items():
            everywhere = len(stages) == len(common) or stages == ["*"]
            changes.append(EnvChange(key, () if everywhere else tuple(stages), *pair_of[tag]))
    summary = lambda e: {k: _summary_value(v) for k, v in e.items()}  # noqa: E731
    return EnvDiff(summary(ea), summary(eb), tuple(changes))


# --------------------------------------------------------------------------- metrics


def _delta(a: Any, b: Any) -> Delta:
    fa = float(a) if isinstance(a, int | float) else None
    fb = float(b) if isinstance(b, int | float) else None
    return Delta(fa, fb, fb - fa if fa is not None and fb is not None else None)


def diff_metrics(a: Mapping[str, Any], b: Mapping[str, Any]) -> MetricsDiff:
    """Held-out accuracy and loss, and per class the precision, recall, f1 and support."""
    ca, cb = a.get("per_class") or {}, b.get("per_class") or {}
    notes = []
    if bool(ca) != bool(cb):  # an older metrics.json without per-class figures
        notes.append(f"{'A' if not ca else 'B'} records no per-class metrics")
    elif ca:
        for side, mine, theirs in (("A", ca, cb), ("B", cb, ca)):
            if alone := sorted(set(mine) - set(theirs)):
                notes.append(f"class(es) {', '.join(map(str, alone))} only in {side}")
    per_class = tuple(
        ClassDelta(
            label=str(c),
            **{
                m: _delta(ca[c].get(m), cb[c].get(m))
                for m in ("precision", "recall", "f1", "support")
            },
        )
        for c in sorted(set(ca) & set(cb), key=lambda c: (len(str(c)), str(c)))  # "2" before "10"
    )
    return MetricsDiff(
        _delta(a.get("accuracy"), b.get("accuracy")),
        _delta(a.get("loss"), b.get("loss")),
        per_class,
        tuple(notes),
    )


__all__ = [
    "BUNDLE",
    "ENV_FIELDS",
    "FRAMEWORK_FIELDS",
    "NOT_VERIFIED",
    "PATHS_SHOWN",
    "RUN",
    "Change",
    "ClassDelta",
    "ConfigDiff",
    "Delta",
    "DependencyChange",
    "DependencyDiff",
    "EnvChange",
    "EnvDiff",
    "FieldsDiff",
    "Lineage",
    "LineageDiff",
    "LockDiff",
    "LockRecord",
    "MetricsDiff",
    "ParamChange",
    "ScanRecord",
    "Side",
    "StageRecord",
    "VulnChange",
    "VulnDiff",
    "VulnFinding",
    "diff",
    "diff_config",
    "diff_dependencies",
    "diff_environment",
    "diff_metrics",
    "diff_vulnerabilities",
    "load_lineage",
    "render",
    "render_json",
    "render_table",
]
