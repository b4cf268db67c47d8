"""The model scanner on real Keras/TensorFlow artifacts: clean architectures in every save
format pass; a Lambda layer, a layer pointed outside Keras and a SavedModel that writes a file
are caught at the right place. Samples are built once per session (TensorFlow is slow to load)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.scan.model import Severity, scan_path
from tests import model_samples as ms

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]


@pytest.fixture(scope="session")
def tf_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tf-sentinel") / "PWNED"


@pytest.fixture(scope="session")
def tf_samples(tmp_path_factory: pytest.TempPathFactory, tf_sentinel: Path) -> list[ms.Sample]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return ms.write_tf_samples(tmp_path_factory.mktemp("tf-samples"), tf_sentinel)


def _by_name(samples: list[ms.Sample], malicious: bool) -> dict[str, ms.Sample]:
    return {s.name: s for s in samples if s.malicious is malicious}


def test_clean_models_in_every_format_pass(tf_samples: list[ms.Sample]) -> None:
    clean = _by_name(tf_samples, malicious=False)
    assert len(clean) == 12  # 3 architectures x (.keras, .h5, export, tf.saved_model.save)
    for name, sample in clean.items():
        report = scan_path(sample.path)
        assert report.ok("medium"), (name, [str(f.location) for f in report.findings])
        assert report.files, name


def test_malicious_models_are_caught_where_they_are(
    tf_samples: list[ms.Sample], tf_sentinel: Path
) -> None:
    evil = _by_name(tf_samples, malicious=True)
    assert set(evil) == {
        "lambda (.keras)",
        "lambda (.h5)",
        "custom module (.keras)",
        "tf.io.write_file (SavedModel)",
    }
    for name, sample in evil.items():
        report = scan_path(sample.path)
        hits = [f for f in report.findings if f.rule == sample.rule]
        assert hits, (name, report.findings)
        for key, value in sample.where.items():
            assert getattr(hits[0].location, key) == value, (name, hits[0].location)
        assert not report.ok("medium")
    assert not tf_sentinel.exists()


def test_lambda_locations_per_format(tf_samples: list[ms.Sample]) -> None:
    evil = _by_name(tf_samples, malicious=True)
    keras_hit = scan_path(evil["lambda (.keras)"].path).findings[0]
    assert (keras_hit.severity, keras_hit.location.member) == (Severity.CRITICAL, "config.json")
    h5_hit = scan_path(evil["lambda (.h5)"].path).findings[0]
    assert h5_hit.location.member is None and (h5_hit.location.key or "").startswith("model_config")
    assert "marshalled Python bytecode" in h5_hit.message


def test_write_file_is_located_in_its_function(tf_samples: list[ms.Sample]) -> None:
    sample = _by_name(tf_samples, malicious=True)["tf.io.write_file (SavedModel)"]
    (hit,) = [f for f in scan_path(sample.path).findings if f.severity >= Severity.MEDIUM]
    loc = hit.location
    assert hit.severity is Severity.CRITICAL
    assert loc.file == "saved_model.pb" and loc.op == "WriteFile"
    assert (loc.function or "").startswith("__inference_drop")


def test_subset_schema_sees_every_op_tensorflow_sees(tf_samples: list[ms.Sample]) -> None:
    """The scanner's own protobuf subset must read the same ops as TensorFlow's full schema."""
    from tensorflow.core.protobuf.saved_model_pb2 import SavedModel

    from pipeline.scan.model.savedmodel import tf_messages as _tf_messages

    for sample in tf_samples:
        pb = sample.path / "saved_model.pb"
        if not pb.exists():
            continue
        full, subset = SavedModel(), _tf_messages()["SavedModel"]()
        full.ParseFromString(pb.read_bytes())
        subset.ParseFromString(pb.read_bytes())
        assert _ops(full) == _ops(subset), sample.name


def _ops(sm: object) -> list[tuple[str, str, str]]:
    out = []
    for mg in sm.meta_graphs:  # type: ignore[attr-defined]
        out += [("graph", n.name, n.op) for n in mg.graph_def.node]
        for f in mg.graph_def.library.function:
            out += [(f.signature.name, n.name, n.op) for n in f.node_def]
    return sorted(out)
