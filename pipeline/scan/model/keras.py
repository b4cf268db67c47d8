"""Keras configs judged as data: .keras config.json, .h5 model_config/training_config attributes
and SavedModel Keras metadata; Lambda layers, serialized functions and objects outside Keras."""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import replace
from typing import IO, Any

from pipeline.scan.model.collect import Collector
from pipeline.scan.model.policy import dangerous_global, judge_global
from pipeline.scan.model.report import Location, Severity, names

# Keras' own encodings of tensors, arrays, slices...: data, not importable names.
_KERAS_SPECIAL = names(
    "__keras_tensor__ __tensor__ __numpy__ __bytes__ __ellipsis__ __slice__ __typespec__ "
    "__passive_serialization__"
)


# Keras callables that do more than compute: judged by what they do, not by living in keras.*.
# A config that names one makes loading call it (the CVE-2025-8747 shape: keras.utils.get_file
# fetching a URL and writing a file, with safe_mode on).
_KERAS_UNSAFE_NAMES: dict[str, str] = {
    **dict.fromkeys(("get_file",), "downloads a URL and writes the file anywhere"),
    **dict.fromkeys(
        ("load_model", "load_weights", "load_img", "load_from_saved_model"),
        "loads another, unscanned file",
    ),
    **dict.fromkeys(
        ("save_model", "save_weights", "save", "save_img", "export", "export_saved_model"),
        "writes files",
    ),
    **dict.fromkeys(("plot_model", "model_to_dot"), "runs Graphviz and writes an image file"),
    **dict.fromkeys(
        (
            "image_dataset_from_directory",
            "text_dataset_from_directory",
            "audio_dataset_from_directory",
        ),
        "reads a directory tree",
    ),
    **dict.fromkeys(
        ("enable_unsafe_deserialization", "set_backend"), "changes how everything after loads"
    ),
}
_KERAS_UNSAFE_MODULES: dict[str, str] = {
    "callbacks": "writes files or talks to servers (checkpoints, logs, RemoteMonitor)",
    "datasets": "downloads data sets",
    "file_utils": "downloads, extracts or writes files",
    "io_utils": "reads or writes files",
    "export": "writes SavedModels",
    "legacy.saving": "loads or writes model files",
}


def keras_callable_risk(module: str, attr: str) -> str | None:
    """Why a callable inside Keras is not pure compute, or None when it only computes."""
    full = f"{module}.{attr}"
    why = dangerous_global(full)
    if why is not None:
        return why
    if attr in _KERAS_UNSAFE_NAMES:
        return _KERAS_UNSAFE_NAMES[attr]
    dotted = f".{module}."
    for part, what in _KERAS_UNSAFE_MODULES.items():
        if f".{part}." in dotted:  # a whole module path segment, e.g. keras.src.callbacks.x
            return what
    return None


def is_keras_module(module: str) -> bool:
    return module == "keras" or module.startswith("keras.")


def scan_keras_json_bytes(out: Collector, loc: Location, data: bytes | str) -> None:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        out.add(Severity.HIGH, "keras-config-malformed", f"config is not valid JSON: {e}", loc)
        return
    check_keras_config(out, loc, doc)


def check_keras_config(out: Collector, loc: Location, doc: object) -> None:
    """Flag Lambda layers, serialized lambdas, TFSMLayer and objects from outside Keras."""
    try:
        _walk_keras(out, loc, doc, "$", layer=None, is_layer=True, in_lambda=False)
    except RecursionError:
        out.add(Severity.HIGH, "keras-config-malformed", "config nested too deeply to check", loc)


def _walk_keras(
    out: Collector,
    loc: Location,
    node: object,
    path: str,
    layer: str | None,
    is_layer: bool,
    in_lambda: bool,
) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _walk_keras(out, loc, item, f"{path}[{i}]", layer, is_layer, in_lambda)
        return
    if not isinstance(node, dict):
        return
    class_name = node.get("class_name")
    if isinstance(class_name, str):
        inner = node.get("config")
        name = inner.get("name") if isinstance(inner, dict) else None
        if is_layer and isinstance(name, str):
            layer = name
        here = replace(loc, layer=layer, key=f"{loc.key} {path}" if loc.key else path)
        in_lambda = _judge_keras_object(out, here, node, class_name, inner, in_lambda)
    for key, value in node.items():
        child_is_layer = key == "layers" or (key == "layer" and isinstance(value, dict))
        _walk_keras(out, loc, value, f"{path}.{key}", layer, child_is_layer, in_lambda)


def _judge_keras_object(
    out: Collector,
    loc: Location,
    node: dict[str, Any],
    class_name: str,
    inner: object,
    in_lambda: bool,
) -> bool:
    """Report what this one object would make Keras do; returns the new in-Lambda flag."""
    if class_name == "Lambda":
        fn = inner.get("function") if isinstance(inner, dict) else None
        out.add(
            Severity.CRITICAL,
            "keras-lambda",
            f"Lambda layer: {_describe_lambda_function(fn, inner)}; it runs when the model is "
            "loaded with safe_mode=False or called",
            loc,
        )
        return True
    if class_name == "__lambda__" and not in_lambda:
        out.add(
            Severity.CRITICAL,
            "keras-lambda-function",
            f"serialized Python lambda ({_describe_code(inner)}) used as a function argument",
            loc,
        )
    if class_name == "TFSMLayer":
        target = inner.get("filepath") if isinstance(inner, dict) else None
        out.add(
            Severity.HIGH,
            "keras-tfsmlayer",
            f"TFSMLayer loads an external SavedModel ({target!r}) whose graph this scan "
            "cannot see; scan that SavedModel too",
            loc,
        )
    _judge_keras_module(out, loc, node, class_name, inner)
    return in_lambda


def _judge_keras_module(
    out: Collector, loc: Location, node: dict[str, Any], class_name: str, inner: object
) -> None:
    module = node.get("module")
    registered = node.get("registered_name")
    if class_name in _KERAS_SPECIAL or class_name == "__lambda__":
        return
    if isinstance(module, str) and is_keras_module(module):
        attr = inner if class_name == "function" and isinstance(inner, str) else class_name
        why = keras_callable_risk(module, attr)
        if why is not None:
            out.add(
                Severity.CRITICAL,
                "keras-unsafe-callable",
                f"{class_name!r} resolves to {module}.{attr}, which {why}: Keras' own code, "
                "but loading the config calls it with arguments the file chooses",
                loc,
            )
            return
    if isinstance(module, str) and not is_keras_module(module):
        attr = inner if class_name == "function" and isinstance(inner, str) else class_name
        verdict = judge_global(module, attr, out.policy.profiles)
        severity = verdict[0] if verdict and verdict[0] is Severity.CRITICAL else Severity.HIGH
        why = f" ({verdict[1]})" if severity is Severity.CRITICAL and verdict else ""
        out.add(
            severity,
            "keras-custom-object",
            f"{class_name!r} resolves to {module}.{attr}, outside Keras{why}: loading imports "
            "that module and runs its code",
            loc,
        )
    elif isinstance(registered, str) and ">" in registered:
        out.add(
            Severity.HIGH,
            "keras-custom-object",
            f"custom registered object {registered!r}: its code comes from whatever package "
            "registers it in the loading process",
            loc,
        )


def _describe_lambda_function(fn: object, inner: object) -> str:
    if isinstance(fn, dict):
        if fn.get("class_name") == "__lambda__":
            return _describe_code(fn.get("config"))
        if fn.get("class_name") == "function":
            return f"calls function {fn.get('module')}.{fn.get('config')}"
    if isinstance(fn, list | tuple) and fn:
        return _describe_code({"code": fn[0]})  # tf.keras 2: [code, defaults, closure]
    if isinstance(fn, str):
        kind = inner.get("function_type") if isinstance(inner, dict) else None
        return _describe_code({"code": fn}) if kind == "lambda" else f"calls function {fn!r}"
    return "function of unknown form"


def _describe_code(config: object) -> str:
    """Say what a serialized lambda holds, by base64-decoding only (never unmarshalling)."""
    code = None
    if isinstance(config, dict):
        code = config.get("code", config.get("value"))
    if not isinstance(code, str):
        return "serialized function"
    try:
        raw = base64.b64decode(code.encode("ascii"), validate=False)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return f"undecodable serialized function ({len(code)} chars)"
    # marshal writes a code object as type byte 'c', with 0x80 set when it is referenced.
    if raw[:1] in (b"c", b"\xe3"):
        return f"holds marshalled Python bytecode ({len(raw)} bytes)"
    return f"holds a serialized function ({len(raw)} bytes)"


# --------------------------------------------------------------------------------------------
# HDF5 (.h5 / .hdf5 / legacy .keras): attributes only
# --------------------------------------------------------------------------------------------


_H5_KEYS = ("model_config", "training_config")


def scan_h5(out: Collector, loc: Location, fh: IO[bytes]) -> None:
    """Read the Keras configs from HDF5 attributes in a child process.

    The HDF5 C library parses the hostile file: some corrupt files make it spin forever (or
    crash), so it runs in a forked child with a deadline; a hang or a crash is a finding, and
    the scan goes on. Results come back as JSON over a pipe, never pickled.
    """
    import multiprocessing

    name = getattr(fh, "name", None)
    # h5py reads a real file through its own driver, much faster than through Python.
    source: Any = name if isinstance(name, str) and os.path.isfile(name) else fh
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_h5_child, args=(source, send, out.limits.document_bytes), daemon=True
    )
    child.start()
    send.close()
    deadline = out.limits.parse_seconds
    try:
        reply = receive.recv_bytes() if receive.poll(deadline) else None
    except (EOFError, OSError):
        reply = b'{"error": "the HDF5 reader died on this file"}'
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    if reply is None:
        out.add(
            Severity.HIGH,
            "h5-malformed",
            f"the HDF5 library did not finish reading this file within {deadline} s "
            "(limit parse_seconds): a corrupt or hostile file, refused",
            loc,
        )
        return
    doc = json.loads(reply)
    if "error" in doc:
        out.add(Severity.HIGH, "h5-malformed", f"unreadable HDF5 file: {doc['error']}", loc)
        return
    for key in _H5_KEYS:
        if key in doc.get("too_large", []):
            out.add(
                Severity.HIGH,
                "too-large",
                f"{key} exceeds the document_bytes limit ({out.limits.document_bytes:,} bytes)",
                replace(loc, key=key),
            )
        elif key in doc.get("configs", {}):
            scan_keras_json_bytes(out, replace(loc, key=key), doc["configs"][key])
    # Without model_config it is a weights file: tensors only, nothing Keras would execute.


def _h5_child(source: Any, send: Any, limit: int) -> None:
    """In the child: the config attributes as JSON text, or the error h5py raised."""
    try:
        import h5py

        configs: dict[str, str] = {}
        too_large: list[str] = []
        with h5py.File(source, "r") as f:
            for key in _H5_KEYS:
                if key not in f.attrs:
                    continue
                raw = f.attrs[key]
                text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                if len(text) > limit:
                    too_large.append(key)
                else:
                    configs[key] = text
        reply: dict[str, Any] = {"configs": configs, "too_large": too_large}
    except Exception as e:  # the child reports every failure; the parent decides
        reply = {"error": f"{type(e).__name__}: {e}"}
    send.send_bytes(json.dumps(reply).encode())
    send.close()
