"""`chainproof scan model PATH`: scan model weights for code that loading them would run.

Exit codes (through pipeline.cli.main): 0 no finding at or above --fail-on, 1 findings at or
above it (UnsafeModelError), 2 bad input (InputError: a missing path). The default threshold is
medium: a finding the scanner cannot vouch for (an unknown TensorFlow op, an object outside the
allowlists) fails until someone has reviewed it; info and low entries only describe.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.scan.model import (
    DEFAULT_FAIL_ON,
    DEFAULT_PROFILES,
    PROFILES,
    Severity,
    UnsafeModelError,
    render_table,
    scan_path,
)

SEVERITIES = [s.label for s in Severity]


@click.command("model")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for CI and provenance.",
)
@click.option(
    "--fail-on",
    type=click.Choice(SEVERITIES, case_sensitive=False),
    default=DEFAULT_FAIL_ON.label,
    show_default=True,
    help="Exit 1 when any finding is at or above this severity.",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    type=click.Choice(sorted(PROFILES), case_sensitive=False),
    help="Pickle allowlist profile (repeatable); replaces the default "
    f"({', '.join(DEFAULT_PROFILES)}). numpy is always on; add sklearn for scikit-learn models.",
)
def scan_model(path: Path, fmt: str, fail_on: str, profiles: tuple[str, ...]) -> None:
    """Scan PATH (a model file or directory) without loading it: pickles, PyTorch, joblib,
    .keras, .h5, SavedModel, .npy/.npz, safetensors, ONNX, GGUF, zip/tar. A file PATH names that
    is not a model is refused; inside a directory, non-model files are listed as not-a-model."""
    report = scan_path(path, profiles=profiles or None)
    click.echo(report.to_json() if fmt == "json" else render_table(report))
    if not report.ok(fail_on):
        raise UnsafeModelError(report, fail_on)
