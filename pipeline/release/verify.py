"""Verify a run directory or a release bundle: `chainproof verify` and the deploy gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import InputError, VerificationError
from pipeline.hashing import Walk, sha256_file, walk_tree
from pipeline.provenance.chain import (
    DiskArtifacts,
    VerifyReport,
    released_steps,
    safe_join,
    verify_chain,
    verify_inspections,
)
from pipeline.provenance.keys import public_key_from_dict, resolve_trusted_owner
from pipeline.provenance.links import Link
from pipeline.provenance.statements import payload_of, read_verified_statement
from pipeline.release.manifest import check_release_manifest, read_renewal
from pipeline.workspace import (
    CHECKS_DIR,
    DATA,
    LAYOUT_NAME,
    PROVENANCE,
    RELEASE_MANIFEST,
    RENEWAL,
    UPSTREAM,
    base_model_name,
    read_run_record,
)

LAYOUT = LAYOUT_NAME


def is_bundle(path: Path) -> bool:
    return (path / "attestations" / LAYOUT).is_file()


def _summary(stmt: dict[str, Any]) -> str:
    pred = stmt.get("predicate", {})
    kind = "/".join(stmt.get("predicateType", "").rstrip("/").rsplit("/", 2)[-2:])
    cp = pred.get("chainproof", {})
    if kind.startswith("vulns"):
        if not cp.get("scanned"):
            return f"{kind}: dependencies NOT SCANNED ({cp.get('reason', 'no database')})"
        db = cp.get("database", {})
        n = sum(len(lock.get("findings", [])) for lock in cp.get("locks", []))
        vex = [
            f"{v.get('id')} in {v.get('package')} until {v.get('expires')}"
            for lock in cp.get("locks", [])
            for v in lock.get("not_affected", [])
        ]
        return (
            f"{kind}: {cp.get('verdict')}, db sha256 {str(db.get('sha256'))[:12]}… "
            f"({db.get('records')} records, newest {db.get('newest_modified')}), {n} finding(s)"
            + (f"; not affected per owner-signed VEX: {', '.join(vex)}" if vex else "")
        )
    if kind.startswith("provenance"):
        build = pred.get("buildDefinition", {})
        return f"{kind}: SLSA, {len(build.get('resolvedDependencies', []))} resolved dependencies"
    verdict = pred.get("result") or pred.get("verdict") or cp.get("verdict") or "present"
    return f"{kind}: {verdict}"


def _bound(name: str, stmt: dict[str, Any], recorded: dict[str, str], run_id: str | None) -> bool:
    """Is this statement about *this* chain? Recorded by a link, or naming this run."""
    if name in recorded or name == PROVENANCE:  # provenance: bound by check_provenance
        return True
    if name == RELEASE_MANIFEST:  # bound by check_release_manifest
        return bool(run_id) and stmt.get("predicate", {}).get("run_id") == run_id
    url = str(stmt.get("predicate", {}).get("url", ""))
    return bool(run_id) and url.startswith("chainproof:reproduce/") and url.endswith(f"/{run_id}")


def check_statements(
    directories: list[tuple[Path, str]],
    report: VerifyReport,
    *,
    run_id: str | None = None,
    run_dir: Path | None = None,
) -> None:
    """Verify every signed Statement in `directories` with the layout's functionary keys.

    Each (directory, prefix) pair: a statement named `<prefix><file>` that a link records as a
    material must be present with exactly that digest (so a release proves which scans it
    passed); a signed statement that binds to nothing in this chain (one copied from another
    run) is refused rather than shown. One that does not verify fails the whole verification.
    """
    if report.layout is None:
        return
    keys = [public_key_from_dict(d, source="layout") for d in report.layout.keys.values()]
    recorded = {
        name: digest["sha256"]
        for link in report.links.values()
        for name, digest in link.materials.items()
        if name.startswith(f"{CHECKS_DIR}/")
    }
    seen = set()
    for directory, prefix in directories:
        for path in sorted(directory.glob("*.intoto.json")):
            name = f"{prefix}{path.name}"
            if name == RENEWAL:  # the owner's, checked with the owner key by read_renewal
                continue
            seen.add(name)
            stmt = read_verified_statement(path, keys)
            if name in recorded and sha256_file(path) != recorded[name]:
                raise VerificationError(
                    f"{name} is not the statement the chain recorded",
                    check="attestations",
                    artifact=str(path),
                )
            if not _bound(name, stmt, recorded, run_id):
                raise VerificationError(
                    f"{name} is signed, but binds to nothing in this chain (copied from "
                    "another run?)",
                    check="attestations",
                    artifact=str(path),
                    hint="remove it; only statements the chain records or names are trusted",
                )
            report.passed("attestation", f"{name}: {_summary(stmt)} (signed)")
            if name == DATA:  # the screen's verdict, re-applied (its files, in a run)
                from pipeline.scan.data.attest import recheck_data_screen

                report.passed("data screen", recheck_data_screen(stmt, run_id, run_dir))
    for name in sorted(set(recorded) - seen):
        raise VerificationError(
            f"{name}, which the deploy step consumed, is missing",
            check="attestations",
            artifact=name,
            hint="the release was stripped of its gate evidence; do not use it",
        )


def check_provenance(
    path: Path, report: VerifyReport, artifacts: Path, links: Path, *, required: bool
) -> None:
    """The SLSA provenance's subjects are the released files and its byproducts the links."""
    if not path.is_file():
        if required:
            raise VerificationError(
                "the release's SLSA provenance is missing",
                check="provenance",
                artifact=str(path),
                hint="a published release always carries attestations/provenance.intoto.json",
            )
        return
    stmt = payload_of(path)  # its signature was verified by check_statements
    for subject in stmt.get("subject", []):
        file = safe_join(artifacts, str(subject.get("name", "")), check="provenance")
        if not file.is_file() or sha256_file(file) != subject["digest"]["sha256"]:
            raise VerificationError(
                f"provenance subject {subject['name']} does not match the released file",
                check="provenance",
                artifact=str(file),
            )
    for item in stmt["predicate"]["runDetails"].get("byproducts", []):
        file = safe_join(links, str(item.get("name", "")).split("/", 1)[-1], check="provenance")
        if not file.is_file() or sha256_file(file) != item["digest"]["sha256"]:
            raise VerificationError(
                f"provenance byproduct {item['name']} does not match the link shipped",
                check="provenance",
                artifact=str(file),
            )
    report.passed(
        "provenance",
        f"SLSA v1: {len(stmt.get('subject', []))} subject(s) = released files, "
        f"byproducts = the links and layout",
    )


def check_model_signature(bundle: Path, report: VerifyReport, released: list[str]) -> None:
    """The OpenSSF model signature, with a release key the owner-signed layout names."""
    from pipeline.bounded import KEY_BYTES, read_bytes
    from pipeline.provenance.keys import RELEASE_PUB, release_public_key
    from pipeline.provenance.openssf import SIGNATURE, verify_model_dir

    signature = bundle / "attestations" / SIGNATURE
    if report.layout is None:
        return
    functionaries = {k for step in report.layout.steps for k in step.pubkeys}
    release_keys = set(report.layout.keys) - functionaries
    if not signature.is_file():
        if release_keys:  # the owner named a release key, so a signature must be there
            raise VerificationError(
                "the OpenSSF model signature is missing",
                check="model signature",
                artifact=str(signature),
            )
        return
    pub = bundle / "keys" / RELEASE_PUB
    if not pub.is_file():
        raise VerificationError(
            "the model signature's public key is missing",
            check="model signature",
            artifact=str(pub),
        )
    try:
        key = release_public_key(read_bytes(pub, what="release key", max_bytes=KEY_BYTES))
    except (ValueError, InputError) as e:
        raise VerificationError(
            f"{pub.name} is not a PEM public key ({e})", check="model signature", artifact=str(pub)
        ) from e
    if key.keyid not in release_keys:
        raise VerificationError(
            "the bundle's release key is not the one the owner-signed layout names",
            check="model signature",
            artifact=str(pub),
        )
    verify_model_dir(bundle / "artifacts" / released[0], signature, pub)
    report.passed(
        "model signature", f"OpenSSF model-signing signature over artifacts/{released[0]}"
    )


def check_locks(directory: Path, report: VerifyReport) -> None:
    """The locks shipped beside the chain are exactly the ones its steps ran under."""
    recorded = {str(link.environment.get("lock_sha256")) for link in report.links.values()}
    shipped = set()
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if path.is_symlink() or not path.is_file():
            raise VerificationError(
                f"locks/{path.name} is not a regular file", check="locks", artifact=str(path)
            )
        digest = sha256_file(path)
        shipped.add(digest)
        if digest not in recorded:
            raise VerificationError(
                f"lock {path.name} is not the lock any step ran under",
                check="locks",
                artifact=str(path),
                hint="the lock file was edited after the run",
            )
        report.passed("locks", f"{path.name} is the lock the steps ran under")
    missing = recorded - shipped
    if missing:
        raise VerificationError(
            f"the lock(s) the steps ran under are missing (sha256 {sorted(missing)[0][:16]}…)",
            check="locks",
            artifact=str(directory),
        )


def refuse_symlinks(root: Path, tree: Walk | None = None) -> Walk:
    """A verified tree must be what it says: no link may point anywhere else.

    Returns the walk (one os.scandir pass) for the checks that follow; `tree` is a walk of
    `root` the caller already has."""
    if root.is_symlink():
        raise VerificationError(f"{root} is a symlink", check="layout of files", artifact=str(root))
    # a tree walked to be verified: each of its files is hashed next (disk check, manifest)
    tree = tree if tree is not None else walk_tree(root, digest_small=True)
    for name in tree.symlinks:
        raise VerificationError(
            f"{name} is a symlink; a verified tree holds only real files",
            check="layout of files",
            artifact=tree.path(name),
        )
    return tree


def refuse_stray_links(link_dir: Path, report: VerifyReport) -> None:
    expected = {
        f"{step.name}.{kid[:8]}.link"
        for step in (report.layout.steps if report.layout else [])
        for kid in step.pubkeys
    }
    for path in sorted(link_dir.glob("*.link")):
        if path.name not in expected:
            raise VerificationError(
                f"{path.name} is a link for no step and key of the layout",
                check="links present",
                artifact=str(path),
            )


def refuse_unattested(run_dir: Path, report: VerifyReport, tree: Walk | None = None) -> None:
    """In a run, every file in a step's directory must be one of its recorded products.

    `tree`: the run directory's walk, symlinks already refused (refuse_symlinks)."""
    tree = tree if tree is not None else refuse_symlinks(run_dir)
    products = {n for link in report.links.values() for n in link.products}
    for step in report.links:
        inside = f"{step}/"
        stray = [n for n in tree.files if n.startswith(inside) and n not in products]
        for name in sorted(stray, key=_parts):  # sorted only when there is one to name
            raise VerificationError(
                f"{name} is in step '{step}' but its link does not record it",
                check="artifacts on disk",
                step=step,
                artifact=tree.path(name),
            )


def _parts(name: str) -> list[str]:
    return name.split("/")  # the order Path sorting gave: by component


def check_run_files(run_dir: Path, report: VerifyReport) -> None:
    """A run directory is the run its links name, with the config and logs they recorded."""
    if report.run_id and run_dir.name != report.run_id:
        raise VerificationError(
            f"the links name run {report.run_id}, but this is {run_dir.name}",
            check="run binding",
            artifact=str(run_dir),
            hint="links or files were moved between runs; do not trust this one",
        )
    config = run_dir / "config.yaml"
    recorded = {link.environment.get("config_sha256") for link in report.links.values()}
    if config.is_file() and recorded and sha256_file(config) not in recorded:
        raise VerificationError(
            f"config.yaml has sha256 {sha256_file(config)[:16]}…, but the links recorded "
            f"{sorted(map(str, recorded))[0][:16]}…",
            check="config",
            artifact=str(config),
            hint="the recorded config was edited after the run",
        )
    for step, link in report.links.items():
        for which in ("stdout", "stderr"):
            entry = link.byproducts.get(which)
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                continue
            path = safe_join(run_dir, entry["path"], check="logs", step=step)
            if not path.is_file() or sha256_file(path) != entry.get("sha256"):
                raise VerificationError(
                    f"the {which} log of step '{step}' is not the one its link recorded",
                    check="logs",
                    step=step,
                    artifact=str(path),
                    hint="the log was edited or removed after the run",
                )
    report.passed("config and logs", "the recorded config and every stage log match the links")


def verify_run(
    run_dir: Path,
    *,
    owner_key: str | None = None,
    owner_key_file: Path | None = None,
    workspace: Path | None = None,
) -> VerifyReport:
    """Verify every link of a run against its layout, and every recorded file on disk.

    The owner key is trusted only as given: a fingerprint (matched against the run's copy of
    the owner key), a key file, or the key of `workspace` (the verifier's own workspace,
    chosen explicitly) — never the keys of the workspace the run happens to sit in.
    """
    run_dir = run_dir.resolve()
    record = read_run_record(run_dir)
    trusted = resolve_trusted_owner(
        owner_key,
        key_file=owner_key_file,
        shipped=run_dir / "keys" / "owner.pub",
        workspace_key=(workspace / "attestations" / "keys" / "owner.pub") if workspace else None,
    )
    links = (run_dir / str(record["links"])).resolve()
    disk = DiskArtifacts(run_dir)  # walked once; the checks below reuse the walk
    report = verify_chain(
        layout_path=(run_dir / str(record["layout"])).resolve(),
        link_dir=links,
        owner=trusted.key,
        disk=disk,
        target=str(run_dir),
    )
    report.trust = trusted.source
    refuse_unattested(run_dir, report, refuse_symlinks(run_dir, disk.tree))
    refuse_stray_links(links, report)
    verify_inspections(report, run_dir, disk.tree)  # what in-toto-verify from run_dir checks
    check_run_files(run_dir, report)
    check_statements(
        [(run_dir / CHECKS_DIR, f"{CHECKS_DIR}/"), (links, "")],
        report,
        run_id=report.run_id,
        run_dir=run_dir,
    )
    published = bool(record.get("release"))
    check_provenance(links / PROVENANCE, report, run_dir, links, required=published)
    for line in verify_upstreams(run_dir, report.links):
        report.passed("upstream", line)
    check_locks(run_dir / "locks", report)
    return report


def verify_bundle(
    bundle: Path,
    *,
    owner_key: str | None = None,
    owner_key_file: Path | None = None,
    local_owner: Path | None = None,
    expected_version: str | None = None,
) -> VerifyReport:
    """Verify a release bundle offline, with only its contents and a trusted owner key.

    The bundle's own keys/owner.pub is used only when its fingerprint equals `owner_key`;
    `owner_key_file` names the key itself; `local_owner` is the verifier's own workspace key.
    """
    given = Path(bundle)
    bundle = given.resolve()  # the path you chose (e.g. releases/<name>/latest); inside, no links
    tree = refuse_symlinks(bundle)  # the bundle's one walk: chain and manifest reuse it
    trusted = resolve_trusted_owner(
        owner_key,
        key_file=owner_key_file,
        shipped=bundle / "keys" / "owner.pub",
        workspace_key=local_owner,
    )
    owner = trusted.key
    layout = bundle / "attestations" / LAYOUT
    renewed = read_renewal(bundle, owner)
    # the steps whose products the bundle carries
    released = released_steps(layout, owner, renewed_until=renewed)
    report = verify_chain(
        layout_path=layout,
        link_dir=bundle / "attestations",
        owner=owner,
        disk=DiskArtifacts(
            bundle / "artifacts",
            require_all=False,
            required_steps=tuple(released),
            walked=tree.under("artifacts/"),
        ),
        target=str(bundle),
        renewed_until=renewed,
    )
    report.trust = trusted.source
    attestations = bundle / "attestations"
    refuse_stray_links(attestations, report)
    check_statements(
        [(attestations / CHECKS_DIR, f"{CHECKS_DIR}/"), (attestations, "")],
        report,
        run_id=report.run_id,
    )
    check_provenance(
        attestations / PROVENANCE, report, bundle / "artifacts", attestations, required=True
    )
    check_model_signature(bundle, report, released)
    for line in verify_upstreams(bundle, report.links):
        report.passed("upstream", line)
    check_locks(bundle / "locks", report)
    # last, so a specific check (provenance, model signature, locks) names a missing piece
    # first; then every other byte of the bundle must be the one the manifest signed
    report.release = check_release_manifest(
        bundle, report, expected_version=expected_version, given=given, tree=tree
    )
    return report


def verify_target(
    path: Path,
    *,
    owner_key: str | None = None,
    owner_key_file: Path | None = None,
    workspace: Path | None = None,
    expected_version: str | None = None,
) -> VerifyReport:
    """Verify a run or a bundle. `workspace`: trust that workspace's owner key (explicitly);
    `expected_version`: the release version you asked for (a bundle must be exactly that)."""
    if not path.exists():
        raise InputError(
            f"{path} does not exist", hint="pass runs/<run-id>, runs/latest or a release directory"
        )
    if is_bundle(path):
        local = (workspace / "attestations" / "keys" / "owner.pub") if workspace else None
        return verify_bundle(
            path,
            owner_key=owner_key,
            owner_key_file=owner_key_file,
            local_owner=local,
            expected_version=expected_version,
        )
    return verify_run(path, owner_key=owner_key, owner_key_file=owner_key_file, workspace=workspace)


def verified_release(run_dir: Path, workspace: Path) -> bool:
    """Does the run's chain verify, and its published release too, under `workspace`'s owner
    key? (What lineage sync asks before it calls a model version verified.)"""
    try:
        run = verify_run(run_dir, workspace=workspace)
        record = read_run_record(run_dir.resolve())
        release = record.get("release")
        if not isinstance(release, str) or not release:
            return False
        bundle = verify_bundle(
            Path(release),
            local_owner=workspace / "attestations" / "keys" / "owner.pub",
            expected_version=Path(release).name,
        )
    except (VerificationError, InputError):
        return False
    return bundle.run_id == run.run_id


def verify_upstreams(root: Path, links: dict[str, Link]) -> list[str]:
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
