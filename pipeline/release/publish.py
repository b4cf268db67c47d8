"""Publishing a release: SLSA provenance, the bundle, the OpenSSF signature, VERIFY.md.

Everything comes in as explicit inputs (`ReleaseInputs`), not as the Runner: the bundle is
assembled in a staging directory, verified there as a consumer would, and renamed into place,
so a release appears whole or not at all.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pipeline.bounded import read_json
from pipeline.config import PipelineConfig
from pipeline.errors import InputError
from pipeline.fsutil import atomic_directory, atomic_symlink
from pipeline.hashing import list_tree, sha256_file
from pipeline.provenance import keys as keymod
from pipeline.provenance.chain import VerifyReport, load_layout, released_steps
from pipeline.provenance.links import Link, link_filename
from pipeline.provenance.openssf import SIGNATURE as MODEL_SIGNATURE
from pipeline.provenance.openssf import sign_model_dir
from pipeline.provenance.statements import (
    RELEASE_PREDICATE,
    slsa_provenance,
    statement,
    write_signed_statement,
)
from pipeline.release.verify import verify_bundle
from pipeline.workspace import CHECKS_DIR, LAYOUT_NAME, PROVENANCE, RELEASE_MANIFEST, UPSTREAM


@dataclass(frozen=True)
class ReleaseInputs:
    """What a release is made from: one verified run and the keys that may sign for it."""

    config: PipelineConfig
    run_id: str
    run_dir: Path
    links_dir: Path
    layout_path: Path
    locks: dict[Path, str]  # lock path -> sha256
    links: dict[str, Link]  # step -> its (verified) link
    owner: keymod.PublicKey
    functionary: keymod.KeyPair
    release_key: tuple[Path, Path] | None  # the OpenSSF key pair (private, public)
    started: str
    finished: str
    source_commit: str | None
    code: dict[str, Any]  # the code digest and the git state of the tree it came from
    layout_signed_by: str  # "owner" (signed beforehand) or "runner" (one-machine convenience)
    destination: Path  # releases/<name>/<version>


def _dataset_dependencies(inp: ReleaseInputs) -> list[dict[str, Any]]:
    deps: list[dict[str, Any]] = []
    for step, link in inp.links.items():
        for name, d in link.products.items():
            if name.endswith("/dataset.npz"):
                path = inp.run_dir / step / "manifest.json"  # a stage's product: hostile
                manifest = read_json(path, what="dataset manifest")
                if not isinstance(manifest, dict):
                    raise InputError(f"{path} is not a dataset manifest (not a JSON object)")
                origin = manifest.get("source")
                origin = origin if isinstance(origin, dict) else {}
                deps.append(
                    {
                        "name": f"dataset:{manifest.get('name')}",
                        "uri": str(origin.get("location", name)),
                        "digest": {"sha256": d["sha256"]},
                        "annotations": {
                            "origin_sha256": origin.get("sha256"),
                            "split": manifest.get("split"),
                        },
                    }
                )
        origin = link.environment.get("base_model")
        if origin:
            deps.append(
                {
                    "name": f"base_model:{step}",
                    "uri": origin["location"],
                    "digest": {"sha256": origin["sha256"]},
                    "annotations": {
                        k: v for k, v in origin.items() if k not in ("location", "sha256")
                    },
                }
            )
    return deps


def write_provenance(inp: ReleaseInputs, released: list[str]) -> Path:
    """SLSA provenance v1 for the released model files, signed by the runner's key."""
    config = inp.config
    subjects = {
        name: d["sha256"]
        for step in released
        for name, d in inp.links[step].products.items()
        if name.endswith((".keras", ".h5")) or "/saved_model/" in name
    }
    deps: list[dict[str, Any]] = [
        {"name": "config", "uri": config.path.as_uri(), "digest": {"sha256": config.sha256}},
    ]
    for lock, digest in inp.locks.items():
        deps.append(
            {"name": f"lock:{lock.name}", "uri": lock.as_uri(), "digest": {"sha256": digest}}
        )
    deps += _dataset_dependencies(inp)
    if inp.source_commit and inp.source_commit != "unknown":
        deps.append(
            {
                "name": "source",
                "uri": f"git+file://{config.base_dir}",
                "digest": {"gitCommit": inp.source_commit},
                "annotations": {"dirty": inp.code.get("dirty")},
            }
        )
    deps.append(
        {
            "name": "code",
            "digest": {"sha256": inp.code["sha256"]},
            "annotations": {"gitCommit": inp.code.get("commit"), "dirty": inp.code.get("dirty")},
        }
    )
    byproducts = {
        f"attestations/{p.name}": sha256_file(p)
        for p in sorted(inp.links_dir.glob("*.link")) + [inp.layout_path]
    }
    stmt = slsa_provenance(
        subjects=subjects,
        external={
            "pipeline": config.name,
            "config": {"path": str(config.path), "sha256": config.sha256},
        },
        internal={
            "stages": [s.name for s in config.stages],
            "layout_sha256": sha256_file(inp.layout_path),
            "layout_signed_by": inp.layout_signed_by,
        },
        dependencies=deps,
        invocation_id=inp.run_id,
        started=inp.started,
        finished=inp.finished,
        byproducts=byproducts,
        builder_version={"chainproof": version("chainproof")},
    )
    path = inp.links_dir / PROVENANCE
    write_signed_statement(path, stmt, inp.functionary.signer)
    return path


def write_release_manifest(bundle: Path, inp: ReleaseInputs) -> None:
    """Sign the list of every file in the bundle (VERIFY.md, keys and locks included), with the
    release's name, version and run: verify refuses any file it does not cover, and a bundle
    sitting under another version's name."""
    files = list_tree(bundle)
    digests = {name: sha256_file(path) for name, path in files.items()}
    stmt = statement(
        digests,
        RELEASE_PREDICATE,
        {
            "name": inp.config.name,
            "version": inp.destination.name,
            "run_id": inp.run_id,
            "published": inp.finished,
            "layout_sha256": sha256_file(inp.layout_path),
        },
    )
    write_signed_statement(bundle / "attestations" / RELEASE_MANIFEST, stmt, inp.functionary.signer)


def _layout_names(inp: ReleaseInputs, release_pub: Path) -> bool:
    """Does the owner's layout bind this OpenSSF release key? (Only then is it used.)"""
    report = VerifyReport(target=str(inp.layout_path), owner_keyid=inp.owner.keyid)
    layout = load_layout(inp.layout_path, inp.owner, report)
    return keymod.release_public_key(release_pub.read_bytes()).keyid in layout.keys


def publish(inp: ReleaseInputs) -> Path:
    """Write the provenance, assemble and verify the bundle, rename it into place."""
    released = released_steps(inp.layout_path, inp.owner)
    write_provenance(inp, released)
    final = inp.destination
    if final.exists():
        raise InputError(
            f"release {final} already exists",
            hint="releases are immutable; set a new release.version in the config",
        )
    with atomic_directory(final) as staging:
        (staging / "attestations").mkdir()
        shutil.copyfile(inp.layout_path, staging / "attestations" / LAYOUT_NAME)
        for s in inp.config.stages:
            name = link_filename(s.name, inp.functionary.public.keyid)
            shutil.copyfile(inp.links_dir / name, staging / "attestations" / name)
        shutil.copyfile(inp.links_dir / PROVENANCE, staging / "attestations" / PROVENANCE)
        shutil.copytree(inp.run_dir / CHECKS_DIR, staging / "attestations" / CHECKS_DIR)
        shutil.copytree(inp.run_dir / "locks", staging / "locks")
        if (inp.run_dir / UPSTREAM).is_dir():
            shutil.copytree(inp.run_dir / UPSTREAM, staging / UPSTREAM)
        (staging / "keys").mkdir()
        for role in keymod.ROLES:
            shutil.copyfile(inp.run_dir / f"keys/{role}.pub", staging / f"keys/{role}.pub")
        for step in released:
            for name, path in list_tree(inp.run_dir / step, prefix=f"{step}/").items():
                dest = staging / "artifacts" / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
        if inp.release_key and _layout_names(inp, inp.release_key[1]):
            shutil.copyfile(inp.release_key[1], staging / "keys" / keymod.RELEASE_PUB)
            sign_model_dir(
                staging / "artifacts" / released[0],
                staging / "attestations" / MODEL_SIGNATURE,
                inp.release_key[0],
            )
        (staging / "VERIFY.md").write_text(verify_md(inp, released[0]))
        write_release_manifest(staging, inp)
        verify_bundle(staging, owner_key=inp.owner.keyid, expected_version=final.name)
    atomic_symlink(final.name, final.parent / "latest")
    return final


def verify_md(inp: ReleaseInputs, model_dir: str) -> str:
    """How to check this release, with the owner fingerprint (written into the bundle)."""
    kid, final = inp.owner.keyid, inp.destination
    return f"""# Verifying this release

Release `{inp.config.name}` version `{final.name}`, built by chainproof run `{inp.run_id}`.

Trust comes from the owner's key fingerprint, which you must get from the owner through a
channel other than this bundle:

    owner key fingerprint (sha256 keyid): {kid}

The model directory is also signed in the OpenSSF Model Signing format; its own CLI checks it:

    model_signing verify key artifacts/{model_dir} --signature attestations/model.sig \\
        --public_key keys/release-ec.pub.pem

Check the whole chain offline, with only this directory:

    chainproof verify {final.name} --owner-key {kid}

(run it from the directory that holds this one, or pass the bundle's path). It verifies the
owner's signature on `attestations/root.layout`, that the layout has not expired, that every
step's link is signed by the functionary key the layout names, ran the expected command and
exited 0, that each step's materials match the products of the step before it (from the
dataset's sha256 to the packaged weights), and that every file under `artifacts/` has the
digest its signed link records. Any failure names the check, the step, the rule and the file.
"""
