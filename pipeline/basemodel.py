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

INPUTS = "inputs"
BASE_MODEL = "base_model.keras"
UPSTREAM = "upstream"


@dataclass(frozen=True)
class PreparedBase:
    path: Path  # inside the run
    sha256: str
    origin: dict[str, Any]


def base_model_name(stage: str) -> str:
    """Run-relative name of a stage's base model (a material of its link)."""
    return f"{INPUTS}/{stage}/{BASE_MODEL}"


def _read(spec: dict[str, Any], base_dir: Path) -> tuple[bytes, dict[str, Any]]:
    if spec.get("bundle"):
        from pipeline.loading import DEFAULT_MODEL, read_verified_bytes

        bundle = (base_dir / spec["bundle"]).resolve()
        owner = spec.get("owner_key")
        if not owner:
            raise InputError("a base_model bundle needs owner_key (fingerprint or owner.pub)")
        owner_path = base_dir / owner
        owner_key = str(owner_path) if owner_path.is_file() else owner
        try:
            data, report = read_verified_bytes(
                bundle, owner_key=owner_key, model=spec.get("file") or DEFAULT_MODEL
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
    from pipeline.modelscan import UnsafeModelError, scan_path

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
        atomic_write_bytes(
            upstream / "artifacts" / (spec.get("file") or "package/model.keras"), data
        )
    return PreparedBase(dest, digest, {**origin, "sha256": digest})


def verify_upstreams(root: Path, links: dict, verify_bundle) -> list[str]:
    """Verify each upstream release a link says its stage fine-tuned from; one line each.

    `root` holds `upstream/<stage>/` (a run directory or a bundle's artifacts root); the
    owner key is the one the signed link recorded for that base model.
    """
    lines = []
    for stage, link in links.items():
        origin = link.environment.get("base_model")
        if not origin:
            continue
        material = link.materials.get(base_model_name(stage), {}).get("sha256")
        if material != origin.get("sha256"):
            raise VerificationError(
                f"step '{stage}' recorded base model {origin.get('sha256')} "
                f"but consumed {material}",
                check="base model",
                step=stage,
            )
        if origin.get("kind") != "bundle":
            lines.append(f"{stage}: base model {origin['location']} pinned sha256 {material[:12]}…")
            continue
        upstream = root / UPSTREAM / stage
        if not upstream.is_dir():
            raise VerificationError(
                f"the upstream release of step '{stage}' is not shipped",
                check="base model",
                step=stage,
                artifact=str(upstream),
            )
        report = verify_bundle(upstream, owner_key=origin["owner_keyid"])
        attested = next(
            (
                lk.products[n]["sha256"]
                for lk in report.links.values()
                for n in lk.products
                if n.endswith(".keras") and lk.products[n]["sha256"] == material
            ),
            None,
        )
        if attested is None:
            raise VerificationError(
                f"step '{stage}' fine-tuned from a model its upstream release does not attest",
                check="base model",
                step=stage,
            )
        lines.append(
            f"{stage}: fine-tuned from release {origin.get('release')} (owner "
            f"{origin['owner_keyid'][:16]}…), whose own chain verifies "
            f"({len(report.checks)} checks)"
        )
    return lines
