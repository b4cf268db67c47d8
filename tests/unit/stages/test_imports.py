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


def test_the_train_stage_imports_tensorflow_without_the_optional_modules_keras_pulls_in():
    """scikit-learn (Keras's sklearn wrappers) and pyplot (keras.visualization) cost the train
    stage ~2 s of CPU at start and are never used by it; once TensorFlow is in, both stay
    importable in the same process."""
    probe = (
        "import sys; from stages.train import import_tensorflow; tf = import_tensorflow(); "
        "tf.keras.Sequential; "
        "print(' '.join(n for n in ('sklearn', 'matplotlib.pyplot') if n in sys.modules)); "
        "import sklearn, matplotlib.pyplot; print('importable')"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["", "importable"]
