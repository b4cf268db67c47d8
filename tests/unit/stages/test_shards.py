"""The train stage reads an image source's shards only as manifest.json describes them: a
shard that disagrees (shape, dtype, labels, members, name) is refused naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.stage import StageError
from stages._io import write_npz
from stages._shards import Shards


def manifest(**over) -> dict:
    doc = {
        "input_shape": [4, 4, 3],
        "classes": 3,
        "scale": 255.0,
        "input_range": [0.0, 1.0],
        "shards": [
            {"file": "train-00000.npz", "split": "train", "rows": 5},
            {"file": "test-00000.npz", "split": "test", "rows": 2},
        ],
    }
    doc.update(over)
    return doc


def write(source: Path, name: str, x: np.ndarray, y: np.ndarray) -> None:
    write_npz(source / "shards" / name, {"x": x, "y": y})


def good(source: Path) -> Shards:
    write(source, "train-00000.npz", np.zeros((5, 4, 4, 3), np.uint8), np.arange(5) % 3)
    write(source, "test-00000.npz", np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 2]))
    return Shards.from_manifest(manifest(), source)


def test_a_well_formed_shard_set_loads(tmp_path: Path) -> None:
    shards = good(tmp_path)
    x, y = shards.load("train-00000.npz", 5)
    assert x.shape == (5, 4, 4, 3) and y.tolist() == [0, 1, 2, 0, 1]
    assert shards.labels("test").tolist() == [0, 2] and shards.test_rows == 2
    assert shards.validation_rows(0.4) == 2


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.zeros((5, 4, 4, 1), np.uint8), np.zeros(5, np.int64), "manifest.json says uint8"),
        (np.zeros((5, 4, 4, 3), np.float32), np.zeros(5, np.int64), "float32"),
        (np.zeros((5, 4, 4, 3), np.uint8), np.full(5, 7, np.int64), "labels are not 5 ints"),
        (np.zeros((5, 4, 4, 3), np.uint8), np.zeros(4, np.int64), "labels are not 5 ints"),
    ],
)
def test_a_shard_that_disagrees_with_the_manifest_is_refused(tmp_path, x, y, message) -> None:
    shards = good(tmp_path)
    write(tmp_path, "train-00000.npz", x, y)
    with pytest.raises(StageError, match=message):
        shards.load("train-00000.npz", 5)


def test_an_unreadable_shard_is_refused_naming_it(tmp_path: Path) -> None:
    shards = good(tmp_path)
    (tmp_path / "shards" / "train-00000.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(StageError, match=r"train-00000.npz is not readable"):
        shards.load("train-00000.npz", 5)


@pytest.mark.parametrize(
    "over",
    [
        {"shards": [{"file": "../../etc/passwd", "split": "train", "rows": 1}]},
        {"shards": [{"file": "test-00000.npz", "split": "train", "rows": 1}]},
        {"shards": [{"file": "train-00000.npz", "split": "train", "rows": 0}]},
        {"shards": "many"},
        {"input_shape": [4, 4]},
        {"classes": 1},
        {"scale": None},
    ],
)
def test_a_manifest_that_does_not_describe_shards_is_refused(tmp_path, over) -> None:
    with pytest.raises(StageError):
        Shards.from_manifest(manifest(**over), tmp_path)
