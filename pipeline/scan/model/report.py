"""What a model scan reports: severities, findings with their locations, the files read, and the
plain-text table. Immutable values, built once a scan ends."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError, VerificationError


class Severity(enum.IntEnum):
    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str | Severity) -> Severity:
        if isinstance(text, Severity):
            return text
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = "|".join(s.label for s in cls)
            raise InputError(f"unknown severity {text!r}", hint=f"use one of {choices}") from None


# Findings at or above this fail a scan by default: an unknown TF op (medium) is refused until
# someone has looked at it; info/low entries only describe what was seen.
DEFAULT_FAIL_ON = Severity.MEDIUM


@dataclass(frozen=True)
class Location:
    """Where a finding is: the file (relative to the scan target) and, inside it, as much as
    applies — zip member (nested members joined by '!'), Keras layer, TF function and node,
    op or pickle opcode, byte offset of that opcode in its stream, JSON path in a config."""

    file: str
    member: str | None = None
    layer: str | None = None
    function: str | None = None
    node: str | None = None
    op: str | None = None
    offset: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        text = self.file + (f"!{self.member}" if self.member else "")
        parts = [
            f"{label}={value}"
            for label, value in (
                ("layer", self.layer),
                ("function", self.function),
                ("node", self.node),
                ("op", self.op),
                ("offset", self.offset),
                ("key", self.key),
            )
            if value is not None
        ]
        return " ".join([text, *parts])

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Finding:
    severity: Severity
    rule: str
    message: str
    location: Location

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity.label,
            "rule": self.rule,
            "message": self.message,
            "location": self.location.to_dict(),
        }


@dataclass(frozen=True)
class ScannedFile:
    """One file or container member that was read. `sha256` is set for files on disk."""

    path: str
    format: str
    size: int
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "format": self.format, "size": self.size}
        if self.sha256:
            d["sha256"] = self.sha256
        return d


@dataclass(frozen=True)
class ScanReport:
    target: str
    files: tuple[ScannedFile, ...]
    findings: tuple[Finding, ...]
    bytes_scanned: int
    duration_s: float

    @property
    def max_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    def at_or_above(self, threshold: Severity | str = DEFAULT_FAIL_ON) -> list[Finding]:
        level = Severity.parse(threshold)
        return [f for f in self.findings if f.severity >= level]

    def ok(self, threshold: Severity | str = DEFAULT_FAIL_ON) -> bool:
        """True when no finding is at or above `threshold`."""
        return not self.at_or_above(threshold)

    def counts(self) -> dict[str, int]:
        return {s.label: sum(f.severity == s for f in self.findings) for s in Severity}

    def to_dict(self) -> dict[str, Any]:
        top = self.max_severity
        return {
            "target": self.target,
            "files": [f.to_dict() for f in self.files],
            "findings": [f.to_dict() for f in self.findings],
            "bytes_scanned": self.bytes_scanned,
            "duration_s": round(self.duration_s, 6),
            "max_severity": top.label if top is not None else None,
            "counts": self.counts(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class UnsafeModelError(VerificationError):
    """A model scan found something at or above the threshold: do not load the model."""

    def __init__(self, report: ScanReport, threshold: Severity | str = DEFAULT_FAIL_ON) -> None:
        level = Severity.parse(threshold)
        bad = sorted(report.at_or_above(level), key=lambda f: -f.severity)
        worst = bad[0]
        super().__init__(
            f"{len(bad)} finding(s) at or above {level.label} in {report.target}; worst: "
            f"{worst.severity.label} {worst.rule}: {worst.message}",
            check="model-scan",
            rule=worst.rule,
            artifact=str(worst.location),
            hint="do not load this model. Review every finding (`--format json` lists them "
            "all); if they are your own code (e.g. custom layers), vet it and raise --fail-on",
        )
        self.report = report
        self.threshold = level


def render_table(report: ScanReport) -> str:
    """A plain-text summary and one row per finding, worst first."""
    top = report.max_severity
    mib = report.bytes_scanned / (1 << 20)
    lines = [
        f"scanned {report.target}: {len(report.files)} file(s)/member(s), {mib:.2f} MiB "
        f"in {report.duration_s:.2f} s; max severity: {top.label if top is not None else 'none'}"
    ]
    if not report.findings:
        lines.append("no findings")
        return "\n".join(lines)
    rows = [
        (f.severity.label, f.rule, str(f.location), f.message)
        for f in sorted(report.findings, key=lambda f: (-f.severity, f.rule, str(f.location)))
    ]
    w_sev = max(8, *(len(r[0]) for r in rows))
    w_rule = max(4, *(len(r[1]) for r in rows))
    lines.append(f"{'SEVERITY':<{w_sev}}  {'RULE':<{w_rule}}  LOCATION / MESSAGE")
    for sev, rule, loc, msg in rows:
        lines.append(f"{sev:<{w_sev}}  {rule:<{w_rule}}  {loc}")
        lines.append(f"{'':<{w_sev}}  {'':<{w_rule}}    {msg}")
    counts = ", ".join(f"{n} {label}" for label, n in report.counts().items() if n)
    lines.append(f"{len(report.findings)} finding(s): {counts}")
    return "\n".join(lines)


def names(text: str) -> frozenset[str]:
    """A table written as whitespace-separated names (keeps long data lists readable)."""
    return frozenset(text.split())
