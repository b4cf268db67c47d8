"""reproduce tells the truth about what it did not compare byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.compare.reproduce import StageComparison, compare_bom


def bom(tmp: Path, name: str, *, serial: str, stamp: str, sm: str, lib: str = "aa") -> Path:
    doc = {
        "bomFormat": "CycloneDX",
        "serialNumber": serial,
        "metadata": {
            "timestamp": stamp,
            "component": {
                "name": "m",
                "components": [
                    {"name": "model.keras", "hashes": [{"content": "11" * 32}]},
                    {"name": "saved_model/saved_model.pb", "hashes": [{"content": sm * 32}]},
                ],
            },
        },
        "components": [{"name": "numpy", "hashes": [{"content": lib * 32}]}],
    }
    path = tmp / name
    path.write_text(json.dumps(doc))
    return path


def test_a_bom_differing_only_per_build_is_same_content_not_identical(tmp_path):
    a = bom(tmp_path, "a.json", serial="urn:uuid:1", stamp="2026-01-01T00:00:00Z", sm="22")
    b = bom(tmp_path, "b.json", serial="urn:uuid:2", stamp="2026-02-01T00:00:00Z", sm="33")
    got = compare_bom("package/bom.cdx.json", a, b)
    assert got.identical and "not byte-identical" in got.detail
    st = StageComparison("package", equivalent=[got])
    assert st.notes() == [f"package/bom.cdx.json: {got.detail}"]


def test_a_bom_with_other_content_differs(tmp_path):
    a = bom(tmp_path, "a.json", serial="urn:uuid:1", stamp="t", sm="22")
    b = bom(tmp_path, "b.json", serial="urn:uuid:1", stamp="t", sm="22", lib="bb")
    got = compare_bom("package/bom.cdx.json", a, b)
    assert not got.identical and "components" in got.detail
    (tmp_path / "c.json").write_text("[1, 2]")
    assert not compare_bom("x", a, tmp_path / "c.json").identical


def test_savedmodel_exports_are_reported_as_not_compared():
    st = StageComparison("train", not_compared=["train/saved_model/saved_model.pb"])
    assert st.identical  # nothing compared differed ...
    (note,) = st.notes()  # ... and the output says what was not compared, and why
    assert "1 SavedModel export file(s) not compared: not byte-reproducible" in note
    assert "model.keras" in note
