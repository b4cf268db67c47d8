"""Look-alike names: near misses of popular projects are flagged and named; the project's own
lock is clean; a name can be accepted on purpose until an expiry."""

from __future__ import annotations

import json
import random
import string
import time
from datetime import date
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.scan.deps import from_lock
from pipeline.scan.lookalike import load_popular, refresh_popular
from pipeline.scan.vulndb import import_osv
from pipeline.scan.vulns import AcceptName, Policy, evaluate, scan
from tests.conftest import MAIN_LOCK, SHARED


@pytest.fixture(scope="module")
def popular():
    return load_popular()


@pytest.mark.parametrize(
    ("name", "target", "how"),
    [
        ("0requests", "requests", "'0' added"),
        ("reqeusts", "requests", "'ue' swapped"),
        ("requestss", "requests", "letter 's' doubled"),
        ("reqests", "requests", "'u' dropped"),
        ("py-requests", "requests", "prefix 'py-' added"),
        ("requests-py", "requests", "suffix '-py' added"),
        ("re-quests", "requests", "different separators"),
        ("r3quests", "requests", "digits in place of letters"),
        ("numpy-lib", "numpy", "suffix '-lib' added"),
        ("nump", "numpy", "'y' dropped"),
        ("nunpy", "numpy", "'m' changed to 'n'"),
        ("python-numpy", "numpy", "prefix 'python-' added"),
        ("num\u0440y", "numpy", "Unicode confusables"),  # Cyrillic р
        ("tensorflows", "tensorflow", "'s' added"),
        ("tensrflow", "tensorflow", "'o' dropped"),
        ("tensor-flow", "tensorflow", "different separators"),
        ("tenosrflow", "tensorflow", "'so' swapped"),
    ],
)
def test_lookalikes_of_popular_ml_names_are_flagged(popular, name: str, target: str, how: str):
    hit = popular.resembles(name)
    assert hit is not None, name
    assert hit[0] == target and how in hit[1]


def test_popular_names_and_unrelated_names_are_not_flagged(popular) -> None:
    for name in (
        "requests",
        "numpy",
        "tensorflow",
        "Requests",
        "scikit_learn",
        "a-b",
        "chainproof",
        "definitely-not-a-package-name",
    ):
        assert popular.resembles(name) is None, name


def test_the_projects_own_lock_has_no_lookalikes(popular) -> None:
    graph = from_lock(MAIN_LOCK)
    assert popular.check({n: p.version for n, p in graph.packages.items()}) == ()


def test_the_malicious_samples_lookalikes_are_caught(popular) -> None:
    sample = SHARED / "osv" / "malicious-sample"
    if not sample.is_dir():
        pytest.skip(f"{sample} is absent (it ships in ../shared)")
    names = sorted(p.name for p in sample.iterdir() if p.is_dir())
    caught = {n for n in names if popular.resembles(n)}
    # look-alikes of ML packages, all named in the sample's README
    assert {
        "nump",
        "numpy-lib",
        "tensorflows",
        "matplotlibe",
        "transformars",
        "torchvisions",
        "sklearns",
        "huggingface-hubs",
        "pandas-data",
        "0requests",
        "rsquests",
    } <= caught
    assert "fastapi" not in caught  # the real one (its record is withdrawn)
    assert len(caught) >= 25, sorted(set(names) - caught)


def test_scan_reports_them_with_paths_and_the_policy_accepts_by_name(tmp_path: Path) -> None:
    (tmp_path / "osv").mkdir()
    (tmp_path / "osv" / "r.json").write_text(json.dumps({"id": "X-1", "modified": "2026-01-01"}))
    db = tmp_path / "db.sqlite"
    import_osv(tmp_path / "osv", db)
    lock = tmp_path / "app.txt"
    lock.write_text(
        "helper==1.0\n    # via -r app.in\nreqeusts==2.0\n    # via helper\n"
        "nunpy==1.0\n    # via -r app.in\n"
    )
    result = scan(from_lock(lock), db)
    assert [(lf.package, lf.lookalike.resembles) for lf in result.lookalikes] == [
        ("nunpy", "numpy"),
        ("reqeusts", "requests"),
    ]
    assert result.lookalikes[1].direct == ("helper",)
    today = date(2026, 12, 1)
    ev = evaluate(result, Policy(), today)
    assert not ev.ok and len(ev.lookalike_violations) == 2
    accept = AcceptName("nunpy", "our internal fork, on purpose", date(2027, 1, 31))
    ev = evaluate(result, Policy(accept_names=(accept,)), today)
    assert [lf.package for lf in ev.lookalike_violations] == ["reqeusts"]
    assert [(lf.package, a.reason) for lf, a in ev.lookalikes_accepted] == [
        ("nunpy", "our internal fork, on purpose")
    ]
    expired = AcceptName("nunpy", "it was fine once", date(2026, 1, 1))
    ev = evaluate(result, Policy(accept_names=(expired,)), today)
    assert len(ev.lookalike_violations) == 2 and ev.accept_expired == (expired,)
    assert scan(from_lock(lock), db, popular=False).lookalikes == ()


def test_ten_thousand_names_in_well_under_a_second(popular) -> None:
    rng = random.Random(7)
    names = {
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 16))): "1"
        for _ in range(10_000)
    }
    popular.resembles("warm-up")  # builds the index once, as a scan does
    start = time.perf_counter()
    popular.check(names)
    took = time.perf_counter() - start
    # ~0.3-0.6 s measured (bench/bench_deptrust.py); the bound leaves room for a busy CI box
    assert took < 5.0, f"{took:.2f}s for {len(names)} names"


def test_refresh_from_a_top_pypi_export_names_source_and_date(tmp_path: Path) -> None:
    export = tmp_path / "top-pypi-packages.json"
    export.write_text(
        json.dumps(
            {
                "last_update": "2026-11-01 07:00:00",
                "rows": [
                    {"project": "boto3", "download_count": 9},
                    {"project": "Requests_X", "download_count": 8},
                ],
            }
        )
    )
    out = tmp_path / "popular.txt"
    names = refresh_popular(export, out, top=1, label="hugovk/top-pypi-packages", extra=["numpy"])
    assert names.names == ("boto3", "numpy")
    text = out.read_text()
    assert "# source: hugovk/top-pypi-packages (top 1 by downloads)" in text
    assert "# date: 2026-11-01" in text
    guarddog = tmp_path / "top_pypi_packages.json"
    guarddog.write_text(json.dumps({"downloaded_timestamp": 1781626097, "packages": ["a", "b"]}))
    assert refresh_popular(guarddog, out, extra=()).date == "2026-06-16"
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="not a top-PyPI-packages export"):
        refresh_popular(bad, out)


def test_the_shipped_list_states_source_and_date(popular) -> None:
    assert "top-pypi-packages" in popular.source and popular.date == "2026-06-16"
    assert {"requests", "numpy", "tensorflow", "torch"} <= set(popular.names)


def test_the_index_and_the_generated_edits_agree(popular) -> None:
    names = [
        "0requests",
        "nunpy",
        "tenosrflow",
        "reqeusts",
        "numpyy",
        "nump",
        "boto4",
        "flasl",
        "idnna",
        "not-a-lookalike-at-all",
        "requests",
        "torchvisions",
    ]
    generated = [popular.resembles(n) for n in names]
    indexed = [popular.resembles(n, indexed=True) for n in names]
    assert generated == indexed


def test_the_gate_refuses_a_lookalike_records_an_accepted_one_and_rechecks_it(
    tmp_path: Path,
) -> None:
    from pipeline.config import DependencyPolicySpec
    from pipeline.runner.gates import check_dependencies, recheck
    from pipeline.scan.vulns import VulnerabilitiesFound

    (tmp_path / "osv").mkdir()
    (tmp_path / "osv" / "r.json").write_text(json.dumps({"id": "X-1", "modified": "2026-11-01"}))
    db = tmp_path / "db.sqlite"
    import_osv(tmp_path / "osv", db)
    lock = tmp_path / "app.txt"
    lock.write_text("nunpy==1.0 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via -r app.in\n")
    with pytest.raises(VulnerabilitiesFound, match="look-alike name nunpy resembles numpy"):
        check_dependencies([lock], DependencyPolicySpec(database=str(db)), tmp_path)
    spec = DependencyPolicySpec.model_validate(
        {
            "database": str(db),
            "accept_lookalikes": [{"name": "nunpy", "reason": "ours", "expires": "2027-01-31"}],
        }
    )
    gate = check_dependencies([lock], spec, tmp_path, today=date(2026, 12, 1))
    [locked] = gate.statement["predicate"]["chainproof"]["locks"]
    assert locked["lookalikes"][0]["resembles"] == "numpy"
    assert locked["lookalikes_accepted"] == [
        {"name": "nunpy", "reason": "ours", "expires": "2027-01-31"}
    ]
    assert "1 look-alike name(s) accepted" in gate.summary
    assert recheck(gate.statement, required=True, today=date(2026, 12, 1)).endswith("pass")
    with pytest.raises(VulnerabilitiesFound, match="acceptance of look-alike name nunpy expired"):
        recheck(gate.statement, required=True, today=date(2027, 2, 1))


def test_cli_popular_refresh_and_scan_with_another_list(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli.scan import deps as deps_group
    from pipeline.cli.scan import scan_deps

    source = tmp_path / "names.txt"
    source.write_text("# one per line\nacme-widgets\nrequests\n")
    out = tmp_path / "popular.txt"
    res = CliRunner().invoke(
        deps_group, ["popular-refresh", str(source), "-o", str(out), "--label", "our index"]
    )
    assert res.exit_code == 0, res.output
    assert load_popular(out).names[:2] == ("acme-widgets", "requests")
    (tmp_path / "osv").mkdir()
    (tmp_path / "osv" / "r.json").write_text(json.dumps({"id": "X-1", "modified": "2026-11-01"}))
    db = tmp_path / "db.sqlite"
    import_osv(tmp_path / "osv", db)
    lock = tmp_path / "app.txt"
    lock.write_text("acme-widget==1.0\n    # via -r app.in\n")
    res = CliRunner().invoke(
        scan_deps, ["--lock", str(lock), "--db", str(db), "--popular", str(out)]
    )
    assert res.exit_code == 1
    assert "acme-widget 1.0 resembles acme-widgets" in res.output
