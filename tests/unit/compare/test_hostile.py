"""A side of `diff` or `show` is hostile input: any shape of any record it ships must end in a
report or a chainproof `Error` (exit 2), never in an internal error (exit 70)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.compare.diff import diff, load_lineage
from pipeline.compare.render import render
from pipeline.errors import Error
from pipeline.show import read_chain, render_json, render_tree
from tests.unit.compare.lineages import finding, make_bundle, make_run, side

# What a hostile writer puts where the reader expects something else.
WRONG = ([1], "s", 7, None, {"k": {}})


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    out = json.loads(json.dumps(doc))
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def _mutations(doc: Any) -> Iterator[Any]:
    for path in _paths(doc):
        for value in WRONG:
            yield _replaced(doc, path, value)


def _read_payload(path: Path) -> tuple[dict[str, Any], Any]:
    envelope = json.loads(path.read_text())
    return envelope, json.loads(base64.b64decode(envelope["payload"]))


def _write_payload(path: Path, envelope: dict[str, Any], payload: Any) -> None:
    # diff and show never check signatures, so the envelope need not be re-signed
    envelope = {**envelope, "payload": base64.b64encode(json.dumps(payload).encode()).decode()}
    path.write_text(json.dumps(envelope))


def _survives(target: Path, other: Any) -> None:
    """diff (both ways, both formats) and show (both formats) of `target`: a report or an Error."""
    try:
        mine = load_lineage(target)
        for d in (diff(other, mine), diff(mine, other)):
            for fmt in ("table", "json"):
                render(d, fmt)
    except Error:
        pass
    try:
        view = read_chain(target)
        render_tree(view)
        render_json(view)
    except Error:
        pass


@pytest.fixture
def sides(tmp_path: Path, signer) -> tuple[Path, Path, Any]:
    s = side(findings=[finding("PYSEC-2023-1", "urllib3", "1.26.0", "GHSA-x", via="requests")])
    run = make_run(tmp_path, "r1", s, signer)
    bundle = make_bundle(tmp_path, "1.0", s, signer)
    return run, bundle, load_lineage(make_bundle(tmp_path, "base", side(), signer))


@pytest.mark.parametrize(
    "name",
    [
        "run.json",
        "specs/train.json",
        "package/metrics.json",
        "package/model_card.json",
        "config.yaml",
    ],
)
def test_every_wrong_shape_of_a_run_record_is_a_report_or_bad_input(
    sides: tuple[Path, Path, Any], name: str
) -> None:
    run, _, other = sides
    path = run / name
    original = path.read_text()
    doc = json.loads(original) if name.endswith(".json") else yaml.safe_load(original)
    for mutated in _mutations(doc):
        path.write_text(json.dumps(mutated))  # JSON is YAML too
        _survives(run, other)
    path.write_text(original)


def test_every_wrong_shape_of_a_bundle_record_is_a_report_or_bad_input(
    sides: tuple[Path, Path, Any],
) -> None:
    _, bundle, other = sides
    for name in ("package/metrics.json", "package/model_card.json"):
        path = bundle / "artifacts" / name
        original = path.read_text()
        for mutated in _mutations(json.loads(original)):
            path.write_text(json.dumps(mutated))
            _survives(bundle, other)
        path.write_text(original)


def test_every_wrong_shape_of_the_scan_statement_is_a_report_or_bad_input(
    sides: tuple[Path, Path, Any],
) -> None:
    _, bundle, other = sides
    path = bundle / "attestations" / "checks" / "dependencies.intoto.json"
    envelope, payload = _read_payload(path)
    for mutated in _mutations(payload):
        _write_payload(path, envelope, mutated)
        _survives(bundle, other)


def test_a_scan_statement_that_is_not_json_reads_as_no_statement(
    sides: tuple[Path, Path, Any],
) -> None:
    _, bundle, other = sides
    path = bundle / "attestations" / "checks" / "dependencies.intoto.json"
    for content in (b"", b"[]", b'{"payload": "!!"}', b"[" * 100_000):
        path.write_bytes(content)
        lineage = load_lineage(bundle)
        assert lineage.scan.state == "no statement"
        v = diff(other, lineage).vulnerabilities
        assert not v.compared and v.not_scanned == ("B",)
