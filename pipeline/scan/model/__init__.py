"""Model-file scanning: find code that would run when a model is loaded, without loading it.

`scan_path(path)` reads a model file or directory as data only — pickle opcodes through
`pickletools.genops`, Keras configs as JSON, HDF5 attributes through h5py, SavedModel protobufs
through a private subset schema — and never unpickles, unmarshals, imports or executes anything
the artifact names. What it does not understand it refuses (`unrecognised-format`), never passes.

    from pipeline.scan.model import scan_path, Severity
    report = scan_path("runs/latest/train/model.keras")
    if not report.ok(Severity.MEDIUM):
        ...  # do not load it

Rules, by severity:
  critical  pickle-dangerous-import, pickle-unresolved-import, keras-lambda,
            keras-lambda-function, tf-unsafe-op (WriteFile, Py*Func, PrintV2 to a file),
            keras-custom-object (when the module is a dangerous one)
  high      pickle-unsafe-import, pickle-extension-registry, pickle-malformed,
            numpy-object-array, numpy-malformed, keras-custom-object, keras-tfsmlayer,
            keras-config-malformed, h5-malformed, tf-unsafe-op (other file, network, debug ops),
            tf-checkpoint-op-outside-saver, savedmodel-malformed, safetensors-malformed,
            json-malformed, zip-slip, zip-symlink, zip-encrypted, zip-malformed, zip-too-deep,
            symlink, unrecognised-format
  medium    tf-unknown-op
  info      savedmodel-asset
"""

from pipeline.scan.model.report import (
    DEFAULT_FAIL_ON,
    ScanReport,
    Severity,
    UnsafeModelError,
    render_table,
)
from pipeline.scan.model.walk import scan_path

__all__ = [
    "DEFAULT_FAIL_ON",
    "ScanReport",
    "Severity",
    "UnsafeModelError",
    "render_table",
    "scan_path",
]
