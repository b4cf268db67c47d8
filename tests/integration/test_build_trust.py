"""Trust at build time: the owner signs beforehand, the runner holds only its key, the code and
the run are in the chain. Each attack is a test: it fails and names what broke."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import MappingProxyType

import pytest

from pipeline.config import load_config
from pipeline.errors import VerificationError
from pipeline.provenance.keys import load_public_key
from pipeline.release.verify import verify_target
from pipeline.runner.signing import accept_layout, config_code, layout_pins, write_signed_layout
from tests.conftest import FAST_PIPELINE, chainproof, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]


def keyid(pub: Path) -> str:
    return json.loads(pub.read_text())["keyid"]


def test_two_keys_owner_signs_beforehand_runner_holds_only_the_functionary_key(tmp_path):
    owner_ws, runner_ws = tmp_path / "owner", tmp_path / "runner"
    cfg = write_config(tmp_path / "configs", FAST_PIPELINE)
    # the runner makes its own keys: the functionary key (and the OpenSSF release key)
    proc = chainproof("keys", "init", "--role", "functionary", "--workspace", runner_ws)
    assert proc.returncode == 0, proc.stderr
    rkeys = runner_ws / "attestations" / "keys"
    assert not (rkeys / "owner.pem").exists()
    # the owner, elsewhere, signs a layout authorising that functionary key
    layout = tmp_path / "digits.layout"
    proc = chainproof(
        "layout",
        cfg,
        "-o",
        layout,
        "--functionary-key",
        rkeys / "functionary.pub",
        "--release-key",
        rkeys / "release-ec.pub.pem",
        "--workspace",
        owner_ws,
    )
    assert proc.returncode == 0, proc.stderr
    owner_pub = owner_ws / "attestations" / "keys" / "owner.pub"
    shutil.copyfile(owner_pub, tmp_path / "owner.pub")  # what the owner hands over
    proc = chainproof(
        "run",
        cfg,
        "--layout",
        layout,
        "--owner-key-file",
        tmp_path / "owner.pub",
        "--workspace",
        runner_ws,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert not (rkeys / "owner.pem").exists(), "the runner never holds the owner key"
    run = (runner_ws / "runs" / "latest").resolve()
    assert json.loads((run / "run.json").read_text())["layout_signed_by"] == "owner"
    (bundle,) = [
        p for p in (runner_ws / "releases" / "digits-fast").iterdir() if not p.is_symlink()
    ]
    proc = chainproof("verify", bundle, "--owner-key", keyid(owner_pub))
    assert proc.returncode == 0, proc.stderr
    assert "layout pins (owner)" in proc.stdout
    # the runner's own dev owner key does not verify it: trust is the owner's, not the runner's
    proc = chainproof("verify", bundle, "--owner-key", "ab" * 32)
    assert proc.returncode == 1


def test_code_edited_after_the_layout_was_signed_is_refused(tmp_path):
    ws = tmp_path / "ws"
    proc = chainproof("keys", "init", "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    config = load_config(write_config(tmp_path, FAST_PIPELINE))
    keys = ws / "attestations" / "keys"
    from pipeline.provenance.keys import load_signer

    owner, functionary = load_signer("owner", keys), load_signer("functionary", keys)
    code = config_code(config)
    layout = tmp_path / "layout"
    pins = layout_pins(config, code, signed_by="owner")
    write_signed_layout(config, owner, functionary.public, layout, keys, pins=pins)
    accept_layout(layout, owner.public, config, code, functionary.public)  # as signed: fine
    # stages/train.py edited to relabel 7 -> 1 after the owner signed
    edited = dict(code.files)
    edited["stages/train.py"] = "0" * 64
    tampered = dataclasses.replace(code, files=MappingProxyType(edited), sha256="1" * 64)
    with pytest.raises(VerificationError) as info:
        accept_layout(layout, owner.public, config, tampered, functionary.public)
    assert info.value.check == "layout pins"
    assert "stages/train.py" in info.value.message
    # so is another config
    other = dataclasses.replace(config, sha256="2" * 64)
    with pytest.raises(VerificationError, match="the layout pins"):
        accept_layout(layout, owner.public, other, code, functionary.public)
    # and a layout signed by someone else
    with pytest.raises(VerificationError) as info:
        accept_layout(layout, functionary.public, config, code, functionary.public)
    assert info.value.check == "layout signature"


def test_links_spliced_from_another_run_are_refused(workspace_copy):
    ws = workspace_copy
    first = (ws / "runs" / "latest").resolve()
    cfg = write_config(ws / "configs2", FAST_PIPELINE)
    proc = chainproof("run", cfg, "--workspace", ws, "--new-run")  # not "up to date"
    assert proc.returncode == 0, proc.stderr
    second = (ws / "runs" / "latest").resolve()
    assert second != first
    # take the second run's train/package/deploy links and products into the first
    links_a = ws / "attestations" / "runs" / first.name
    links_b = ws / "attestations" / "runs" / second.name
    for step in ("train", "package", "deploy"):
        shutil.rmtree(first / step)
        shutil.copytree(second / step, first / step)
        for link in links_a.glob(f"{step}.*.link"):
            link.unlink()
        for link in links_b.glob(f"{step}.*.link"):
            shutil.copyfile(link, links_a / link.name)
    (links_a / "provenance.intoto.json").unlink()
    record = json.loads((first / "run.json").read_text())
    record["release"] = None
    (first / "run.json").write_text(json.dumps(record))
    with pytest.raises(VerificationError) as info:
        verify_target(first, workspace=ws)
    assert info.value.check in ("run binding", "artifact rules")
    # a run directory that is not the run its links name
    shutil.copytree(second, ws / "runs" / "20990101T000000Z-aaaaaa")
    with pytest.raises(VerificationError) as info:
        verify_target(ws / "runs" / "20990101T000000Z-aaaaaa", workspace=ws)
    assert info.value.check == "run binding"


def test_someone_elses_run_does_not_verify_from_the_owners_workspace(workspace_copy, tmp_path):
    mine = workspace_copy
    theirs = tmp_path / "theirs"
    shutil.copytree(mine, theirs, symlinks=True)
    shutil.rmtree(theirs / "attestations" / "keys")
    proc = chainproof("keys", "init", "--workspace", theirs)  # their own keys
    assert proc.returncode == 0
    cfg = write_config(theirs / "configs3", FAST_PIPELINE.replace("seed: 7}", "seed: 8}", 1))
    proc = chainproof("run", cfg, "--workspace", theirs)
    assert proc.returncode == 0, proc.stderr
    run = (theirs / "runs" / "latest").resolve()
    # from my workspace, trusting my key: their run is not mine
    proc = chainproof("verify", run, "--workspace", mine)
    assert proc.returncode == 1
    assert "layout signature" in proc.stderr
    # a path given as --owner-key is never loaded as a key
    proc = chainproof("verify", run, "--owner-key", run / "keys" / "owner.pub")
    assert proc.returncode == 2
    assert "--owner-key-file" in proc.stderr
    # no trust given at all: refused, not defaulted to anything found on disk
    proc = chainproof("verify", run, cwd=theirs)
    assert proc.returncode == 2
    assert "no trusted owner key" in proc.stderr
    assert load_public_key(run / "keys" / "owner.pub").keyid != keyid(
        mine / "attestations" / "keys" / "owner.pub"
    )
