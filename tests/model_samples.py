"""Model artifacts for the model-scanner tests and bench, made here rather than downloaded.

Malicious samples are built with `pickle.dumps` / `np.save` / hand-assembled opcodes and are
NEVER loaded: each payload would create a sentinel file, so "the sentinel never appears" is a
test. TensorFlow/Keras samples (real `model.save`, `model.export`, `tf.saved_model.save`) import
TensorFlow lazily, so the fast unit tests can use the rest without paying for it.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import io
import json
import operator
import os
import pickle
import runpy
import struct
import subprocess
import tarfile
import timeit
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class Reduce:
    """Pickles as the call `func(*args)`. Only ever passed to pickle.dumps, never loaded."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


def touch_cmd(sentinel: Path) -> str:
    return f"touch {sentinel}"


def touch_code(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


# --- malicious pickles -------------------------------------------------------------------------


def pickle_os_system(sentinel: Path, protocol: int = 4) -> bytes:
    return pickle.dumps(Reduce(os.system, (touch_cmd(sentinel),)), protocol=protocol)


def pickle_exec(sentinel: Path) -> bytes:
    return pickle.dumps(Reduce(builtins.exec, (touch_code(sentinel),)), protocol=4)


def pickle_runpy(sentinel: Path) -> bytes:
    return pickle.dumps(Reduce(runpy._run_code, (touch_code(sentinel), {})), protocol=4)


def pickle_popen(sentinel: Path) -> bytes:
    return pickle.dumps(Reduce(subprocess.Popen, (["touch", str(sentinel)],)), protocol=4)


def pickle_methodcaller(sentinel: Path) -> bytes:
    """methodcaller('system', cmd)(importlib.import_module('os')): no os/posix global at all."""
    os_module = Reduce(importlib.import_module, ("os",))
    call = Reduce(operator.methodcaller("system", touch_cmd(sentinel)), (os_module,))
    return pickle.dumps(call, protocol=4)


def pickle_partial(sentinel: Path) -> bytes:
    return pickle.dumps(Reduce(functools.partial(os.system, touch_cmd(sentinel)), ()), protocol=4)


def pickle_timeit(sentinel: Path) -> bytes:
    return pickle.dumps(Reduce(timeit.timeit, (touch_code(sentinel), "", None, 1)), protocol=4)


def pickle_numpy_runstring(sentinel: Path) -> bytes:
    from numpy.testing._private import utils

    return pickle.dumps(Reduce(utils.runstring, (touch_code(sentinel), {})), protocol=4)


def _sbu(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def pickle_stack_shuffle(sentinel: Path) -> bytes:
    """Hand-assembled: 'os' and 'system' reach STACK_GLOBAL via memo and POP, not adjacently.

    A scanner that reads the two opcodes before STACK_GLOBAL sees ('junk', 'system').
    """
    return b"".join(
        [
            b"\x80\x04",  # PROTO 4
            _sbu("os"),
            b"\x94",  # MEMOIZE -> memo[0] = 'os'
            b"0",  # POP
            _sbu("junk"),
            b"0",  # POP
            b"h\x00",  # BINGET 0 -> 'os'
            _sbu("system"),
            b"\x93",  # STACK_GLOBAL -> os.system
            _sbu(touch_cmd(sentinel)),
            b"\x85",  # TUPLE1
            b"R",  # REDUCE
            b".",  # STOP
        ]
    )


def pickle_truncated() -> bytes:
    return pickle.dumps({"weights": list(range(100))}, protocol=4)[:-7]


# --- clean pickles and containers --------------------------------------------------------------


def clean_pickle() -> bytes:
    data = OrderedDict(
        weights=np.arange(12, dtype=np.float32).reshape(3, 4),
        bias=np.zeros(4),
        classes={"cat", "dog"},
        window=slice(0, 10, 2),
    )
    return pickle.dumps(data, protocol=4)


def torch_style_clean_pickle() -> bytes:
    """What torch.save writes for {'weight': tensor}, assembled by hand (torch is not needed)."""
    persid = b"(" + _bu("storage") + b"ctorch\nFloatStorage\n" + _bu("0") + _bu("cpu") + b"K\x04tQ"
    return b"".join(
        [
            b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01",
            _bu("weight"),
            b"ctorch._utils\n_rebuild_tensor_v2\nq\x02(",
            persid,
            b"K\x00K\x02K\x02\x86K\x02K\x01\x86\x89ccollections\nOrderedDict\n)Rtq\x03Rq\x04s.",
        ]
    )


def _bu(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def torch_zip(data_pkl: bytes, prefix: str = "archive") -> bytes:
    """A PyTorch >= 1.6 checkpoint layout: <prefix>/data.pkl, data/<n>, version, byteorder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        zf.writestr(f"{prefix}/byteorder", "little")
        zf.writestr(f"{prefix}/data/0", np.arange(4, dtype=np.float32).tobytes())
        zf.writestr(f"{prefix}/version", "3\n")
        zf.writestr(f"{prefix}/.data/serialization_id", "1234567890")
    return buf.getvalue()


def zip_with(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def object_npy(sentinel: Path) -> bytes:
    buf = io.BytesIO()
    payload = np.array([Reduce(os.system, (touch_cmd(sentinel),)), 1], dtype=object)
    np.save(buf, payload, allow_pickle=True)  # saving pickles; it is loading that would run it
    return buf.getvalue()


def clean_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.linspace(0, 1, 32, dtype=np.float32).reshape(4, 8))
    return buf.getvalue()


def clean_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, w=np.ones((3, 3)), b=np.zeros(3, dtype=np.int8))
    return buf.getvalue()


def joblib_file(path: Path, sentinel: Path | None = None) -> Path:
    """A joblib dump with raw numeric arrays; with `sentinel`, also an object array whose
    elements' pickle would run os.system."""
    import joblib

    obj: dict[str, Any] = {
        "coef": np.arange(10, dtype=np.float64),
        "labels": np.array(["a", "bb"]),
        "classes": np.array([1, "x"], dtype=object),
    }
    if sentinel is not None:
        obj["payload"] = np.array([Reduce(os.system, (touch_cmd(sentinel),))], dtype=object)
    joblib.dump(obj, path)
    return path


def safetensors_bytes(ok: bool = True) -> bytes:
    data = np.arange(6, dtype=np.float32).tobytes()
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, len(data)]}}
    raw = json.dumps(header).encode() if ok else b"{not json"
    return struct.pack("<Q", len(raw)) + raw + data


# --- Keras configs without TensorFlow (unit tests) ---------------------------------------------


def _dtype_policy() -> dict[str, Any]:
    return {
        "module": "keras",
        "class_name": "DTypePolicy",
        "config": {"name": "float32"},
        "registered_name": None,
    }


def dense_layer(
    name: str = "dense", module: str = "keras.layers", class_name: str = "Dense"
) -> dict[str, Any]:
    return {
        "module": module,
        "class_name": class_name,
        "config": {
            "name": name,
            "trainable": True,
            "dtype": _dtype_policy(),
            "units": 2,
            "activation": "linear",
            "use_bias": True,
        },
        "registered_name": None,
        "build_config": {"input_shape": [None, 4]},
    }


def lambda_layer(name: str = "lam") -> dict[str, Any]:
    # base64 of a marshalled code object, as keras' func_dump writes it (never unmarshalled).
    code = "4wEAAAAAAAAAAAAAAAIAAAADAAAA8wwAAACXAHwAZAF6BQAAUwApAk7pAgAAAKkAKQHaAXhzAQAA\n"
    return {
        "module": "keras.layers",
        "class_name": "Lambda",
        "config": {
            "name": name,
            "trainable": True,
            "dtype": _dtype_policy(),
            "function": {
                "class_name": "__lambda__",
                "config": {"code": code, "defaults": None, "closure": None},
            },
            "arguments": {},
        },
        "registered_name": None,
    }


def sequential_config(*layers: dict[str, Any]) -> dict[str, Any]:
    inp = {
        "module": "keras.layers",
        "class_name": "InputLayer",
        "config": {"batch_shape": [None, 4], "dtype": "float32", "name": "input_layer"},
        "registered_name": None,
    }
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "trainable": True,
            "dtype": _dtype_policy(),
            "layers": [inp, *layers],
        },
        "registered_name": None,
        "compile_config": {
            "optimizer": {
                "module": "keras.optimizers",
                "class_name": "Adam",
                "config": {"name": "adam", "learning_rate": 0.001},
                "registered_name": None,
            },
            "loss": "sparse_categorical_crossentropy",
            "metrics": ["accuracy"],
        },
    }


def keras_zip(config: dict[str, Any], extra: dict[str, bytes] | None = None) -> bytes:
    """A .keras archive as Keras 3 writes it: config.json, metadata.json, model.weights.h5."""
    import h5py

    weights = io.BytesIO()
    with h5py.File(weights, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.zeros((4, 2), dtype=np.float32))
    members = {
        "metadata.json": json.dumps({"keras_version": "3.15.1"}).encode(),
        "config.json": json.dumps(config).encode(),
        "model.weights.h5": weights.getvalue(),
        **(extra or {}),
    }
    return zip_with(members)


def h5_with_config(path: Path, config: dict[str, Any] | None) -> Path:
    """A legacy Keras .h5: weights plus (optionally) the model_config attribute."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("model_weights/dense/kernel", data=np.zeros((4, 2), dtype=np.float32))
        if config is not None:
            f.attrs["model_config"] = json.dumps(config)
            f.attrs["keras_version"] = "3.15.1"
    return path


# --- real Keras / TensorFlow models (integration tests, bench) --------------------------------


def build_seed_cnn(keras: Any) -> Any:
    """The seed CNN: Conv2D(32, 3x3, relu) -> MaxPooling2D -> Flatten -> Dense softmax."""
    return keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1)),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def build_mlp(keras: Any, width: int = 32) -> Any:
    return keras.Sequential(
        [
            keras.Input(shape=(16,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def build_bn_dropout(keras: Any) -> Any:
    inputs = keras.Input(shape=(12,))
    x = keras.layers.Dense(16)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Dropout(0.25)(x)
    outputs = keras.layers.Dense(2, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name="bn_dropout")


def build_lambda(keras: Any) -> Any:
    return keras.Sequential(
        [
            keras.Input(shape=(4,)),
            keras.layers.Lambda(lambda x: x, name="lam"),
            keras.layers.Dense(2),
        ]
    )


CLEAN_ARCHITECTURES: dict[str, Callable[[Any], Any]] = {
    "seed_cnn": build_seed_cnn,
    "mlp": build_mlp,
    "bn_dropout": build_bn_dropout,
}


def _compiled(keras: Any, model: Any) -> Any:
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])
    return model


def save_clean_keras(dest: Path, name: str) -> dict[str, Path]:
    """One clean architecture (random weights) as .keras, .h5 and two kinds of SavedModel."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = _compiled(keras, CLEAN_ARCHITECTURES[name](keras))
    paths = {
        "keras": dest / f"{name}.keras",
        "h5": dest / f"{name}.h5",
        "export": dest / f"{name}_export",
        "tf_saved_model": dest / f"{name}_tfsave",
    }
    model.save(paths["keras"])
    model.save(paths["h5"])
    model.export(paths["export"], verbose=False)
    tf.saved_model.save(model, str(paths["tf_saved_model"]))
    return paths


def save_lambda_keras(dest: Path) -> dict[str, Path]:
    import keras

    model = build_lambda(keras)
    paths = {"keras": dest / "lambda.keras", "h5": dest / "lambda.h5"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    return paths


def retarget_keras_module(src: Path, dest: Path, module: str, cls: str) -> str:
    """Copy a .keras archive, pointing its first Dense layer at a module outside Keras.

    Returns that layer's name (Keras numbers layer names per process, so it is not fixed).
    """
    with zipfile.ZipFile(src) as zin:
        members = {i.filename: zin.read(i) for i in zin.infolist()}
    config = json.loads(members["config.json"])
    entry = next(e for e in config["config"]["layers"] if e["class_name"] == "Dense")
    entry["module"], entry["class_name"] = module, cls
    members["config.json"] = json.dumps(config).encode()
    dest.write_bytes(zip_with(members))
    return str(entry["config"]["name"])


def save_write_file_module(dest: Path, sentinel: Path) -> Path:
    """A SavedModel whose function writes `sentinel` when called (tf.io.write_file)."""
    import tensorflow as tf

    class Dropper(tf.Module):
        @tf.function(input_signature=[])
        def drop(self) -> Any:
            tf.io.write_file(str(sentinel), "pwned")
            return tf.constant(0)

    tf.saved_model.save(Dropper(), str(dest))
    return dest


# --- the catalog the tests and the bench share ---------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    path: Path
    malicious: bool
    rule: str | None = None  # the rule that must fire (ours)
    where: dict[str, str] = field(default_factory=dict)  # Location fields that must match


def write_pickle_samples(dest: Path, sentinel: Path) -> list[Sample]:
    """Every non-TensorFlow sample, malicious and clean, written under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    crit = "pickle-dangerous-import"
    evil: dict[str, tuple[bytes, str | None, dict[str, str]]] = {
        "os_system.pkl": (pickle_os_system(sentinel), crit, {}),
        "os_system_proto0.pkl": (pickle_os_system(sentinel, protocol=0), crit, {}),
        "exec.pkl": (pickle_exec(sentinel), crit, {}),
        "runpy.pkl": (pickle_runpy(sentinel), crit, {}),
        "popen.pkl": (pickle_popen(sentinel), crit, {}),
        "methodcaller_importlib.pkl": (pickle_methodcaller(sentinel), crit, {}),
        "partial.pkl": (pickle_partial(sentinel), crit, {}),
        "timeit.pkl": (pickle_timeit(sentinel), crit, {}),
        "numpy_runstring.pkl": (pickle_numpy_runstring(sentinel), crit, {}),
        "stack_shuffle.pkl": (pickle_stack_shuffle(sentinel), crit, {}),
        "evil_torch.pt": (
            torch_zip(pickle_os_system(sentinel)),
            crit,
            {"member": "archive/data.pkl"},
        ),
        "object_array.npy": (object_npy(sentinel), crit, {}),
    }
    clean: dict[str, bytes] = {
        "clean.pkl": clean_pickle(),
        "clean_torch.pt": torch_zip(torch_style_clean_pickle()),
        "clean.npy": clean_npy(),
        "clean.npz": clean_npz(),
        "clean.safetensors": safetensors_bytes(),
    }
    samples = []
    for name, (data, rule, where) in evil.items():
        (dest / name).write_bytes(data)
        samples.append(Sample(name, dest / name, True, rule, where))
    for name, data in clean.items():
        (dest / name).write_bytes(data)
        samples.append(Sample(name, dest / name, False))
    samples.append(Sample("evil.joblib", joblib_file(dest / "evil.joblib", sentinel), True, crit))
    samples.append(Sample("clean.joblib", joblib_file(dest / "clean.joblib"), False))
    return samples


def write_tf_samples(dest: Path, sentinel: Path) -> list[Sample]:
    """Real Keras/TF models: clean architectures in every format, and the malicious ones."""
    dest.mkdir(parents=True, exist_ok=True)
    samples = []
    for arch in CLEAN_ARCHITECTURES:
        for fmt, path in save_clean_keras(dest, arch).items():
            samples.append(Sample(f"{arch} ({fmt})", path, False))
    lam = save_lambda_keras(dest)
    samples.append(Sample("lambda (.keras)", lam["keras"], True, "keras-lambda", {"layer": "lam"}))
    samples.append(Sample("lambda (.h5)", lam["h5"], True, "keras-lambda", {"layer": "lam"}))
    custom = dest / "custom_module.keras"
    layer = retarget_keras_module(dest / "mlp.keras", custom, "attacker_pkg.layers", "Backdoor")
    samples.append(
        Sample("custom module (.keras)", custom, True, "keras-custom-object", {"layer": layer})
    )
    dropper = save_write_file_module(dest / "write_file_savedmodel", sentinel)
    samples.append(
        Sample("tf.io.write_file (SavedModel)", dropper, True, "tf-unsafe-op", {"op": "WriteFile"})
    )
    return samples


# --- issue 19: loader-mirroring formats (unit tests, bench) -------------------------------------


def modern_torch_zip(data_pkl: bytes, prefix: str = "model") -> bytes:
    """What torch >= 2.1 writes: the legacy members plus .format_version/.storage_alignment."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        zf.writestr(f"{prefix}/.format_version", "1")
        zf.writestr(f"{prefix}/.storage_alignment", "64")
        zf.writestr(f"{prefix}/byteorder", "little")
        zf.writestr(f"{prefix}/data/0", np.arange(4, dtype=np.float32).tobytes())
        zf.writestr(f"{prefix}/version", "3\n")
        zf.writestr(f"{prefix}/.data/serialization_id", "0123456789")
    return buf.getvalue()


def h5_with_user_block(path: Path, block: bytes, config: dict[str, Any] | None) -> Path:
    """An HDF5 file whose first 512 bytes are a user block holding `block` (h5py accepts it)."""
    import h5py

    assert len(block) <= 512
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("model_weights/dense/kernel", data=np.zeros((4, 2), dtype=np.float32))
        if config is not None:
            f.attrs["model_config"] = json.dumps(config)
    with open(path, "r+b") as fh:
        fh.write(block)
    return path


def gguf_bytes(
    metadata: dict[str, str | int] | None = None,
    tensors: list[tuple[str, list[int], int, int]] | None = None,
    data: bytes = b"",
) -> bytes:
    """A GGUF v3 file: string/uint32 metadata, tensor infos (name, dims, type, offset), data."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    meta = {"general.architecture": "llama", **(metadata or {})}
    tensors = tensors if tensors is not None else [("w", [4], 0, 0)]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for key, value in meta.items():
        if isinstance(value, int):
            out += s(key) + struct.pack("<II", 4, value)
        else:
            out += s(key) + struct.pack("<I", 8) + s(value)
    for name, dims, ggml_type, offset in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += b"\0" * (-len(out) % 32)
    return out + (data or np.arange(4, dtype=np.float32).tobytes())


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if loop.index0 == 0 and "
    "message['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SSTI_TEMPLATE = (
    "{% for x in ().__class__.__base__.__subclasses__() %}{% if 'warning' in x.__name__ %}"
    "{{ x()._module.__builtins__['__import__']('os').popen('id').read() }}{% endif %}"
    "{% endfor %}"
)


def _onnx_model(domain: str = "", op: str = "Relu", external: str | None = None) -> bytes:
    """A small ONNX ModelProto through the scanner's subset schema (the onnx package is not
    locked); field numbers are upstream's, so any ONNX reader parses it the same."""
    from pipeline.scan.model.onnx import onnx_messages

    model = onnx_messages()["ModelProto"]()
    model.ir_version = 9
    model.producer_name = "chainproof-samples"
    model.opset_import.add(domain="", version=17)
    if domain:
        model.opset_import.add(domain=domain, version=1)
    model.graph.name = "g"
    model.graph.node.add(name="mm", op_type="MatMul")
    model.graph.node.add(name="act", op_type=op, domain=domain)
    init = model.graph.initializer.add(name="W")
    if external is not None:
        init.data_location = 1
        init.external_data.add(key="location", value=external)
    return bytes(model.SerializeToString())


def _compressed_joblib(path: Path, method: str, sentinel: Path | None) -> Path:
    import joblib

    obj: dict[str, Any] = {"coef": np.linspace(0, 1, 256), "intercept": np.zeros(4)}
    if sentinel is not None:
        obj["payload"] = np.array([Reduce(os.system, (touch_cmd(sentinel),))], dtype=object)
    joblib.dump(obj, path, compress=(method, 3))
    return path


def _model_repo(dest: Path) -> Path:
    """A Hugging Face-style model repository: weights plus the documents around them."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model.safetensors").write_bytes(safetensors_bytes())
    (dest / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 3}))
    (dest / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {}}}))
    (dest / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    (dest / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\nthe\n")
    (dest / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return dest


def write_frontier_samples(dest: Path, sentinel: Path) -> list[Sample]:
    """Issue 19's classes, malicious and clean twin: loader-mirroring detection, archive members,
    Keras callables, safetensors headers, compressed joblib, ONNX, GGUF, model repositories."""
    dest.mkdir(parents=True, exist_ok=True)
    lam = sequential_config(lambda_layer("lam"), dense_layer())
    clean_cfg = sequential_config(dense_layer())
    get_file = dense_layer("d")
    get_file["config"]["activation"] = {
        "module": "keras.utils",
        "class_name": "function",
        "config": "get_file",
        "registered_name": "get_file",
    }
    decoy = zip_with(
        {"archive/data.pkl": torch_style_clean_pickle(), "archive/data/0": object_npy(sentinel)}
    )
    st_overlap = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        }
    ).encode()
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("w.npy", b"\0" * (64 << 20))
    tar_evil, tar_clean = io.BytesIO(), io.BytesIO()
    for buf, members in (
        (tar_evil, {"model/w.pkl": pickle_os_system(sentinel)}),
        (tar_clean, {"model/w.npy": clean_npy()}),
    ):
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    files: dict[str, tuple[bytes, bool]] = {
        "prepended_zip_lambda.keras": (b"\x00junk" * 300 + keras_zip(lam), True),
        "pickle_then_torch_zip.pt": (
            pickle_os_system(sentinel) + torch_zip(torch_style_clean_pickle()),
            True,
        ),
        "npy_behind_torch_decoy.npz": (decoy, True),
        "keras_get_file.keras": (keras_zip(sequential_config(get_file)), True),
        "safetensors_overlap.safetensors": (
            struct.pack("<Q", len(st_overlap)) + st_overlap + bytes(24),
            True,
        ),
        "onnx_custom_op.onnx": (_onnx_model("com.attacker", "Backdoor"), True),
        "onnx_external_escape.onnx": (_onnx_model(external="../../../etc/passwd"), True),
        "gguf_ssti_template.gguf": (gguf_bytes({"tokenizer.chat_template": SSTI_TEMPLATE}), True),
        "zip_bomb_64MiB.npz": (bomb.getvalue(), True),
        "evil_pickle.tar.gz": (tar_evil.getvalue(), True),
        "modern_torch_evil.pt": (modern_torch_zip(pickle_os_system(sentinel, 2)), True),
        "modern_torch.pt": (modern_torch_zip(torch_style_clean_pickle()), False),
        "clean.onnx": (_onnx_model("ai.onnx.ml", "Normalizer", "weights/W.bin"), False),
        "clean_llama3_template.gguf": (
            gguf_bytes({"tokenizer.chat_template": LLAMA3_TEMPLATE}),
            False,
        ),
        "clean_model.tar.gz": (tar_clean.getvalue(), False),
        "clean_keras_prefixless.keras": (keras_zip(clean_cfg), False),
    }
    samples = []
    for name, (data, evil) in files.items():
        (dest / name).write_bytes(data)
        samples.append(Sample(name, dest / name, evil))
    h5_evil = h5_with_user_block(dest / "h5_userblock_pickle.h5", pickle.dumps({"a": 1}), lam)
    samples.append(Sample("h5_userblock_pickle.h5", h5_evil, True, "keras-lambda"))
    h5_clean = h5_with_user_block(dest / "h5_userblock_zeros.h5", b"", clean_cfg)
    samples.append(Sample("h5_userblock_zeros.h5", h5_clean, False))
    for method in ("zlib", "gzip", "xz"):
        evil_path = _compressed_joblib(dest / f"evil_{method}.joblib", method, sentinel)
        samples.append(Sample(f"evil_{method}.joblib", evil_path, True))
        clean_path = _compressed_joblib(dest / f"clean_{method}.joblib", method, None)
        samples.append(Sample(f"clean_{method}.joblib", clean_path, False))
    samples.append(Sample("model repository (dir)", _model_repo(dest / "repo"), False))
    return samples
