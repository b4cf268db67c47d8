"""Known-malicious packages (OpenSSF MAL- records): by name+version and by file hash, always
blocking; withdrawn records accuse nobody. Uses the real records in ../shared."""

from __future__ import annotations

import json
import re
import time
from datetime import date
from pathlib import Path

import pytest

from pipeline.config import DependencyPolicySpec
from pipeline.runner.gates import check_dependencies
from pipeline.scan.deps import from_lock
from pipeline.scan.vulndb import VulnDB, import_osv
from pipeline.scan.vulns import AllowEntry, Policy, VulnerabilitiesFound, evaluate, scan
from tests.conftest import MAIN_LOCK, SHARED

MALICIOUS = SHARED / "osv" / "malicious-sample"
PYPA = SHARED / "osv" / "pypa-advisory-database"
TODAY = date(2026, 12, 1)
# From the records themselves (affected[0].database_specific.indicators.package_integrity).
ZEROREQ_WHEEL = "c8784cf0aa8fa13a43614fbd6d51902feeecafdc06fc4db2695fd2572db66db8"
ZEROREQ_SDIST = "99aed88269a370198174a549985d8ae7ccc0690aab5185685b960b77914ba31f"
OTHER = "a" * 64


def pin(name: str, version: str, *hashes: str) -> str:
    lines = [f"{name}=={version}" + (" \\" if hashes else "")]
    lines += [
        f"    --hash=sha256:{h}" + (" \\" if i < len(hashes) - 1 else "")
        for i, h in enumerate(hashes)
    ]
    return "\n".join(lines) + "\n    # via -r app.in\n"


@pytest.fixture(scope="module")
def mal_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not MALICIOUS.is_dir():
        pytest.skip(f"the malicious-packages sample {MALICIOUS} is absent (it ships in ../shared)")
    db = tmp_path_factory.mktemp("mal") / "vulndb.sqlite"
    import_osv(MALICIOUS, db)
    return db


def lock(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "app.txt"
    path.write_text(body)
    return path


def test_import_counts_malicious_records_and_their_file_hashes(mal_db: Path) -> None:
    with VulnDB.open(mal_db) as db:
        assert db.info.records == 41 and db.info.malicious == 41
        assert db.info.file_hashes == 16  # 11 records carry package_integrity (README)
        hits = db.records_for_hashes([ZEROREQ_WHEEL])
    assert [(r["id"], pkg, f) for r, pkg, f in hits[ZEROREQ_WHEEL]] == [
        ("MAL-2026-15859", "0requests", "0requests-0.0.1-py3-none-any.whl")
    ]


def test_malicious_by_name_and_version_blocks_at_every_threshold(
    mal_db: Path, tmp_path: Path
) -> None:
    result = scan(from_lock(lock(tmp_path, pin("0requests", "0.0.1", OTHER))), mal_db)
    [f] = result.findings
    assert f.malicious and f.id == "MAL-2026-15859" and f.matched_by == "name and version"
    allow = (AllowEntry("MAL-2026-15859", "we like it", date(2999, 1, 1)),)
    ev = evaluate(result, Policy(threshold="critical", allow=allow), TODAY)
    assert ev.violations == (f,) and not ev.allowed  # no allowlist entry accepts malware
    assert not evaluate(
        scan(from_lock(lock(tmp_path, pin("0requests", "0.0.2"))), mal_db), Policy(), TODAY
    ).violations  # a version the record does not list


def test_malicious_file_under_another_name_and_version_blocks(mal_db: Path, tmp_path: Path) -> None:
    body = pin("harmless-tool", "9.9", OTHER, ZEROREQ_SDIST) + pin("six", "1.16.0", OTHER)
    result = scan(from_lock(lock(tmp_path, body)), mal_db)
    [f] = result.findings
    assert f.package == "harmless-tool" and f.version == "9.9" and f.malicious
    assert ZEROREQ_SDIST in f.matched_by and "0requests-0.0.1.tar.gz" in f.matched_by
    with pytest.raises(VulnerabilitiesFound, match="harmless-tool 9.9 .*matched by sha256"):
        check_dependencies(
            [lock(tmp_path, body)],
            DependencyPolicySpec(database=str(mal_db), severity="critical"),
            tmp_path,
        )


def test_withdrawn_record_matches_neither_by_name_nor_by_hash(mal_db: Path, tmp_path: Path) -> None:
    record = json.loads((MALICIOUS / "fastapi" / "MAL-2026-4750.json").read_text())
    assert record["withdrawn"]
    entry = record["affected"][0]
    digest = entry["database_specific"]["indicators"]["package_integrity"][0]["hashes"]["sha256"]
    body = pin("fastapi", entry["versions"][0], digest) + pin("renamed", "1.0", digest)
    result = scan(from_lock(lock(tmp_path, body)), mal_db)
    assert result.findings == ()


def test_both_databases_together_and_the_projects_lock_stays_clean(tmp_path: Path) -> None:
    if not (MALICIOUS.is_dir() and PYPA.is_dir()):
        pytest.skip("the OSV samples in ../shared are absent")
    db = tmp_path / "vulndb.sqlite"
    start = time.perf_counter()
    info = import_osv([PYPA, MALICIOUS], db)
    imported = time.perf_counter() - start
    assert info.malicious == 41 and info.records > 2700 - 5
    start = time.perf_counter()
    result = scan(from_lock(MAIN_LOCK), db)
    took = time.perf_counter() - start
    assert not [f for f in result.findings if f.malicious] and result.lookalikes == ()
    assert took < 2.0, f"scan took {took:.2f}s (import {imported:.1f}s)"  # ~0.3 s measured


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"id": "H-1", "affected": "x"}, "'affected' is not a list"),
        ({"id": "H-2", "affected": [1]}, "affected[0] is not an object"),
        ({"id": "H-3", "affected": [{"package": "demo"}]}, "affected[0].package is not an object"),
        ({"id": "H-4", "affected": [{"versions": 5}]}, "affected[0].versions is not a list"),
        (
            {"id": "H-5", "affected": [{"ranges": [{"events": "x"}]}]},
            "affected[0].ranges[0].events is not a list",
        ),
        ({"id": "MAL-H-6", "aliases": "MAL-1"}, "'aliases' is not a list"),
    ],
)
def test_a_malformed_record_is_refused_by_name_never_an_internal_error(
    tmp_path: Path, record: dict, problem: str
) -> None:
    from pipeline.errors import InputError

    (tmp_path / "osv").mkdir()
    (tmp_path / "osv" / "r.json").write_text(json.dumps(record))
    with pytest.raises(
        InputError, match=re.escape(f"record {record['id']} is not valid OSV: {problem}")
    ):
        import_osv(tmp_path / "osv", tmp_path / "db.sqlite")
    assert not (tmp_path / "db.sqlite").exists()
