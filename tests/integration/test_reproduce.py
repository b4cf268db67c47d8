"""Reproducibility: same config, data and lock give byte-identical products."""

from __future__ import annotations

import json

import pytest

from pipeline.compare.reproduce import compare_runs
from pipeline.errors import VerificationError
from pipeline.release.verify import verify_target
from tests.conftest import FAST_PIPELINE, chainproof, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]


def test_reproduce_gives_identical_weights_and_a_signed_statement(workspace_copy):
    original = (workspace_copy / "runs" / "latest").resolve()
    proc = chainproof("reproduce", original)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "identical  train/model.keras" in proc.stdout
    assert "reproduced: identical" in proc.stdout
    new = (workspace_copy / "runs" / "latest").resolve()
    assert new != original
    assert (new / "train/model.keras").read_bytes() == (original / "train/model.keras").read_bytes()

    statement = next((workspace_copy / "attestations/runs" / new.name).glob("*.intoto.json"))
    report = verify_target(new, workspace=workspace_copy)
    assert any("test-result/v0.1: PASSED" in d for c, d in report.checks if c == "attestation")

    # a tampered statement fails verification
    env = json.loads(statement.read_text())
    env["payload"] = env["payload"][:-8] + ("A" * 8 if env["payload"][-8:] != "A" * 8 else "B" * 8)
    statement.write_text(json.dumps(env))
    with pytest.raises(VerificationError) as info:
        verify_target(new, workspace=workspace_copy)
    assert info.value.check == "attestations"


def test_a_changed_hyperparameter_is_reported_as_different(completed_workspace, tmp_path):
    ws = tmp_path / "ws"
    base = write_config(
        tmp_path,
        FAST_PIPELINE.replace("seed: 7}\n  - name: package", "seed: 7}\n  - name: package"),
    )
    assert chainproof("run", base, "--workspace", ws).returncode == 0
    first = (ws / "runs" / "latest").resolve()
    changed = write_config(
        tmp_path,
        FAST_PIPELINE.replace(
            "params: {epochs: 2, seed: 7}", "params: {epochs: 2, seed: 7, learning_rate: 0.01}"
        ),
        name="changed.yaml",
    )
    assert chainproof("run", changed, "--workspace", ws).returncode == 0
    second = (ws / "runs" / "latest").resolve()
    stages = {s.stage: s for s in compare_runs(first, second)}
    assert stages["source"].identical, "same data either way"
    train = {f.name: f for f in stages["train"].files}
    assert not train["train/model.keras"].identical
    assert "tensors differ" in train["train/model.keras"].detail
    assert "max |diff|" in train["train/model.keras"].detail
    assert "params" in train["train/metrics.json"].detail


def test_reproduce_refuses_when_the_lock_changed(tmp_path):
    from tests.conftest import MAIN_LOCK

    lock = tmp_path / "lock.txt"
    lock.write_bytes(MAIN_LOCK.read_bytes())  # the same pins, in a file the test may change
    body = (
        FAST_PIPELINE.replace("lock: @MAIN_LOCK@", f"lock: {lock}") + "lineage: {enabled: false}\n"
    )
    ws = tmp_path / "ws"
    assert chainproof("run", write_config(tmp_path, body), "--workspace", ws).returncode == 0
    lock.write_text(lock.read_text() + "\n# changed after the run\n")
    proc = chainproof("reproduce", ws / "runs" / "latest")
    assert proc.returncode == 2 and "the lock changed" in proc.stderr


def test_reproduce_refuses_a_run_that_does_not_verify(workspace_copy):
    run = (workspace_copy / "runs" / "latest").resolve()
    model = run / "package" / "model.keras"
    data = bytearray(model.read_bytes())
    data[-100] ^= 1
    model.write_bytes(bytes(data))
    proc = chainproof("reproduce", run)
    assert proc.returncode == 1 and "package/model.keras" in proc.stderr
    assert "reproduced" not in proc.stdout
