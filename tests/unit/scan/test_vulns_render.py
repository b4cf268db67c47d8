"""Every `scan deps --format` choice maps to exactly one report format (pip-audit's
test_to_format_is_exhaustive), and each format renders a real scan."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click
import pytest

from pipeline.cli.scan import SCAN_FORMATS, scan_deps
from pipeline.errors import InputError
from pipeline.scan import vulns_render
from pipeline.scan.deps import from_lock
from pipeline.scan.vulndb import import_osv
from pipeline.scan.vulns import Policy, evaluate, scan

RECORD = {
    "id": "PYSEC-0000-1",
    "modified": "2026-11-01T00:00:00Z",
    "summary": "a test advisory",
    "affected": [
        {
            "package": {"ecosystem": "PyPI", "name": "demo"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "2.0"}]}],
        }
    ],
}


def test_every_format_choice_maps_to_exactly_one_implementation() -> None:
    option = next(p for p in scan_deps.params if p.name == "fmt")
    assert isinstance(option.type, click.Choice)
    choices = tuple(option.type.choices)
    assert choices == SCAN_FORMATS
    assert set(choices) == set(vulns_render.FORMATS)
    implementations = [type(vulns_render.FORMATS[c]) for c in choices]
    assert len(set(implementations)) == len(choices)  # no two choices share one format
    for choice, impl in zip(choices, implementations, strict=True):
        assert issubclass(impl, vulns_render.VulnerabilityFormat)
        assert impl.name == choice
    # every concrete format is reachable from some choice
    concrete = {c for c in vulns_render.VulnerabilityFormat.__subclasses__()}
    assert concrete == set(implementations)


def test_each_format_renders_a_scan(tmp_path: Path) -> None:
    (tmp_path / "osv").mkdir()
    (tmp_path / "osv" / "r.json").write_text(json.dumps(RECORD))
    db = tmp_path / "db.sqlite"
    import_osv(tmp_path / "osv", db)
    lock = tmp_path / "lock.txt"
    lock.write_text("demo==1.0\n    # via -r demo.in\n")
    result = scan(from_lock(lock), db, now=datetime(2026, 11, 2, tzinfo=UTC))
    ev = evaluate(result, Policy(), datetime(2026, 11, 2).date())
    assert "PYSEC-0000-1" in vulns_render.render(result, "table", ev)
    assert (
        json.loads(vulns_render.render(result, "json", ev))["findings"][0]["id"] == "PYSEC-0000-1"
    )
    cdx = json.loads(vulns_render.render(result, "cyclonedx", ev))
    assert cdx["vulnerabilities"][0]["id"] == "PYSEC-0000-1"
    sarif = json.loads(vulns_render.render(result, "sarif", ev))
    assert sarif["runs"][0]["results"][0]["ruleId"] == "PYSEC-0000-1"
    with pytest.raises(InputError, match="unknown format"):
        vulns_render.render(result, "xml", ev)
