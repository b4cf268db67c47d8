"""ONNX (built from the scanner's own protobuf subset) and GGUF (built with struct): custom-op
domains, external data outside the model directory, chat templates carrying Jinja code."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.scan.model import Severity, scan_path
from pipeline.scan.model.onnx import onnx_messages
from tests import model_samples as ms


def _onnx(
    path: Path,
    domain: str = "",
    op: str = "Relu",
    external: str | None = None,
    subgraph_op: tuple[str, str] | None = None,
) -> Path:
    model = onnx_messages()["ModelProto"]()
    model.ir_version = 9
    model.producer_name = "test"
    model.opset_import.add(domain="", version=17)
    graph = model.graph
    graph.name = "g"
    graph.node.add(name="n0", op_type="MatMul")
    graph.node.add(name="n1", op_type=op, domain=domain)
    init = graph.initializer.add(name="W")
    if external is not None:
        init.data_location = 1
        init.external_data.add(key="location", value=external)
        init.external_data.add(key="offset", value="0")
    if subgraph_op is not None:
        branch = graph.node.add(name="if0", op_type="If").attribute.add(name="then_branch")
        branch.g.node.add(name="inner", op_type=subgraph_op[1], domain=subgraph_op[0])
    path.write_bytes(model.SerializeToString())
    return path


def test_clean_onnx_passes(tmp_path: Path) -> None:
    report = scan_path(_onnx(tmp_path / "m.onnx", external="weights/W.bin"))
    assert report.findings == () and report.files[0].format == "onnx"


def test_onnx_ml_and_contrib_domains_pass(tmp_path: Path) -> None:
    assert scan_path(_onnx(tmp_path / "a.onnx", "ai.onnx.ml", "TreeEnsembleClassifier")).ok("info")
    assert scan_path(_onnx(tmp_path / "b.onnx", "com.microsoft", "FusedMatMul")).ok("info")


def test_onnx_custom_op_domain_is_flagged(tmp_path: Path) -> None:
    (hit,) = scan_path(_onnx(tmp_path / "m.onnx", "evil.ops", "Backdoor")).findings
    assert (hit.rule, hit.severity, hit.location.op, hit.location.node) == (
        "onnx-custom-op",
        Severity.HIGH,
        "Backdoor",
        "n1",
    )


def test_onnx_custom_op_in_a_subgraph_is_flagged(tmp_path: Path) -> None:
    (hit,) = scan_path(_onnx(tmp_path / "m.onnx", subgraph_op=("my.domain", "X"))).findings
    assert hit.rule == "onnx-custom-op" and "then_branch" in (hit.location.function or "")


@pytest.mark.parametrize("where", ["../../etc/passwd", "/etc/shadow", "a/../../x.bin", "C:\\x"])
def test_onnx_external_data_escaping_the_directory(tmp_path: Path, where: str) -> None:
    (hit,) = scan_path(_onnx(tmp_path / "m.onnx", external=where)).findings
    assert hit.rule == "onnx-external-data-escape" and repr(where) in hit.message


def test_onnx_garbage_is_malformed(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"\xff\xff\xff garbage")
    assert [f.rule for f in scan_path(tmp_path / "m.onnx").findings] == ["onnx-malformed"]


# --- GGUF -----------------------------------------------------------------------------------------


def test_gguf_with_a_normal_chat_template_passes(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(
        ms.gguf_bytes({"tokenizer.chat_template": ms.LLAMA3_TEMPLATE, "general.alignment": 32})
    )
    report = scan_path(tmp_path / "m.gguf")
    assert report.findings == () and report.files[0].format == "gguf"


def test_gguf_chat_template_with_code_is_critical(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(ms.gguf_bytes({"tokenizer.chat_template": ms.SSTI_TEMPLATE}))
    (hit,) = scan_path(tmp_path / "m.gguf").findings
    assert (hit.rule, hit.severity, hit.location.key) == (
        "gguf-chat-template-code",
        Severity.CRITICAL,
        "tokenizer.chat_template",
    )


def test_gguf_named_template_is_judged_too(tmp_path: Path) -> None:
    meta = {"tokenizer.chat_template.tool_use": "{{ cycler.__init__.__globals__.os }}"}
    (tmp_path / "m.gguf").write_bytes(ms.gguf_bytes(meta))
    assert scan_path(tmp_path / "m.gguf").max_severity is Severity.CRITICAL


@pytest.mark.parametrize(
    ("tensors", "why"),
    [
        ([("w", [4], 0, 64)], "past the data"),  # offset beyond the data section
        ([("w", [1000], 0, 0)], "past the end"),  # F32 x 1000 needs 4000 bytes
        ([("w", [4], 0, 0), ("v", [4], 0, 0)], "overlap"),
        ([("w", [4], 0, 3)], "aligned"),
    ],
)
def test_gguf_tensor_offsets_are_checked(tmp_path: Path, tensors: list, why: str) -> None:
    (tmp_path / "m.gguf").write_bytes(ms.gguf_bytes(tensors=tensors))
    (hit,) = scan_path(tmp_path / "m.gguf").findings
    assert hit.rule == "gguf-malformed" and why in hit.message


def test_gguf_lying_lengths_end_in_a_finding(tmp_path: Path) -> None:
    data = bytearray(ms.gguf_bytes())
    data[24:32] = (2**62).to_bytes(8, "little")  # first key's length: 4 EiB
    (tmp_path / "m.gguf").write_bytes(bytes(data))
    (hit,) = scan_path(tmp_path / "m.gguf").findings
    assert hit.rule == "gguf-malformed"
    (tmp_path / "n.gguf").write_bytes(b"GGUF\x09\x00\x00\x00")
    assert scan_path(tmp_path / "n.gguf").findings[0].rule == "gguf-malformed"
