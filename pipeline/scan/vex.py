"""Signed "not affected" statements: OpenVEX documents, DSSE-signed by the owner, with an expiry.

Where a finding does not apply (the vulnerable function is never imported, say), the owner
records an OpenVEX v0.2.0 `not_affected` statement with a justification instead of a bare
allowlist entry. The document is the predicate of an in-toto Statement (predicateType
`https://openvex.dev/ns/v0.2.0`, as `vexctl attest` makes them) whose subjects are the locked
files of the package it is about, signed with the owner key in a DSSE envelope.

chainproof adds one field to the document, `expires` (a date, inclusive): a judgement about
reachability goes stale as the code changes, so it must be renewed like an allowlist entry.
A statement counts only when its envelope verifies with a trusted owner key and it has not
expired; an unsigned, foreign-signed, malformed or expired one silences nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from pipeline.errors import InputError, VerificationError
from pipeline.provenance.keys import PublicKey
from pipeline.provenance.statements import read_verified_statement, statement

OPENVEX_CONTEXT = "https://openvex.dev/ns/v0.2.0"
OPENVEX_PREDICATE = OPENVEX_CONTEXT
DEFAULT_PRODUCT = "pkg:pypi/chainproof"
# OpenVEX's status justifications for not_affected (spec, "Status Justifications").
JUSTIFICATIONS = (
    "component_not_present",
    "vulnerable_code_not_present",
    "vulnerable_code_not_in_execute_path",
    "vulnerable_code_cannot_be_controlled_by_adversary",
    "inline_mitigations_already_exist",
)
_MAX_BYTES = 1 << 20
_MAX_STATEMENTS = 1000


@dataclass(frozen=True)
class VexStatement:
    """One verified `not_affected` statement about one vulnerability in one package."""

    vulnerability: str  # an id or alias, e.g. PYSEC-2023-74 or CVE-2023-32681
    package: str  # canonical name
    version: str | None  # None: every version of the package
    justification: str
    impact: str
    expires: date
    document: str  # where it was read from
    document_sha256: str  # sha256 of the signed envelope file
    signer: str  # keyid of the owner key that signed it

    def active(self, today: date) -> bool:
        return today <= self.expires

    def covers(self, names: Iterable[str], package: str, version: str) -> bool:
        """Is this the statement for a finding with these ids/aliases in `package==version`?"""
        if canonicalize_name(package) != self.package:
            return False
        if self.version is not None and self.version != version:
            return False
        return self.vulnerability.upper() in {n.upper() for n in names}

    def as_dict(self) -> dict[str, Any]:
        return {
            "vulnerability": self.vulnerability,
            "package": self.package,
            "version": self.version,
            "status": "not_affected",
            "justification": self.justification,
            "impact_statement": self.impact,
            "expires": self.expires.isoformat(),
            "document": self.document,
            "document_sha256": self.document_sha256,
            "signer": self.signer,
        }


@dataclass(frozen=True)
class VexRejected:
    """A document that counts for nothing, and why (shown to the user, never silent)."""

    document: str
    reason: str


def purl(name: str, version: str | None) -> str:
    return f"pkg:pypi/{canonicalize_name(name)}" + (f"@{version}" if version else "")


def _parse_purl(text: str) -> tuple[str, str | None] | None:
    if not text.startswith("pkg:pypi/"):
        return None
    rest = text[len("pkg:pypi/") :].split("?", 1)[0].split("#", 1)[0]
    name, _, version = rest.partition("@")
    return (canonicalize_name(name), version or None) if name else None


def not_affected_statement(
    *,
    vulnerability: str,
    package: str,
    version: str | None,
    files: dict[str, str],
    justification: str,
    impact: str,
    expires: date,
    author: str,
    product: str = DEFAULT_PRODUCT,
    now: datetime | None = None,
) -> dict[str, Any]:
    """An in-toto Statement carrying one OpenVEX `not_affected` statement (unsigned).

    `files` (filename -> sha256, e.g. the lock's hashes of the pin) become the subjects.
    """
    if justification not in JUSTIFICATIONS:
        raise InputError(
            f"unknown justification {justification!r}",
            hint=f"OpenVEX allows: {', '.join(JUSTIFICATIONS)}",
        )
    if not vulnerability.strip() or not impact.strip():
        raise InputError("a VEX statement needs a vulnerability id and an impact statement")
    if not files:
        raise InputError(f"no file hashes for {package}: the statement needs subjects")
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "vulnerability": {"name": vulnerability.strip()},
        "products": [{"@id": product, "subcomponents": [{"@id": purl(package, version)}]}],
        "status": "not_affected",
        "justification": justification,
        "impact_statement": impact.strip(),
        "timestamp": stamp,
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    doc = {
        "@context": OPENVEX_CONTEXT,
        "@id": f"https://chainproof.dev/vex/{digest}",
        "author": author,
        "timestamp": stamp,
        "version": 1,
        "expires": expires.isoformat(),  # chainproof's extension: see the module docstring
        "statements": [body],
    }
    return statement(files, OPENVEX_PREDICATE, doc)


def load_vex(path: Path, trusted: Sequence[PublicKey]) -> list[VexStatement]:
    """The not_affected statements of the signed document at `path`.

    Raises VerificationError when the envelope is not signed by one of `trusted` (unsigned,
    altered, or someone else's), InputError when it is not an OpenVEX document.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read VEX document {path}: {e.strerror}") from e
    if size > _MAX_BYTES:
        raise InputError(f"VEX document {path} is larger than {_MAX_BYTES >> 10} KiB")
    raw = path.read_bytes()
    try:
        stmt = read_verified_statement(path, list(trusted))
    except VerificationError as e:
        raise VerificationError(
            f"VEX document {path.name} is not signed by the trusted owner key "
            "(unsigned, altered, or signed by someone else): it counts for nothing",
            check="vex",
            artifact=str(path),
            hint="sign it with the owner key: chainproof deps vex create ...",
        ) from e
    if stmt.get("predicateType") != OPENVEX_PREDICATE:
        raise InputError(f"{path}: not an OpenVEX attestation ({stmt.get('predicateType')!r})")
    doc = stmt.get("predicate")
    if not isinstance(doc, dict) or doc.get("@context") != OPENVEX_CONTEXT:
        raise InputError(f"{path}: the predicate is not an OpenVEX v0.2.0 document")
    try:
        expires = date.fromisoformat(str(doc.get("expires")))
    except ValueError as e:
        raise InputError(
            f"{path}: no valid 'expires' date (YYYY-MM-DD)",
            hint="chainproof honours only VEX statements that expire",
        ) from e
    body = doc.get("statements")
    if not isinstance(body, list) or not body or len(body) > _MAX_STATEMENTS:
        raise InputError(f"{path}: 'statements' must be a list of 1..{_MAX_STATEMENTS}")
    signer = _signer_of(raw, trusted)
    out = []
    for i, s in enumerate(body):
        out.extend(_statements(s, f"{path}: statements[{i}]", expires, path, raw, signer))
    return out


def _signer_of(raw: bytes, trusted: Sequence[PublicKey]) -> str:
    env = json.loads(raw)
    ids = {s.get("keyid") for s in env.get("signatures", []) if isinstance(s, dict)}
    return next((k.keyid for k in trusted if k.keyid in ids), trusted[0].keyid)


def _statements(
    s: Any, where: str, expires: date, path: Path, raw: bytes, signer: str
) -> list[VexStatement]:
    if not isinstance(s, dict):
        raise InputError(f"{where}: not an object")
    if s.get("status") != "not_affected":
        return []  # affected / fixed / under_investigation silence nothing
    vuln = s.get("vulnerability")
    name = vuln.get("name") if isinstance(vuln, dict) else vuln
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: no vulnerability name")
    justification = s.get("justification")
    impact = s.get("impact_statement")
    if justification not in JUSTIFICATIONS and not (isinstance(impact, str) and impact):
        raise InputError(
            f"{where}: not_affected needs a justification or an impact statement (OpenVEX)"
        )
    targets = []
    for product in _list(s.get("products")):
        if not isinstance(product, dict):
            continue
        for sub in _list(product.get("subcomponents")):
            parsed = _parse_purl(str(sub.get("@id", ""))) if isinstance(sub, dict) else None
            if parsed:
                targets.append(parsed)
        parsed = _parse_purl(str(product.get("@id", "")))
        if parsed and not product.get("subcomponents"):
            targets.append(parsed)
    if not targets:
        raise InputError(f"{where}: names no PyPI package (pkg:pypi/NAME[@VERSION])")
    digest = hashlib.sha256(raw).hexdigest()
    return [
        VexStatement(
            vulnerability=name,
            package=pkg,
            version=version,
            justification=str(justification or ""),
            impact=str(impact or ""),
            expires=expires,
            document=str(path),
            document_sha256=digest,
            signer=signer,
        )
        for pkg, version in targets
    ]


def _list(value: Any) -> list[Any]:
    return value[:_MAX_STATEMENTS] if isinstance(value, list) else []


def load_all(
    paths: Iterable[Path], trusted: Sequence[PublicKey]
) -> tuple[tuple[VexStatement, ...], tuple[VexRejected, ...]]:
    """Every statement of every document that verifies; the others, each with its reason."""
    good: list[VexStatement] = []
    bad: list[VexRejected] = []
    for path in paths:
        try:
            good.extend(load_vex(path, trusted))
        except (VerificationError, InputError) as e:
            bad.append(VexRejected(str(path), e.message))
    return tuple(good), tuple(bad)
