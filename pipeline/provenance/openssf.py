"""OpenSSF Model Signing interop: releases are also signed in the `model-signing` format.

The key-based (elliptic-curve) method signs the released model directory so that the
project's own CLI accepts it:

    model_signing verify key artifacts/package --signature attestations/model.sig \\
        --public_key keys/release-ec.pub.pem

The release key's public half is named in the owner-signed layout, so trusting the owner
key is enough to trust it; `chainproof verify` checks both the binding and the signature.
"""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path

from pipeline import bounded
from pipeline.errors import InputError, VerificationError

SIGNATURE = "model.sig"

_preloaded = False


def preload() -> None:
    """Import model_signing now, if it is not imported yet (the first call only).

    The import is about 1 s of CPU (sigstore, tuf, rekor types, pydantic models) that a
    publishing run would otherwise pay after its last stage, in its critical path. The runner
    calls this while a stage process runs, so the two overlap on separate cores. In the
    caller's thread, not a background one: stages are forked from the runner, and forking
    while another thread is inside an import (or dlopen) is not safe. Nothing is signed or
    read here; an absent package raises where sign_model_dir imports it.
    """
    global _preloaded
    if not _preloaded:
        _preloaded = True
        with contextlib.suppress(ImportError):
            import model_signing  # noqa: F401


def sign_model_dir(model_dir: Path, signature: Path, private_key: Path) -> None:
    import model_signing

    signer = model_signing.signing.Config()  # type: ignore[no-untyped-call]
    signer.use_elliptic_key_signer(private_key=private_key).sign(model_dir, signature)


def verify_model_dir(model_dir: Path, signature: Path, public_key: Path) -> None:
    """The OpenSSF signature over `model_dir` verifies with `public_key`, or VerificationError.

    The signature file is hostile until it verifies: it is read within pipeline.bounded's
    caps first (model_signing parses it with no limits), and whatever model_signing raises
    for a bad one — cryptography's InvalidSignature for an altered signature or payload, and
    the TypeError/IndexError/KeyError its parser lets escape on a wrong shape — is a
    VerificationError naming the file.
    """
    import model_signing
    from cryptography.exceptions import InvalidSignature

    _precheck(signature)
    try:
        verifier = model_signing.verifying.Config()  # type: ignore[no-untyped-call]
        verifier.use_elliptic_key_verifier(public_key=public_key).verify(model_dir, signature)
    except InvalidSignature as e:
        raise VerificationError(
            "the OpenSSF model signature does not verify with the release key (the signature "
            "or what it signs was altered)",
            check="model signature",
            artifact=str(signature),
            hint="do not use this model; fetch the release again from its publisher",
        ) from e
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        # ValueError is model_signing's own report of a mismatch (and pydantic's of a bad
        # bundle); the others are its parser meeting a signature file of the wrong shape.
        raise VerificationError(
            f"the OpenSSF model signature does not verify: {e or type(e).__name__}",
            check="model signature",
            artifact=str(signature),
        ) from e
    except OSError as e:
        raise VerificationError(
            f"cannot read what the OpenSSF model signature covers: {e}",
            check="model signature",
            artifact=str(signature),
        ) from e


def _precheck(signature: Path) -> None:
    """Size and nesting of the signature file and of its DSSE payload, before model_signing."""
    try:
        bundle = bounded.read_json(signature, what="OpenSSF model signature")
        envelope = bundle.get("dsseEnvelope") if isinstance(bundle, dict) else None
        payload = envelope.get("payload") if isinstance(envelope, dict) else None
        if isinstance(payload, str):
            bounded.check_nesting(
                base64.b64decode(payload), source=f"the payload of {signature.name}"
            )
    except FileNotFoundError as e:
        raise VerificationError(
            "the OpenSSF model signature is missing",
            check="model signature",
            artifact=str(signature),
        ) from e
    except InputError as e:
        raise VerificationError(e.message, check="model signature", artifact=str(signature)) from e
    except ValueError:
        return  # not base64: model_signing reports it, in its own words
