"""TensorFlow SavedModel protobufs read through a private subset schema: every node of every
graph and function judged against the op policy, the saver's checkpoint I/O allowed only there."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.scan.model.collect import Collector, read_document
from pipeline.scan.model.keras import check_keras_config
from pipeline.scan.model.report import Location, Severity, names

# Ops judged here by name, attribute or place; generated COMPUTE_OPS excludes all of them.
_TF_WRITES = "WriteFile"
_TF_PYTHON = "PyFunc PyFuncStateless EagerPyFunc"
_TF_READS = """
    ReadFile MatchingFiles MatchingFilesDataset ImmutableConst LoadAndRemapMatrix
    GenerateVocabRemapping InitializeTableFromTextFile InitializeTableFromTextFileV2 RecordInput
    WholeFileReader WholeFileReaderV2 TFRecordReader TFRecordReaderV2 TextLineReader
    TextLineReaderV2 FixedLengthRecordReader FixedLengthRecordReaderV2 LMDBReader IdentityReader
    IdentityReaderV2 TFRecordDataset TFRecordDatasetV2 TextLineDataset FixedLengthRecordDataset
    FixedLengthRecordDatasetV2 CSVDataset CSVDatasetV2 LMDBDataset SqlDataset
    ExperimentalSqlDataset ExperimentalLMDBDataset ExperimentalCSVDataset LoadDataset
"""
_TF_FILE_WRITES = """
    SaveDataset SaveDatasetV2 DistributedSave DatasetToTFRecord ExperimentalDatasetToTFRecord
    SnapshotDataset SnapshotDatasetV2 CacheDataset CacheDatasetV2 CreateSummaryFileWriter
    CreateSummaryDbWriter WriteSummary WriteScalarSummary WriteHistogramSummary
    WriteImageSummary WriteAudioSummary WriteGraphSummary WriteRawProtoSummary
    FileSystemSetConfiguration
"""
_TF_DEBUG = """
    DebugIdentity DebugIdentityV2 DebugIdentityV3 DebugNanCount DebugNumericSummary
    DebugNumericSummaryV2 Copy CopyHost
"""
_TF_NETWORK = """
    DataServiceDataset DataServiceDatasetV2 DataServiceDatasetV3 DataServiceDatasetV4
    RegisterDataset RegisterDatasetV2 RemoteCall
"""
TF_UNSAFE_OPS: dict[str, tuple[Severity, str]] = {
    **dict.fromkeys(names(_TF_WRITES), (Severity.CRITICAL, "writes a file")),
    **dict.fromkeys(names(_TF_PYTHON), (Severity.CRITICAL, "calls back into Python")),
    **dict.fromkeys(names(_TF_READS), (Severity.HIGH, "reads files")),
    **dict.fromkeys(
        names(_TF_FILE_WRITES), (Severity.HIGH, "writes files or changes filesystem config")
    ),
    **dict.fromkeys(
        names(_TF_DEBUG), (Severity.HIGH, "debug op that can stream tensors to file:// or grpc://")
    ),
    **dict.fromkeys(names(_TF_NETWORK), (Severity.HIGH, "talks to other hosts")),
}

# Checkpoint I/O every SavedModel carries in its saver; allowed there and only there.
# StringJoin, StaticRegexFullMatch and Const also appear in savers but are pure compute, so they
# stay allowed everywhere (flagging them would hit every text-processing model).
TF_CHECKPOINT_OPS = names(
    "SaveV2 RestoreV2 MergeV2Checkpoints ShardedFilename ShardedFilespec Save SaveSlices Restore "
    "RestoreSlice"
)

# Judged by attribute: PrintV2 may print to a file; proto codecs may read a descriptor file.
TF_ATTR_OPS = frozenset({"PrintV2", "DecodeProtoV2", "EncodeProto"})
_PRINT_STREAMS = {b"stderr", b"stdout", b"log(info)", b"log(warning)", b"log(error)"}

TF_RULED_OPS = frozenset(TF_UNSAFE_OPS) | TF_CHECKPOINT_OPS | TF_ATTR_OPS


@cache
def tf_messages() -> dict[str, Any]:
    """Message classes for the subset of TF's SavedModel schema the scan reads.

    Field numbers match tensorflow/core/protobuf/*.proto; fields not declared here are skipped
    by the parser. Importing TensorFlow's own saved_model_pb2 instead would import all of
    TensorFlow (about 4 s and 1,600 modules on this machine) just to read a protobuf.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="chainproof_tf_subset.proto", package="chainproof.tf", syntax="proto3"
    )
    T = descriptor_pb2.FieldDescriptorProto
    S, B, M = T.TYPE_STRING, T.TYPE_BYTES, T.TYPE_MESSAGE
    OPT, REP = T.LABEL_OPTIONAL, T.LABEL_REPEATED

    def message(name: str, *fields: tuple[str, int, int, int, str | None]) -> Any:
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".chainproof.tf.{type_name}"
        return msg

    def map_entry(msg: Any, entry: str, value_type: str) -> None:
        nested = msg.nested_type.add(name=entry)
        nested.options.map_entry = True
        nested.field.add(name="key", number=1, type=S, label=OPT)
        nested.field.add(
            name="value", number=2, type=M, label=OPT, type_name=f".chainproof.tf.{value_type}"
        )

    message("SavedModel", ("meta_graphs", 2, M, REP, "MetaGraphDef"))
    message(
        "MetaGraphDef",
        ("meta_info_def", 1, M, OPT, "MetaInfoDef"),
        ("graph_def", 2, M, OPT, "GraphDef"),
        ("saver_def", 3, M, OPT, "SaverDef"),
        ("object_graph_def", 7, M, OPT, "SavedObjectGraph"),
    )
    # SavedObjectGraph.nodes -> SavedObject.user_object -> SavedUserObject.metadata: the Keras
    # config old loaders read when keras_metadata.pb is absent.
    message("SavedObjectGraph", ("nodes", 1, M, REP, "GraphObject"))
    message("GraphObject", ("user_object", 4, M, OPT, "SavedUserObject"))
    message("SavedUserObject", ("identifier", 1, S, OPT, None), ("metadata", 3, S, OPT, None))
    message("MetaInfoDef", ("tags", 4, S, REP, None))
    message(
        "SaverDef",
        ("filename_tensor_name", 1, S, OPT, None),
        ("save_tensor_name", 2, S, OPT, None),
        ("restore_op_name", 3, S, OPT, None),
    )
    message("GraphDef", ("node", 1, M, REP, "NodeDef"), ("library", 2, M, OPT, "FunctionLib"))
    node = message(
        "NodeDef",
        ("name", 1, S, OPT, None),
        ("op", 2, S, OPT, None),
        ("input", 3, S, REP, None),
        ("attr", 5, M, REP, "NodeDef.AttrEntry"),
    )
    map_entry(node, "AttrEntry", "AttrValue")
    message(
        "AttrValue",
        ("list", 1, M, OPT, "ListValue"),
        ("s", 2, B, OPT, None),
        ("func", 10, M, OPT, "NameAttrList"),
    )
    message("ListValue", ("s", 2, B, REP, None), ("func", 9, M, REP, "NameAttrList"))
    nal = message(
        "NameAttrList", ("name", 1, S, OPT, None), ("attr", 2, M, REP, "NameAttrList.AttrEntry")
    )
    map_entry(nal, "AttrEntry", "AttrValue")
    message("FunctionLib", ("function", 1, M, REP, "FunctionDef"))
    message("FunctionDef", ("signature", 1, M, OPT, "OpDef"), ("node_def", 3, M, REP, "NodeDef"))
    message("OpDef", ("name", 1, S, OPT, None), ("input_arg", 2, M, REP, "ArgDef"))
    message("ArgDef", ("name", 1, S, OPT, None))
    message("SavedMetadata", ("nodes", 1, M, REP, "SavedObject"))
    message(
        "SavedObject",
        ("node_path", 3, S, OPT, None),
        ("identifier", 4, S, OPT, None),
        ("metadata", 5, S, OPT, None),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"chainproof.tf.{name}"))
        for name in ("SavedModel", "SavedMetadata")
    }


def _read_proto(out: Collector, file: Path, inner: str) -> bytes:
    with open(file, "rb") as fh:
        return read_document(fh, out.limits.protobuf_bytes, inner)


def scan_saved_model_file(out: Collector, loc: Location, file: Path, inner: str) -> None:
    """One file of a SavedModel directory, judged by its role there."""
    if inner in ("saved_model.pb", "saved_model.pbtxt"):
        data = _read_proto(out, file, inner)
        legacy = not (file.parent / "keras_metadata.pb").exists()
        _scan_saved_model_proto(out, loc, data, text=inner.endswith(".pbtxt"), legacy=legacy)
    elif inner == "keras_metadata.pb":
        _scan_keras_metadata(out, loc, _read_proto(out, file, inner))
    elif inner == "fingerprint.pb" or re.fullmatch(
        r"variables/variables\.(index|data-\d+-of-\d+)", inner
    ):
        pass  # hashes and a tensor bundle: data the loader never interprets as code
    elif inner.startswith(("assets/", "assets.extra/")):
        with open(file, "rb") as fh:
            out.nested_asset(loc, inner, fh, 0)
    else:
        with open(file, "rb") as fh:
            out.nested(loc, inner, fh, 0)


def _parse_proto(out: Collector, loc: Location, name: str, data: bytes, text: bool) -> Any:
    from google.protobuf import message as pb_message
    from google.protobuf import text_format

    msg = tf_messages()[name]()
    try:
        if text:
            text_format.Parse(data.decode("utf-8"), msg, allow_unknown_field=True)
        else:
            msg.ParseFromString(data)
    except (pb_message.DecodeError, text_format.ParseError, UnicodeDecodeError) as e:
        out.add(Severity.HIGH, "savedmodel-malformed", f"cannot parse {name}: {e}", loc)
        return None
    return msg


def _scan_saved_model_proto(
    out: Collector, loc: Location, data: bytes, *, text: bool = False, legacy: bool = True
) -> None:
    sm = _parse_proto(out, loc, "SavedModel", data, text)
    if sm is None:
        return
    if not sm.meta_graphs:
        out.add(Severity.HIGH, "savedmodel-malformed", "SavedModel without meta graphs", loc)
    for mg in sm.meta_graphs:
        tags = ",".join(mg.meta_info_def.tags) or "untagged"
        _scan_meta_graph(out, replace(loc, key=f"meta_graph[{tags}]"), mg)
        if legacy:
            _scan_object_graph_metadata(out, replace(loc, key=f"meta_graph[{tags}]"), mg)


def _node_key(ref: str) -> str:
    return ref.lstrip("^").split(":")[0]


def _func_refs(node: Any, library: set[str]) -> set[str]:
    """Functions a node calls: `f`, branches, bodies (any func-typed attr) or a function-op."""
    refs = {node.op} if node.op in library else set()
    for value in node.attr.values():
        if value.func.name:
            refs.add(value.func.name)
        refs.update(f.name for f in value.list.func)
    return refs


def _calls_of(function: Any, library: set[str]) -> set[str]:
    refs: set[str] = set()
    for n in function.node_def:
        refs |= _func_refs(n, library)
    return refs


def _closure(roots: Iterable[str], calls: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(calls.get(name, ()))
    return seen


def _saver_nodes(graph: Any, saver: Any) -> set[str]:
    """Graph nodes that belong to the SaverDef: its save and restore ops and their inputs."""
    by_name = {n.name: n for n in graph.node}
    roots = [saver.save_tensor_name, saver.restore_op_name, saver.filename_tensor_name]
    todo = [_node_key(r) for r in roots if r]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        todo.extend(_node_key(i) for i in by_name[name].input)
    return seen


def _scan_meta_graph(out: Collector, loc: Location, mg: Any) -> None:
    graph = mg.graph_def
    functions = {f.signature.name: f for f in graph.library.function}
    names = set(functions)
    calls = {name: _calls_of(f, names) for name, f in functions.items()}
    saver_nodes = _saver_nodes(graph, mg.saver_def)
    saver_roots: set[str] = set()
    other_roots: set[str] = set()
    for n in graph.node:
        (saver_roots if n.name in saver_nodes else other_roots).update(_func_refs(n, names))
    saver_fns = _closure(saver_roots, calls)
    # Functions nobody in the saver calls are roots too: the object graph can call them directly.
    other_fns = _closure(other_roots | (names - saver_fns), calls)
    saver_only = saver_fns - other_fns
    unknown: dict[tuple[str, str], list[str]] = {}
    for n in graph.node:
        _judge_node(out, replace(loc, node=n.name), n, n.name in saver_nodes, names, unknown)
    for fname, f in functions.items():
        floc = replace(loc, function=fname)
        for n in f.node_def:
            _judge_node(out, replace(floc, node=n.name), n, fname in saver_only, names, unknown)
    _check_saver_paths(out, loc, mg, saver_nodes, [functions[f] for f in sorted(saver_only)])
    for (where, op), nodes in sorted(unknown.items()):
        more = f" (+{len(nodes) - 1} more)" if len(nodes) > 1 else ""
        out.add(
            Severity.MEDIUM,
            "tf-unknown-op",
            f"op {op!r} is not on the compute allowlist; review what it does before serving",
            replace(loc, function=where, node=f"{nodes[0]}{more}", op=op),
        )


def _judge_node(
    out: Collector,
    loc: Location,
    node: Any,
    in_saver: bool,
    library: set[str],
    unknown: dict[tuple[str, str], list[str]],
) -> None:
    op = node.op
    at = replace(loc, op=op)
    if op in library or op in _compute_ops():
        return
    if op in TF_UNSAFE_OPS:
        severity, why = TF_UNSAFE_OPS[op]
        out.add(severity, "tf-unsafe-op", f"{op} {why}", at)
    elif op in TF_CHECKPOINT_OPS:
        if not in_saver:
            out.add(
                Severity.HIGH,
                "tf-checkpoint-op-outside-saver",
                f"checkpoint op {op} outside the SaverDef's save/restore functions: it can read "
                "or write files at any path when this code runs",
                at,
            )
    elif op in TF_ATTR_OPS:
        _judge_attr_op(out, at, node)
    else:
        unknown.setdefault((loc.function or "graph", op), []).append(node.name)


@cache
def _compute_ops() -> frozenset[str]:
    from pipeline.scan.model.tfops import COMPUTE_OPS

    return COMPUTE_OPS


def _judge_attr_op(out: Collector, loc: Location, node: Any) -> None:
    if node.op == "PrintV2":
        stream = node.attr["output_stream"].s if "output_stream" in node.attr else b"stderr"
        if stream not in _PRINT_STREAMS:
            out.add(
                Severity.CRITICAL,
                "tf-unsafe-op",
                f"PrintV2 writes to {stream.decode('utf-8', 'replace')!r}, i.e. to a file",
                loc,
            )
        return
    source = node.attr["descriptor_source"].s if "descriptor_source" in node.attr else b"local://"
    if source != b"local://":
        out.add(
            Severity.HIGH,
            "tf-unsafe-op",
            f"{node.op} reads a proto descriptor from {source.decode('utf-8', 'replace')!r}",
            loc,
        )


def _scan_keras_metadata(out: Collector, loc: Location, data: bytes) -> None:
    """tf.keras 2 SavedModels keep each layer's Keras config as JSON in keras_metadata.pb."""
    meta = _parse_proto(out, loc, "SavedMetadata", data, text=False)
    if meta is None:
        return
    for node in meta.nodes:
        if not node.metadata:
            continue
        where = replace(loc, layer=node.node_path or None)
        try:
            doc = json.loads(node.metadata)
        except json.JSONDecodeError as e:
            out.add(Severity.HIGH, "keras-config-malformed", f"metadata not JSON: {e}", where)
            continue
        check_keras_config(out, where, doc)


def _scan_object_graph_metadata(out: Collector, loc: Location, mg: Any) -> None:
    """tf.keras 2 also wrote each layer's config into the object graph (SavedUserObject
    .metadata); without keras_metadata.pb, older loaders rebuild the model from these."""
    for i, node in enumerate(mg.object_graph_def.nodes):
        meta = node.user_object.metadata
        if not meta:
            continue
        where = replace(loc, key=f"{loc.key} object_graph_def.nodes[{i}].user_object.metadata")
        try:
            doc = json.loads(meta)
        except json.JSONDecodeError as e:
            out.add(Severity.HIGH, "keras-config-malformed", f"metadata not JSON: {e}", where)
            continue
        check_keras_config(out, where, doc)


# Which inputs of a checkpoint op name a file: the op writes or reads whatever path they hold.
_PATH_INPUTS = {
    "Save": (0,),
    "SaveV2": (0,),
    "SaveSlices": (0,),
    "Restore": (0,),
    "RestoreV2": (0,),
    "RestoreSlice": (0,),
    "MergeV2Checkpoints": (0, 1),
    "ShardedFilename": (0,),
    "ShardedFilespec": (0,),
}
# How a saver builds paths from its filename: these keep the prefix (input 0) ...
_PREFIX_OPS = {"Identity", "StringJoin", "ShardedFilename", "ShardedFilespec"}
# ... these combine alternatives, each of which must be a saver path.
_ALL_INPUT_OPS = {"Pack": None, "Select": (1, 2), "SelectV2": (1, 2)}
_MAX_TRACE = 10_000


def _check_saver_paths(
    out: Collector, loc: Location, mg: Any, saver_nodes: set[str], saver_fns: list[Any]
) -> None:
    """A checkpoint op in the saver may only touch paths built from the saver's filename.

    In the graph (TF1 savers) that is the SaverDef's filename tensor; inside the saver's
    functions (TF2) it is the function's own arguments, which the saver feeds the filename.
    """
    graph = mg.graph_def
    filename = _node_key(mg.saver_def.filename_tensor_name)
    by_name = {n.name: n for n in graph.node}
    sources = {filename} if filename else set()
    for n in graph.node:
        if n.name in saver_nodes:
            _check_path_inputs(out, replace(loc, node=n.name, op=n.op), n, by_name, sources)
    for f in saver_fns:
        nodes = {n.name: n for n in f.node_def}
        args = {a.name for a in f.signature.input_arg}
        floc = replace(loc, function=f.signature.name)
        for n in f.node_def:
            _check_path_inputs(out, replace(floc, node=n.name, op=n.op), n, nodes, args)


def _check_path_inputs(
    out: Collector, loc: Location, node: Any, nodes: dict[str, Any], sources: set[str]
) -> None:
    for index in _PATH_INPUTS.get(node.op, ()):
        if index >= len(node.input):
            continue
        ref = node.input[index]
        if not _derives(ref, nodes, sources):
            out.add(
                Severity.HIGH,
                "tf-saver-foreign-path",
                f"{node.op} in the saver takes its path from {_node_key(ref)!r}, not from the "
                "saver's filename: restoring or saving would touch a path the file chose",
                loc,
            )


def _derives(ref: str, nodes: dict[str, Any], sources: set[str]) -> bool:
    """Whether a path input is the filename (or an argument), as a saver builds it."""
    todo, seen = [_node_key(ref)], 0
    while todo:
        name = todo.pop()
        seen += 1
        if seen > _MAX_TRACE:
            return False
        if name in sources:
            continue
        node = nodes.get(name)
        if node is None:
            return False
        data = [i for i in node.input if not i.startswith("^")]
        if node.op in _PREFIX_OPS and data:
            todo.append(_node_key(data[0]))
        elif node.op in _ALL_INPUT_OPS and data:
            picks = _ALL_INPUT_OPS[node.op]
            chosen = data if picks is None else [data[i] for i in picks if i < len(data)]
            if not chosen:
                return False
            todo.extend(_node_key(i) for i in chosen)
        else:
            return False
    return True
