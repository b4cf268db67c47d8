"""Keras configs in .keras archives and .h5 attributes: Lambda layers, serialized functions,
objects from outside Keras."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.scan.model import ScanReport, Severity, scan_path
from pipeline.scan.model.report import Finding
from tests import model_samples as ms

ROOT = Path(__file__).resolve().parents[4]


def _only(report: ScanReport, rule: str) -> list[Finding]:
    return [f for f in report.findings if f.rule == rule]


def _keras(tmp_path: Path, *layers: dict, name: str = "m.keras") -> ScanReport:
    (tmp_path / name).write_bytes(ms.keras_zip(ms.sequential_config(*layers)))
    return scan_path(tmp_path / name)


def test_clean_keras_archive(tmp_path: Path) -> None:
    report = _keras(tmp_path, ms.dense_layer())
    assert report.findings == ()
    assert {f.format for f in report.files} >= {"zip", "keras-config", "h5", "json"}


def test_keras_lambda_layer(tmp_path: Path) -> None:
    report = _keras(tmp_path, ms.lambda_layer("lam"), ms.dense_layer())
    (hit,) = report.findings
    assert (hit.rule, hit.severity) == ("keras-lambda", Severity.CRITICAL)
    assert (hit.location.member, hit.location.layer) == ("config.json", "lam")
    assert "marshalled Python bytecode" in hit.message


@pytest.mark.parametrize(
    ("module", "cls", "severity"),
    [
        ("attacker_pkg.layers", "Backdoor", Severity.HIGH),
        ("__main__", "MyLayer", Severity.HIGH),
        ("subprocess", "Popen", Severity.CRITICAL),
    ],
)
def test_keras_object_outside_keras(
    tmp_path: Path, module: str, cls: str, severity: Severity
) -> None:
    report = _keras(tmp_path, ms.dense_layer("evil", module=module, class_name=cls))
    (hit,) = report.findings
    assert (hit.rule, hit.severity, hit.location.layer) == ("keras-custom-object", severity, "evil")


def test_keras_registered_custom_object_and_tfsmlayer(tmp_path: Path) -> None:
    custom = ms.dense_layer("c")
    custom["registered_name"] = "my_pkg>Scaler"
    tfsm = {
        "module": "keras.layers",
        "class_name": "TFSMLayer",
        "config": {"name": "sm", "filepath": "/srv/other_model"},
        "registered_name": None,
    }
    rules = {f.rule: f for f in _keras(tmp_path, custom, tfsm).findings}
    assert rules["keras-custom-object"].location.layer == "c"
    assert "/srv/other_model" in rules["keras-tfsmlayer"].message


def test_keras_lambda_as_activation(tmp_path: Path) -> None:
    layer = ms.dense_layer("d")
    layer["config"]["activation"] = {"class_name": "__lambda__", "config": {"value": "YWJj"}}
    (hit,) = _keras(tmp_path, layer).findings
    assert (hit.rule, hit.location.layer) == ("keras-lambda-function", "d")


def test_keras_dangerous_builtin_function(tmp_path: Path) -> None:
    layer = ms.dense_layer("d")
    layer["config"]["activation"] = {
        "module": "builtins",
        "class_name": "function",
        "config": "eval",
        "registered_name": None,
    }
    (hit,) = _keras(tmp_path, layer).findings
    assert hit.severity is Severity.CRITICAL and "builtins.eval" in hit.message


def test_keras_pickle_member_is_scanned(tmp_path: Path, sentinel: Path) -> None:
    cfg = ms.sequential_config(ms.dense_layer())
    (tmp_path / "m.keras").write_bytes(
        ms.keras_zip(cfg, {"assets/tokenizer.pkl": ms.pickle_os_system(sentinel)})
    )
    crit = [f for f in scan_path(tmp_path / "m.keras").findings if f.severity is Severity.CRITICAL]
    assert crit[0].location.member == "assets/tokenizer.pkl"


def test_keras_config_not_json(tmp_path: Path) -> None:
    (tmp_path / "m.keras").write_bytes(ms.zip_with({"config.json": b"{nope"}))
    (hit,) = scan_path(tmp_path / "m.keras").findings
    assert hit.rule == "keras-config-malformed"


def test_h5_model_config_lambda_tf_keras2_style(tmp_path: Path) -> None:
    lam = {
        "class_name": "Lambda",
        "config": {
            "name": "old_lam",
            "function": [
                "4wEAAAAAAAAAAAAAAAEAAAABAAAAQwAAAHMEAAAAfABTACkBTqkAKQHaAXhyAQAAAHIBAAAA",
                None,
                None,
            ],
            "function_type": "lambda",
            "module": "__main__",
        },
    }
    cfg = {"class_name": "Sequential", "config": {"name": "s", "layers": [lam]}}
    report = scan_path(ms.h5_with_config(tmp_path / "m.h5", cfg))
    (hit,) = report.findings
    assert (hit.rule, hit.location.layer, hit.location.key.split()[0]) == (
        "keras-lambda",
        "old_lam",
        "model_config",
    )
    assert "marshalled Python bytecode" in hit.message


def test_h5_weights_only_is_clean(tmp_path: Path) -> None:
    report = scan_path(ms.h5_with_config(tmp_path / "w.h5", None))
    assert report.findings == () and report.files[0].format == "hdf5"


# --- callables judged by what they do, not by living under keras.* -------------------------------


def _fn_ref(module: str, name: str) -> dict:
    return {"module": module, "class_name": "function", "config": name, "registered_name": name}


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("keras.utils", "get_file"),  # the CVE-2025-8747 shape: fetch a URL, write a file
        ("keras.src.utils.file_utils", "get_file"),
        ("keras.models", "load_model"),
        ("keras.src.callbacks.remote_monitor", "RemoteMonitor"),
        ("keras.config", "enable_unsafe_deserialization"),
    ],
)
def test_keras_callable_that_touches_files_or_network(
    tmp_path: Path, module: str, name: str
) -> None:
    layer = ms.dense_layer("d")
    layer["config"]["activation"] = _fn_ref(module, name)
    (hit,) = _keras(tmp_path, layer).findings
    assert (hit.rule, hit.severity, hit.location.layer) == (
        "keras-unsafe-callable",
        Severity.CRITICAL,
        "d",
    )
    assert f"{module}.{name}" in hit.message


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("keras.src.activations.activations", "relu"),
        ("keras.activations", "gelu"),
        ("keras.src.ops.nn", "softmax"),
        ("keras.src.layers.preprocessing.exporter_like", "Rescale"),  # no whole-segment match
    ],
)
def test_keras_compute_callables_pass(tmp_path: Path, module: str, name: str) -> None:
    layer = ms.dense_layer("d")
    layer["config"]["activation"] = _fn_ref(module, name)
    assert _keras(tmp_path, layer).findings == ()


# --- the HDF5 library parses hostile bytes in a child with a deadline -----------------------------


def _h5_child_that(behaviour: str):  # type: ignore[no-untyped-def]
    def child(source: object, send: object, limit: int) -> None:
        import os
        import time

        if behaviour == "hangs":
            time.sleep(60)
        os._exit(139)  # what a segfault in the C library looks like from outside

    return child


@pytest.mark.parametrize(("behaviour", "says"), [("hangs", "within 1 s"), ("dies", "died")])
def test_hdf5_reader_that_hangs_or_dies_is_a_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str, says: str
) -> None:
    from pipeline.scan.model import ScanLimits, keras

    path = ms.h5_with_config(tmp_path / "m.h5", ms.sequential_config(ms.dense_layer()))
    monkeypatch.setattr(keras, "_h5_child", _h5_child_that(behaviour))
    (hit,) = scan_path(path, limits=ScanLimits(parse_seconds=1)).findings
    assert hit.rule == "h5-malformed" and says in hit.message


def test_hdf5_config_over_the_document_cap(tmp_path: Path) -> None:
    from pipeline.scan.model import ScanLimits

    path = ms.h5_with_config(tmp_path / "m.h5", ms.sequential_config(ms.dense_layer()))
    (hit,) = scan_path(path, limits=ScanLimits(document_bytes=16)).findings
    assert (hit.rule, hit.location.key) == ("too-large", "model_config")
