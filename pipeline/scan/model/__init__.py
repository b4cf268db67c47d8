"""Model-file scanning: judge weights and checkpoints without loading or executing them."""

from pipeline.scan.model.scanner import (
    DEFAULT_FAIL_ON,
    ScanReport,
    Severity,
    UnsafeModelError,
    render_table,
    scan_path,
)

__all__ = [
    "DEFAULT_FAIL_ON",
    "ScanReport",
    "Severity",
    "UnsafeModelError",
    "render_table",
    "scan_path",
]
