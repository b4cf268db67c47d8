"""Stage processes import only what they use: start-up time is a cost every run pays."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("numpy", "tensorflow", "keras", "sklearn", "mlflow", "matplotlib")


def imported_by(module: str) -> set[str]:
    probe = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return {name.split(".")[0] for name in proc.stdout.split()}


@pytest.mark.parametrize(
    ("stage", "allowed"),
    [
        ("stages.package", set()),
        ("stages.deploy", set()),
        ("stages.source", {"numpy"}),  # it writes the dataset as arrays
        ("stages.train", set()),  # TensorFlow and numpy only once it trains
    ],
)
def test_a_stage_module_imports_no_heavy_library_it_does_not_use(stage, allowed):
    assert imported_by(stage) & set(HEAVY) <= allowed
