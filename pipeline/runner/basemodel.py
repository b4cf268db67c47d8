"""Base models with verified lineage: what a fine-tune starts from, checked before anything loads.

The runner (the trust boundary), not the stage, fetches the base model: from a release bundle
(whose whole chain is verified against the owner key the config names), a local file or a URL
(each pinned by sha256). The pin is checked on the bytes actually read, the model scanner runs
on those bytes, and only then are they written into the run as `inputs/<stage>/base_model.keras`
— a material of the stage's link. A bundle's attestations travel with the run (`upstream/`),
so the downstream release verifies as a two-level chain.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, VerificationError
from pipeline.fsutil import atomic_write_bytes
from pipeline.release.loading import read_verified_bytes
from pipeline.scan.model import UnsafeModelError, scan_path
from pipeline.workspace import DEFAULT_MODEL, UPSTREAM, base_model_name


@dataclass(frozen=True)
class PreparedBase:
    path: Path  # inside the run
    sha256: str
    origin: dict[str, Any]


def _read(spec: dict[str, Any], base_dir: Path) -> tuple[bytes, dict[str, Any]]:
    if spec.get("bundle"):
        bundle = (base_dir / spec["bundle"]).resolve()
        owner_key, owner_file = spec.get("owner_key"), spec.get("owner_key_file")
        if not owner_key and not owner_file:
            raise InputError(
                "a base_model bundle needs owner_key (the owner's fingerprint) or owner_key_file"
            )
        try:
            data, report = read_verified_bytes(
                bundle,
                owner_key=owner_key,
                owner_key_file=(base_dir / owner_file) if owner_file else None,
                model=spec.get("file") or DEFAULT_MODEL,
                freshness=False,  # the config names this very bundle on purpose
            )
        except VerificationError as e:
            raise VerificationError(
                f"the base model's release {bundle} does not verify; nothing was loaded: "
                f"{e.message}",
                check=f"base model: {e.check}",
                step=e.step,
                rule=e.rule,
                artifact=e.artifact,
            ) from e
        return data, {
            "kind": "bundle",
            "location": str(bundle),
            "owner_keyid": report.owner_keyid,
            "release": bundle.name,
        }
    if spec.get("path"):
        path = base_dir / spec["path"]
        try:
            return path.read_bytes(), {"kind": "file", "location": str(path.resolve())}
        except OSError as e:
            raise InputError(f"cannot read base model {path}: {e.strerror}") from e
    if spec.get("url"):
        try:
            with urllib.request.urlopen(spec["url"], timeout=60) as resp:
                return resp.read(), {"kind": "url", "location": spec["url"]}
        except OSError as e:
            raise InputError(f"cannot download base model {spec['url']}: {e}") from e
    raise InputError("base_model needs one of bundle, path, url")


def prepare(stage: str, spec: dict[str, Any], base_dir: Path, run_dir: Path) -> PreparedBase:
    """Fetch, pin-check, scan and place a stage's base model in the run. Raises on any doubt."""
    data, origin = _read(spec, base_dir)
    digest = hashlib.sha256(data).hexdigest()
    pin = spec.get("sha256")
    if pin and pin != digest:
        raise VerificationError(
            f"the base model has sha256 {digest}, but the config pins {pin}",
            check="base model pin",
            artifact=origin["location"],
        )
    if not pin and origin["kind"] != "bundle":
        raise InputError("a base_model path or url needs a sha256 pin")
    dest = run_dir / base_model_name(stage)
    atomic_write_bytes(dest, data)
    report = scan_path(dest)
    if not report.ok():
        dest.unlink()
        raise UnsafeModelError(report)
    if origin["kind"] == "bundle":
        # The upstream release travels with the run, so the downstream release verifies as a
        # two-level chain; the model in it is the exact bytes just verified and scanned.
        upstream = run_dir / UPSTREAM / stage
        shutil.copytree(Path(origin["location"]), upstream, symlinks=False)
        atomic_write_bytes(upstream / "artifacts" / (spec.get("file") or DEFAULT_MODEL), data)
    return PreparedBase(dest, digest, {**origin, "sha256": digest})
