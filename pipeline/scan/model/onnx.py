"""ONNX models read through a private protobuf subset of onnx.proto: operators from custom-op
domains (a native library must be registered to run them) and external-data paths that leave
the model's directory."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import replace
from functools import cache
from typing import IO, Any

from pipeline.scan.model.collect import Collector, read_document
from pipeline.scan.model.report import Location, Severity

# Operator domains onnxruntime implements itself; anything else needs a custom-op library
# (SessionOptions.register_custom_ops_library loads a shared object: native code).
STANDARD_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.training",
        "ai.onnx.preview.training",
        "com.microsoft",
        "com.microsoft.nchwc",
        "com.microsoft.experimental",
        "com.ms.internal.nhwc",
    }
)
MAX_GRAPH_DEPTH = 64  # If/Loop/Scan bodies nest graphs; real models stay in single digits
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@cache
def onnx_messages() -> dict[str, Any]:
    """Message classes for the part of onnx.proto the scan reads (field numbers as upstream).

    The onnx package is not a dependency; fields not declared here (raw tensor data among
    them) are skipped by the parser.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="chainproof_onnx_subset.proto", package="chainproof.onnx", syntax="proto3"
    )
    T = descriptor_pb2.FieldDescriptorProto
    S, I64, I32, M = T.TYPE_STRING, T.TYPE_INT64, T.TYPE_INT32, T.TYPE_MESSAGE
    OPT, REP = T.LABEL_OPTIONAL, T.LABEL_REPEATED

    def message(name: str, *fields: tuple[str, int, int, int, str | None]) -> None:
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".chainproof.onnx.{type_name}"

    message(
        "ModelProto",
        ("ir_version", 1, I64, OPT, None),
        ("producer_name", 2, S, OPT, None),
        ("graph", 7, M, OPT, "GraphProto"),
        ("opset_import", 8, M, REP, "OperatorSetIdProto"),
        ("functions", 25, M, REP, "FunctionProto"),
    )
    message("OperatorSetIdProto", ("domain", 1, S, OPT, None), ("version", 2, I64, OPT, None))
    message(
        "GraphProto",
        ("node", 1, M, REP, "NodeProto"),
        ("name", 2, S, OPT, None),
        ("initializer", 5, M, REP, "TensorProto"),
        ("sparse_initializer", 15, M, REP, "SparseTensorProto"),
    )
    message(
        "NodeProto",
        ("name", 3, S, OPT, None),
        ("op_type", 4, S, OPT, None),
        ("attribute", 5, M, REP, "AttributeProto"),
        ("domain", 7, S, OPT, None),
    )
    message(
        "AttributeProto",
        ("name", 1, S, OPT, None),
        ("t", 5, M, OPT, "TensorProto"),
        ("g", 6, M, OPT, "GraphProto"),
        ("tensors", 10, M, REP, "TensorProto"),
        ("graphs", 11, M, REP, "GraphProto"),
        ("sparse_tensor", 22, M, OPT, "SparseTensorProto"),
        ("sparse_tensors", 23, M, REP, "SparseTensorProto"),
    )
    message(
        "TensorProto",
        ("name", 8, S, OPT, None),
        ("external_data", 13, M, REP, "StringStringEntryProto"),
        ("data_location", 14, I32, OPT, None),
    )
    message(
        "SparseTensorProto",
        ("values", 1, M, OPT, "TensorProto"),
        ("indices", 2, M, OPT, "TensorProto"),
    )
    message("StringStringEntryProto", ("key", 1, S, OPT, None), ("value", 2, S, OPT, None))
    message(
        "FunctionProto",
        ("name", 1, S, OPT, None),
        ("node", 7, M, REP, "NodeProto"),
        ("domain", 10, S, OPT, None),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"chainproof.onnx.{name}"))
        for name in ("ModelProto",)
    }


def scan_onnx(out: Collector, loc: Location, fh: IO[bytes]) -> None:
    """Judge every node (subgraphs included) and every tensor's external-data location."""
    from google.protobuf import message as pb_message

    data = read_document(fh, out.limits.protobuf_bytes, f"ONNX model {loc}")
    model = onnx_messages()["ModelProto"]()
    try:
        model.ParseFromString(data)
    except (pb_message.DecodeError, RecursionError) as e:
        out.add(Severity.HIGH, "onnx-malformed", f"not an ONNX ModelProto: {e}", loc)
        return
    if not model.ir_version or not model.HasField("graph"):
        out.add(Severity.HIGH, "onnx-malformed", "no IR version or no graph: not ONNX", loc)
        return
    local = {(f.domain, f.name) for f in model.functions}
    graphs = [("graph", model.graph)]
    for g_path, graph in _graphs(out, loc, graphs):
        for node in graph.node:
            _judge_node(out, replace(loc, function=g_path, node=node.name or None), node, local)
        for tensor in _tensors(graph):
            _judge_tensor(out, replace(loc, function=g_path), tensor)
    for f in model.functions:
        floc = replace(loc, function=f"function {f.domain}.{f.name}")
        for node in f.node:
            _judge_node(out, replace(floc, node=node.name or None), node, local)


def _graphs(
    out: Collector, loc: Location, todo: list[tuple[str, Any]]
) -> Iterator[tuple[str, Any]]:
    """The main graph and every subgraph in node attributes, depth first, bounded."""
    stack = [(path, graph, 0) for path, graph in todo]
    while stack:
        path, graph, depth = stack.pop()
        if depth > MAX_GRAPH_DEPTH:
            out.add(Severity.HIGH, "onnx-malformed", f"subgraphs nested past {depth}", loc)
            return
        yield path, graph
        for node in graph.node:
            for attr in node.attribute:
                subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                for i, sub in enumerate(subs):
                    stack.append(
                        (f"{path}/{node.name or node.op_type}.{attr.name}[{i}]", sub, depth + 1)
                    )


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in [
                *([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []),
                *attr.sparse_tensors,
            ]:
                yield sparse.values
                yield sparse.indices


def _judge_node(out: Collector, loc: Location, node: Any, local: set[tuple[str, str]]) -> None:
    domain = node.domain
    if domain in STANDARD_DOMAINS or (domain, node.op_type) in local:
        return
    out.add(
        Severity.HIGH,
        "onnx-custom-op",
        f"operator {domain}.{node.op_type} is from a custom-op domain: running the model "
        "needs a native op library registered with the runtime, code this scan cannot see",
        replace(loc, op=node.op_type),
    )


def _judge_tensor(out: Collector, loc: Location, tensor: Any) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    if tensor.data_location != _EXTERNAL and not entries:
        return
    where = replace(loc, key=f"initializer {tensor.name}")
    path = entries.get("location")
    if not path:
        out.add(Severity.HIGH, "onnx-malformed", "external tensor without a location", where)
        return
    if _escapes(path):
        out.add(
            Severity.HIGH,
            "onnx-external-data-escape",
            f"external data location {path!r} points outside the model's directory: the "
            "runtime would read that file as tensor bytes",
            where,
        )


def _escapes(path: str) -> bool:
    """Lexically outside the model's directory (the runtime joins it to that directory)."""
    if "\0" in path or path.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", path):
        return True
    norm = posixpath.normpath(path.replace("\\", "/"))
    return norm == ".." or norm.startswith("../")
