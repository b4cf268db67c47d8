"""Ways to get "up to date" from `chainproof run` when it must not say so (an adversarial
review's cases). Each test starts from a copy of one real workspace with one published run R,
makes one hostile change, and asserts the next `chainproof run` is NOT "up to date"."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import FAST_PIPELINE, chainproof, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]


def _run_json(ws: Path, run_id: str) -> Path:
    return ws / "runs" / run_id / "run.json"


def _edit(path: Path, **fields) -> None:
    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record, indent=2))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("uptodate")
    config = write_config(root / "configs", FAST_PIPELINE + "lineage: {enabled: false}\n")
    ws = root / "ws"
    proc = chainproof("run", config, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    return ws, config, (ws / "runs" / "latest").resolve().name


@pytest.fixture
def ws(base, tmp_path) -> tuple[Path, Path, str]:
    """A private copy at the SAME path (the dependency statement records the workspace path)."""
    src, config, run_id = base
    backup = tmp_path / "backup"
    shutil.copytree(src, backup, symlinks=True)
    yield src, config, run_id
    shutil.rmtree(src)
    shutil.copytree(backup, src, symlinks=True)


def _up_to_date(ws: Path, config: Path) -> bool:
    proc = chainproof("run", config, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    return "up to date" in proc.stdout + proc.stderr


def test_baseline_an_untouched_workspace_is_up_to_date(ws):
    root, config, _ = ws
    assert _up_to_date(root, config)


def test_release_redirected_to_a_copy_outside_the_workspace(ws, tmp_path):
    """run.json is unsigned: point `release` at a pristine copy elsewhere, then tamper with the
    workspace's real release. `run` must not call the pipeline up to date."""
    root, config, run_id = ws
    real = root / "releases" / "digits-fast" / run_id
    copy = tmp_path / "elsewhere" / run_id
    shutil.copytree(real, copy)
    card = real / "artifacts" / "package" / "model_card.json"
    card.write_bytes(card.read_bytes().replace(b"{", b"{ ", 1))
    _edit(_run_json(root, run_id), release=str(copy))
    assert not _up_to_date(root, config), "up to date on a copy outside the workspace"


def test_rotated_release_key(ws):
    """A new run would sign the model with the workspace's new OpenSSF release key and name it
    in its layout; R's release is under the retired key, so it would not be reproduced."""
    root, config, _ = ws
    keys = root / "attestations" / "keys"
    for name in ("release-ec.pem", "release-ec.pub.pem"):
        (keys / name).unlink()
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
         str(keys / "release-ec.pem")], check=True, capture_output=True)  # fmt: skip
    subprocess.run(
        ["openssl", "ec", "-in", str(keys / "release-ec.pem"), "-pubout", "-out",
         str(keys / "release-ec.pub.pem")], check=True, capture_output=True)  # fmt: skip
    (keys / "release-ec.pem").chmod(0o600)
    assert not _up_to_date(root, config), "up to date with a release under the retired key"


def test_model_signature_is_not_vouched_for_by_the_release_key(ws):
    """The skip of the OpenSSF check: the release manifest is signed by the functionary key,
    not the release key, so a functionary-key holder who breaks model.sig (or swaps the model
    and re-signs links) gets "up to date ... its release verifies"; `verify` refuses it."""
    from pipeline.hashing import list_tree, sha256_file
    from pipeline.provenance.keys import load_signer
    from pipeline.provenance.statements import (
        RELEASE_PREDICATE,
        payload_of,
        statement,
        write_signed_statement,
    )

    root, config, run_id = ws
    bundle = root / "releases" / "digits-fast" / run_id
    manifest = bundle / "attestations" / "release.intoto.json"
    sig = bundle / "attestations" / "model.sig"
    text = sig.read_text()
    m = re.search(r'"sig":\s*"([A-Za-z0-9+/=])', text)
    assert m is not None
    flip = "A" if m.group(1) != "A" else "B"
    sig.write_text(text[: m.start(1)] + flip + text[m.start(1) + 1 :])
    files = {n: sha256_file(p) for n, p in list_tree(bundle).items() if p != manifest}
    signer = load_signer("functionary", root / "attestations" / "keys").signer
    predicate = payload_of(manifest)["predicate"]
    write_signed_statement(manifest, statement(files, RELEASE_PREDICATE, predicate), signer)
    verify = chainproof("verify", bundle, "--workspace", root)
    assert verify.returncode != 0 and "model signature" in verify.stdout + verify.stderr
    assert not _up_to_date(root, config), "up to date although the bundle fails `verify`"


def test_a_newer_release_hidden_by_an_edited_status(ws, tmp_path):
    """A newer run S (another config) published the workspace's latest release; its unsigned
    run.json status is set to "failed". `run` with R's config says up to date naming R while
    releases/<name>/latest is S's model: a normal run would have moved it."""
    root, config, run_id = ws
    other = write_config(
        tmp_path / "other",
        FAST_PIPELINE.replace("seed: 7}", "seed: 8}") + "lineage: {enabled: false}\n",
    )
    proc = chainproof("run", other, "--workspace", root)
    assert proc.returncode == 0, proc.stderr
    newer = (root / "runs" / "latest").resolve().name
    assert newer != run_id
    _edit(_run_json(root, newer), status="failed")
    latest = (root / "releases" / "digits-fast" / "latest").resolve().name
    assert latest == newer
    assert not _up_to_date(root, config), f"up to date with {run_id}, but latest is {newer}"


def test_up_to_date_waits_for_the_background_environment_walk(ws, monkeypatch):
    # The bootstrap of `run` walks TensorFlow, MLflow, ... in the background (envmanifest
    # DEFERRED). A drift it finds must refuse the run (exit 3) before "up to date" is said.
    from pipeline import envmanifest
    from pipeline.config import load_config
    from pipeline.errors import EnvironmentDrift
    from pipeline.runner.run import Runner
    from pipeline.workspace import Workspace

    root, config, _ = ws
    said: list[str] = []

    def drifted() -> None:
        raise EnvironmentDrift("venv", ["! tensorflow/__init__.py: differs (simulated)"])

    monkeypatch.setattr(envmanifest, "settle_all", drifted)
    runs = sorted(p.name for p in (root / "runs").iterdir())
    runner = Runner(load_config(config), Workspace(root), on_event=said.append, reuse=True)
    with pytest.raises(EnvironmentDrift) as info:
        runner.run()
    assert info.value.exit_code == 3
    assert not any("up to date" in line for line in said)
    assert sorted(p.name for p in (root / "runs").iterdir()) == runs, "no run was made"
