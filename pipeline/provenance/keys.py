"""Signing keys: dev keys on first use, or securesystemslib signer URIs for real ones.

A public key file is the securesystemslib key dict with its keyid inside (what in-toto's
layout and verifier want). The keyid is always recomputed from the key material when a key
is loaded, so a file cannot claim someone else's fingerprint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.exceptions import Error as SSLibError
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from securesystemslib.signer._utils import compute_default_keyid

from pipeline import bounded
from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_bytes, atomic_write_text

ROLES = ("owner", "functionary")
ENV_URI = "CHAINPROOF_{role}_SIGNER"  # e.g. CHAINPROOF_OWNER_SIGNER=file2:/secure/owner.pem
ENV_PUB = "CHAINPROOF_{role}_PUBKEY"  # its public key file (a .pub written by chainproof)


@dataclass(frozen=True)
class PublicKey:
    key: SSlibKey

    @property
    def keyid(self) -> str:
        return self.key.keyid

    def legacy_dict(self) -> dict[str, Any]:
        """The key dict with its keyid inside, as in-toto layouts and verify expect."""
        d = self.key.to_dict()
        d["keyid"] = self.key.keyid
        return d

    def to_json(self) -> str:
        return json.dumps(self.legacy_dict(), sort_keys=True, indent=1) + "\n"

    def to_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM, the form in-toto-verify 3.x reads (--verification-keys).

        in-toto recomputes the keyid from the PEM with the key type's default scheme; a key
        whose keyid would come out different (a non-default scheme) is refused here, since
        in-toto-verify would then not find the layout's signature.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        public = self.key.keyval.get("public")
        if not isinstance(public, str):
            raise InputError(f"key {self.keyid[:16]}… has no public key value")
        try:
            if self.key.keytype == "ed25519":
                crypto: Any = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
            else:  # ecdsa and rsa keys keep their PEM in keyval
                crypto = load_pem_public_key(public.encode())
            again = SSlibKey.from_crypto(crypto)
        except (ValueError, TypeError, SSLibError) as e:
            raise InputError(f"key {self.keyid[:16]}… cannot be written as PEM ({e})") from e
        if again.keyid != self.keyid:
            raise InputError(
                f"key {self.keyid[:16]}… uses scheme {self.key.scheme!r}; in-toto-verify would "
                f"read its PEM as {again.scheme!r} with keyid {again.keyid[:16]}…",
                hint="only keys with their type's default scheme can be exported for in-toto",
            )
        pem: bytes = crypto.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem


def public_key_from_dict(d: dict[str, Any], *, source: str) -> PublicKey:
    try:
        keytype, scheme, keyval = d["keytype"], d["scheme"], d["keyval"]
        keyid = compute_default_keyid(keytype, scheme, keyval)
        if d.get("keyid") not in (None, keyid):
            raise InputError(
                f"{source}: the keyid in the file ({d['keyid'][:16]}…) is not the fingerprint "
                f"of the key in it ({keyid[:16]}…)",
                hint="the key file was edited; fetch the owner's public key again",
            )
        clean = {"keytype": keytype, "scheme": scheme, "keyval": keyval}
        return PublicKey(SSlibKey.from_dict(keyid, clean))
    except (KeyError, TypeError, ValueError, AttributeError, SSLibError) as e:
        # SSLibError: canonical JSON refuses floats and the like in `keyval`
        raise InputError(f"{source} is not a public key file ({e!r})") from e


def load_public_key(path: Path) -> PublicKey:
    try:
        data = bounded.read_json(path, what="public key", max_bytes=bounded.KEY_BYTES)
    except FileNotFoundError as e:
        raise InputError(
            f"public key {path} not found", hint="run `chainproof keys init` first"
        ) from e
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a public key file (it holds a JSON {type(data).__name__})")
    return public_key_from_dict(data, source=str(path))


@dataclass(frozen=True)
class KeyPair:
    role: str
    signer: Signer
    public: PublicKey


def init_dev_keys(
    keys_dir: Path, *, force: bool = False, roles: tuple[str, ...] = ROLES
) -> dict[str, Path]:
    """Write dev ed25519 keys for `roles` (private 0600). Keeps existing ones.

    The functionary (runner) side also gets the OpenSSF release key, which signs bundles.
    """
    keys_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for role in roles:
        priv, pub = keys_dir / f"{role}.pem", keys_dir / f"{role}.pub"
        if priv.exists() and pub.exists() and not force:
            continue
        signer = CryptoSigner.generate_ed25519()
        atomic_write_bytes(priv, signer.private_bytes, mode=0o600)
        os.chmod(priv, 0o600)
        atomic_write_text(pub, PublicKey(signer.public_key).to_json())
        written[role] = pub
    if "functionary" in roles:
        init_release_key(keys_dir)
    return written


# The OpenSSF model-signing key: its key-based method wants an elliptic-curve key (ECDSA
# P-256), so releases get one beside the ed25519 roles. The owner binds it by naming its
# public key in the signed layout.
RELEASE_KEY, RELEASE_PUB = "release-ec.pem", "release-ec.pub.pem"


def init_release_key(keys_dir: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv, pub = keys_dir / RELEASE_KEY, keys_dir / RELEASE_PUB
    if priv.exists() and pub.exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    atomic_write_bytes(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    atomic_write_bytes(
        pub,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def release_public_key(pem: bytes) -> PublicKey:
    """The sslib form of the release key's PEM, as the layout names it.

    Raises ValueError for anything that is not a PEM public key securesystemslib supports
    (cryptography reports an unknown curve as UnsupportedAlgorithm, which is not one)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = SSlibKey.from_crypto(load_pem_public_key(pem))
    except UnsupportedAlgorithm as e:
        raise ValueError(f"unsupported public key algorithm ({e})") from e
    return PublicKey(key)


def public_key_path(role: str, keys_dir: Path) -> Path:
    """Where `role`'s public key is: $CHAINPROOF_<ROLE>_PUBKEY beside a configured signer URI
    (as `load_signer` reads it), else the dev key's `<role>.pub` in `keys_dir`."""
    if role not in ROLES:
        raise InputError(f"no key named {role!r}", hint=f"the keys are named {', '.join(ROLES)}")
    if os.environ.get(ENV_URI.format(role=role.upper())):
        pub = os.environ.get(ENV_PUB.format(role=role.upper()))
        if pub:
            return Path(pub)
    return keys_dir / f"{role}.pub"


def owner_signer_configured(keys_dir: Path) -> bool:
    """Is there an owner signer: $CHAINPROOF_OWNER_SIGNER, or a dev key in `keys_dir`?"""
    return bool(os.environ.get(ENV_URI.format(role="OWNER"))) or (keys_dir / "owner.pem").is_file()


def load_signer(role: str, keys_dir: Path) -> KeyPair:
    """The signer for `role`: from $CHAINPROOF_<ROLE>_SIGNER if set, else the dev key file."""
    uri = os.environ.get(ENV_URI.format(role=role.upper()))
    if uri:
        pub_env = ENV_PUB.format(role=role.upper())
        pub_path = os.environ.get(pub_env)
        if not pub_path:
            raise InputError(
                f"{ENV_URI.format(role=role.upper())} is set but {pub_env} is not",
                hint=f"set {pub_env} to the signer's public key file",
            )
        public = load_public_key(Path(pub_path))
    else:
        priv = keys_dir / f"{role}.pem"
        if not priv.exists():
            raise InputError(
                f"no {role} key in {keys_dir}", hint="run `chainproof keys init` (dev keys)"
            )
        if priv.stat().st_mode & 0o077:
            raise InputError(
                f"{priv} is readable by other users (mode {oct(priv.stat().st_mode & 0o777)})",
                hint=f"chmod 600 {priv}",
            )
        public = load_public_key(keys_dir / f"{role}.pub")
        uri = f"file2:{priv.resolve()}"
    try:
        signer = Signer.from_priv_key_uri(uri, public.key)
    except Exception as e:  # securesystemslib raises many types for bad URIs/keys
        raise InputError(f"cannot load the {role} signer from {uri!r}: {e}") from e
    return KeyPair(role, signer, public)


@dataclass(frozen=True)
class TrustedOwner:
    """The owner key a verification trusts, and where that trust came from (for the report)."""

    key: PublicKey
    source: str


def parse_fingerprint(value: str, *, option: str = "--owner-key") -> str:
    """A 64-hex sha256 keyid, or InputError. Never a path: a key file is named explicitly."""
    fp = value.strip().lower()
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        hint = (
            f"{option} takes the owner's sha256 key fingerprint (64 hex digits); "
            "to trust a key file, pass it explicitly with --owner-key-file PATH"
        )
        raise InputError(f"{option} {value!r} is not a sha256 key fingerprint", hint=hint)
    return fp


def resolve_trusted_owner(
    fingerprint: str | None,
    *,
    key_file: Path | None = None,
    shipped: Path | None = None,
    workspace_key: Path | None = None,
) -> TrustedOwner:
    """The owner key to trust. Trust comes only from what the user gave:

    - `key_file` (--owner-key-file): that key; with a fingerprint too, they must agree;
    - `fingerprint` (--owner-key): the key `shipped` beside what is verified (a bundle's
      keys/owner.pub) is used only if its recomputed fingerprint equals it;
    - `workspace_key`: the verifier's own workspace key, when the caller chose it explicitly.

    Nothing is picked up from the current directory or from the thing being verified.
    """
    from pipeline.errors import VerificationError

    fp = parse_fingerprint(fingerprint) if fingerprint else None
    if key_file is not None:
        key = load_public_key(key_file)
        if fp and key.keyid != fp:
            raise VerificationError(
                f"{key_file} has fingerprint {key.keyid}, not the {fp} you trust",
                check="owner key",
                artifact=str(key_file),
                hint="the key file is not the owner's; fetch it again from the owner",
            )
        return TrustedOwner(key, f"key file {key_file}")
    if fp:
        if shipped is None or not shipped.is_file():
            raise InputError(
                "a fingerprint alone needs the owner key shipped with what is verified "
                "(keys/owner.pub)",
                hint="pass the owner's public key with --owner-key-file PATH",
            )
        key = load_public_key(shipped)
        if key.keyid != fp:
            raise VerificationError(
                f"the shipped owner key has fingerprint {key.keyid}, not the {fp} you trust",
                check="owner key",
                artifact=str(shipped),
                hint="it was signed by someone else; do not use it",
            )
        return TrustedOwner(key, f"fingerprint {fp} you gave (matched {shipped})")
    if workspace_key is not None:
        return TrustedOwner(load_public_key(workspace_key), f"workspace key {workspace_key}")
    raise InputError(
        "no trusted owner key",
        hint="pass --owner-key FINGERPRINT (the owner's sha256 keyid, from the owner, not from "
        "the bundle) or --owner-key-file PATH",
    )
