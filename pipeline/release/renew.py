"""Release lifetime: the owner extends a published release without touching its links.

A renewal is an in-toto Statement signed by the owner key, whose one subject is the bundle's
exact layout file and whose predicate says until when. The layout, links and provenance stay
byte-identical (the provenance's binding to the layout digest holds); verify accepts an
expired layout only with a valid renewal of that very layout from the owner it trusts.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.provenance.keys import KeyPair
from pipeline.provenance.statements import RENEWAL_PREDICATE, statement, write_signed_statement
from pipeline.release.verify import is_bundle, verify_bundle
from pipeline.workspace import LAYOUT_NAME, RENEWAL

MAX_DAYS = 3650


def renew(bundle: Path, owner: KeyPair, *, days: int, now: datetime | None = None) -> datetime:
    """Sign a renewal of `bundle` until now + `days`; the bundle must verify under `owner`."""
    if not is_bundle(bundle):
        raise InputError(f"{bundle} is not a release bundle (no attestations/{LAYOUT_NAME})")
    if not 1 <= days <= MAX_DAYS:
        raise InputError(f"--days must be between 1 and {MAX_DAYS}, got {days}")
    until = (now or datetime.now(UTC)) + timedelta(days=days)
    layout = bundle / "attestations" / LAYOUT_NAME
    stmt = statement(
        {f"attestations/{LAYOUT_NAME}": sha256_file(layout)},
        RENEWAL_PREDICATE,
        {"expires": until.strftime("%Y-%m-%dT%H:%M:%SZ"), "release": bundle.resolve().name},
    )
    path = bundle / "attestations" / RENEWAL
    previous = path.read_bytes() if path.is_file() else None
    write_signed_statement(path, stmt, owner.signer)
    try:  # the renewed bundle must verify as a consumer would, or nothing changes
        verify_bundle(bundle, owner_key=owner.public.keyid)
    except BaseException:
        if previous is None:
            path.unlink()
        else:
            path.write_bytes(previous)
        raise
    return until
