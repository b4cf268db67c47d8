"""The train stage's side of an image dataset: the source stage's .npz shards, checked and
streamed with tf.data, so the stage's memory is a few shards and a shuffle buffer however
many images there are.

Shards are another stage's products: every one is read with allow_pickle=False and checked
against what manifest.json says (name, split, rows, dtype, shape, label range) before a
single value reaches TensorFlow.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stage import StageError

_NAME = re.compile(r"^(train|test)-\d{5}\.npz$")
_UNREADABLE = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class Shards:
    """The shards of one image dataset, as its source stage listed them."""

    directory: Path
    train: tuple[tuple[str, int], ...]  # (file name, rows)
    test: tuple[tuple[str, int], ...]
    shape: tuple[int, int, int]
    classes: int
    scale: float
    input_range: tuple[float, float]

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], source_dir: Path) -> Shards:
        """Checked view of manifest.json's shard list; anything off is a StageError."""
        where = f"{source_dir / 'manifest.json'}"
        try:
            shape = tuple(int(d) for d in manifest["input_shape"])
            classes = int(manifest["classes"])
            scale = float(manifest["scale"])
            lo, hi = (float(v) for v in manifest["input_range"])
            listed = manifest["shards"]
            if not isinstance(listed, list):
                raise TypeError("shards is not a list")
            parts: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
            for s in listed:
                name, split, rows = str(s["file"]), str(s["split"]), int(s["rows"])
                if not _NAME.match(name) or not name.startswith(f"{split}-") or rows < 1:
                    raise ValueError(f"shard entry {s!r}")
                parts[split].append((name, rows))
        except (KeyError, TypeError, ValueError) as e:
            raise StageError(
                f"{where} does not describe image shards: {e}",
                hint="it must be the product of a source stage on an image folder",
            ) from e
        if len(shape) != 3 or min(shape) < 1 or classes < 2 or not scale > 0:
            raise StageError(f"{where}: input_shape {shape}, classes {classes}, scale {scale}")
        if not parts["train"] or not parts["test"]:
            raise StageError(f"{where} lists no training or no held-out shard")
        return cls(
            directory=source_dir / "shards",
            train=tuple(parts["train"]),
            test=tuple(parts["test"]),
            shape=(shape[0], shape[1], shape[2]),
            classes=classes,
            scale=scale,
            input_range=(lo, hi),
        )

    @property
    def test_rows(self) -> int:
        return sum(r for _, r in self.test)

    def load(self, name: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """x (rows, H, W, C) uint8 and y (rows,) int64 of one shard, checked."""
        path = self.directory / name
        try:
            with np.load(path, allow_pickle=False) as d:
                if sorted(d.files) != ["x", "y"]:
                    raise ValueError(f"holds {sorted(d.files)}, not x and y")
                x, y = d["x"], d["y"]
        except _UNREADABLE as e:
            raise StageError(f"shard {path} is not readable: {str(e)[:200]}") from e
        if x.dtype != np.uint8 or x.shape != (rows, *self.shape):
            raise StageError(
                f"shard {path} holds {x.dtype} {x.shape}; manifest.json says uint8 "
                f"{(rows, *self.shape)}"
            )
        if (
            y.dtype != np.int64
            or y.shape != (rows,)
            or (len(y) and (y.min() < 0 or y.max() >= self.classes))
        ):
            raise StageError(f"shard {path}: labels are not {rows} ints in 0..{self.classes - 1}")
        return x, y

    def labels(self, split: str) -> np.ndarray:
        return np.concatenate([self.load(n, r)[1] for n, r in getattr(self, split)])

    def _rows(self, name: str, rows: int, part: str, validation_split: float) -> Iterator[Any]:
        x, y = self.load(name, rows)
        n_val = int(rows * validation_split)
        if part == "fit":
            yield x[: rows - n_val], y[: rows - n_val]
        elif part == "val":
            if n_val:
                yield x[rows - n_val :], y[rows - n_val :]
        else:
            yield x, y

    def validation_rows(self, validation_split: float) -> int:
        return sum(int(r * validation_split) for _, r in self.train)

    def dataset(
        self,
        tf: Any,
        part: str,
        *,
        batch_size: int,
        validation_split: float = 0.0,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ) -> Any:
        """Batches of (float32 images / scale, int64 labels) streamed from the shards.

        `part`: "fit" (training shards minus each one's validation tail, shards and rows
        shuffled per epoch from `seed`), "val" (those tails) or "test" (the held-out split).
        The validation tail of every shard is the images the source stage ordered last by
        their path's hash: a random sample, the same in every run.
        """
        files = self.test if part == "test" else self.train
        names = tf.constant([n for n, _ in files])
        rows = tf.constant([r for _, r in files], tf.int64)
        spec = (
            tf.TensorSpec((None, *self.shape), tf.uint8),
            tf.TensorSpec((None,), tf.int64),
        )

        def one(name: Any, n: Any) -> Any:
            return tf.data.Dataset.from_generator(
                lambda a, b: self._rows(a.decode(), int(b), part, validation_split),
                output_signature=spec,
                args=(name, n),
            )

        ds = tf.data.Dataset.from_tensor_slices((names, rows))
        if part == "fit":
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(one, cycle_length=2, block_length=1)
        ds = ds.unbatch()
        if part == "fit" and shuffle_buffer:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        scale = float(self.scale)
        return ds.batch(batch_size).map(
            lambda x, y: (tf.cast(x, tf.float32) / scale, y),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
