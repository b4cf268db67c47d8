"""OpenSSF Model Signing interop: releases are also signed in the `model-signing` format.

The key-based (elliptic-curve) method signs the released model directory so that the
project's own CLI accepts it:

    model_signing verify key artifacts/package --signature attestations/model.sig \\
        --public_key keys/release-ec.pub.pem

The release key's public half is named in the owner-signed layout, so trusting the owner
key is enough to trust it; `chainproof verify` checks both the binding and the signature.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import VerificationError

SIGNATURE = "model.sig"


def sign_model_dir(model_dir: Path, signature: Path, private_key: Path) -> None:
    import model_signing

    signer = model_signing.signing.Config()  # type: ignore[no-untyped-call]
    signer.use_elliptic_key_signer(private_key=private_key).sign(model_dir, signature)


def verify_model_dir(model_dir: Path, signature: Path, public_key: Path) -> None:
    import model_signing

    try:
        verifier = model_signing.verifying.Config()  # type: ignore[no-untyped-call]
        verifier.use_elliptic_key_verifier(public_key=public_key).verify(model_dir, signature)
    except ValueError as e:  # model_signing reports every mismatch as ValueError
        raise VerificationError(
            f"the OpenSSF model signature does not verify: {e}",
            check="model signature",
            artifact=str(signature),
        ) from e
