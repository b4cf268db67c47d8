"""End to end: a real four-stage run verifies; each tamper fails and names its culprit."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from in_toto.models.metadata import Metadata
from securesystemslib.signer import CryptoSigner

from pipeline.errors import VerificationError
from pipeline.provenance.keys import load_signer
from pipeline.provenance.links import envelope_bytes
from pipeline.release.verify import verify_target
from tests.conftest import chainproof

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]


def run_dir(ws: Path) -> Path:
    return (ws / "runs" / "latest").resolve()


def link_path(ws: Path, step: str) -> Path:
    (found,) = (ws / "attestations" / "runs" / run_dir(ws).name).glob(f"{step}.*.link")
    return found


def release_dir(ws: Path) -> Path:
    (found,) = [p for p in (ws / "releases" / "digits-fast").iterdir() if not p.is_symlink()]
    return found


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def failure(ws: Path, target: Path | None = None, **kw) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify_target(target or run_dir(ws), workspace=ws, **kw)
    return info.value


# ---------------------------------------------------------------- the good path


def test_run_produces_a_verified_chain_and_release(completed_workspace):
    ws = completed_workspace
    run = run_dir(ws)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "succeeded"
    links = sorted(p.name.split(".")[0] for p in link_path(ws, "source").parent.glob("*.link"))
    assert links == ["deploy", "package", "source", "train"]
    assert (run / "train" / "model.keras").stat().st_size > 10_000
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.5, "a real model learns the digits"
    assert set(metrics["test"]["per_class"]) == {str(c) for c in range(10)}
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == metrics["test"]["samples"]
    for png in ("training_curves.png", "confusion_matrix.png"):
        assert (run / "train" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = chainproof("verify", run, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    assert "verified: ok" in proc.stdout

    bundle = release_dir(ws)
    assert (bundle / "artifacts" / "package" / "model.keras").is_file()
    assert (bundle / "VERIFY.md").is_file()
    owner = json.loads((ws / "attestations/keys/owner.pub").read_text())["keyid"]
    proc = chainproof("verify", bundle, "--owner-key", owner)
    assert proc.returncode == 0, proc.stderr


def test_link_records_environment_and_log_digests(completed_workspace):
    link = Metadata.load(str(link_path(completed_workspace, "train"))).get_payload()
    env = link.environment
    assert len(env["lock_sha256"]) == 64 and env["python"].startswith("3.11")
    assert env["files_verified"] > 1000, "every installed file was checked against RECORD"
    assert link.byproducts["return-value"] == 0
    assert link.byproducts["stdout"]["path"] == "logs/train.stdout"
    assert link.command[:4] == ["python", "-I", "-m", "stages.train"]
    switches = env["determinism"]
    assert switches["tf.config.experimental.enable_op_determinism"] is True
    assert switches["keras.utils.set_random_seed"] == 7
    assert "source/dataset.npz" in link.materials and "train/model.keras" in link.products


def test_show_prints_the_chain(completed_workspace):
    proc = chainproof("show", run_dir(completed_workspace))
    assert proc.returncode == 0
    assert "source/dataset.npz" in proc.stdout and "train/model.keras" in proc.stdout


# ---------------------------------------------------------------- tampering, one byte at a time


def test_dataset_byte_changed_after_source(workspace_copy):
    flip_byte(run_dir(workspace_copy) / "source" / "dataset.npz")
    err = failure(workspace_copy)
    assert err.check == "artifacts on disk" and err.step == "source"
    assert err.artifact.endswith("source/dataset.npz")
    proc = chainproof("verify", run_dir(workspace_copy), "--workspace", workspace_copy)
    assert proc.returncode == 1
    assert "source/dataset.npz" in proc.stderr and "step:     source" in proc.stderr


def test_weights_byte_changed_after_train(workspace_copy):
    flip_byte(run_dir(workspace_copy) / "train" / "model.keras", offset=2000)
    err = failure(workspace_copy)
    assert (err.check, err.step) == ("artifacts on disk", "train")
    assert err.artifact.endswith("train/model.keras")


def test_byte_in_a_link(workspace_copy):
    path = link_path(workspace_copy, "train")
    doc = json.loads(path.read_text())
    payload = bytearray(doc["payload"].encode())
    payload[100] = ord("A") if payload[100] != ord("A") else ord("B")
    doc["payload"] = payload.decode()
    path.write_text(json.dumps(doc))
    err = failure(workspace_copy)
    assert err.step == "train" and err.check in ("link signatures", "link format")
    assert err.artifact.endswith(path.name)


def test_deleted_link(workspace_copy):
    link_path(workspace_copy, "package").unlink()
    err = failure(workspace_copy)
    assert (err.check, err.step) == ("links present", "package")


def test_link_signed_by_a_key_the_layout_does_not_name(workspace_copy):
    path = link_path(workspace_copy, "train")
    link = Metadata.load(str(path)).get_payload()
    intruder = CryptoSigner.generate_ed25519()
    # under the authorised file name...
    path.write_bytes(envelope_bytes(link, intruder))
    err = failure(workspace_copy)
    assert (err.check, err.step) == ("link signatures", "train")
    # ...and under its own key's name
    path.unlink()
    (path.parent / f"train.{intruder.public_key.keyid[:8]}.link").write_bytes(
        envelope_bytes(link, intruder)
    )
    err = failure(workspace_copy)
    assert (err.check, err.step) == ("links present", "train")
    assert "does not name" in err.message


def test_layout_resigned_with_a_foreign_key(workspace_copy):
    path = link_path(workspace_copy, "train").parent / "root.layout"
    layout = Metadata.load(str(path)).get_payload()
    layout.steps[1].expected_materials = [["ALLOW", "*"]]  # an attacker's loosened rule
    path.write_bytes(envelope_bytes(layout, CryptoSigner.generate_ed25519()))
    err = failure(workspace_copy)
    assert err.check == "layout signature" and err.artifact.endswith("root.layout")


def test_expired_layout(workspace_copy):
    path = link_path(workspace_copy, "train").parent / "root.layout"
    layout = Metadata.load(str(path)).get_payload()
    layout.expires = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    owner = load_signer("owner", workspace_copy / "attestations" / "keys")
    path.write_bytes(envelope_bytes(layout, owner.signer))
    err = failure(workspace_copy)
    assert err.check == "layout expiry" and "expired" in err.message


def test_link_with_an_unexpected_command_is_refused(workspace_copy):
    path = link_path(workspace_copy, "train")
    link = Metadata.load(str(path)).get_payload()
    link.command = ["python", "-c", "print('something else')"]
    functionary = load_signer("functionary", workspace_copy / "attestations" / "keys")
    path.write_bytes(envelope_bytes(link, functionary.signer))
    err = failure(workspace_copy)
    assert (err.check, err.step) == ("expected command", "train")


def test_material_that_does_not_match_upstream_product(workspace_copy):
    """A train link whose dataset digest differs from what source produced (re-signed)."""
    path = link_path(workspace_copy, "train")
    link = Metadata.load(str(path)).get_payload()
    link.materials["source/dataset.npz"] = {"sha256": "0" * 64}
    functionary = load_signer("functionary", workspace_copy / "attestations" / "keys")
    path.write_bytes(envelope_bytes(link, functionary.signer))
    err = failure(workspace_copy)
    assert (err.check, err.step) == ("artifact rules", "train")
    assert "source/dataset.npz" in err.artifact and "DISALLOW" in err.rule


# ---------------------------------------------------------------- the release bundle


def test_bundle_with_a_swapped_model_file(workspace_copy):
    bundle = release_dir(workspace_copy)
    flip_byte(bundle / "artifacts" / "package" / "model.keras", offset=3000)
    err = failure(workspace_copy, bundle)
    assert err.check == "artifacts on disk" and err.artifact.endswith("package/model.keras")


def test_bundle_with_a_wrong_owner_fingerprint(workspace_copy):
    err = failure(workspace_copy, release_dir(workspace_copy), owner_key="ab" * 32)
    assert err.check == "owner key"


def test_bundle_with_an_unattested_extra_file(workspace_copy):
    bundle = release_dir(workspace_copy)
    (bundle / "artifacts" / "package" / "extra.pkl").write_bytes(b"not attested")
    err = failure(workspace_copy, bundle)
    assert "no link attests it" in err.message


def test_bundle_missing_a_released_file(workspace_copy):
    bundle = release_dir(workspace_copy)
    (bundle / "artifacts" / "package" / "model_card.json").unlink()
    err = failure(workspace_copy, bundle)
    assert err.check == "artifacts on disk" and "missing" in err.message


def test_run_directory_is_complete_with_no_temp_files(completed_workspace):
    leftovers = [
        p for p in completed_workspace.rglob("*") if ".tmp-" in p.name or ".staging-" in p.name
    ]
    assert leftovers == []
    assert not (run_dir(completed_workspace) / "tmp").exists()
    assert os.readlink(completed_workspace / "runs" / "latest") == run_dir(completed_workspace).name


def test_an_unattested_file_in_a_step_directory_fails(workspace_copy):
    (run_dir(workspace_copy) / "package" / "evil.py").write_text("import os\n")
    err = failure(workspace_copy)
    assert err.check == "artifacts on disk" and err.step == "package"


def test_a_truncated_run_record_is_an_input_error(workspace_copy):
    (run_dir(workspace_copy) / "run.json").write_text("[]")
    proc = chainproof("verify", run_dir(workspace_copy), "--workspace", workspace_copy)
    assert proc.returncode == 2 and "not a chainproof run record" in proc.stderr
