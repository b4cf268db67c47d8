"""The candidate gate: updates reach production only through a passing, signed comparison."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.errors import VerificationError
from pipeline.release.verify import verify_target
from tests.conftest import FAST_PIPELINE, chainproof, write_config
from tests.integration.test_dependency_gate import VULNERABLE_LOCK

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]


def releases(ws) -> list[str]:
    return sorted(p.name for p in (ws / "releases" / "digits-fast").iterdir() if not p.is_symlink())


def test_identical_candidate_passes_and_deploys_only_on_request(workspace_copy, tmp_path):
    ws = workspace_copy
    before = releases(ws)
    cfg = write_config(tmp_path, FAST_PIPELINE)
    proc = chainproof("candidate", cfg, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "pass  prediction agreement   1.0000" in proc.stdout
    assert "verdict: PASSED (not deployed" in proc.stdout
    assert releases(ws) == before, "passing is not deploying"

    proc = chainproof("candidate", cfg, "--workspace", ws, "--deploy")
    assert proc.returncode == 0, proc.stderr
    assert len(releases(ws)) == len(before) + 1
    report = verify_target(ws / "runs" / "latest", workspace=ws)
    assert any("candidate.intoto.json: test-result/v0.1: PASSED" in d for _, d in report.checks)


def test_candidate_that_wrecks_accuracy_is_blocked_with_the_deltas(workspace_copy, tmp_path):
    ws = workspace_copy
    before = releases(ws)
    cfg = write_config(
        tmp_path,
        FAST_PIPELINE.replace(
            "params: {epochs: 2, seed: 7}", "params: {epochs: 2, seed: 7, learning_rate: 10.0}"
        ),
    )
    proc = chainproof("candidate", cfg, "--workspace", ws, "--deploy")
    assert proc.returncode == 1, proc.stderr
    assert "FAIL  accuracy" in proc.stdout and "allowed drop 0.02" in proc.stdout
    assert "metrics          CHANGED: accuracy" in proc.stdout
    assert "verdict: BLOCKED" in proc.stdout
    assert releases(ws) == before, "a blocked candidate changes nothing in production"

    # the signed comparison records the failure, and a tampered one fails verification
    run = (ws / "runs" / "latest").resolve()
    stmt = run / "checks" / "candidate.intoto.json"
    env = json.loads(stmt.read_text())
    env["signatures"][0]["sig"] = env["signatures"][0]["sig"][::-1]
    stmt.write_text(json.dumps(env))
    with pytest.raises(VerificationError) as info:
        from pipeline.provenance.keys import load_public_key
        from pipeline.provenance.statements import read_verified_statement

        read_verified_statement(stmt, [load_public_key(run / "keys" / "functionary.pub")])
    assert info.value.check == "attestations"


def test_candidate_lock_with_a_known_advisory_is_blocked_naming_it(
    workspace_copy, tmp_path, osv_db
):
    ws = workspace_copy
    (ws / ".chainproof").mkdir(exist_ok=True)
    shutil.copyfile(osv_db, ws / ".chainproof" / "vulndb.sqlite")
    lock = tmp_path / "candidate.txt"
    lock.write_text(VULNERABLE_LOCK)
    before = releases(ws)
    proc = chainproof(
        "candidate", write_config(tmp_path, FAST_PIPELINE), "--lock", lock, "--workspace", ws
    )
    assert proc.returncode == 1, proc.stderr
    assert "PYSEC-2019-132" in proc.stderr
    assert "urllib3 1.23 <- requests 2.19.0 <- old.in" in proc.stderr
    assert releases(ws) == before


def test_a_candidate_whose_stage_fails_is_recorded_as_failed(workspace_copy, tmp_path):
    ws = workspace_copy
    before = releases(ws)
    body = FAST_PIPELINE.replace(
        "    kind: train\n    needs: [source]\n",
        "    kind: train\n    needs: [source]\n    timeout: 1\n",
    )
    proc = chainproof("candidate", write_config(tmp_path, body), "--workspace", ws)
    assert proc.returncode == 4, proc.stderr
    assert "stage 'train' failed: timed out" in proc.stderr
    record = json.loads(((ws / "runs" / "latest").resolve() / "run.json").read_text())
    assert record["status"] == "failed"
    assert "stage 'train' failed" in record["error"]
    assert "lineage" in record, "the failed candidate is still logged to MLflow"
    assert releases(ws) == before
