"""Owner-signed OpenVEX "not affected" statements: one silences exactly its finding; an
expired, foreign-signed or altered one counts for nothing; the gate records and rechecks it."""

from __future__ import annotations

import base64
import json
from datetime import date
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.scan import deps as deps_group
from pipeline.cli.scan import scan_deps
from pipeline.config import DependencyPolicySpec
from pipeline.errors import InputError, VerificationError
from pipeline.provenance.keys import init_dev_keys, load_signer
from pipeline.provenance.statements import write_signed_statement
from pipeline.runner.gates import check_dependencies, recheck
from pipeline.scan.deps import from_lock
from pipeline.scan.vex import load_all, load_vex, not_affected_statement
from pipeline.scan.vulndb import import_osv
from pipeline.scan.vulns import Policy, VulnerabilitiesFound, evaluate, scan

TODAY = date(2026, 12, 1)
HIGH = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"  # 7.5
H1, H2 = "1" * 64, "2" * 64


def record(rid: str, alias: str) -> dict:
    return {
        "id": rid,
        "modified": "2026-11-01T00:00:00Z",
        "aliases": [alias],
        "severity": [{"type": "CVSS_V3", "score": HIGH}],
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": "demo"},
                "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "2"}]}],
            }
        ],
    }


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    osv = tmp_path / "osv"
    osv.mkdir()
    for rid, alias in (("PYSEC-0000-1", "CVE-0000-1"), ("PYSEC-0000-2", "CVE-0000-2")):
        (osv / f"{rid}.json").write_text(json.dumps(record(rid, alias)))
    db = tmp_path / "db.sqlite"
    import_osv(osv, db)
    lock = tmp_path / "app.txt"
    lock.write_text(
        f"demo==1.0 \\\n    --hash=sha256:{H1} \\\n    --hash=sha256:{H2}\n    # via -r app.in\n"
    )
    init_dev_keys(tmp_path / "keys")
    init_dev_keys(tmp_path / "other")
    return db, lock, tmp_path


def make_vex(keys: Path, out: Path, vuln: str, *, expires: date, version: str | None = "1.0"):
    owner = load_signer("owner", keys)
    stmt = not_affected_statement(
        vulnerability=vuln,
        package="demo",
        version=version,
        files={"demo==1.0#0": H1},
        justification="vulnerable_code_not_in_execute_path",
        impact="demo.parse_url is never imported",
        expires=expires,
        author="test owner",
    )
    write_signed_statement(out, stmt, owner.signer)
    return owner.public


def test_a_vex_statement_silences_exactly_its_finding(setup) -> None:
    db, lock, tmp = setup
    owner = make_vex(tmp / "keys", tmp / "a.vex.json", "CVE-0000-1", expires=date(2027, 1, 31))
    statements, rejected = load_all([tmp / "a.vex.json"], [owner])
    assert rejected == () and len(statements) == 1
    result = scan(from_lock(lock), db, popular=False)
    ev = evaluate(result, Policy(vex=statements), TODAY)
    assert [f.id for f in ev.violations] == ["PYSEC-0000-2"]  # the other finding stays
    [(finding, s)] = ev.not_affected
    assert finding.id == "PYSEC-0000-1" and s.justification == "vulnerable_code_not_in_execute_path"
    assert s.signer == owner.keyid
    # another version of the package is not covered by a statement about 1.0
    other = tmp / "other.txt"
    other.write_text("demo==1.5\n    # via -r app.in\n")
    ev = evaluate(scan(from_lock(other), db, popular=False), Policy(vex=statements), TODAY)
    assert len(ev.violations) == 2 and not ev.not_affected


def test_expired_foreign_signed_or_altered_vex_counts_for_nothing(setup) -> None:
    db, lock, tmp = setup
    owner = make_vex(tmp / "keys", tmp / "old.vex.json", "PYSEC-0000-1", expires=date(2026, 1, 1))
    statements, _ = load_all([tmp / "old.vex.json"], [owner])
    result = scan(from_lock(lock), db, popular=False)
    ev = evaluate(result, Policy(vex=statements), TODAY)
    assert len(ev.violations) == 2 and ev.vex_expired == statements  # expired: shown, not used

    make_vex(tmp / "other", tmp / "foreign.vex.json", "PYSEC-0000-1", expires=date(2027, 1, 1))
    with pytest.raises(VerificationError, match="not signed by the trusted owner key"):
        load_vex(tmp / "foreign.vex.json", [owner])

    make_vex(tmp / "keys", tmp / "altered.vex.json", "PYSEC-0000-1", expires=date(2027, 1, 1))
    env = json.loads((tmp / "altered.vex.json").read_text())
    payload = json.loads(base64.b64decode(env["payload"]))
    payload["predicate"]["statements"][0]["vulnerability"]["name"] = "PYSEC-0000-2"
    env["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    (tmp / "altered.vex.json").write_text(json.dumps(env))
    (tmp / "plain.vex.json").write_text(json.dumps(payload))  # unsigned: no envelope at all
    statements, rejected = load_all(
        [tmp / "foreign.vex.json", tmp / "altered.vex.json", tmp / "plain.vex.json"], [owner]
    )
    assert statements == () and len(rejected) == 3
    ev = evaluate(result, Policy(vex=statements, vex_rejected=rejected), TODAY)
    assert len(ev.violations) == 2


def test_a_statement_needs_an_openvex_justification(setup) -> None:
    with pytest.raises(InputError, match="unknown justification"):
        not_affected_statement(
            vulnerability="X",
            package="demo",
            version=None,
            files={"f": H1},
            justification="trust me",
            impact="x",
            expires=TODAY,
            author="a",
        )


def test_the_gate_records_vex_and_deploy_rechecks_its_expiry(setup) -> None:
    db, lock, tmp = setup
    owner = make_vex(tmp / "keys", tmp / "a.vex.json", "PYSEC-0000-1", expires=date(2027, 1, 31))
    make_vex(tmp / "keys", tmp / "b.vex.json", "CVE-0000-2", expires=date(2027, 1, 31))
    spec = DependencyPolicySpec(database=str(db), vex=("a.vex.json", "b.vex.json"))
    with pytest.raises(VulnerabilitiesFound):  # without the owner key, VEX counts for nothing
        check_dependencies([lock], spec, tmp, today=TODAY)
    gate = check_dependencies([lock], spec, tmp, today=TODAY, vex_keys=[owner])
    [locked] = gate.statement["predicate"]["chainproof"]["locks"]
    assert sorted(v["id"] for v in locked["not_affected"]) == ["PYSEC-0000-1", "PYSEC-0000-2"]
    assert "2 not affected (signed VEX)" in gate.summary
    verdict = recheck(gate.statement, required=True, today=TODAY)
    assert "signed VEX: PYSEC-0000-1 in demo 1.0 not affected" in verdict
    with pytest.raises(VulnerabilitiesFound, match="VEX statement .* expired on 2027-01-31"):
        recheck(gate.statement, required=True, today=date(2027, 2, 1))


def test_cli_creates_a_signed_statement_and_scan_honours_it(setup) -> None:
    db, lock, tmp = setup
    runner = CliRunner()
    out = tmp / "cli.vex.json"
    res = runner.invoke(
        deps_group,
        [
            "vex",
            "create",
            "--id",
            "PYSEC-0000-1",
            "--package",
            "demo",
            "--justification",
            "vulnerable_code_not_present",
            "--impact",
            "patched locally",
            "--expires",
            "2999-01-01",
            "--lock",
            str(lock),
            "-o",
            str(out),
            "--keys-dir",
            str(tmp / "keys"),
        ],
    )
    assert res.exit_code == 0, res.output
    args = ["--lock", str(lock), "--db", str(db), "--format", "json"]
    key = ["--owner-key", str(tmp / "keys" / "owner.pub")]
    res = runner.invoke(scan_deps, [*args, "--vex", str(out), *key])
    doc = json.loads(res.stdout)
    assert [v["id"] for v in doc["policy"]["not_affected"]] == ["PYSEC-0000-1"]
    assert doc["policy"]["violations"] == ["PYSEC-0000-2"] and res.exit_code == 1
    foreign = ["--owner-key", str(tmp / "other" / "owner.pub")]
    res = runner.invoke(scan_deps, [*args, "--vex", str(out), *foreign])
    doc = json.loads(res.stdout)
    assert doc["policy"]["not_affected"] == [] and len(doc["policy"]["vex_rejected"]) == 1


def test_a_vex_document_with_odd_shapes_is_refused_not_a_crash(setup) -> None:
    db, lock, tmp = setup
    owner = load_signer("owner", tmp / "keys")
    for i, products in enumerate((5, "pkg:pypi/demo", [{"subcomponents": 3}], [])):
        stmt = not_affected_statement(
            vulnerability="PYSEC-0000-1",
            package="demo",
            version="1.0",
            files={"f": H1},
            justification="component_not_present",
            impact="x",
            expires=date(2027, 1, 1),
            author="a",
        )
        stmt["predicate"]["statements"][0]["products"] = products
        path = tmp / f"odd{i}.vex.json"
        write_signed_statement(path, stmt, owner.signer)
        statements, rejected = load_all([path], [owner.public])
        assert statements == () and "names no PyPI package" in rejected[0].reason


def test_verify_shows_the_vex_statements_a_release_relied_on(setup) -> None:
    from pipeline.release.verify import _summary

    db, lock, tmp = setup
    owner = make_vex(tmp / "keys", tmp / "a.vex.json", "PYSEC-0000-1", expires=date(2027, 1, 31))
    make_vex(tmp / "keys", tmp / "b.vex.json", "PYSEC-0000-2", expires=date(2027, 1, 31))
    spec = DependencyPolicySpec(database=str(db), vex=("a.vex.json", "b.vex.json"))
    gate = check_dependencies([lock], spec, tmp, today=TODAY, vex_keys=[owner])
    line = _summary(gate.statement)
    assert "not affected per owner-signed VEX: PYSEC-0000-1 in demo until 2027-01-31" in line
