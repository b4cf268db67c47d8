"""The package stage's ML-BOM: what outside CycloneDX tools read, validated strictly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from pipeline.envcheck import parse_lock
from pipeline.scan.deps import from_lock
from stages import package
from stages.package import InstalledWheel, dataset_uri, installed_wheels, ml_bom, validate_bom
from tests.conftest import MAIN_LOCK, ROOT

WEIGHTS = "ab" * 32
FILES = {
    "model.keras": WEIGHTS,
    "saved_model/saved_model.pb": "cd" * 32,
    "saved_model/variables/variables.index": "ef" * 32,
}


def card(kind: str = "package") -> dict:
    location = {
        "package": "scikit-learn 1.6.1: sklearn/datasets/data/digits.csv.gz",
        "url": "https://example.org/data/digits.npz",
        "file": "/home/builder/data/digits.npz",
    }[kind]
    return {
        "model": {"name": "digits-cnn", "version": "sha256-abababababab", "files": {}},
        "input": {"dtype": "float32", "shape": [8, 8, 1], "range": [0.0, 1.0]},
        "intended_use": "Demonstration.",
        "limitations": "Small data.",
        "training_data": {
            "name": "sklearn-digits",
            "sha256": "12" * 32,
            "source": {"kind": kind, "location": location, "sha256": "34" * 32},
            "split": {"seed": 42, "test_fraction": 0.2, "train": 1437, "test": 360},
        },
        "metrics": {"accuracy": 0.97, "loss": 0.1},
    }


@pytest.fixture(scope="module")
def bom() -> dict:
    return json.loads(ml_bom(card(), FILES, [MAIN_LOCK]))


def test_bom_passes_cyclonedx_strict_validation():
    text = ml_bom(card(), FILES, [MAIN_LOCK])
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None


def test_metadata_names_the_model_time_tool_and_serial(bom):
    meta = bom["metadata"]
    model = meta["component"]
    assert model["type"] == "machine-learning-model" and model["version"] == "sha256-abababababab"
    assert model["purl"] == f"pkg:generic/digits-cnn@sha256-abababababab?checksum=sha256:{WEIGHTS}"
    assert model["hashes"] == [{"alg": "SHA-256", "content": WEIGHTS}]
    assert {f["name"]: f["hashes"][0]["content"] for f in model["components"]} == FILES
    assert meta["timestamp"].endswith("Z") and bom["serialNumber"].startswith("urn:uuid:")
    assert [t["name"] for t in meta["tools"]["components"]] == ["chainproof"]
    assert "machine-learning-model" not in {c["type"] for c in bom["components"]}


def test_dependencies_follow_the_lock_graph(bom):
    graph = from_lock(MAIN_LOCK)
    edges = {d["ref"]: set(d.get("dependsOn", [])) for d in bom["dependencies"]}
    refs = {c["bom-ref"] for c in bom["components"]} | {"model"}
    assert set(edges) <= refs and all(kids <= refs for kids in edges.values())
    tf = f"pkg:pypi/tensorflow@{graph.version('tensorflow')}"
    assert f"pkg:pypi/numpy@{graph.version('numpy')}" in edges[tf]
    assert "dataset" in edges["model"]
    assert {f"pkg:pypi/{r}@{graph.version(r)}" for r in graph.roots} <= edges["model"]


def test_dataset_has_a_data_block_and_a_portable_uri(bom):
    (data,) = [c for c in bom["components"] if c["type"] == "data"]
    (block,) = data["data"]
    assert block["type"] == "dataset"
    assert block["contents"]["url"] == (
        "pkg:pypi/scikit-learn@1.6.1#sklearn/datasets/data/digits.csv.gz"
    )
    props = {p["name"]: p["value"] for p in block["contents"]["properties"]}
    assert props["chainproof:origin-sha256"] == "34" * 32
    assert dataset_uri(card("url")["training_data"]["source"]) == (
        "https://example.org/data/digits.npz"
    )
    # a builder's local path is not a URI anyone else can resolve: no url at all
    local = json.loads(ml_bom(card("file"), FILES, [MAIN_LOCK]))
    (data,) = [c for c in local["components"] if c["type"] == "data"]
    assert "url" not in data["data"][0]["contents"]
    assert "/home/builder" not in json.dumps(local)


def test_library_carries_the_installed_wheel_hash_when_known():
    pins = parse_lock(MAIN_LOCK).pins
    numpy = pins["numpy"]
    chosen = sorted(numpy.hashes)[3]
    url = "https://files.pythonhosted.org/packages/numpy-x-cp311-manylinux.whl"
    installed = {("numpy", numpy.version): InstalledWheel(chosen, "pip install report", url)}
    doc = json.loads(ml_bom(card(), FILES, [MAIN_LOCK], installed=installed))
    libs = {c["name"]: c for c in doc["components"] if c["type"] == "library"}
    assert libs["numpy"]["hashes"] == [{"alg": "SHA-256", "content": chosen}]
    assert libs["numpy"]["externalReferences"][0]["url"] == url
    # not identified: every lock hash, and the BOM says so
    six = libs[next(n for n in libs if n != "numpy")]
    (note,) = six["properties"]
    assert note["value"].startswith("not identified")


def test_a_recorded_hash_outside_the_lock_is_not_believed():
    numpy = parse_lock(MAIN_LOCK).pins["numpy"]
    installed = {("numpy", numpy.version): InstalledWheel("00" * 32, "direct_url.json")}
    doc = json.loads(ml_bom(card(), FILES, [MAIN_LOCK], installed=installed))
    (lib,) = [c for c in doc["components"] if c["name"] == "numpy"]
    assert {h["content"] for h in lib["hashes"]} == set(numpy.hashes)
    assert "00" * 32 in lib["properties"][0]["value"]


def test_installed_wheels_reads_pips_install_report(tmp_path):
    report = {
        "install": [
            {
                "metadata": {"name": "NumPy", "version": "2.4.6"},
                "download_info": {
                    "url": "https://files.example/numpy.whl",
                    "archive_info": {"hashes": {"sha256": "aa" * 32}},
                },
            },
            {"metadata": {"name": "bad"}, "download_info": "not a dict"},
            "garbage",
        ]
    }
    (tmp_path / package.INSTALL_REPORT).write_text(json.dumps(report))
    got = installed_wheels(tmp_path)
    assert got[("numpy", "2.4.6")].sha256 == "aa" * 32
    (tmp_path / package.INSTALL_REPORT).write_text("{not json")
    assert ("numpy", "2.4.6") not in installed_wheels(tmp_path)


def test_runtime_validator_rejects_what_the_schema_rejects():
    doc = json.loads(ml_bom(card(), FILES, [MAIN_LOCK]))
    assert validate_bom(doc) == []
    doc["metadata"]["component"]["type"] = "weights"
    doc["components"][0]["data"][0]["contents"]["url"] = "not a uri with spaces"
    errors = validate_bom(doc)
    assert any(e.startswith("metadata/component/type") for e in errors)
    assert any("components/0/data/0/contents/url" in e for e in errors)


def test_runtime_validation_does_not_import_rfc3987_syntax():
    code = (
        "import json, sys\n"
        "from stages.package import validate_bom\n"
        "doc = {'bomFormat': 'CycloneDX', 'specVersion': '1.6', 'version': 1,\n"
        "       'metadata': {'timestamp': '2026-01-01T00:00:00Z'}}\n"
        "assert validate_bom(doc) == [], validate_bom(doc)\n"
        "assert validate_bom({**doc, 'version': 'x'})\n"
        "print(*(m in sys.modules for m in ('rfc3987_syntax', 'lark', 'cyclonedx')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"]


def test_package_module_does_not_import_tensorflow_or_cyclonedx():
    code = (
        "import sys, stages.package\n"
        "print(sorted(m for m in ('tensorflow', 'cyclonedx', 'jsonschema') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_bom_is_written_as_deterministic_json_apart_from_time_and_serial():
    a = json.loads(
        ml_bom(
            card(),
            FILES,
            [MAIN_LOCK],
            created="2026-01-01T00:00:00Z",
            serial="urn:uuid:00000000-0000-4000-8000-000000000000",
        )
    )
    b = json.loads(
        ml_bom(
            card(),
            FILES,
            [MAIN_LOCK],
            created="2026-01-01T00:00:00Z",
            serial="urn:uuid:00000000-0000-4000-8000-000000000000",
        )
    )
    assert a == b
