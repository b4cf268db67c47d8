"""`deps fix`: the smallest set of direct-requirement changes, from the graph and the records'
fixed versions; a lock with known findings becomes one with none; no fix is said as such."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.scan import deps as deps_group
from pipeline.scan.depfix import ADD, NO_FIX, RAISE, REMOVE, apply_to_graph, apply_to_in, plan_fix
from pipeline.scan.deps import from_lock
from pipeline.scan.vulndb import VulnDB, import_osv
from pipeline.scan.vulns import scan

OLD_LOCK = """\
certifi==2018.4.16
    # via requests
chardet==3.0.4
    # via requests
idna==2.7
    # via requests
pyyaml==5.3
    # via -r old.in
requests==2.19.0
    # via -r old.in
urllib3==1.23
    # via requests
"""
OLD_IN = "requests==2.19.0\npyyaml>=5,<6  # config files\n"


@pytest.fixture
def pypa_db(osv_db: Path) -> Path:
    """The session's import of the PyPA snapshot (conftest; skips where ../shared is absent)."""
    return osv_db


def test_fix_of_a_lock_with_known_findings_leaves_none(pypa_db: Path, tmp_path: Path) -> None:
    lock = tmp_path / "old.txt"
    lock.write_text(OLD_LOCK)
    graph = from_lock(lock)
    with VulnDB.open(pypa_db) as db:
        before = scan(graph, db, popular=False)
        assert len(before.findings) >= 10
        plan = plan_fix(before, db.records_for(before.vulnerable_packages))
        after = scan(apply_to_graph(graph, plan), db, popular=False)
    assert after.findings == ()
    kinds = {c.package: c.kind for c in plan.changes}
    assert kinds == {
        "requests": RAISE,
        "pyyaml": RAISE,
        "urllib3": ADD,
        "certifi": ADD,
        "idna": ADD,
    }
    assert plan.moved == 5 and not plan.unfixable  # one change per vulnerable package
    # each target is the lowest version no record affects, not merely the first fix
    targets = {c.package: c.target for c in plan.changes}
    assert targets["requests"] == "2.31.0" and targets["pyyaml"] == "5.4"
    urllib3 = next(c for c in plan.changes if c.package == "urllib3")
    assert urllib3.pulled_in_by == ("requests",)

    in_file = tmp_path / "old.in"
    in_file.write_text(OLD_IN)
    text = apply_to_in(in_file, plan)
    lines = text.splitlines()
    assert lines[0].startswith("requests>=2.31.0  # chainproof deps fix:")
    assert lines[1].startswith("pyyaml<6,>=5.4") or lines[1].startswith("pyyaml>=5.4,<6")
    assert any(
        ln.startswith(f"urllib3>={targets['urllib3']}") and "pulled in by requests" in ln
        for ln in lines
    )
    assert in_file.read_text() == text


def test_no_fix_and_malicious_are_said_as_such(tmp_path: Path) -> None:
    osv = tmp_path / "osv"
    osv.mkdir()
    for rid, name in (("PYSEC-0000-9", "nofix"), ("MAL-0000-1", "evil"), ("MAL-0000-2", "deep")):
        (osv / f"{rid}.json").write_text(
            json.dumps(
                {
                    "id": rid,
                    "modified": "2026-01-01T00:00:00Z",
                    "affected": [
                        {
                            "package": {"ecosystem": "PyPI", "name": name},
                            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}]}],
                        }
                    ],
                }
            )
        )
    db = tmp_path / "db.sqlite"
    import_osv(osv, db)
    lock = tmp_path / "app.txt"
    lock.write_text(
        "nofix==1.0\n    # via -r app.in\nevil==1.0\n    # via -r app.in\n"
        "lib==1.0\n    # via -r app.in\ndeep==0.1\n    # via lib\n"
    )
    with VulnDB.open(db) as store:
        result = scan(from_lock(lock), store, popular=False)
        plan = plan_fix(result, store.records_for(result.vulnerable_packages))
    kinds = {c.package: c.kind for c in plan.changes}
    assert kinds == {"nofix": NO_FIX, "evil": REMOVE, "deep": NO_FIX}
    deep = next(c for c in plan.changes if c.package == "deep")
    assert "remove or replace the requirement" in deep.describe() and "lib" in deep.describe()
    runner = CliRunner()
    res = runner.invoke(deps_group, ["fix", "--lock", str(lock), "--db", str(db)])
    assert res.exit_code == 1
    assert "NO FIX for nofix 1.0" in res.output and "remove evil 1.0" in res.output


def test_cli_writes_the_plan_into_the_in_file(pypa_db: Path, tmp_path: Path) -> None:
    lock = tmp_path / "old.txt"
    lock.write_text(OLD_LOCK)
    in_file = tmp_path / "old.in"
    in_file.write_text(OLD_IN)
    res = CliRunner().invoke(
        deps_group, ["fix", "--lock", str(lock), "--db", str(pypa_db), "--write"]
    )
    assert res.exit_code == 0, res.output
    assert "predicted after it: 0 finding(s)" in res.output
    text = in_file.read_text()
    assert text.startswith("requests>=2.31.0") and "urllib3>=" in text
