"""The mutable state of one scan: findings and files as they are found, the policy in force, and
the dispatchers through which format modules hand nested streams back to the walker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Protocol

from pipeline.scan.model.policy import ScanLimits, ScanPolicy
from pipeline.scan.model.report import Finding, Location, ScannedFile, Severity


# How a format module hands a nested stream (a zip member, an asset) back to the walker without
# importing it: the walker installs itself here, so format modules never import upward.
class StreamScanner(Protocol):
    def __call__(
        self, out: Collector, loc: Location, name: str, fh: IO[bytes], depth: int, deep: bool
    ) -> None: ...


def _no_dispatch(
    out: Collector, loc: Location, name: str, fh: IO[bytes], depth: int, deep: bool
) -> None:
    raise RuntimeError("Collector used without a stream dispatcher")  # a wiring bug, exit 70


@dataclass
class Collector:
    """Findings and files of one scan, and the dispatchers for nested content."""

    findings: list[Finding] = field(default_factory=list)
    files: list[ScannedFile] = field(default_factory=list)
    policy: ScanPolicy = field(default_factory=ScanPolicy)
    dispatch: StreamScanner = _no_dispatch
    dispatch_asset: StreamScanner = _no_dispatch

    def add(self, severity: Severity, rule: str, message: str, loc: Location) -> None:
        self.findings.append(Finding(severity, rule, message, loc))

    def seen(self, loc: Location, fmt: str, size: int, sha256: str | None = None) -> None:
        name = loc.file + (f"!{loc.member}" if loc.member else "")
        self.files.append(ScannedFile(name, fmt, size, sha256))

    def nested(
        self, loc: Location, name: str, fh: IO[bytes], depth: int, *, deep: bool = True
    ) -> None:
        """Scan a nested stream of any format (the walker's dispatch). `deep=False` when
        seeking through it is costly (a compressed member): only its head is probed."""
        self.dispatch(self, loc, name, fh, depth, deep)

    def nested_asset(self, loc: Location, name: str, fh: IO[bytes], depth: int) -> None:
        """Scan an asset: data read by ops, inspected when its format is known."""
        self.dispatch_asset(self, loc, name, fh, depth, True)

    @property
    def limits(self) -> ScanLimits:
        return self.policy.limits


class LimitExceeded(Exception):
    """A stream claims or reaches more than a ScanLimits cap; the walker turns it into a finding.

    Deliberately not an OSError/ValueError: format parsers must not swallow it as "malformed".
    """

    def __init__(self, rule: str, cap: str, limit: int, what: str) -> None:
        super().__init__(f"{what} exceeds the {cap} limit ({limit:,} bytes)")
        self.rule = rule
        self.cap = cap
        self.limit = limit


def read_document(fh: IO[bytes], limit: int, what: str) -> bytes:
    """Read a stream that must be parsed whole (JSON, protobuf), never more than `limit` bytes."""
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise LimitExceeded("too-large", "document_bytes", limit, what)
    return data
