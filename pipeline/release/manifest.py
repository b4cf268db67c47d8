"""A bundle's own signed facts: the release manifest (every file, name, version, run) and the
owner's renewal of its layout. Both are read as hostile input and bound to the chain."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import VerificationError
from pipeline.hashing import Walk, hash_stated, list_tree, sha256_file
from pipeline.provenance.chain import VerifyReport, safe_join
from pipeline.provenance.keys import PublicKey, public_key_from_dict
from pipeline.provenance.statements import (
    RELEASE_PREDICATE,
    RENEWAL_PREDICATE,
    payload_of,
    read_verified_statement,
)
from pipeline.workspace import LAYOUT_NAME, RELEASE_MANIFEST, RENEWAL

LAYOUT = LAYOUT_NAME


def read_renewal(bundle: Path, owner: PublicKey) -> datetime | None:
    """The expiry of the owner's renewal of this bundle's layout, if the bundle carries one.

    A renewal is a Statement signed by the owner key whose subject is the exact layout file:
    the layout and links stay untouched, so the provenance's binding to the layout holds.
    """
    path = bundle / "attestations" / RENEWAL
    if not path.is_file():
        return None
    stmt = read_verified_statement(path, [owner])  # the owner's signature, nobody else's
    layout = bundle / "attestations" / LAYOUT
    subjects = {s.get("name"): s.get("digest", {}).get("sha256") for s in stmt.get("subject", [])}
    if stmt.get("predicateType") != RENEWAL_PREDICATE or subjects.get(
        f"attestations/{LAYOUT}"
    ) != sha256_file(layout):
        raise VerificationError(
            "the renewal is not a renewal of this bundle's layout",
            check="layout expiry",
            artifact=str(path),
        )
    try:
        until = datetime.fromisoformat(str(stmt["predicate"]["expires"]).replace("Z", "+00:00"))
    except (KeyError, TypeError, ValueError) as e:
        raise VerificationError(
            f"the renewal's expiry is not a date ({e})", check="layout expiry", artifact=str(path)
        ) from e
    return until if until.tzinfo else until.replace(tzinfo=UTC)


def check_release_manifest(
    bundle: Path,
    report: VerifyReport,
    *,
    expected_version: str | None,
    given: Path,
    tree: Walk | None = None,
) -> dict[str, Any]:
    """Every file of the bundle is listed, with its digest, in the signed release manifest;
    its signed name and version are where it sits and what was asked for (no rollback).

    `tree`: the bundle's walk, its symlinks already refused (verify_bundle's one pass)."""
    path = bundle / "attestations" / RELEASE_MANIFEST
    if not path.is_file():
        raise VerificationError(
            "the bundle has no signed release manifest (attestations/release.intoto.json)",
            check="release manifest",
            artifact=str(path),
            hint="a published release always carries one; do not use this bundle",
        )
    keys = [
        public_key_from_dict(d, source="layout")
        for d in (report.layout.keys.values() if report.layout else [])
    ]
    stmt = read_verified_statement(path, keys)
    raw = stmt.get("predicate")
    pred: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if stmt.get("predicateType") != RELEASE_PREDICATE or pred.get("run_id") != report.run_id:
        raise VerificationError(
            "the release manifest is not about this chain's run",
            check="release manifest",
            artifact=str(path),
        )
    listed: dict[str, str] = {}
    for subject in stmt.get("subject", []):
        name = str(subject.get("name", "")) if isinstance(subject, dict) else ""
        safe_join(bundle, name, check="release manifest")
        listed[name] = str((subject.get("digest") or {}).get("sha256", ""))
    skip = {f"attestations/{RELEASE_MANIFEST}", f"attestations/{RENEWAL}"}
    if tree is None:
        present = {n: p for n, p in list_tree(bundle).items() if n not in skip}
        stats = {n: p.stat() for n, p in present.items()}
    else:
        stats = {n: st for n, st in tree.files.items() if n not in skip}
        present = {n: bundle / n for n in stats}
    for name in sorted(set(present) - set(listed)):
        raise VerificationError(
            f"{name} is in the bundle but not in its signed release manifest",
            check="release manifest",
            artifact=str(present[name]),
            hint="something was added to the release after it was published; do not use it",
        )
    for name in sorted(set(listed) - set(present)):
        raise VerificationError(
            f"{name}, listed in the signed release manifest, is missing",
            check="release manifest",
            artifact=str(bundle / name),
        )
    digests = dict(
        zip(present, hash_stated([(str(present[n]), stats[n]) for n in present]), strict=True)
    )
    for name, file in present.items():
        if digests[name] != listed[name]:
            raise VerificationError(
                f"{name} has sha256 {digests[name][:16]}…, but the release manifest signed "
                f"{listed[name][:16]}…",
                check="release manifest",
                artifact=str(file),
                hint="the file was changed after the release was published; do not use it",
            )
    version, name = str(pred.get("version")), str(pred.get("name"))
    if expected_version is not None and version != expected_version:
        raise VerificationError(
            f"this bundle is release {name} version {version}, "
            f"not the {expected_version} asked for",
            check="release version",
            artifact=str(bundle),
            hint="an older (or other) release was put in its place; do not use it",
        )
    if expected_version is None and bundle.parent.name == name and bundle.name != version:
        raise VerificationError(
            f"releases/{name}/{bundle.name} holds the signed release version {version}",
            check="release version",
            artifact=str(bundle),
            hint="a release was copied under another version's name (a rollback?)",
        )
    if given.is_symlink() and given.name == "latest":
        newer = [
            sib.name
            for sib in bundle.parent.iterdir()
            if sib.is_dir()
            and not sib.is_symlink()
            and sib != bundle
            and str(_published(sib)) > str(pred.get("published"))
        ]
        if newer:
            raise VerificationError(
                f"{given} points at {version}, but {sorted(newer)[-1]} was published later",
                check="release version",
                artifact=str(given),
                hint="`latest` was pointed back at an older release (a rollback)",
            )
    report.passed(
        "release manifest",
        f"{len(present)} file(s) signed as release {name} version {version}",
    )
    return pred


def _published(bundle: Path) -> str:
    """A sibling release's published time, read unverified: it can only make a check stricter."""
    try:
        return str(payload_of(bundle / "attestations" / RELEASE_MANIFEST)["predicate"]["published"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
