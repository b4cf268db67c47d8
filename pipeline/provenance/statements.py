"""in-toto Statement v1 attestations (test results, later SLSA provenance), DSSE-signed.

in-toto's own DSSE payload is the legacy link schema; for interchange we emit Statement v1
beside the links, signed with securesystemslib's DSSE envelope.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import Error as SslibError
from securesystemslib.exceptions import VerificationError as SslibVerificationError
from securesystemslib.signer import Signer

from pipeline import bounded
from pipeline.errors import InputError, VerificationError
from pipeline.fsutil import atomic_write_bytes
from pipeline.provenance.keys import PublicKey

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
TEST_RESULT = "https://in-toto.io/attestation/test-result/v0.1"
# chainproof's own predicates: a release's whole file list, and the owner's renewal of it
RELEASE_PREDICATE = "https://chainproof.dev/attestation/release/v1"
RENEWAL_PREDICATE = "https://chainproof.dev/attestation/renewal/v1"


def statement(
    subjects: dict[str, str], predicate_type: str, predicate: dict[str, Any]
) -> dict[str, Any]:
    """`subjects` maps artifact names to sha256 hex digests."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": {"sha256": d}} for n, d in sorted(subjects.items())],
        "predicateType": predicate_type,
        "predicate": predicate,
    }


def write_signed_statement(path: Path, stmt: dict[str, Any], signer: Signer) -> None:
    payload = json.dumps(stmt, sort_keys=True, separators=(",", ":")).encode()
    env = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    env.sign(signer)
    atomic_write_bytes(path, json.dumps(env.to_dict(), sort_keys=True, indent=1).encode() + b"\n")


def read_verified_statement(path: Path, keys: list[PublicKey]) -> dict[str, Any]:
    """The statement in the DSSE envelope at `path`, if signed by one of `keys`.

    The file is hostile until its signature verifies: read within pipeline.bounded's caps, and
    any shape securesystemslib rejects is a VerificationError naming the file, never a crash.
    """
    try:
        data = bounded.read_json(path, what="attestation")
        if not isinstance(data, dict):
            raise TypeError(f"it holds a JSON {type(data).__name__}, not an object")
        env = Envelope.from_dict(data)
    except (InputError, OSError) as e:
        raise VerificationError(
            f"{path.name} cannot be read: {e}", check="attestations", artifact=str(path)
        ) from e
    except (ValueError, KeyError, TypeError, AttributeError, SslibError) as e:
        raise VerificationError(
            f"{path.name} is not a DSSE envelope ({e!r})", check="attestations", artifact=str(path)
        ) from e
    try:
        env.verify([k.key for k in keys], 1)
    except SslibVerificationError as e:
        raise VerificationError(
            f"the signature on {path.name} does not verify with the functionary key",
            check="attestations",
            artifact=str(path),
            hint="the attestation was altered or signed by someone else",
        ) from e
    if env.payload_type != PAYLOAD_TYPE:
        raise VerificationError(
            f"{path.name} has payload type {env.payload_type}", check="attestations"
        )
    try:
        stmt = bounded.loads_json(env.payload, source=f"the payload of {path.name}")
    except InputError as e:
        raise VerificationError(e.message, check="attestations", artifact=str(path)) from e
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE:
        raise VerificationError(f"{path.name} is not an in-toto Statement v1", check="attestations")
    return stmt


def payload_of(path: Path) -> dict[str, Any]:
    """The statement without verifying it: for display only.

    Read within pipeline.bounded's caps. Anything that is not an envelope holding a JSON
    object raises ValueError (KeyError, TypeError), which callers show as unreadable.
    """
    try:
        env = bounded.read_json(path, what="attestation")
        stmt = bounded.loads_json(
            base64.b64decode(env["payload"]), source=f"the payload of {path.name}"
        )
    except InputError as e:
        raise ValueError(e.message) from e
    if not isinstance(stmt, dict):
        raise ValueError(f"the payload of {path.name} is not a JSON object")
    return stmt


SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://chainproof.dev/buildtypes/ml-pipeline/v1"
BUILDER_ID = "https://chainproof.dev/runner/v1"


def slsa_provenance(
    *,
    subjects: dict[str, str],
    external: dict[str, Any],
    internal: dict[str, Any],
    dependencies: list[dict[str, Any]],
    invocation_id: str,
    started: str,
    finished: str,
    byproducts: dict[str, str],
    builder_version: dict[str, str],
) -> dict[str, Any]:
    """SLSA provenance v1 for a model. The buildType's parameters are documented in the README."""
    return statement(
        subjects,
        SLSA_PROVENANCE,
        {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": internal,
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": builder_version},
                "metadata": {
                    "invocationId": invocation_id,
                    "startedOn": started,
                    "finishedOn": finished,
                },
                "byproducts": [
                    {"name": n, "digest": {"sha256": d}} for n, d in sorted(byproducts.items())
                ],
            },
        },
    )
