"""The consumer side: load a released model only when its whole chain verifies.

`load_verified` replaces the seed's `load_trusted_weights`, which loaded whatever sat at a
path. It verifies the bundle offline against the owner key you trust, reads the model file
once, checks those exact bytes against the digest the signed chain records, scans them, and
only then hands them to Keras with safe_mode=True — there is no gap between check and load.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, VerificationError
from pipeline.provenance.chain import VerifyReport
from pipeline.release.freshness import check_fresh
from pipeline.release.verify import verify_bundle
from pipeline.workspace import DEFAULT_MODEL


def attested_digest(report: VerifyReport, name: str) -> str:
    for link in report.links.values():
        if name in link.products:
            return str(link.products[name]["sha256"])
    raise InputError(f"no step of this release produced {name}")


def read_verified_bytes(
    bundle: Path,
    *,
    owner_key: str | None = None,
    owner_key_file: Path | None = None,
    model: str = DEFAULT_MODEL,
    min_version: str | None = None,
    freshness: bool = True,
) -> tuple[bytes, VerifyReport]:
    """(the model file's bytes, the verification report) — the bytes are the attested ones.

    With `freshness` (the default) a release older than one this machine already verified, or
    below `min_version`, is refused (see release/freshness.py).
    """
    report = verify_bundle(Path(bundle), owner_key=owner_key, owner_key_file=owner_key_file)
    if freshness:
        check_fresh(report, min_version=min_version)
    expected = attested_digest(report, model)
    data = (Path(bundle) / "artifacts" / model).read_bytes()  # the one read we load from
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise VerificationError(
            f"{model} changed after verification (sha256 {got[:16]}…, attested {expected[:16]}…)",
            check="load",
            artifact=str(Path(bundle) / "artifacts" / model),
        )
    return data, report


def load_verified(
    bundle: str | Path,
    *,
    owner_key: str | None = None,
    owner_key_file: str | Path | None = None,
    model: str = DEFAULT_MODEL,
    min_version: str | None = None,
) -> Any:
    """The Keras model of a release bundle, or a VerificationError/UnsafeModelError.

    `owner_key` is the owner's key fingerprint (sha256 keyid), obtained from the owner, never
    from the bundle itself; or `owner_key_file`, the owner's public key file.
    """
    from pipeline.scan.model import UnsafeModelError, scan_path

    data, _ = read_verified_bytes(
        Path(bundle),
        owner_key=owner_key,
        owner_key_file=Path(owner_key_file) if owner_key_file else None,
        model=model,
        min_version=min_version,
    )
    with tempfile.TemporaryDirectory(prefix="chainproof-load-") as private:
        os.chmod(private, 0o700)
        path = Path(private) / Path(model).name
        path.write_bytes(data)
        report = scan_path(path)
        if not report.ok():
            raise UnsafeModelError(report)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras

        return keras.saving.load_model(path, safe_mode=True)
