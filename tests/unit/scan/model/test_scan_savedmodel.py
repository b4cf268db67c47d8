"""TensorFlow SavedModels, built from the scanner's own subset schema (no TensorFlow needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.scan.model import ScanReport, Severity, scan_path
from pipeline.scan.model.report import Finding
from pipeline.scan.model.savedmodel import tf_messages
from tests import model_samples as ms

ROOT = Path(__file__).resolve().parents[4]


def _only(report: ScanReport, rule: str) -> list[Finding]:
    return [f for f in report.findings if f.rule == rule]


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
    sm = tf_messages()["SavedModel"]()
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
        "import sys; from pipeline.scan.model import scan_path; "
        "r = scan_path(sys.argv[1]); "
        "assert r.findings; bad = [m for m in ('tensorflow', 'keras', 'torch') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code, str(d)], check=True, cwd=ROOT, timeout=60)


# --- TF1 savers: the path must come from the saver's filename tensor ----------------------------


def _tf1_saver(mg: object, extra_save_path: str | None = None) -> None:
    """The graph tf.compat.v1.train.Saver builds: save/Const is the filename tensor."""
    g = mg.graph_def.node  # type: ignore[attr-defined]
    _node(g, "save/Const", "Const")
    _node(g, "save/SaveV2/tensor_names", "Const")
    _node(g, "save/SaveV2/shape_and_slices", "Const")
    _node(g, "w", "VarHandleOp")
    _node(
        g,
        "save/SaveV2",
        "SaveV2",
        ("save/Const", "save/SaveV2/tensor_names", "save/SaveV2/shape_and_slices", "w"),
    )
    _node(g, "save/control_dependency", "Identity", ("save/Const", "^save/SaveV2"))
    restore_inputs = ["save/Const", "save/SaveV2/tensor_names", "save/SaveV2/shape_and_slices"]
    _node(g, "save/RestoreV2", "RestoreV2", tuple(restore_inputs))
    _node(g, "save/Assign", "AssignVariableOp", ("w", "save/RestoreV2"))
    restore_deps = ["^save/Assign"]
    if extra_save_path is not None:
        # A Save that only hangs off the restore op: part of the saver by reachability, but
        # writing to a path of its own choosing.
        _node(g, "evil/path", "Const", attrs={"value": extra_save_path.encode()})
        _node(g, "evil/Save", "Save", ("evil/path", "save/SaveV2/tensor_names", "w"))
        restore_deps.append("^evil/Save")
    _node(g, "save/restore_all", "NoOp", tuple(restore_deps))
    mg.saver_def.filename_tensor_name = "save/Const:0"  # type: ignore[attr-defined]
    mg.saver_def.save_tensor_name = "save/control_dependency:0"  # type: ignore[attr-defined]
    mg.saver_def.restore_op_name = "save/restore_all"  # type: ignore[attr-defined]


def test_tf1_saver_is_clean(tmp_path: Path) -> None:
    assert scan_path(_saved_model(tmp_path, _tf1_saver)).findings == ()


def test_tf1_save_reachable_from_restore_with_its_own_path(tmp_path: Path) -> None:
    report = scan_path(_saved_model(tmp_path, lambda mg: _tf1_saver(mg, "/etc/cron.d/x")))
    (hit,) = report.findings
    assert (hit.rule, hit.location.node, hit.location.op) == (
        "tf-saver-foreign-path",
        "evil/Save",
        "Save",
    )
    assert "evil/path" in hit.message


def test_tf2_saver_function_path_must_come_from_its_argument(tmp_path: Path) -> None:
    def build(mg: object, evil: bool) -> None:
        _with_saver(mg)
        f = next(
            f
            for f in mg.graph_def.library.function  # type: ignore[attr-defined]
            if f.signature.name == "__inference__traced_save_9"
        )
        f.signature.input_arg.add(name="file_prefix")
        _node(f.node_def, "other", "Const")
        _node(f.node_def, "join", "StringJoin", ("file_prefix", "other:output:0"))
        _node(f.node_def, "save2", "SaveV2", ("other:output:0" if evil else "join:output:0",))

    assert scan_path(_saved_model(tmp_path, lambda mg: build(mg, False), "ok")).findings == ()
    (hit,) = scan_path(_saved_model(tmp_path, lambda mg: build(mg, True), "bad")).findings
    assert hit.rule == "tf-saver-foreign-path" and hit.location.function == (
        "__inference__traced_save_9"
    )


# --- legacy Keras metadata in the object graph -------------------------------------------------


def _with_object_graph_metadata(mg: object, layer: dict) -> None:
    node = mg.object_graph_def.nodes.add()  # type: ignore[attr-defined]
    node.user_object.identifier = "_tf_keras_layer"
    import json

    node.user_object.metadata = json.dumps(layer)


def test_legacy_object_graph_metadata_lambda_is_found(tmp_path: Path) -> None:
    layer = ms.lambda_layer("old_lam")
    d = _saved_model(tmp_path, lambda mg: _with_object_graph_metadata(mg, layer))
    (hit,) = scan_path(d).findings
    assert (hit.rule, hit.location.layer) == ("keras-lambda", "old_lam")
    assert "object_graph_def" in (hit.location.key or "")


def test_legacy_object_graph_metadata_clean_layer_passes(tmp_path: Path) -> None:
    d = _saved_model(tmp_path, lambda mg: _with_object_graph_metadata(mg, ms.dense_layer()))
    assert scan_path(d).findings == ()
