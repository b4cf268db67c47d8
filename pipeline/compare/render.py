"""The report formats of `chainproof diff`, each one `DiffFormat` (a `LineageDiff` in, text out).

`FORMATS` maps every `--format` name to its one implementation: the CLI offers exactly its keys.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

from pipeline.compare.changes import (
    ConfigDiff,
    Delta,
    DependencyDiff,
    EnvDiff,
    FieldsDiff,
    LineageDiff,
    MetricsDiff,
    VulnDiff,
)
from pipeline.compare.recorded import NOT_VERIFIED, short
from pipeline.errors import InputError


class DiffFormat(ABC):
    """One way to print a diff. `name` is the `--format` value that selects it."""

    name: ClassVar[str]

    @abstractmethod
    def format(self, d: LineageDiff) -> str:
        """The whole report; the CLI prints it as is."""


class TableFormat(DiffFormat):
    """For people: one line per group, the changed groups expanded below their line."""

    name = "table"

    def format(self, d: LineageDiff) -> str:
        return render_table(d)


class JsonFormat(DiffFormat):
    """For programs: every group as an object, keys sorted, so equal diffs are equal bytes."""

    name = "json"

    def format(self, d: LineageDiff) -> str:
        return render_json(d)


FORMATS: Mapping[str, DiffFormat] = MappingProxyType(
    {f.name: f for f in (TableFormat(), JsonFormat())}
)


def format_for(name: str) -> DiffFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(
            f"unknown format {name!r}", hint=f"use one of: {', '.join(sorted(FORMATS))}"
        ) from None


def render(d: LineageDiff, fmt: str = "table") -> str:
    return format_for(fmt).format(d)


def render_json(d: LineageDiff) -> str:
    return json.dumps(d.to_dict(), indent=2, sort_keys=True)


def _val(v: Any) -> str:
    if isinstance(v, str):
        return short(v) if len(v) == 64 and all(c in "0123456789abcdef" for c in v) else v
    if isinstance(v, float):
        return f"{v:.6g}"
    return json.dumps(v, default=str)


def _num(d: Delta, digits: int = 4) -> str:
    fmt = lambda x: "?" if x is None else f"{x:.{digits}f}"  # noqa: E731
    if not d.changed:
        return fmt(d.a)
    sign = "" if d.delta is None else f" ({d.delta:+.{digits}f})"
    return f"{fmt(d.a)} -> {fmt(d.b)}{sign}"


def _table(rows: Sequence[tuple[str, ...]], indent: str = "    ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def _deps_section(g: DependencyDiff) -> tuple[str, list[str]]:
    parts, lines = [], []
    for lock in g.locks:
        if lock.a_name is None or lock.b_name is None:
            side = "B" if lock.a_name is None else "A"
            parts.append(f"{lock.name} only in {side} ({lock.packages} packages)")
            continue
        counts = [
            f"{len(lock.of(c))} {c}"
            for c in ("added", "removed", "upgraded", "downgraded", "changed", "rehashed")
            if lock.of(c)
        ]
        if not lock.changed:
            parts.append(f"{lock.name} ({lock.packages} packages, sha256 {short(lock.b_sha256)})")
            continue
        if lock.digest_only:
            parts.append(
                f"{lock.name} sha256 {short(lock.a_sha256)} -> {short(lock.b_sha256)} "
                f"(pins not compared: {lock.digest_only} ships no lock file)"
            )
            continue
        parts.append(f"{lock.name}: " + (", ".join(counts) or "same pins, other bytes"))
        lines.append(f"    {lock.name}  sha256 {short(lock.a_sha256)} -> {short(lock.b_sha256)}")
        rows = []
        for c in lock.changes:
            if c.change == "added":
                version = f"{c.b_version} (new)"
            elif c.change == "removed":
                version = f"{c.a_version} (gone)"
            else:
                version = f"{c.a_version} -> {c.b_version}"
            more = f" (+{len(c.paths) - 1} more)" if len(c.paths) > 1 else ""
            rows.append(
                (
                    c.change,
                    c.package,
                    version,
                    "direct" if c.direct else "transitive",
                    (c.paths[0] if c.paths else "") + more,
                )
            )
        lines += _table(rows, indent="      ")
    parts += list(g.notes)
    return "; ".join(parts) or "no locks on either side", lines


def _vuln_section(g: VulnDiff) -> tuple[str, list[str]]:
    if g.compared:
        head = f"{len(g.new)} new, {len(g.fixed)} fixed, {len(g.still)} still present"
        if not g.changed and g.still:
            head += " (" + ", ".join(f"{v.id} in {v.package}" for v in g.still) + ")"
        if g.not_scanned:  # --db rescanned a side its own gate never scanned: say so up front
            whose = "its own gate" if len(g.not_scanned) == 1 else "their own gates"
            head += f" ({' and '.join(g.not_scanned)} NOT scanned by {whose})"
    else:
        head = f"not comparable: A {g.a_scan}; B {g.b_scan}"
    head += f" [{g.basis}]"
    lines = [f"    A: {g.a_scan}", f"    B: {g.b_scan}"] if g.compared else []
    rows = []
    for label, items in (
        ("new", g.new),
        ("fixed", g.fixed),
        ("still", g.still),
        ("", g.unknown),  # only one side was scanned: say which
    ):
        for v in items:
            tag = label or ("in B" if v.b_version is not None else "in A")
            if label == "still" and v.a_version != v.b_version:
                version = f"{v.a_version} -> {v.b_version}"
            else:
                version = str(v.b_version or v.a_version)
            ids = v.id + (f" ({', '.join(v.aliases)})" if v.aliases else "")
            path = v.paths[0] if v.paths else ""
            rows.append((tag, ids, f"{v.package} {version}", v.severity, ",".join(v.locks), path))
    lines += _table(rows)
    return head, lines + _notes(g.notes)


def _notes(notes: Iterable[str]) -> list[str]:
    return [f"    note: {n}" for n in notes]


def _fields_lines(g: FieldsDiff, *, skip: tuple[str, ...] = ()) -> list[str]:
    show = lambda v: "(none)" if v is None else _val(v)  # noqa: E731
    return _table([(c.key, show(c.a), "->", show(c.b)) for c in g.changes if c.key not in skip])


def _data_section(g: FieldsDiff) -> tuple[str, list[str]]:
    x = g.b
    if g.changed:
        return f"{len(g.changes)} field(s) differ", _fields_lines(g)
    if not x.get("sha256"):
        return "no dataset recorded", []
    size = f" ({x['samples']} samples: {x['train']} train / {x['test']} test)"
    return f"{x.get('name') or 'dataset'} sha256 {short(x['sha256'])}" + (
        size if x.get("samples") else ""
    ), []


def _base_model_section(g: FieldsDiff) -> tuple[str, list[str]]:
    if not g.a and not g.b:
        return "none on either side", []
    if g.changed:
        return f"{len(g.changes)} difference(s)", _fields_lines(g)
    return ", ".join(f"{k}: {_val(v)}" for k, v in g.b.items()), []


def _config_section(g: ConfigDiff) -> tuple[str, list[str]]:
    counts = []
    if g.a_sha256 != g.b_sha256:
        counts.append(f"config sha256 {short(g.a_sha256)} -> {short(g.b_sha256)}")
    if g.params:
        counts.append(f"{len(g.params)} hyperparameter(s)")
    if g.settings:
        counts.append(f"{len(g.settings)} setting(s)")
    if g.stages_added:
        counts.append(f"stages added: {', '.join(g.stages_added)}")
    if g.stages_removed:
        counts.append(f"stages removed: {', '.join(g.stages_removed)}")
    if g.kinds:
        counts.append(f"{len(g.kinds)} kind(s)")
    if not counts:
        counts.append(f"config sha256 {short(g.b_sha256)}")
    rows = [(c.key, "kind", c.a or "?", "->", c.b or "?") for c in g.kinds]
    for p in (*g.params, *g.settings):
        a = "(absent)" if p.change == "added" else _val(p.a)
        b = "(absent)" if p.change == "removed" else _val(p.b)
        rows.append((p.scope, p.key, a, "->", b))
    return "; ".join(counts), _table(rows) + _notes(g.notes)


def _environment_section(g: EnvDiff) -> tuple[str, list[str]]:
    if g.changed:
        where = any(c.stages for c in g.changes)  # else every change is in every stage
        rows = [
            (c.field, *([f"[{', '.join(c.stages) or 'all stages'}]"] if where else []))
            + (_val(c.a), "->", _val(c.b))
            for c in g.changes
        ]
        return f"{len(g.changes)} difference(s)", _table(rows)
    x = g.b
    return ", ".join(
        [
            f"Python {x.get('python') or '?'}",
            f"TensorFlow {x.get('tensorflow') or '?'}",
            f"Keras {x.get('keras') or '?'}",
            str(x.get("platform") or "?"),
            f"lock sha256 {_val(x.get('lock_sha256'))}",
        ]
    ), []


def _metrics_section(g: MetricsDiff) -> tuple[str, list[str]]:
    head = f"accuracy {_num(g.accuracy)}, loss {_num(g.loss)}"
    rows = [
        (c.label, _num(c.precision), _num(c.recall))
        for c in g.per_class
        if c.precision.changed or c.recall.changed
    ]
    lines = _table([("class", "precision", "recall"), *rows]) if rows else []
    support = [c.label for c in g.per_class if c.support.changed]
    if support:
        lines += _notes([f"test support differs for class(es) {', '.join(support)}"])
    return head, lines + _notes(g.notes)


def _model_section(g: FieldsDiff) -> tuple[str, list[str]]:
    a, b = short(g.a.get("sha256")), short(g.b.get("sha256"))
    head = f"{g.b.get('file') or 'model'} sha256 " + (f"{a} -> {b}" if a != b else b)
    return head, _fields_lines(g, skip=("sha256",))


def render_table(d: LineageDiff) -> str:
    """One line per group; only the groups that changed are expanded below their line."""
    sections = {
        "dependencies": _deps_section(d.dependencies),
        "vulnerabilities": _vuln_section(d.vulnerabilities),
        "data": _data_section(d.data),
        "base_model": _base_model_section(d.base_model),
        "config": _config_section(d.config),
        "environment": _environment_section(d.environment),
        "metrics": _metrics_section(d.metrics),
        "model": _model_section(d.model),
    }
    lines = [f"A  {d.a.label}  ({d.a.path})", f"B  {d.b.label}  ({d.b.path})", f"   {NOT_VERIFIED}"]
    lines.append("")
    for group in d.GROUPS:
        head, detail = sections[group]
        changed = getattr(d, group).changed
        status = "CHANGED" if changed else "unchanged"
        if group == "vulnerabilities" and not d.vulnerabilities.compared and not changed:
            status = "UNKNOWN"  # two unscanned sides look alike, but nobody looked
        lines.append(f"{group.replace('_', ' '):<16} {status}: {head}")
        if status != "unchanged":
            lines += detail
    changed = [g.replace("_", " ") for g in d.changed]
    lines += ["", f"{len(changed)} of {len(d.GROUPS)} groups changed" + (": " if changed else "")]
    lines[-1] += ", ".join(changed)
    if not d.vulnerabilities.compared:
        lines.append(
            "vulnerabilities NOT compared: new and fixed are unknown, not zero (see above)"
        )
    return "\n".join(lines)
