"""OSV matching as the schema's evaluation defines it, on small records written here."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.scan import osv
from pipeline.scan.osv import Severity, cvss3_base_score, is_affected, match


def record(
    rid: str,
    *ranges: list[dict[str, str]],
    name: str = "pkg",
    versions: list[str] | None = None,
    range_type: str = "ECOSYSTEM",
    **extra: Any,
) -> dict[str, Any]:
    affected: dict[str, Any] = {
        "package": {"ecosystem": "PyPI", "name": name},
        "ranges": [{"type": range_type, "events": events} for events in ranges],
    }
    if versions is not None:
        affected["versions"] = versions
    return {"id": rid, "modified": "2024-01-01T00:00:00Z", "affected": [affected], **extra}


def affected_versions(rec: dict[str, Any], candidates: str) -> list[str]:
    return [v for v in candidates.split() if is_affected(rec, "pkg", v)]


def test_introduced_and_fixed_bounds() -> None:
    rec = record("X-1", [{"introduced": "1.2"}, {"fixed": "1.4.1"}])
    assert affected_versions(rec, "1.1 1.2 1.3 1.4 1.4.1 1.5") == ["1.2", "1.3", "1.4"]


def test_introduced_zero_means_everything_even_pre_releases() -> None:
    rec = record("X-1", [{"introduced": "0"}, {"fixed": "1.0"}])
    assert affected_versions(rec, "0.0.1.dev0 0.1a1 0.9 1.0rc1 1.0 1.0.post1") == [
        "0.0.1.dev0",
        "0.1a1",
        "0.9",
        "1.0rc1",  # a pre-release of the fix sorts before it (PEP 440)
    ]


def test_pre_release_boundaries() -> None:
    rec = record("X-1", [{"introduced": "2.0.0b1"}, {"fixed": "2.0.0rc2"}])
    assert affected_versions(rec, "2.0.0a9 2.0.0b1 2.0.0rc1 2.0.0rc2 2.0.0") == [
        "2.0.0b1",
        "2.0.0rc1",
    ]


def test_pep440_spelling_and_ordering_not_string_ordering() -> None:
    rec = record("X-1", [{"introduced": "1.9"}, {"fixed": "1.10"}])
    assert affected_versions(rec, "1.9 1.9.5 1.10 1.10.0 1.2") == ["1.9", "1.9.5"]
    listed = record("X-2", versions=["1.0", "2.0RC1"])
    assert affected_versions(listed, "1.0.0 2.0rc1 1.0.1") == ["1.0.0", "2.0rc1"]


def test_last_affected_includes_itself_only() -> None:
    rec = record("X-1", [{"introduced": "1.0"}, {"last_affected": "1.5"}])
    assert affected_versions(rec, "0.9 1.0 1.5 1.5.post1 1.6") == ["1.0", "1.5"]


def test_limit_bounds_the_range() -> None:
    rec = record("X-1", [{"introduced": "0"}, {"limit": "2.0"}])
    assert affected_versions(rec, "1.0 1.99 2.0 3.0") == ["1.0", "1.99"]
    star = record("X-2", [{"introduced": "1.0"}, {"limit": "*"}])
    assert affected_versions(star, "0.9 1.0 99") == ["1.0", "99"]
    several = record("X-3", [{"introduced": "0"}, {"limit": "1.0"}, {"limit": "3.0"}])
    assert affected_versions(several, "0.5 2.0 3.0") == ["0.5", "2.0"]


def test_events_are_sorted_before_evaluation() -> None:
    # As in the real PYSEC-2023-192 (urllib3): the 2.x range is listed before the 1.x one.
    rec = record(
        "X-1",
        [{"introduced": "2.0.0"}, {"fixed": "2.0.6"}, {"introduced": "0"}, {"fixed": "1.26.17"}],
    )
    assert affected_versions(rec, "1.23 1.26.17 1.27 2.0.0 2.0.5 2.0.6") == [
        "1.23",
        "2.0.0",
        "2.0.5",
    ]


def test_several_ranges_and_several_affected_entries() -> None:
    rec = record("X-1", [{"introduced": "1.0"}, {"fixed": "1.1"}], [{"introduced": "3.0"}])
    rec["affected"].append({"package": {"ecosystem": "PyPI", "name": "pkg"}, "versions": ["2.5"]})
    assert affected_versions(rec, "0.5 1.0 1.1 2.5 2.6 3.0 4.0") == ["1.0", "2.5", "3.0", "4.0"]


def test_git_and_semver_ranges_are_ignored_but_versions_still_count() -> None:
    git = record(
        "X-1", [{"introduced": "0"}, {"fixed": "abc123"}], range_type="GIT", versions=["0.3"]
    )
    assert affected_versions(git, "0.1 0.3 9.0") == ["0.3"]
    semver = record("X-2", [{"introduced": "0"}], range_type="SEMVER")
    assert affected_versions(semver, "1.0") == []


def test_unorderable_range_is_skipped_not_guessed() -> None:
    rec = record("X-1", [{"introduced": "0"}, {"fixed": "not-a-version"}], versions=["1.0"])
    assert affected_versions(rec, "1.0 2.0") == ["1.0"]


def test_withdrawn_records_never_match() -> None:
    rec = record("X-1", [{"introduced": "0"}], withdrawn="2024-02-01T00:00:00Z")
    assert match([rec], "pkg", "1.0") == []


def test_names_are_pep503_normalised_and_ecosystem_checked() -> None:
    rec = record("X-1", [{"introduced": "0"}], name="PyYAML")
    assert is_affected(rec, "pyyaml", "5.3") and is_affected(rec, "PyYaml", "5.3")
    zope = record("X-2", [{"introduced": "0"}], name="zope.interface")
    assert is_affected(zope, "Zope_Interface", "5.0")
    npm = record("X-3", [{"introduced": "0"}])
    npm["affected"][0]["package"]["ecosystem"] = "npm"
    assert not is_affected(npm, "pkg", "1.0")


def test_aliases_merge_into_one_advisory() -> None:
    pysec = record(
        "PYSEC-2020-1",
        [{"introduced": "0"}, {"fixed": "2.0"}],
        aliases=["CVE-2020-9", "GHSA-aaaa-bbbb-cccc"],
    )
    ghsa = record(
        "GHSA-aaaa-bbbb-cccc", [{"introduced": "0"}, {"fixed": "2.0.1"}], aliases=["CVE-2020-9"]
    )
    other = record("PYSEC-2021-5", [{"introduced": "0"}])
    found = match([ghsa, other, pysec], "pkg", "1.0")
    assert [a.id for a in found] == ["PYSEC-2020-1", "PYSEC-2021-5"]
    merged = found[0]
    assert merged.ids == ("PYSEC-2020-1", "GHSA-aaaa-bbbb-cccc")
    assert merged.aliases == ("CVE-2020-9",)
    assert merged.fixed == ("2.0", "2.0.1")


def test_records_sharing_only_a_cve_are_one_vulnerability() -> None:
    a = record("PYSEC-1", [{"introduced": "0"}], aliases=["CVE-1"])
    b = record("GHSA-x", [{"introduced": "0"}], aliases=["CVE-1"])
    [only] = match([a, b], "pkg", "1.0")
    assert only.ids == ("PYSEC-1", "GHSA-x") and only.aliases == ("CVE-1",)


def test_fixed_versions_are_those_above_the_pin() -> None:
    rec = record(
        "X-1", [{"introduced": "0"}, {"fixed": "1.5"}, {"introduced": "2.0"}, {"fixed": "2.3"}]
    )
    [adv] = match([rec], "pkg", "2.1")
    assert adv.fixed == ("2.3",)
    assert match([rec], "pkg", "1.0")[0].fixed == ("1.5", "2.3")


# --------------------------------------------------------------------------- severity


@pytest.mark.parametrize(
    ("vector", "score"),
    [
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 9.8),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H", 10.0),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H", 7.5),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N", 6.1),
        ("CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:U/C:H/I:H/A:H", 8.8),
        ("CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:N/A:N", 5.5),
        ("CVSS:3.1/AV:A/AC:H/PR:H/UI:N/S:U/C:H/I:N/A:N", 4.2),
        ("CVSS:3.1/AV:L/AC:L/PR:H/UI:N/S:C/C:H/I:H/A:H", 8.2),
        ("CVSS:3.1/AV:P/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N", 1.6),
        ("CVSS:3.0/AV:N/AC:H/PR:N/UI:R/S:U/C:L/I:N/A:N", 3.1),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N", 0.0),
        # Temporal metrics after the base ones do not change the base score.
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H/E:P/RL:O", 7.5),
    ],
)
def test_cvss3_base_scores(vector: str, score: float) -> None:
    assert cvss3_base_score(vector) == score


@pytest.mark.parametrize(
    "vector",
    [
        "AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",  # no CVSS:3.x prefix
        "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H",  # A missing
        "CVSS:3.1/AV:X/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",  # bad value
        "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N",
    ],
)
def test_invalid_cvss3_vectors_are_rejected(vector: str) -> None:
    with pytest.raises(ValueError):
        cvss3_base_score(vector)


def sev(rec_extra: dict[str, Any]) -> Severity:
    return osv.severity_of(record("X-1", [{"introduced": "0"}], **rec_extra), "pkg")


def test_severity_sources_and_unknown_is_never_low() -> None:
    v3 = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H"
    v4 = "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N"
    assert sev({"severity": [{"type": "CVSS_V3", "score": v3}]}) == Severity(
        "high", 7.5, v3, "CVSS_V3"
    )
    assert sev({"database_specific": {"severity": "MODERATE"}}).rating == "medium"
    with_v4 = sev(
        {
            "severity": [{"type": "CVSS_V4", "score": v4}],
            "database_specific": {"severity": "CRITICAL"},
        }
    )
    assert (with_v4.rating, with_v4.vector) == ("critical", v4)
    assert sev({"severity": [{"type": "CVSS_V4", "score": v4}]}).rating == "unknown"
    assert sev({}).rating == "unknown"
    assert sev({"severity": [{"type": "CVSS_V3", "score": "garbage"}]}).rating == "unknown"


def test_package_level_severity_counts() -> None:
    rec = record("X-1", [{"introduced": "0"}])
    rec["affected"][0]["severity"] = [
        {"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}
    ]
    assert osv.severity_of(rec, "pkg").rating == "critical"


def test_merged_advisory_takes_the_worst_known_severity() -> None:
    low = record(
        "PYSEC-1", [{"introduced": "0"}], aliases=["GHSA-1"], database_specific={"severity": "LOW"}
    )
    high = record("GHSA-1", [{"introduced": "0"}], database_specific={"severity": "HIGH"})
    unknown = record("OSV-1", [{"introduced": "0"}], aliases=["PYSEC-1"])
    [adv] = match([low, high, unknown], "pkg", "1.0")
    assert adv.severity.rating == "high"
    assert adv.ids == ("PYSEC-1", "GHSA-1", "OSV-1")
