"""What `chainproof diff` found: one frozen value per group, shared by the comparison
(`diff.py`) and the report formats (`render.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from pipeline.compare.recorded import NOT_VERIFIED


@dataclass(frozen=True)
class Change:
    key: str
    a: Any
    b: Any


@dataclass(frozen=True)
class FieldsDiff:
    """Named values on both sides; `changes` lists those known on both sides that differ."""

    a: Mapping[str, Any]
    b: Mapping[str, Any]
    changes: tuple[Change, ...]

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class DependencyChange:
    package: str
    change: str  # added | removed | upgraded | downgraded | changed | rehashed
    a_version: str | None
    b_version: str | None
    direct: bool
    paths: tuple[str, ...]  # in the lock that has it: B's, or A's for a removal


@dataclass(frozen=True)
class LockDiff:
    a_name: str | None  # None: the lock is only on the other side
    b_name: str | None
    a_sha256: str | None
    b_sha256: str | None
    packages: int  # pinned in B's lock (A's if only A has it)
    changes: tuple[DependencyChange, ...]
    digest_only: str | None = None  # "A"/"B": that side ships no lock file, only its links' digest

    @property
    def name(self) -> str:
        if self.a_name and self.b_name and self.a_name != self.b_name:
            return f"{self.a_name} -> {self.b_name}"
        return str(self.a_name or self.b_name)

    @property
    def changed(self) -> bool:
        return self.a_sha256 != self.b_sha256

    def of(self, change: str) -> tuple[DependencyChange, ...]:
        return tuple(c for c in self.changes if c.change == change)


@dataclass(frozen=True)
class DependencyDiff:
    locks: tuple[LockDiff, ...]
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return any(lock.changed for lock in self.locks)


@dataclass(frozen=True)
class VulnChange:
    id: str
    aliases: tuple[str, ...]
    package: str
    a_version: str | None
    b_version: str | None
    severity: str
    locks: tuple[str, ...]
    paths: tuple[str, ...]  # B's paths; A's for a fixed one


@dataclass(frozen=True)
class VulnDiff:
    """new/fixed/still only when both sides were scanned; else `unknown` holds the findings
    of the side that was, since "new" cannot be told from "never looked"."""

    basis: str
    a_scan: str
    b_scan: str
    compared: bool
    new: tuple[VulnChange, ...] = ()
    fixed: tuple[VulnChange, ...] = ()
    still: tuple[VulnChange, ...] = ()
    unknown: tuple[VulnChange, ...] = ()
    notes: tuple[str, ...] = ()
    # "A"/"B": sides whose own signed statement records no scan (their gate never looked),
    # even when --db rescanned them here.
    not_scanned: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.new or self.fixed or self.unknown) or self.a_scan != self.b_scan


@dataclass(frozen=True)
class ParamChange:
    scope: str  # a stage name, or "(pipeline)" for top-level config keys
    key: str  # dotted, with [i] for list items
    change: str  # added | removed | changed
    a: Any
    b: Any


@dataclass(frozen=True)
class ConfigDiff:
    a_sha256: str | None
    b_sha256: str | None
    stages_added: tuple[str, ...]
    stages_removed: tuple[str, ...]
    kinds: tuple[Change, ...]  # key: the stage
    params: tuple[ParamChange, ...]  # resolved hyperparameters (specs / training params)
    settings: tuple[ParamChange, ...]  # the rest of config.yaml (runs only)
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(
            self.a_sha256 != self.b_sha256
            or self.stages_added
            or self.stages_removed
            or self.kinds
            or self.params
            or self.settings
        )


@dataclass(frozen=True)
class EnvChange:
    field: str
    stages: tuple[str, ...]  # () when it differs for every stage both sides ran
    a: Any
    b: Any


@dataclass(frozen=True)
class EnvDiff:
    a: Mapping[str, Any]  # per field: the value, or "stage: value, ..." when stages differ
    b: Mapping[str, Any]
    changes: tuple[EnvChange, ...]

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class Delta:
    a: float | None
    b: float | None
    delta: float | None  # b - a when both are known

    @property
    def changed(self) -> bool:
        return self.a != self.b


@dataclass(frozen=True)
class ClassDelta:
    label: str
    precision: Delta
    recall: Delta
    f1: Delta
    support: Delta

    @property
    def changed(self) -> bool:
        return any(d.changed for d in (self.precision, self.recall, self.f1, self.support))


@dataclass(frozen=True)
class MetricsDiff:
    accuracy: Delta
    loss: Delta
    per_class: tuple[ClassDelta, ...]  # the classes both sides report
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.accuracy.changed or self.loss.changed or any(c.changed for c in self.per_class)


@dataclass(frozen=True)
class Side:
    kind: str
    label: str
    path: str
    pipeline: str | None
    run_id: str | None
    source_commit: str | None
    status: str | None


@dataclass(frozen=True)
class LineageDiff:
    a: Side
    b: Side
    dependencies: DependencyDiff
    vulnerabilities: VulnDiff
    data: FieldsDiff
    base_model: FieldsDiff
    config: ConfigDiff
    environment: EnvDiff
    metrics: MetricsDiff
    model: FieldsDiff
    verified: bool = False  # never: diff reads, `chainproof verify` checks

    GROUPS = (
        "dependencies",
        "vulnerabilities",
        "data",
        "base_model",
        "config",
        "environment",
        "metrics",
        "model",
    )

    @property
    def changed(self) -> tuple[str, ...]:
        return tuple(g for g in self.GROUPS if getattr(self, g).changed)

    def to_dict(self) -> dict[str, Any]:
        out = {**_plain(self), "changed": list(self.changed), "note": NOT_VERIFIED}
        if not self.vulnerabilities.compared:
            # Not compared is not zero: a program reading `new: []` would take it for clean.
            out["vulnerabilities"].update(new=None, fixed=None, still=None)
        return out


def _plain(value: Any) -> Any:
    """JSON-safe: dataclasses as objects (with their `changed` verdict), tuples as lists."""
    if is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
        verdict = getattr(type(value), "changed", None)
        if isinstance(verdict, property):
            out["changed"] = _plain(verdict.__get__(value))
        return out
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(_plain(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    return value
