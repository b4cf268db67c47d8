"""Base models with verified lineage: a fine-tune starts only from a verified, scanned model."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pipeline.release.verify import verify_target
from tests import model_samples
from tests.conftest import chainproof, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]

FINETUNE = """
schema: 1
name: digits-ft
lock: @MAIN_LOCK@
lineage: {{enabled: false}}
stages:
  - name: source
    kind: source
    params: {{dataset: sklearn-digits, seed: 3}}
  - name: train
    kind: train
    needs: [source]
    params:
      base_model: {base}
      epochs: 1
      learning_rate: 0.0002
  - name: package
    kind: package
    needs: [train]
  - name: deploy
    kind: deploy
    needs: [package]
"""


def upstream_bundle(ws: Path) -> Path:
    return (ws / "releases" / "digits-fast" / "latest").resolve()


def owner_pub(ws: Path) -> Path:
    return ws / "attestations" / "keys" / "owner.pub"


def test_fine_tune_from_a_release_verifies_as_a_two_level_chain(workspace_copy, tmp_path):
    ws = workspace_copy
    base = f"{{bundle: {upstream_bundle(ws)}, owner_key_file: {owner_pub(ws)}}}"
    proc = chainproof("run", write_config(tmp_path, FINETUNE.format(base=base)), "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    assert "base model" in proc.stderr and "verified and scanned" in proc.stderr
    bundle = (ws / "releases" / "digits-ft" / "latest").resolve()
    fp = json.loads(owner_pub(ws).read_text())["keyid"]
    report = verify_target(bundle, owner_key=fp)
    (line,) = [d for c, d in report.checks if c == "upstream"]
    assert "fine-tuned from release" in line and upstream_bundle(ws).name in line
    env = json.loads(
        base64.b64decode(
            json.loads((bundle / "attestations/provenance.intoto.json").read_text())["payload"]
        )
    )
    deps = {d["name"]: d for d in env["predicate"]["buildDefinition"]["resolvedDependencies"]}
    upstream_model = hashlib.sha256(
        (upstream_bundle(ws) / "artifacts/package/model.keras").read_bytes()
    ).hexdigest()
    assert deps["base_model:train"]["digest"]["sha256"] == upstream_model
    # the run too, its inspection included: inputs/ and upstream/ are the runner's, not a step's
    run = (ws / "runs" / "latest").resolve()
    assert "inspections" in [c for c, _ in verify_target(run, workspace=ws).checks]


def test_fine_tune_from_a_tampered_upstream_is_refused_before_loading(workspace_copy, tmp_path):
    ws = workspace_copy
    upstream = upstream_bundle(ws)
    model = upstream / "artifacts/package/model.keras"
    data = bytearray(model.read_bytes())
    data[-300] ^= 1
    model.write_bytes(bytes(data))
    base = f"{{bundle: {upstream}, owner_key_file: {owner_pub(ws)}}}"
    proc = chainproof("run", write_config(tmp_path, FINETUNE.format(base=base)), "--workspace", ws)
    assert proc.returncode == 1, proc.stderr
    assert "the base model's release" in proc.stderr and "does not verify" in proc.stderr
    assert "model.keras" in proc.stderr
    run = (ws / "runs" / "latest").resolve()
    assert not (run / "train").exists(), "the train stage never started"
    assert not (run / "inputs").exists() or not any((run / "inputs").rglob("*.keras"))


def test_malicious_base_model_file_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    evil = tmp_path / "evil.keras"
    evil.write_bytes(
        model_samples.keras_zip(model_samples.sequential_config(model_samples.lambda_layer()))
    )
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()
    base = f"{{path: {evil}, sha256: {digest}}}"
    ws = tmp_path / "ws"
    proc = chainproof("run", write_config(tmp_path, FINETUNE.format(base=base)), "--workspace", ws)
    assert proc.returncode == 1, proc.stderr
    assert "model-scan" in proc.stderr and "Lambda" in proc.stderr
    assert not sentinel.exists()
    assert not list(ws.rglob("train.*.link"))


def test_base_model_pin_mismatch_is_refused(tmp_path, workspace_copy):
    model = upstream_bundle(workspace_copy) / "artifacts/package/model.keras"
    copy = tmp_path / "base.keras"
    shutil.copyfile(model, copy)
    base = f"{{path: {copy}, sha256: {'ab' * 32}}}"
    proc = chainproof(
        "run", write_config(tmp_path, FINETUNE.format(base=base)), "--workspace", tmp_path / "ws"
    )
    assert proc.returncode == 1 and "but the config pins" in proc.stderr
