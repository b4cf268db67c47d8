"""The source stage's bundled digits: read straight from scikit-learn's file, equal to
load_digits(), without the stage process importing scikit-learn."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.stage import StageContext, StageError
from stages._io import read_npz
from stages.source import SourceParams, SourceStage, _bundled_digits_file, _read_digits_csv


def test_bundled_digits_are_byte_identical_to_load_digits():
    from sklearn.datasets import load_digits

    bundle = load_digits()
    x, y = _read_digits_csv(_bundled_digits_file()[0])
    assert x.dtype == bundle.data.dtype and x.shape == bundle.data.shape == (1797, 64)
    assert y.dtype == bundle.target.dtype and y.shape == bundle.target.shape
    assert x.tobytes() == bundle.data.tobytes()
    assert y.tobytes() == bundle.target.tobytes()


def test_the_recorded_version_is_the_installed_scikit_learn():
    import sklearn

    path, version = _bundled_digits_file()
    assert version == sklearn.__version__
    assert path.samefile(Path(sklearn.__file__).parent / "datasets/data/digits.csv.gz")


def test_the_stage_process_never_imports_scikit_learn(tmp_path):
    """What the issue measured: the source stage paid over a second importing scikit-learn."""
    script = (
        "import sys; from pathlib import Path;"
        "from pipeline.stage import StageContext;"
        "from stages.source import SourceParams, SourceStage;"
        "ctx = StageContext(run_id='r', stage='source',"
        " params=SourceParams(dataset='sklearn-digits'),"
        f" workdir=Path({str(tmp_path)!r}), inputs={{}}, outputs=('dataset.npz', 'manifest.json'));"
        "SourceStage().run(ctx);"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["source"]["location"].startswith("scikit-learn ")
    assert manifest["input_shape"] == [8, 8, 1] and manifest["classes"] == 10


def test_the_sourced_dataset_is_load_digits_split_and_scaled(tmp_path):
    from sklearn.datasets import load_digits

    ctx = StageContext(
        run_id="r",
        stage="source",
        params=SourceParams(dataset="sklearn-digits", seed=3),
        workdir=tmp_path,
        inputs={},
        outputs=("dataset.npz", "manifest.json"),
    )
    SourceStage().run(ctx)
    data = read_npz(tmp_path / "dataset.npz")
    bundle = load_digits()
    x = (bundle.data.astype(np.float32) / np.float32(16)).reshape(-1, 8, 8, 1)
    order = np.random.default_rng(3).permutation(len(x))
    n_test = int(round(len(x) * 0.2))
    assert data["x_test"].tobytes() == x[order[:n_test]].tobytes()
    assert data["x_train"].tobytes() == x[order[n_test:]].tobytes()
    assert data["y_train"].tolist() == bundle.target[order[n_test:]].tolist()


@pytest.mark.parametrize(
    "content, says",
    [
        (b"not gzip at all", "cannot read"),
        (gzip.compress(b"1,2,3\n4,5,6\n"), "expected (N, 65)"),
        (gzip.compress(b"\xff\xfe,1\n"), "cannot read"),
        (gzip.compress(b"0," * 64 + b"x\n"), "cannot read"),
    ],
)
def test_a_damaged_digits_file_is_a_clear_stage_error(tmp_path, content, says):
    path = tmp_path / "digits.csv.gz"
    path.write_bytes(content)
    with pytest.raises(StageError) as info:
        _read_digits_csv(path)
    assert says in str(info.value)


def test_a_digits_file_that_decompresses_without_bound_is_refused(tmp_path):
    path = tmp_path / "digits.csv.gz"
    path.write_bytes(gzip.compress(b"0," * (3 << 20)))  # 6 MiB of text from a few KiB
    with pytest.raises(StageError, match="not the digits file"):
        _read_digits_csv(path)
