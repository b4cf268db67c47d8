"""in-toto links: built from our own digests, DSSE-signed by the functionary, written atomically."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from in_toto.exceptions import SignatureVerificationError
from in_toto.models.common import ValidationMixin
from in_toto.models.link import FILENAME_FORMAT, Link
from in_toto.models.metadata import Envelope, Metadata
from securesystemslib.exceptions import Error as SSLibError
from securesystemslib.exceptions import FormatError
from securesystemslib.signer import Signer

from pipeline import bounded
from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_bytes
from pipeline.provenance.keys import PublicKey

__all__ = [
    "Link",
    "LinkSignatureError",
    "envelope_bytes",
    "link_filename",
    "load_metadata",
    "read_link",
    "read_signed_link",
    "write_link",
]

# Everything in-toto's readers raise on a well-formed JSON value of the wrong shape.
_SHAPE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, SSLibError)


def link_filename(step: str, keyid: str) -> str:
    return str(FILENAME_FORMAT.format(step_name=step, keyid=keyid))


def envelope_bytes(signable: Any, signer: Signer) -> bytes:
    env = Envelope.from_signable(signable)
    env.create_signature(signer)
    return json.dumps(env.to_dict(), sort_keys=True).encode("utf-8")


def write_link(
    directory: Path,
    *,
    name: str,
    materials: dict[str, dict[str, str]],
    products: dict[str, dict[str, str]],
    command: list[str],
    byproducts: dict[str, Any],
    environment: dict[str, Any],
    signer: Signer,
) -> Path:
    """Sign and atomically write `<name>.<keyid8>.link`; returns its path."""
    link = Link(
        name=name,
        materials=materials,
        products=products,
        command=command,
        byproducts=byproducts,
        environment=environment,
    )
    path = directory / link_filename(name, signer.public_key.keyid)
    atomic_write_bytes(path, envelope_bytes(link, signer))
    return path


def load_metadata(path: Path, *, what: str = "in-toto metadata") -> Metadata:
    """`Metadata.load` for a hostile file (see load_metadata_payload)."""
    return load_metadata_payload(path, what=what)[0]


def load_metadata_payload(path: Path, *, what: str = "in-toto metadata") -> tuple[Metadata, Any]:
    """(metadata, its parsed payload): `Metadata.load` for a hostile file: size and nesting
    capped (pipeline.bounded), and any shape in-toto rejects an InputError naming the file.
    Signatures are NOT checked.

    A DSSE payload is JSON inside base64 inside JSON: its nesting is checked too, since
    `get_payload` parses it with the same recursive decoder, and then it is parsed, so that
    `get_payload` cannot fail later. FileNotFoundError propagates. The payload is returned
    so a verifier uses this parse after checking the signature over the same bytes: for a
    link of 50k artifacts each parse costs seconds (in-toto validates and canonicalises it).
    """
    data = bounded.read_json(path, what=what)
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} is not a JSON object (it holds a {type(data).__name__})")
    try:
        metadata = Metadata.from_dict(data)
    except _SHAPE_ERRORS as e:  # SSLibError covers FormatError and in-toto's InvalidMetadata
        raise InputError(
            f"{what} {path} is not valid in-toto metadata ({e or type(e).__name__})"
        ) from e
    if isinstance(metadata, Envelope):
        bounded.check_nesting(metadata.payload, source=f"the payload of {what} {path}")
    try:
        # Parsed here, before any signature check, so that a payload of the wrong shape is
        # refused as bad input instead of surprising the verifier later (validly signed or not).
        payload = payload_of(metadata)
    except _SHAPE_ERRORS as e:
        raise InputError(
            f"the payload of {what} {path} is not an in-toto link or layout "
            f"({e or type(e).__name__})"
        ) from e
    return metadata, payload


class _NotPlain(Exception):
    """The payload holds a float or an escaped surrogate: in-toto's own parse must judge it."""


def _refuse(_text: str) -> Any:
    raise _NotPlain


# A JSON escape that decodes to a UTF-16 surrogate (it may also be the tail of an escaped
# backslash, "\\ud800": then the exact path only costs time).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@cache
def _link_validators() -> tuple[tuple[str, Callable[[Link], None]], ...] | None:
    """Link's `_validate_*` methods by name, in the order in-toto's validate() runs them;
    None when this in-toto's Link validates some other way (then only its own parse is used)."""
    if Link.validate is not ValidationMixin.validate:
        return None
    return tuple(
        (name, fn)
        for name, fn in inspect.getmembers(Link, predicate=inspect.isfunction)
        if name.startswith("_validate_")
    )


# in-toto's _check_hex: re.fullmatch(r"^[0-9a-fA-F]+$", s), a non-empty run of hex digits
_HEX = re.compile(r"[0-9a-fA-F]+").fullmatch
_ARTIFACT_FIELDS = {"_validate_materials": "materials", "_validate_products": "products"}


def _plainly_valid_artifacts(artifacts: object) -> bool:
    """True only for what in-toto's _validate_materials/_validate_products accept (a dict of
    {str: hex str} dicts), checked in one tight loop instead of four calls and a regex-cache
    lookup per entry (~0.4 s for 100k artifacts). False sends it to in-toto's own validator,
    which raises its own error."""
    if type(artifacts) is not dict:
        return False
    for digests in artifacts.values():
        if type(digests) is not dict:
            return False
        for algorithm, value in digests.items():
            if type(algorithm) is not str or type(value) is not str or _HEX(value) is None:
                return False
    return True


def _read_link(data: dict[str, Any]) -> Link:
    """`Link.read(data)` with the same checks, minus the cost of one accident.

    in-toto's validate() finds its `_validate_*` methods with inspect.getmembers(self), which
    also evaluates every property, `signable_bytes` included: the whole link is canonicalised
    (attr.asdict + canonical JSON), ~1.7 s for a 50k-artifact link, and the bytes thrown away.
    The only inputs that canonicalisation refuses and the validators accept are floats and
    strings that are not UTF-8 (lone surrogates); the caller sends those down in-toto's own
    path, so every payload is accepted or refused exactly as Link.read would.
    """
    validators = _link_validators()
    if validators is None:
        return Link.read(data)
    link = Link.__new__(Link)
    # exactly what Link.__init__ assigns, before it calls validate()
    link._type = "link"
    link.name = data.get("name")
    link.materials = data.get("materials", {})
    link.products = data.get("products", {})
    link.byproducts = data.get("byproducts", {})
    link.command = data.get("command", [])
    link.environment = data.get("environment", {})
    for name, validate in validators:
        artifacts = _ARTIFACT_FIELDS.get(name)
        if artifacts is not None and _plainly_valid_artifacts(getattr(link, artifacts)):
            continue  # exactly the dicts in-toto's validator accepts, checked above
        validate(link)
    return link


def payload_of(metadata: Metadata) -> Any:
    """`metadata.get_payload()`, accepting and refusing exactly what it does; a DSSE link is
    parsed without in-toto's throw-away canonicalisation (see _read_link)."""
    if not isinstance(metadata, Envelope) or _SURROGATE_ESCAPE.search(metadata.payload):
        return metadata.get_payload()
    try:
        data = json.loads(
            metadata.payload.decode("utf-8"), parse_float=_refuse, parse_constant=_refuse
        )
    except _NotPlain:
        return metadata.get_payload()
    if not isinstance(data, dict) or data.get("_type") != "link":
        return metadata.get_payload()  # a layout (small), or a shape in-toto refuses
    return _read_link(data)


def read_link(path: Path) -> Link:
    """The link payload, UNVERIFIED: for display only; verification goes through verify.py.

    The file may be hostile (a bundle's): any shape in-toto rejects, JSON nested past the
    cap, or a layout under a `.link` name is an InputError, never a crash."""
    try:
        _, payload = load_metadata_payload(path, what="link")
    except FileNotFoundError as e:
        raise InputError(f"link {path} does not exist") from e
    except _SHAPE_ERRORS as e:
        raise InputError(f"cannot read link {path}: {e or type(e).__name__}") from e
    if not isinstance(payload, Link):
        raise InputError(f"{path} is not an in-toto link (it holds a {type(payload).__name__})")
    return payload


class LinkSignatureError(InputError):
    """A link whose signature does not verify with the key it is checked against."""


def read_signed_link(path: Path, key: PublicKey) -> Link:
    """The link at `path`, its signature verified with `key` (and only that key).

    Raises LinkSignatureError when the signature is not `key`'s (altered, unsigned, or signed
    by another key), InputError for anything that is not a link, FileNotFoundError when absent.
    """
    metadata = load_metadata(path, what="link")
    try:
        metadata.verify_signature(key.legacy_dict())
    except (SignatureVerificationError, FormatError) as e:
        raise LinkSignatureError(
            f"link {path} is not validly signed by functionary key {key.keyid[:16]}…"
        ) from e
    payload = payload_of(metadata)
    if not isinstance(payload, Link):
        raise InputError(f"{path} is not an in-toto link (it holds a {type(payload).__name__})")
    return payload
