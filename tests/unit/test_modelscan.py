"""The model scanner on artifacts made here, without TensorFlow: every malicious sample is
flagged with its location, clean ones pass, nothing is ever loaded (the sentinel never appears)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli.scan_model import scan_model
from pipeline.errors import InputError
from pipeline.scan.model.scanner import (
    Finding,
    ScanReport,
    Severity,
    UnsafeModelError,
    _tf_messages,
    judge_global,
    render_table,
    scan_path,
)
from tests import model_samples as ms

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sentinel") / "PWNED"


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory, sentinel: Path) -> list[ms.Sample]:
    return ms.write_pickle_samples(tmp_path_factory.mktemp("samples"), sentinel)


@pytest.fixture(autouse=True)
def nothing_is_ever_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any deserialiser the scanner might be tempted to call fails the test instead."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scanner tried to deserialise the artifact")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(np, "load", refuse)


def _only(report: ScanReport, rule: str) -> list[Finding]:
    return [f for f in report.findings if f.rule == rule]


def _ids(samples: list[ms.Sample], malicious: bool) -> list[str]:
    return [s.name for s in samples if s.malicious is malicious]


# --- pickles and pickle containers -------------------------------------------------------------

EVIL = [
    "os_system.pkl",
    "os_system_proto0.pkl",
    "exec.pkl",
    "runpy.pkl",
    "popen.pkl",
    "methodcaller_importlib.pkl",
    "partial.pkl",
    "timeit.pkl",
    "numpy_runstring.pkl",
    "stack_shuffle.pkl",
    "evil_torch.pt",
    "object_array.npy",
    "evil.joblib",
]
CLEAN = [
    "clean.pkl",
    "clean_torch.pt",
    "clean.npy",
    "clean.npz",
    "clean.safetensors",
    "clean.joblib",
]


@pytest.mark.parametrize("name", EVIL)
def test_malicious_sample_is_critical_with_location(
    name: str, samples: list[ms.Sample], sentinel: Path
) -> None:
    sample = next(s for s in samples if s.name == name)
    report = scan_path(sample.path)
    assert report.max_severity is Severity.CRITICAL
    hits = _only(report, sample.rule or "")
    assert hits, report.findings
    loc = hits[0].location
    assert loc.file == name
    assert isinstance(loc.offset, int) and loc.offset >= 0
    assert loc.op in {"GLOBAL", "STACK_GLOBAL", "INST"}
    for key, value in sample.where.items():
        assert getattr(loc, key) == value
    assert not report.ok()
    assert not sentinel.exists()


def test_catalogue_names_match(samples: list[ms.Sample]) -> None:
    assert sorted(EVIL) == sorted(_ids(samples, True))
    assert sorted(CLEAN) == sorted(_ids(samples, False))


@pytest.mark.parametrize("name", CLEAN)
def test_clean_sample_has_no_findings(name: str, samples: list[ms.Sample]) -> None:
    sample = next(s for s in samples if s.name == name)
    report = scan_path(sample.path)
    assert report.findings == ()
    assert report.ok("info")
    assert report.files and report.files[0].sha256


def test_payload_call_is_reported_with_its_arguments(samples: list[ms.Sample]) -> None:
    report = scan_path(next(s.path for s in samples if s.name == "os_system.pkl"))
    (hit,) = report.findings
    assert "posix.system" in hit.message or "os.system" in hit.message
    assert "touch " in hit.message and "REDUCE" in hit.message


def test_stack_global_is_resolved_through_memo_and_pop(samples: list[ms.Sample]) -> None:
    report = scan_path(next(s.path for s in samples if s.name == "stack_shuffle.pkl"))
    (hit,) = report.findings
    assert "imports os.system" in hit.message
    assert hit.location.op == "STACK_GLOBAL"


def test_methodcaller_chain_flags_both_gadgets(samples: list[ms.Sample]) -> None:
    report = scan_path(next(s.path for s in samples if s.name == "methodcaller_importlib.pkl"))
    text = " ".join(f.message for f in report.findings)
    assert "operator.methodcaller" in text and "importlib.import_module" in text


def test_unresolvable_stack_global_is_critical(tmp_path: Path) -> None:
    # STACK_GLOBAL whose module name is a call result, not a string literal.
    data = b"\x80\x04" + b"\x8c\x08builtins\x8c\x03str\x93)R" + b"\x8c\x06system\x93."
    (tmp_path / "x.pkl").write_bytes(data)
    report = scan_path(tmp_path / "x.pkl")
    assert [f.rule for f in report.findings if f.severity is Severity.CRITICAL] == [
        "pickle-unresolved-import"
    ]


def test_unknown_callable_is_high_not_passed(tmp_path: Path) -> None:
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(Fraction(1, 3), protocol=2))
    report = scan_path(tmp_path / "m.pkl")
    assert report.max_severity is Severity.HIGH
    assert _only(report, "pickle-unsafe-import")[0].message.startswith("imports fractions.")


def test_hostile_pickles_end_in_findings_not_crashes(tmp_path: Path) -> None:
    hostile = {  # name: (bytes, is it malformed?)
        "deep.pkl": (b"\x80\x04)" + b"\x85" * 200_000 + b".", False),  # a tuple 200k deep
        "cycle.pkl": (b"\x80\x04]\x94h\x00a" * 50 + b".", False),  # list appended to itself
        "huge_len.pkl": (b"\x80\x04\x8e" + (2**60).to_bytes(8, "little"), True),  # "1 EiB"
        "underflow.pkl": (b"\x80\x04R.", True),
        "bad_get.pkl": (b"\x80\x04h\x07.", True),
    }
    for name, (data, malformed) in hostile.items():
        (tmp_path / name).write_bytes(data)
        rules = [f.rule for f in scan_path(tmp_path / name).findings]
        assert rules == (["pickle-malformed"] if malformed else []), name


def test_deeply_nested_keras_config_is_a_finding(tmp_path: Path) -> None:
    doc = "[" * 5000 + "]" * 5000
    (tmp_path / "config.json").write_text(
        json.dumps({"class_name": "Sequential", "config": {}})[:-1] + ', "x": ' + doc + "}"
    )
    assert scan_path(tmp_path / "config.json").max_severity is Severity.HIGH


def test_malformed_pickle_is_a_finding(tmp_path: Path) -> None:
    (tmp_path / "t.pkl").write_bytes(ms.pickle_truncated())
    report = scan_path(tmp_path / "t.pkl")
    (hit,) = report.findings
    assert hit.rule == "pickle-malformed" and hit.severity is Severity.HIGH
    assert not report.ok()


def test_second_pickle_stream_is_scanned_too(tmp_path: Path, sentinel: Path) -> None:
    data = pickle.dumps({"ok": 1}) + ms.pickle_os_system(sentinel)
    (tmp_path / "two.pkl").write_bytes(data)
    report = scan_path(tmp_path / "two.pkl")
    (hit,) = report.findings
    assert hit.severity is Severity.CRITICAL and hit.location.key == "pickle stream 1"


@pytest.mark.parametrize("evil", [False, True])
def test_legacy_torch_save_streams_then_raw_storage(
    tmp_path: Path, sentinel: Path, evil: bool
) -> None:
    model = ms.pickle_os_system(sentinel, protocol=2) if evil else pickle.dumps({"w": 1}, 2)
    streams = [
        pickle.dumps(0x1950A86A20F9469CFC6C, 2),
        pickle.dumps(1001, 2),
        pickle.dumps({"little_endian": True}, 2),
        model,
        pickle.dumps(["0"], 2),
    ]
    (tmp_path / "old.pt").write_bytes(b"".join(streams) + b"\x07raw tensor bytes\xff" * 10)
    rules = [f.rule for f in scan_path(tmp_path / "old.pt").findings]
    assert rules == (["pickle-dangerous-import"] if evil else [])


def test_pickle_magic_in_an_unknown_extension_is_scanned(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / "weights.model").write_bytes(ms.pickle_os_system(sentinel))
    assert scan_path(tmp_path / "weights.model").max_severity is Severity.CRITICAL


def test_unrecognised_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (hit,) = scan_path(tmp_path / "notes.txt").findings
    assert (hit.rule, hit.severity) == ("unrecognised-format", Severity.HIGH)


def test_object_npy_without_imports_is_still_high(tmp_path: Path) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([1, "two"], dtype=object), allow_pickle=True)
    (tmp_path / "o.npy").write_bytes(buf.getvalue())
    report = scan_path(tmp_path / "o.npy")
    assert [f.rule for f in report.findings] == ["numpy-object-array"]
    assert report.max_severity is Severity.HIGH


def test_npz_member_with_object_array(tmp_path: Path, sentinel: Path) -> None:
    data = ms.zip_with({"w.npy": ms.clean_npy(), "evil.npy": ms.object_npy(sentinel)})
    (tmp_path / "m.npz").write_bytes(data)
    report = scan_path(tmp_path / "m.npz")
    crit = [f for f in report.findings if f.severity is Severity.CRITICAL]
    assert crit and crit[0].location.member == "evil.npy"


# --- zip containers ------------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["../../etc/cron.d/x", "/abs/path.pkl", "a/../../b.pkl"])
def test_zip_slip_member_names(tmp_path: Path, member: str) -> None:
    (tmp_path / "z.zip").write_bytes(ms.zip_with({member: pickle.dumps([1, 2])}))
    hits = _only(scan_path(tmp_path / "z.zip"), "zip-slip")
    assert hits and hits[0].location.member == member


def test_zip_symlink_member(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("link")
    info.external_attr = (0o120777 << 16) | 0
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    assert _only(scan_path(tmp_path / "z.zip"), "zip-symlink")


def test_nested_zip_location(tmp_path: Path, sentinel: Path) -> None:
    inner = ms.torch_zip(ms.pickle_os_system(sentinel), prefix="model")
    (tmp_path / "outer.zip").write_bytes(ms.zip_with({"inner.pt": inner}))
    report = scan_path(tmp_path / "outer.zip")
    crit = [f for f in report.findings if f.severity is Severity.CRITICAL]
    assert crit[0].location.member == "inner.pt!model/data.pkl"


def test_unknown_member_in_a_zip_is_refused(tmp_path: Path) -> None:
    (tmp_path / "z.zip").write_bytes(ms.zip_with({"run.sh": b"#!/bin/sh\nrm -rf /\n"}))
    (hit,) = scan_path(tmp_path / "z.zip").findings
    assert hit.rule == "unrecognised-format" and hit.location.member == "run.sh"


def test_safetensors_header_checked(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(ms.safetensors_bytes(ok=False))
    (hit,) = scan_path(tmp_path / "bad.safetensors").findings
    assert hit.rule == "safetensors-malformed"


# --- Keras -----------------------------------------------------------------------------------


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


# --- TensorFlow SavedModel (protobufs built from the scanner's own subset schema) ---------------


def _node(
    msg: object,
    name: str,
    op: str,
    inputs: tuple[str, ...] = (),
    f: str | None = None,
    attrs: dict[str, bytes] | None = None,
) -> None:
    n = msg.add(name=name, op=op)  # type: ignore[attr-defined]
    n.input.extend(inputs)
    if f:
        n.attr["f"].func.name = f
    for key, value in (attrs or {}).items():
        n.attr[key].s = value


def _saved_model(tmp_path: Path, build: object, name: str = "sm") -> Path:
    sm = _tf_messages()["SavedModel"]()
    mg = sm.meta_graphs.add()
    mg.meta_info_def.tags.append("serve")
    build(mg)  # type: ignore[operator]
    d = tmp_path / name
    (d / "variables").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(sm.SerializeToString())
    (d / "variables" / "variables.index").write_bytes(b"\0" * 8)
    (d / "fingerprint.pb").write_bytes(b"\x08\x01")
    return d


def _fn(mg: object, name: str, *ops: str, calls: str | None = None) -> None:
    f = mg.graph_def.library.function.add()  # type: ignore[attr-defined]
    f.signature.name = name
    for i, op in enumerate(ops):
        _node(f.node_def, f"{op.lower()}_{i}", op)
    if calls:
        _node(f.node_def, "call", "StatefulPartitionedCall", f=calls)


def _with_saver(mg: object, save_fn: str = "__inference__traced_save_9") -> None:
    _node(mg.graph_def.node, "saver_filename", "Placeholder")  # type: ignore[attr-defined]
    _node(mg.graph_def.node, "save", "StatefulPartitionedCall", ("saver_filename",), f=save_fn)  # type: ignore[attr-defined]
    _node(
        mg.graph_def.node,
        "restore",
        "StatefulPartitionedCall",
        ("saver_filename",),
        f="__inference__traced_restore_10",
    )  # type: ignore[attr-defined]
    mg.saver_def.filename_tensor_name = "saver_filename:0"  # type: ignore[attr-defined]
    mg.saver_def.save_tensor_name = "save:0"  # type: ignore[attr-defined]
    mg.saver_def.restore_op_name = "restore"  # type: ignore[attr-defined]
    _fn(mg, save_fn, "Const", "StringJoin", "ShardedFilename", "SaveV2", "MergeV2Checkpoints")
    _fn(mg, "__inference__traced_restore_10", "Const", "RestoreV2", "AssignVariableOp")


def test_saved_model_clean_with_saver(tmp_path: Path) -> None:
    def build(mg: object) -> None:
        _with_saver(mg)
        _fn(mg, "__inference_call_5", "MatMul", "BiasAdd", "Relu", "Softmax")
        _node(mg.graph_def.node, "serve", "StatefulPartitionedCall", f="__inference_call_5")  # type: ignore[attr-defined]

    report = scan_path(_saved_model(tmp_path, build))
    assert report.findings == ()
    assert {f.format for f in report.files} == {
        "savedmodel:saved_model.pb",
        "savedmodel:variables",
        "savedmodel:fingerprint.pb",
    }


def test_saved_model_write_file_in_function(tmp_path: Path) -> None:
    def build(mg: object) -> None:
        _with_saver(mg)
        _fn(mg, "__inference_drop_7", "Const", "WriteFile")

    (hit,) = scan_path(_saved_model(tmp_path, build)).findings
    assert (hit.rule, hit.severity) == ("tf-unsafe-op", Severity.CRITICAL)
    loc = hit.location
    assert (loc.file, loc.function, loc.op, loc.node) == (
        "saved_model.pb",
        "__inference_drop_7",
        "WriteFile",
        "writefile_1",
    )


def test_checkpoint_op_outside_saver_is_flagged(tmp_path: Path) -> None:
    def build(mg: object) -> None:
        _with_saver(mg)
        _fn(mg, "__inference_serve_3", "MatMul", "SaveV2")

    (hit,) = scan_path(_saved_model(tmp_path, build)).findings
    assert hit.rule == "tf-checkpoint-op-outside-saver"
    assert hit.location.function == "__inference_serve_3"


def test_saver_function_also_called_from_serving_is_judged_there(tmp_path: Path) -> None:
    def build(mg: object) -> None:
        _with_saver(mg)
        _fn(mg, "__inference_serve_3", "MatMul", calls="__inference__traced_save_9")

    rules = {f.rule for f in scan_path(_saved_model(tmp_path, build)).findings}
    assert rules == {"tf-checkpoint-op-outside-saver"}


def test_saver_named_function_without_saverdef_is_not_trusted(tmp_path: Path) -> None:
    def build(mg: object) -> None:
        _fn(mg, "__inference__traced_save_1", "SaveV2")

    assert {f.rule for f in scan_path(_saved_model(tmp_path, build)).findings} == {
        "tf-checkpoint-op-outside-saver"
    }


def test_unknown_op_is_medium_and_named(tmp_path: Path) -> None:
    def build(mg: object) -> None:
        _fn(mg, "__inference_f_1", "FancyCustomOp", "FancyCustomOp", "MatMul")

    (hit,) = scan_path(_saved_model(tmp_path, build)).findings
    assert (hit.rule, hit.severity, hit.location.op) == (
        "tf-unknown-op",
        Severity.MEDIUM,
        "FancyCustomOp",
    )
    assert "+1 more" in (hit.location.node or "")


def test_print_to_file_is_flagged_print_to_stderr_is_not(tmp_path: Path) -> None:
    def build(mg: object) -> None:
        _node(mg.graph_def.node, "p1", "PrintV2", attrs={"output_stream": b"stderr"})  # type: ignore[attr-defined]
        _node(mg.graph_def.node, "p2", "PrintV2", attrs={"output_stream": b"file:///tmp/x"})  # type: ignore[attr-defined]

    (hit,) = scan_path(_saved_model(tmp_path, build)).findings
    assert (hit.location.node, hit.severity) == ("p2", Severity.CRITICAL)


@pytest.mark.parametrize(
    "op",
    [
        "PyFunc",
        "EagerPyFunc",
        "ReadFile",
        "MatchingFiles",
        "ImmutableConst",
        "LoadAndRemapMatrix",
        "DebugIdentityV2",
    ],
)
def test_file_python_and_debug_ops(tmp_path: Path, op: str) -> None:
    report = scan_path(_saved_model(tmp_path, lambda mg: _fn(mg, "__inference_f_1", op)))
    (hit,) = report.findings
    assert hit.rule == "tf-unsafe-op" and hit.severity >= Severity.HIGH and hit.location.op == op


def test_saved_model_garbage_is_malformed(tmp_path: Path) -> None:
    d = tmp_path / "sm"
    d.mkdir()
    (d / "saved_model.pb").write_bytes(b"\xff\xff\xff\xff not a protobuf")
    assert [f.rule for f in scan_path(d).findings] == ["savedmodel-malformed"]


def test_saved_model_scan_does_not_import_tensorflow(tmp_path: Path) -> None:
    d = _saved_model(tmp_path, lambda mg: _fn(mg, "__inference_f_1", "WriteFile"))
    code = (
        "import sys; from pipeline.scan.model.scanner import scan_path; "
        "r = scan_path(sys.argv[1]); "
        "assert r.findings; bad = [m for m in ('tensorflow', 'keras', 'torch') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code, str(d)], check=True, cwd=ROOT, timeout=60)


# --- directories, the report, the CLI -----------------------------------------------------------


def test_directory_walk_and_symlinks(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "sub" / "evil.pkl").write_bytes(ms.pickle_os_system(sentinel))
    (tmp_path / "m" / "w.npy").write_bytes(ms.clean_npy())
    os.symlink("/etc/passwd", tmp_path / "m" / "link.pkl")
    report = scan_path(tmp_path / "m")
    by_rule = {f.rule: f.location.file for f in report.findings}
    assert by_rule == {"pickle-dangerous-import": "sub/evil.pkl", "symlink": "link.pkl"}
    assert [f.path for f in report.files] == ["sub/evil.pkl", "w.npy"]
    assert report.bytes_scanned == sum(f.size for f in report.files)


def test_fifo_is_refused_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.pkl")
    (hit,) = scan_path(tmp_path).findings
    assert (hit.rule, hit.location.file) == ("unrecognised-format", "pipe.pkl")
    assert scan_path(tmp_path / "pipe.pkl").findings[0].rule == "unrecognised-format"


def test_missing_path_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        scan_path(tmp_path / "nope")


def test_report_api(samples: list[ms.Sample]) -> None:
    report = scan_path(next(s.path for s in samples if s.name == "partial.pkl"))
    assert report.max_severity is Severity.CRITICAL
    assert not report.ok("medium") and not report.ok(Severity.CRITICAL)
    assert report.counts()["critical"] == 1 and report.counts()["high"] == 1
    doc = json.loads(report.to_json())
    assert doc["max_severity"] == "critical" and doc["findings"][0]["location"]["offset"] >= 0
    table = render_table(report)
    assert "pickle-dangerous-import" in table and "partial.pkl" in table
    assert report.duration_s >= 0 and report.bytes_scanned > 0


def test_judge_global_allowlist_and_denylist() -> None:
    assert judge_global("numpy.core.multiarray", "_reconstruct") is None
    assert judge_global("torch._utils", "_rebuild_tensor_v2") is None
    assert judge_global("os.path", "join")[0] is Severity.CRITICAL  # type: ignore[index]
    assert judge_global("builtins", "getattr")[0] is Severity.CRITICAL  # type: ignore[index]
    assert judge_global("sklearn.linear_model", "LogisticRegression")[0] is Severity.HIGH  # type: ignore[index]


def test_unsafe_model_error_names_rule_and_location(samples: list[ms.Sample]) -> None:
    report = scan_path(next(s.path for s in samples if s.name == "evil_torch.pt"))
    err = UnsafeModelError(report, "medium")
    assert err.exit_code == 1 and err.rule == "pickle-dangerous-import"
    assert "archive/data.pkl" in (err.artifact or "")
    assert "do not load" in err.diagnostics()


@pytest.fixture
def cli() -> click.Group:
    """Mount the command the way pipeline.cli will: `chainproof scan model`."""

    @click.group()
    def root() -> None: ...

    @root.group()
    def scan() -> None: ...

    scan.add_command(scan_model)
    return root


def test_cli_clean_exits_0(cli: click.Group, samples: list[ms.Sample]) -> None:
    path = next(s.path for s in samples if s.name == "clean.npz")
    result = CliRunner().invoke(cli, ["scan", "model", str(path)])
    assert result.exit_code == 0, result.output
    assert "no findings" in result.output


def test_cli_findings_raise_unsafe_model_error(cli: click.Group, samples: list[ms.Sample]) -> None:
    path = next(s.path for s in samples if s.name == "exec.pkl")
    result = CliRunner().invoke(cli, ["scan", "model", str(path), "--format", "json"])
    assert isinstance(result.exception, UnsafeModelError) and result.exception.exit_code == 1
    assert json.loads(result.output)["max_severity"] == "critical"


def test_cli_fail_on_threshold(cli: click.Group, tmp_path: Path) -> None:
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(Fraction(1, 3)))  # high, not critical
    args = ["scan", "model", str(tmp_path / "m.pkl")]
    ok = CliRunner().invoke(cli, [*args, "--fail-on", "critical"])
    assert ok.exit_code == 0 and "pickle-unsafe-import" in ok.output
    bad = CliRunner().invoke(cli, args)
    assert isinstance(bad.exception, UnsafeModelError)


def test_cli_missing_path_is_input_error(cli: click.Group, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["scan", "model", str(tmp_path / "missing.pt")])
    assert isinstance(result.exception, InputError) and result.exception.exit_code == 2
