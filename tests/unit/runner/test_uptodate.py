"""The up-to-date check's comparison of dependency scans (only the start time may differ), and
its early bundle check's answer, read as hostile."""

from __future__ import annotations

import copy
import json
import os
import time

import pytest

from pipeline.runner.bundlecheck import BundleCheck
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


def _child(payload: bytes, *, hang: bool = False) -> BundleCheck:
    """A BundleCheck over a real forked child that answers `payload` (or hangs)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        if hang:
            time.sleep(60)
        os.write(write, payload)
        os._exit(0)
    os.close(write)
    return BundleCheck("20261202T000000Z-abcdef", pid, read)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_early_bundle_check_returns_its_childs_answer() -> None:
    answer = {"run_id": "r", "owner": "owner-keyid", "release_keys": [], "expires": "x"}
    check = _child(json.dumps(answer).encode())
    assert check.result(timeout=30) == answer
    assert _gone(check.pid)


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"[1, 2]", b"null", b'{"run_id": "r"' + b" " * 70000 + b"}"],
    ids=["nothing", "garbage", "list", "null", "oversized"],
)
def test_a_bad_answer_from_the_bundle_check_is_no_answer(payload: bytes) -> None:
    assert _child(payload).result(timeout=30) is None


def test_a_hung_bundle_check_is_killed_and_no_answer() -> None:
    check = _child(b"{}", hang=True)
    t0 = time.monotonic()
    assert check.result(timeout=0.5) is None
    assert time.monotonic() - t0 < 10 and _gone(check.pid)
    check.cancel()  # idempotent
