"""The dependency gate: scanned before any stage, refused on a violation, attested for deploy."""

from __future__ import annotations

import json
import shutil
from datetime import date

import pytest

from pipeline.config import DependencyPolicySpec
from pipeline.errors import VerificationError
from pipeline.release.verify import verify_target
from pipeline.runner.gates import check_dependencies, recheck
from pipeline.scan.vulns import VulnerabilitiesFound
from tests.conftest import FAST_PIPELINE, MAIN_LOCK, chainproof, write_config

H = " \\\n    --hash=sha256:" + "a" * 64 + "\n"
VULNERABLE_LOCK = (
    "certifi==2018.4.16" + H + "    # via requests\n"
    "chardet==3.0.4" + H + "    # via requests\n"
    "idna==2.7" + H + "    # via requests\n"
    "requests==2.19.0" + H + "    # via -r old.in\n"
    "urllib3==1.23" + H + "    # via requests\n"
)


def policy(db, **kw) -> DependencyPolicySpec:
    return DependencyPolicySpec.model_validate(
        {
            "database": str(db),
            "required": False,
            "severity": "high",
            "max_age_days": 30,
            "allow": (),
            **kw,
        }
    )


def vulnerable_pipeline(tmp_path, db, extra: str = "") -> object:
    lock = tmp_path / "old.txt"
    lock.write_text(VULNERABLE_LOCK)
    body = FAST_PIPELINE.replace("    kind: package\n", f"    kind: package\n    lock: {lock}\n")
    body += f"security:\n  dependencies:\n    database: {db}\n{extra}"
    return write_config(tmp_path, body)


def test_a_vulnerable_transitive_pin_refuses_the_run_before_any_stage(tmp_path, osv_db):
    ws = tmp_path / "ws"
    proc = chainproof("run", vulnerable_pipeline(tmp_path, osv_db), "--workspace", ws)
    assert proc.returncode == 1, proc.stderr
    assert "refusing to run: the dependency policy is violated" in proc.stderr
    assert (
        "PYSEC-2019-132" in proc.stderr
        and "urllib3 1.23 <- requests 2.19.0 <- old.in" in proc.stderr
    )
    assert not (ws / "runs").exists() or not any((ws / "runs").iterdir()), "no stage ran"


def test_allowlist_entries_pass_until_they_expire(tmp_path, osv_db):
    lock = tmp_path / "old.txt"
    lock.write_text(VULNERABLE_LOCK)
    with pytest.raises(VulnerabilitiesFound) as info:
        check_dependencies([lock], policy(osv_db), tmp_path)
    ids = {line.split()[0] for line in info.value.message.splitlines()[1:]}
    assert {"PYSEC-2018-28", "PYSEC-2019-132"} <= ids
    allow = [{"id": i, "reason": "test", "expires": date(2999, 1, 1)} for i in ids]
    gate = check_dependencies([lock], policy(osv_db, allow=allow), tmp_path)
    cp = gate.statement["predicate"]["chainproof"]
    assert cp["verdict"] == "pass" and len(cp["locks"][0]["allowed"]) == len(ids)
    assert cp["database"]["records"] > 2000 and len(cp["database"]["sha256"]) == 64
    assert gate.statement["subject"] == [
        {"name": "old.txt", "digest": {"sha256": cp["locks"][0]["sha256"]}}
    ]

    expired = [{**a, "expires": date(2020, 1, 1)} for a in allow]
    with pytest.raises(VulnerabilitiesFound):
        check_dependencies([lock], policy(osv_db, allow=expired), tmp_path)

    # deploy's second look: an entry that expired after the scan refuses the release
    stmt = gate.statement
    with pytest.raises(VulnerabilitiesFound, match="expired"):
        recheck(stmt, required=False, today=date(3000, 1, 1))
    assert "pass" in recheck(stmt, required=False, today=date(2026, 1, 1))


def test_required_scan_without_a_database_refuses_to_run(tmp_path):
    body = (
        FAST_PIPELINE
        + f"security:\n  dependencies:\n    required: true\n    database: {tmp_path}/none.sqlite\n"
    )
    proc = chainproof("run", write_config(tmp_path, body), "--workspace", tmp_path / "ws")
    assert proc.returncode == 5, proc.stderr
    assert "requires a dependency scan" in proc.stderr


def test_missing_database_is_never_clean_and_verify_shows_it(completed_workspace):
    report = verify_target(completed_workspace / "runs" / "latest", workspace=completed_workspace)
    shown = [d for c, d in report.checks if c == "attestation"]
    assert any("dependencies NOT SCANNED" in d for d in shown)


def test_scan_attestation_is_part_of_the_verified_chain(workspace_copy, osv_db):
    run = (workspace_copy / "runs" / "latest").resolve()
    stmt = run / "checks" / "dependencies.intoto.json"
    env = json.loads(stmt.read_text())
    env["signatures"][0]["sig"] = env["signatures"][0]["sig"][::-1]
    stmt.write_text(json.dumps(env))
    with pytest.raises(VerificationError) as info:
        verify_target(run, workspace=workspace_copy)
    assert "checks/dependencies.intoto.json" in (info.value.artifact or "")


def test_release_records_the_database_it_was_checked_against(tmp_path, osv_db):
    ws = tmp_path / "ws"
    db = ws / ".chainproof" / "vulndb.sqlite"
    db.parent.mkdir(parents=True)
    shutil.copyfile(osv_db, db)
    body = (
        FAST_PIPELINE.replace("lock: @MAIN_LOCK@", f"lock: {MAIN_LOCK}")
        + "lineage: {enabled: false}\n"
    )
    proc = chainproof("run", write_config(tmp_path, body), "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    assert "dependency gate: scanned" in proc.stderr
    (bundle,) = [p for p in (ws / "releases" / "digits-fast").iterdir() if not p.is_symlink()]
    owner = json.loads((ws / "attestations/keys/owner.pub").read_text())["keyid"]
    out = chainproof("verify", bundle, "--owner-key", owner)
    assert out.returncode == 0, out.stderr
    assert "checks/dependencies.intoto.json: vulns/v0.2: pass, db sha256" in out.stdout


def test_a_signed_vex_statement_lets_the_run_through_and_deploy_and_verify_show_it(tmp_path):
    from datetime import UTC, datetime

    from pipeline.envcheck import parse_lock
    from pipeline.scan.vulndb import import_osv

    ws = tmp_path / "ws"
    version = parse_lock(MAIN_LOCK).pins["packaging"].version
    osv = tmp_path / "osv"
    osv.mkdir()
    (osv / "PYSEC-TEST-1.json").write_text(
        json.dumps(
            {
                "id": "PYSEC-TEST-1",
                "modified": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "summary": "a test advisory against the locked packaging",
                "severity": [
                    {"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"}
                ],
                "affected": [
                    {"package": {"ecosystem": "PyPI", "name": "packaging"}, "versions": [version]}
                ],
            }
        )
    )
    import_osv(osv, ws / ".chainproof" / "vulndb.sqlite")
    body = (
        FAST_PIPELINE.replace("lock: @MAIN_LOCK@", f"lock: {MAIN_LOCK}")
        + "lineage: {enabled: false}\n"
    )
    refused = chainproof("run", write_config(tmp_path, body), "--workspace", ws)
    assert refused.returncode == 1 and "PYSEC-TEST-1 (high) in packaging" in refused.stderr

    assert chainproof("keys", "init", "--workspace", ws).returncode == 0
    vex = ws / "vex" / "packaging.vex.json"
    made = chainproof(
        "deps", "vex", "create", "--id", "PYSEC-TEST-1", "--package", "packaging",
        "--justification", "vulnerable_code_not_in_execute_path",
        "--impact", "the affected function is never called", "--expires", "2999-01-01",
        "--lock", MAIN_LOCK, "-o", vex, "--keys-dir", ws / "attestations" / "keys",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    body += "security:\n  dependencies:\n    vex: [vex/packaging.vex.json]\n"
    proc = chainproof("run", write_config(tmp_path, body), "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    assert "1 not affected (signed VEX)" in proc.stderr
    (bundle,) = [p for p in (ws / "releases" / "digits-fast").iterdir() if not p.is_symlink()]
    release = json.loads((bundle / "artifacts" / "deploy" / "release.json").read_text())
    assert "signed VEX: PYSEC-TEST-1 in packaging" in release["gate"]["dependencies"]
    owner = json.loads((ws / "attestations/keys/owner.pub").read_text())["keyid"]
    out = chainproof("verify", bundle, "--owner-key", owner)
    assert out.returncode == 0, out.stderr
    assert "not affected per owner-signed VEX: PYSEC-TEST-1 in packaging until 2999-01-01" in (
        out.stdout
    )
