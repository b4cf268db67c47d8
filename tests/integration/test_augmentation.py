"""Augmentation with real TensorFlow: the one projective transform against ImageDataGenerator,
the tf.data pipeline's seeded determinism, and a trained model that carries no augmentation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.scan.model import scan_path
from pipeline.stage import StageContext
from stages.source import SourceParams, SourceStage
from stages.train import Augmentation, TrainParams, compose_transforms, make_datasets

pytestmark = [pytest.mark.tensorflow]

SEED_KNOBS = {
    "rotation_range": 20,
    "width_shift_range": 0.2,
    "height_shift_range": 0.2,
    "shear_range": 0.2,
    "zoom_range": 0.2,
    "horizontal_flip": True,
    "fill_mode": "nearest",
}


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    return tensorflow


def _projective(tf, image, mode, cval, **kw):
    p = {"theta": 0.0, "tx": 0.0, "ty": 0.0, "shear": 0.0, "zx": 1.0, "zy": 1.0} | kw
    one = lambda v: np.array([v], np.float64)  # noqa: E731
    n = image.shape[0]
    t = compose_transforms(
        np,
        one(math.radians(p["theta"])),
        one(p["tx"]),
        one(p["ty"]),
        one(math.radians(p["shear"])),
        one(p["zx"]),
        one(p["zy"]),
        one(-1.0 if p.get("flip_horizontal") else 1.0),
        one(-1.0 if p.get("flip_vertical") else 1.0),
        n,
        n,
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=t.astype(np.float32),
        output_shape=[n, n],
        fill_value=cval,
        interpolation="BILINEAR",
        fill_mode=mode.upper(),
    )[0].numpy()


CASES = [
    {},
    {"tx": 2},
    {"ty": -3},
    {"flip_horizontal": True},
    {"flip_vertical": True},
    {"theta": 17},
    {"shear": 12},
    {"zx": 1.2, "zy": 0.85},
    {
        "theta": 20,
        "tx": 3.2,
        "ty": -2.2,
        "shear": 11,
        "zx": 1.1,
        "zy": 0.9,
        "flip_horizontal": True,
    },
]


@pytest.mark.parametrize("mode", ["nearest", "reflect", "constant"])
def test_one_transform_resamples_exactly_as_image_data_generator(tf, mode):
    """For the same drawn parameters, the same pixels (scipy's `grid-constant` for constant:
    TensorFlow interpolates towards cval across the edge; see the README)."""
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    idg = ImageDataGenerator(fill_mode=mode, cval=0.5)
    if mode == "constant":
        idg.fill_mode = "grid-constant"
    for case in CASES:
        # ImageDataGenerator's `tx` moves columns (x) and `ty` rows (y), as ours do.
        expected = idg.apply_transform(image, case)
        got = _projective(tf, image, mode, 0.5, **case)
        assert np.abs(expected - got).max() <= 1e-5, case


def _epoch_batches(tf, dataset) -> list[np.ndarray]:
    return [x.numpy() for x, _ in dataset]


def test_the_input_pipeline_augments_anew_each_epoch_and_alike_for_a_seed(tf):
    x = np.random.default_rng(1).random((64, 8, 8, 1)).astype(np.float32)
    y = np.arange(64) % 10
    p = TrainParams(augmentation=Augmentation(**SEED_KNOBS), batch_size=16, validation_split=0.25)
    tf.keras.utils.set_random_seed(p.seed)
    train, val = make_datasets(tf, x, y, p)
    first, second = _epoch_batches(tf, train), _epoch_batches(tf, train)
    assert len(first) == len(second) == 3 and first[0].shape == (16, 8, 8, 1)
    assert not np.array_equal(first[0], second[0]), "each epoch draws new transforms"
    tf.keras.utils.set_random_seed(p.seed)
    again, _ = make_datasets(tf, x, y, p)
    assert all(np.array_equal(a, b) for a, b in zip(first, _epoch_batches(tf, again), strict=True))
    # validation is never augmented
    assert np.array_equal(np.concatenate(_epoch_batches(tf, val)), x[48:])
    plain, _ = make_datasets(tf, x, y, TrainParams(batch_size=16, validation_split=0.25))
    assert sorted(np.concatenate(_epoch_batches(tf, plain)).sum(axis=(1, 2, 3))) == sorted(
        x[:48].sum(axis=(1, 2, 3))
    ), "no knobs: the images pass through untouched"


def _train(tmp: Path, dataset_dir: Path, augmentation: dict) -> Path:
    """The train stage as the runner starts it: `python -I -m stages.train SPEC`."""
    tmp.mkdir()
    params = {"epochs": 2, "seed": 7, "augmentation": augmentation}
    spec = {
        "run_id": "r",
        "stage": "train",
        "params": params,
        "inputs": {"source": os.path.relpath(dataset_dir, tmp)},
        "outputs": [
            "model.keras",
            "saved_model/",
            "metrics.json",
            "training_curves.png",
            "confusion_matrix.png",
        ],
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TF_DETERMINISTIC_OPS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "MPLBACKEND": "Agg",
    }
    proc = subprocess.run(
        [sys.executable, "-I", "-m", "stages.train", "spec.json"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "model.keras"


@pytest.mark.slow
def test_augmented_training_is_byte_identical_and_the_model_holds_no_augmentation(tf, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    SourceStage().run(
        StageContext(
            run_id="r",
            stage="source",
            params=SourceParams(dataset="sklearn-digits", seed=7),
            workdir=source,
            inputs={},
            outputs=("dataset.npz", "manifest.json"),
        )
    )
    first = _train(tmp_path / "a", source, SEED_KNOBS)
    second = _train(tmp_path / "b", source, SEED_KNOBS)
    plain = _train(tmp_path / "c", source, {})
    assert first.read_bytes() == second.read_bytes(), "same seed, same weights, same bytes"
    assert first.read_bytes() != plain.read_bytes(), "the augmentation changed what was learned"

    with zipfile.ZipFile(first) as zf:
        config = zf.read("config.json").decode()
    assert "Random" not in config, "augmentation lives in the input pipeline, not in the model"
    metrics = json.loads((first.parent / "metrics.json").read_text())
    assert metrics["model"]["layers"] == ["Conv2D", "MaxPooling2D", "Flatten", "Dense"]
    assert metrics["params"]["augmentation"]["rotation_range"] == 20

    report = scan_path(first)
    assert report.ok("low"), [str(f.location) for f in report.findings]
    model = tf.keras.models.load_model(first, safe_mode=True)
    assert model.output_shape == (None, 10)
