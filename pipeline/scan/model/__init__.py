"""Model-file scanning: find code that would run when a model is loaded, without loading it.

`scan_path(path)` reads a model file or directory as data only — pickle opcodes through
`pickletools.genops`, Keras configs as JSON, HDF5 attributes through h5py, SavedModel and ONNX
protobufs through private subset schemas, GGUF and safetensors headers with struct — and never
unpickles, unmarshals, imports or executes anything the artifact names. Each stream is judged in
every reading a loader could make of it (by extension and by content); what it does not
understand it refuses (`unrecognised-format`), never passes.

    from pipeline.scan.model import scan_path, Severity
    report = scan_path("runs/latest/train/model.keras", profiles=["torch", "sklearn"])
    if not report.ok(Severity.MEDIUM):
        ...  # do not load it

Rules, by severity:
  critical  pickle-dangerous-import, pickle-unresolved-import, keras-lambda,
            keras-lambda-function, keras-unsafe-callable, gguf-chat-template-code,
            tf-unsafe-op (WriteFile, Py*Func, PrintV2 to a file),
            keras-custom-object (when the module is a dangerous one)
  high      pickle-unsafe-import, pickle-extension-registry, pickle-malformed,
            numpy-object-array, numpy-malformed, keras-custom-object, keras-tfsmlayer,
            keras-config-malformed, h5-malformed, tf-unsafe-op (other file, network, debug ops),
            tf-checkpoint-op-outside-saver, tf-saver-foreign-path, savedmodel-malformed,
            safetensors-malformed, json-malformed, onnx-custom-op, onnx-external-data-escape,
            onnx-malformed, gguf-malformed, polyglot, zip-slip, zip-symlink, zip-encrypted,
            zip-malformed, zip-too-deep, zip-bomb, tar-slip, tar-link, tar-special,
            tar-malformed, tar-too-deep, compressed-malformed, compressed-unsupported,
            decompression-bomb, too-large, symlink, unrecognised-format
  medium    tf-unknown-op
  info      savedmodel-asset, not-a-model (a non-model file inside a scanned directory)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.scan.model.policy import DEFAULT_PROFILES, PROFILES, ScanLimits
    from pipeline.scan.model.report import (
        DEFAULT_FAIL_ON,
        ScanReport,
        Severity,
        UnsafeModelError,
        render_table,
    )
    from pipeline.scan.model.walk import scan_path

# Resolved on first use (PEP 562): every chainproof command declares `scan model`'s options,
# which need only the severities and profiles, not the readers behind scan_path (~50 ms).
_EXPORTS = {
    "DEFAULT_PROFILES": "policy",
    "PROFILES": "policy",
    "ScanLimits": "policy",
    "DEFAULT_FAIL_ON": "report",
    "ScanReport": "report",
    "Severity": "report",
    "UnsafeModelError": "report",
    "render_table": "report",
    "scan_path": "walk",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_FAIL_ON",
    "DEFAULT_PROFILES",
    "PROFILES",
    "ScanLimits",
    "ScanReport",
    "Severity",
    "UnsafeModelError",
    "render_table",
    "scan_path",
]
