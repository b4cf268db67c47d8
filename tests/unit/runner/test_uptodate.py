"""The up-to-date check's comparison of dependency scans: only the start time may differ."""

from __future__ import annotations

import copy

from pipeline.runner.uptodate import _scan_outcome

SCAN = {
    "_type": "https://in-toto.io/Statement/v1",
    "subject": [{"name": "main.txt", "digest": {"sha256": "ab" * 32}}],
    "predicateType": "https://in-toto.io/attestation/vulns/v0.1",
    "predicate": {
        "scanner": {"uri": "chainproof", "version": "1", "result": []},
        "metadata": {"scanStartedOn": "2026-12-01T00:00:00Z", "scanFinishedOn": "x"},
        "chainproof": {"scanned": True, "verdict": "ok", "database": {"sha256": "cd" * 32}},
    },
}


def test_two_scans_that_differ_only_in_their_start_time_agree() -> None:
    later = copy.deepcopy(SCAN)
    later["predicate"]["metadata"]["scanStartedOn"] = "2026-12-02T09:00:00Z"
    assert _scan_outcome(later) == _scan_outcome(SCAN)


def test_a_new_database_finding_or_lock_is_a_different_outcome() -> None:
    for change in (
        lambda s: s["predicate"]["chainproof"]["database"].update(sha256="ef" * 32),
        lambda s: s["predicate"]["scanner"]["result"].append({"id": "GHSA-x"}),
        lambda s: s["subject"][0]["digest"].update(sha256="00" * 32),
        lambda s: s["predicate"]["metadata"].update(scanFinishedOn="y"),
    ):
        other = copy.deepcopy(SCAN)
        change(other)
        assert _scan_outcome(other) != _scan_outcome(SCAN)


def test_the_comparison_never_changes_the_statement() -> None:
    before = copy.deepcopy(SCAN)
    _scan_outcome(SCAN)
    assert before == SCAN
