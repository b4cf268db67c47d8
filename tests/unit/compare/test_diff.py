"""`chainproof diff`: hand-made runs and release bundles, compared group by group.

The sides come from `lineages.py` (real signed links and Statements, tiny files, no stage run).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.compare import diff as diff_command
from pipeline.compare.diff import (
    DependencyChange,
    EnvChange,
    ParamChange,
    diff,
    load_lineage,
    render_json,
    render_table,
)
from pipeline.errors import InputError
from pipeline.scan.vulndb import import_osv
from tests.unit.compare.lineages import (
    DATASET,
    LOCK_A,
    LOCK_B,
    MAIN_IN,
    PER_CLASS,
    TRAIN_PARAMS,
    finding,
    make_bundle,
    make_run,
    osv_store,
    sha,
    side,
)

# --------------------------------------------------------------------------- dependencies


def test_two_releases_from_different_locks_list_exactly_the_changed_distributions(
    tmp_path: Path, signer
) -> None:
    a = make_bundle(tmp_path, "1.0", side(lock=LOCK_A), signer)
    b = make_bundle(tmp_path, "1.1", side(lock=LOCK_B), signer)

    d = diff(load_lineage(a), load_lineage(b))

    (lock,) = d.dependencies.locks
    assert lock.name == "main.txt" and lock.a_sha256 == sha(LOCK_A) and lock.b_sha256 == sha(LOCK_B)
    assert set(lock.changes) == {
        DependencyChange(
            "click", "upgraded", "8.1.0", "8.2.0", True, (f"click 8.2.0 <- {MAIN_IN}",)
        ),
        DependencyChange(
            "requests", "upgraded", "2.31.0", "2.32.0", True, (f"requests 2.32.0 <- {MAIN_IN}",)
        ),
        DependencyChange(
            "six", "downgraded", "1.16.0", "1.15.0", True, (f"six 1.15.0 <- {MAIN_IN}",)
        ),
        DependencyChange(
            "idna", "added", None, "3.7", False, (f"idna 3.7 <- requests 2.32.0 <- {MAIN_IN}",)
        ),
        # A removal's path is the one it had in A's lock.
        DependencyChange(
            "urllib3",
            "removed",
            "1.26.0",
            None,
            False,
            (f"urllib3 1.26.0 <- requests 2.31.0 <- {MAIN_IN}",),
        ),
    }
    assert "certifi" not in {c.package for c in lock.changes}  # same pin on both sides
    # The rest of the two releases is identical, but for the lock digest each link recorded.
    assert d.changed == ("dependencies", "environment")
    assert [(c.field, c.stages) for c in d.environment.changes] == [("lock_sha256", ())]

    table = render_table(d)
    assert (
        "dependencies     CHANGED: main.txt: 1 added, 1 removed, 2 upgraded, 1 downgraded" in table
    )
    assert any(
        line.split()[:5] == ["removed", "urllib3", "1.26.0", "(gone)", "transitive"]
        for line in table.splitlines()
    )


def test_pep440_ordering_not_string_ordering(tmp_path: Path, signer) -> None:
    a = make_bundle(tmp_path, "1", side(lock=f"click==8.9.0\n    # via -r {MAIN_IN}\n"), signer)
    b = make_bundle(tmp_path, "2", side(lock=f"click==8.10.0\n    # via -r {MAIN_IN}\n"), signer)
    (lock,) = diff(load_lineage(a), load_lineage(b)).dependencies.locks
    assert [(c.package, c.change) for c in lock.changes] == [("click", "upgraded")]


def test_same_version_with_other_hashes_is_reported(tmp_path: Path, signer) -> None:
    pin = "click==8.1.0 \\\n    --hash=sha256:{h}\n    # via -r " + MAIN_IN + "\n"
    a = make_bundle(tmp_path, "1", side(lock=pin.format(h="a" * 64)), signer)
    b = make_bundle(tmp_path, "2", side(lock=pin.format(h="b" * 64)), signer)
    (lock,) = diff(load_lineage(a), load_lineage(b)).dependencies.locks
    assert [(c.package, c.change, c.a_version, c.b_version) for c in lock.changes] == [
        ("click", "rehashed", "8.1.0", "8.1.0")
    ]


# --------------------------------------------------------------------------- vulnerabilities


def test_vulnerabilities_new_fixed_and_still_present_from_the_signed_statements(
    tmp_path: Path, signer
) -> None:
    a_findings = [
        finding("PYSEC-2023-1", "urllib3", "1.26.0", via="requests 2.31.0"),
        finding("PYSEC-2023-2", "requests", "2.31.0", "GHSA-rrrr"),
    ]
    b_findings = [
        # The same advisory under another id (the database re-keyed it): still present.
        finding("GHSA-rrrr", "requests", "2.32.0", "PYSEC-2023-2"),
        finding("PYSEC-2024-9", "idna", "3.7", via="requests 2.32.0"),
    ]
    a = make_bundle(tmp_path, "1", side(lock=LOCK_A, findings=a_findings), signer)
    b = make_bundle(tmp_path, "2", side(lock=LOCK_B, findings=b_findings), signer)

    v = diff(load_lineage(a), load_lineage(b)).vulnerabilities

    assert v.compared
    assert [(x.id, x.package, x.b_version) for x in v.new] == [("PYSEC-2024-9", "idna", "3.7")]
    assert [(x.id, x.package, x.a_version) for x in v.fixed] == [
        ("PYSEC-2023-1", "urllib3", "1.26.0")
    ]
    assert [(x.id, x.package, x.a_version, x.b_version) for x in v.still] == [
        ("GHSA-rrrr", "requests", "2.31.0", "2.32.0")
    ]
    assert v.still[0].aliases == ("PYSEC-2023-2",)
    assert v.new[0].paths == (f"idna 3.7 <- requests 2.32.0 <- {MAIN_IN}",)
    assert v.notes == ()  # both scanned against the same database


def test_a_side_that_was_not_scanned_is_said_and_nothing_is_called_new(
    tmp_path: Path, signer
) -> None:
    a = make_bundle(tmp_path, "1", side(findings=None), signer)
    b = make_bundle(tmp_path, "2", side(findings=[finding("PYSEC-2024-9", "idna", "3.7")]), signer)

    d = diff(load_lineage(a), load_lineage(b))

    v = d.vulnerabilities
    assert not v.compared and v.new == () and v.fixed == ()
    assert [x.id for x in v.unknown] == ["PYSEC-2024-9"]
    assert "NOT SCANNED (no database at x.sqlite)" in v.a_scan
    table = render_table(d)
    assert "vulnerabilities  CHANGED: not comparable: A NOT SCANNED" in table
    assert any(
        line.split()[:4] == ["in", "B", "PYSEC-2024-9", "idna"] for line in table.splitlines()
    )


def test_different_databases_are_pointed_out(tmp_path: Path, signer) -> None:
    a = make_bundle(tmp_path, "1", side(db="1" * 64), signer)
    b = make_bundle(tmp_path, "2", side(db="2" * 64), signer)
    (note,) = diff(load_lineage(a), load_lineage(b)).vulnerabilities.notes
    assert "pass --db PATH" in note


def test_db_rescans_both_locks_against_one_database(tmp_path: Path, signer) -> None:
    osv = tmp_path / "osv"
    osv.mkdir()
    for id_, pkg, fixed in (("OSV-U", "urllib3", "1.26.5"), ("OSV-I", "idna", "3.8")):
        record = {
            "id": id_,
            "modified": "2024-01-01T00:00:00Z",
            "affected": [
                {
                    "package": {"ecosystem": "PyPI", "name": pkg},
                    "ranges": [
                        {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": fixed}]}
                    ],
                }
            ],
        }
        (osv / f"{id_}.json").write_text(json.dumps(record))
    store = tmp_path / "vulndb.sqlite"
    info = import_osv(osv, store)
    # Both signed statements claim a clean scan (an older database): the rescan knows better.
    a = make_bundle(tmp_path, "1", side(lock=LOCK_A), signer)
    b = make_bundle(tmp_path, "2", side(lock=LOCK_B, findings=None), signer)

    v = diff(load_lineage(a), load_lineage(b), db=store).vulnerabilities

    assert v.compared and str(store) in v.basis and info.digest[:12] in v.basis
    assert [(x.id, x.package) for x in v.fixed] == [("OSV-U", "urllib3")]
    assert [(x.id, x.package, x.paths) for x in v.new] == [
        ("OSV-I", "idna", (f"idna 3.7 <- requests 2.32.0 <- {MAIN_IN}",))
    ]
    assert "B NOT SCANNED" in v.notes[0]  # what the signed statements said is kept


def test_an_unusable_db_is_bad_input(tmp_path: Path, signer) -> None:
    a = load_lineage(make_bundle(tmp_path, "1", side(), signer))
    with pytest.raises(InputError) as e:
        diff(a, a, db=tmp_path / "missing.sqlite")
    assert e.value.exit_code == 2 and "omit --db" in (e.value.hint or "")


def test_two_unscanned_sides_are_unknown_never_zero_new(tmp_path: Path, signer) -> None:
    a = make_bundle(tmp_path, "1", side(findings=None), signer)
    b = make_bundle(tmp_path, "2", side(findings=None), signer)

    d = diff(load_lineage(a), load_lineage(b))

    assert not d.vulnerabilities.compared and d.vulnerabilities.not_scanned == ("A", "B")
    table = render_table(d)
    assert "vulnerabilities  UNKNOWN: not comparable: A NOT SCANNED" in table
    assert "0 new" not in table and "unchanged: not comparable" not in table
    assert "    note: A was NOT scanned: new and fixed cannot be told apart" in table
    assert table.splitlines()[-1].startswith("vulnerabilities NOT compared")
    doc = json.loads(render_json(d))["vulnerabilities"]
    assert doc["new"] is None and doc["fixed"] is None and doc["still"] is None
    assert doc["compared"] is False and doc["not_scanned"] == ["A", "B"]


def test_a_scanned_side_against_an_unscanned_one_says_which_and_counts_nothing_new(
    tmp_path: Path, signer
) -> None:
    a = make_bundle(tmp_path, "1", side(), signer)  # scanned: clean
    b = make_bundle(tmp_path, "2", side(findings=None), signer)

    table = render_table(diff(load_lineage(a), load_lineage(b)))

    assert "vulnerabilities  CHANGED: not comparable: A scanned against db" in table
    assert "; B NOT SCANNED (no database at x.sqlite)" in table
    assert "0 new" not in table
    assert "    note: B was NOT scanned: new and fixed cannot be told apart" in table
    assert "pass --db PATH" in table


def test_db_rescan_of_a_side_its_gate_never_scanned_says_so(tmp_path: Path, signer) -> None:
    store = osv_store(tmp_path, {"OSV-U": ("urllib3", "1.26.5")})
    a = make_bundle(tmp_path, "1", side(lock=LOCK_A, findings=None), signer)
    b = make_bundle(tmp_path, "2", side(lock=LOCK_B), signer)

    d = diff(load_lineage(a), load_lineage(b), db=store)

    v = d.vulnerabilities
    assert v.compared and v.not_scanned == ("A",)
    assert [x.id for x in v.fixed] == ["OSV-U"]
    assert any("A's own dependency gate did NOT scan it" in n for n in v.notes)
    assert "(A NOT scanned by its own gate)" in render_table(d)


def test_cli_without_db_uses_the_signed_statements_even_with_a_store_at_hand(
    elsewhere: Path, signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store where `vulndb import` puts it, and the env var `scan deps` reads: neither may
    # stand in for the statements each side's gate signed.
    store = osv_store(elsewhere, {"OSV-I": ("idna", "3.8")})
    monkeypatch.setenv("CHAINPROOF_VULNDB", str(store))
    a = make_bundle(elsewhere, "1", side(lock=LOCK_A), signer)
    b = make_bundle(elsewhere, "2", side(lock=LOCK_B, findings=None), signer)

    plain = CliRunner().invoke(diff_command, [str(a), str(b), "--format", "json"])
    rescanned = CliRunner().invoke(
        diff_command, [str(a), str(b), "--format", "json", "--db", str(store)]
    )

    assert plain.exit_code == 0, plain.output
    v = json.loads(plain.output)["vulnerabilities"]
    assert v["basis"] == "each side's signed dependency-scan statement"
    assert v["compared"] is False and v["new"] is None and v["not_scanned"] == ["B"]
    assert "OSV-I" not in plain.output
    assert rescanned.exit_code == 0, rescanned.output
    w = json.loads(rescanned.output)["vulnerabilities"]
    assert w["compared"] is True and [x["id"] for x in w["new"]] == ["OSV-I"]
    assert w["not_scanned"] == ["B"]


# --------------------------------------------------------------------------- config, env, metrics


def test_config_hyperparameter_changes_per_stage(tmp_path: Path, signer) -> None:
    params = {**TRAIN_PARAMS, "learning_rate": 0.01, "dropout": 0.5, "layers": [{"units": 16}]}
    del params["optimizer"]
    a = make_run(tmp_path, "a", side(), signer)
    b = make_run(tmp_path, "b", side(train_params=params, timeout=900), signer)

    c = diff(load_lineage(a), load_lineage(b)).config

    assert c.a_sha256 != c.b_sha256 and c.stages_added == () and c.kinds == ()
    assert c.params == (
        ParamChange("train", "dropout", "added", None, 0.5),
        ParamChange("train", "layers[0].units", "changed", 8, 16),
        ParamChange("train", "learning_rate", "changed", 0.001, 0.01),
        ParamChange("train", "optimizer", "removed", "adam", None),
    )
    # Outside the params, the recorded config.yaml: every stage's timeout went up.
    assert {(p.scope, p.key, p.a, p.b) for p in c.settings} == {
        (stage, "timeout", 600, 900) for stage in ("source", "train", "package")
    }


def test_environment_changes_name_the_stages_they_touch(tmp_path: Path, signer) -> None:
    a = make_run(tmp_path, "a", side(), signer)
    b_side = side(
        env={"*": {"python": "3.11.9"}, "train": {"lock_sha256": "9" * 64}},
        framework={"tensorflow": "2.22.0", "keras": "3.15.1"},
    )
    b = make_run(tmp_path, "b", b_side, signer)

    e = diff(load_lineage(a), load_lineage(b)).environment

    assert set(e.changes) == {
        EnvChange("python", (), "3.11.7", "3.11.9"),  # every stage
        EnvChange("lock_sha256", ("train",), sha(LOCK_A), "9" * 64),
        EnvChange("tensorflow", (), "2.21.0", "2.22.0"),
    }


def test_metrics_deltas_overall_and_per_class(tmp_path: Path, signer) -> None:
    per_class = copy.deepcopy(PER_CLASS)
    per_class["1"].update(precision=0.9, recall=0.875)
    a = make_run(tmp_path, "a", side(), signer)
    b = make_run(tmp_path, "b", side(accuracy=0.95, loss=0.2, per_class=per_class), signer)

    d = diff(load_lineage(a), load_lineage(b))

    m = d.metrics
    assert m.accuracy.delta == pytest.approx(0.05) and m.loss.delta == pytest.approx(-0.1)
    by_class = {c.label: c for c in m.per_class}
    assert not by_class["0"].changed
    assert by_class["1"].precision.delta == pytest.approx(0.1)
    assert by_class["1"].recall.delta == pytest.approx(-0.125)
    table = render_table(d)
    assert "metrics          CHANGED: accuracy 0.9000 -> 0.9500 (+0.0500), loss 0.3000" in table
    rows = [line.split() for line in table.splitlines() if line.startswith("    ")]
    assert [
        "1",
        "0.8000",
        "->",
        "0.9000",
        "(+0.1000)",
        "1.0000",
        "->",
        "0.8750",
        "(-0.1250)",
    ] in rows
    assert not any(row[0] == "0" for row in rows)  # an unchanged class is not listed
    assert "model            CHANGED" in table  # other weights, since the model file differs


# --------------------------------------------------------------------------- both shapes


def test_a_run_against_its_own_release_shows_no_change(tmp_path: Path, signer) -> None:
    s = side(findings=[finding("PYSEC-2023-1", "urllib3", "1.26.0")])
    run = load_lineage(make_run(tmp_path, "r1", s, signer))
    bundle = load_lineage(make_bundle(tmp_path, "r1", s, signer))

    d = diff(run, bundle)

    assert d.changed == ()
    assert bundle.kind == "bundle" and bundle.label == "release digits r1"
    assert bundle.stage("train").params == TRAIN_PARAMS  # from the shipped metrics.json
    assert bundle.stage("source").params is None and bundle.dataset["bytes"] is None
    assert run.dataset["bytes"] == len(DATASET)
    assert d.config.notes[0] == "parameters of source, package not recorded in B"
    assert [v.id for v in d.vulnerabilities.still] == ["PYSEC-2023-1"]
    lines = render_table(d).splitlines()
    assert "unchanged: none on either side" in lines[lines.index("") + 4]
    # Unchanged groups take one line each: nothing is expanded below them.
    groups = lines[4:12]
    assert len(groups) == 8 and all("unchanged:" in line for line in groups)
    assert lines[12:] == ["", "0 of 8 groups changed"]


def test_an_older_bundle_without_lock_files_or_per_class_metrics(tmp_path: Path, signer) -> None:
    a = make_bundle(tmp_path, "1", side(ship_lock=False, per_class=None), signer)
    b = make_bundle(tmp_path, "2", side(), signer)

    d = diff(load_lineage(a), load_lineage(b))

    # A's links still record the lock digest it ran under: the same lock, so no change.
    (lock,) = d.dependencies.locks
    assert not lock.changed and lock.digest_only == "A"
    assert d.dependencies.notes == ("A ships no lock files",)
    assert d.metrics.per_class == () and d.metrics.notes == ("A records no per-class metrics",)
    assert d.changed == ()


def test_a_base_model_is_found_in_params(tmp_path: Path, signer) -> None:
    a = make_bundle(tmp_path, "1", side(), signer)
    b = make_bundle(
        tmp_path, "2", side(train_params={**TRAIN_PARAMS, "base_model": "mnv2"}), signer
    )
    d = diff(load_lineage(a), load_lineage(b))
    assert [(c.key, c.a, c.b) for c in d.base_model.changes] == [
        ("train param base_model", None, "mnv2")
    ]


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cwd of its own, with no CHAINPROOF_VULNDB: nothing around the CLI may change the diff."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHAINPROOF_VULNDB", raising=False)
    return tmp_path


def test_cli_reports_with_exit_0_in_table_and_sorted_json(elsewhere: Path, signer) -> None:
    a = make_run(elsewhere, "a", side(lock=LOCK_A), signer)
    b = make_bundle(elsewhere, "2", side(lock=LOCK_B), signer)

    table = CliRunner().invoke(diff_command, [str(a), str(b)])
    out = CliRunner().invoke(diff_command, [str(a), str(b), "--format", "json"])

    assert table.exit_code == 0 and "dependencies     CHANGED" in table.output
    assert out.exit_code == 0
    doc = json.loads(out.output)
    assert out.output.rstrip("\n") == json.dumps(doc, indent=2, sort_keys=True)
    assert doc["changed"] == ["dependencies", "environment"] and doc["verified"] is False
    assert doc["a"]["kind"] == "run" and doc["b"]["kind"] == "bundle"
    assert doc["dependencies"]["locks"][0]["changed"] is True
    assert "each side's signed" in doc["vulnerabilities"]["basis"]
    assert out.output == render_json(diff(load_lineage(a), load_lineage(b))) + "\n"


def test_cli_bad_input_is_an_input_error_with_a_hint(elsewhere: Path, signer) -> None:
    b = make_bundle(elsewhere, "2", side(), signer)
    (elsewhere / "not-a-run").mkdir()
    for bad in (elsewhere / "missing", elsewhere / "not-a-run"):
        result = CliRunner().invoke(diff_command, [str(bad), str(b)])
        assert isinstance(result.exception, InputError), result.output
        assert result.exception.exit_code == 2
        assert "runs/<run-id>" in (result.exception.hint or "")
