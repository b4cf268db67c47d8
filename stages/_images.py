"""Image datasets into shards: decode (Pillow) every pinned file to the configured size and
channels, label it (class folders or a labels file), split it by a seeded hash of its path,
and write .npz shards of uint8 pixels. Memory stays flat: decoded rows go to a scratch file,
and one shard is in memory at a time.

Pillow, not TensorFlow: the source stage's process never pays TensorFlow's import.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import struct
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline import bounded
from pipeline.datasets import DatasetSource, Manifest
from pipeline.errors import InputError
from pipeline.hashing import sha256_file, workers
from pipeline.stage import StageError
from stages._io import write_npz

if TYPE_CHECKING:
    import numpy as np

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
# The formats a dataset may hold: Pillow tries only these plugins, not every one it knows.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
BATCH = 128  # files per decode task: amortises the pool's overhead on 10 KiB images


class Unreadable(Exception):
    """One file that is not an image this stage can decode (a reason, not a crash)."""


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    # What Pillow's plugins raise on hostile or broken bytes: UnidentifiedImageError and
    # truncation are OSErrors; broken chunks are SyntaxError, ValueError or struct.error;
    # some plugins index or divide by header fields they read (IndexError, ZeroDivisionError).
    return (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        struct.error,
        IndexError,
        ZeroDivisionError,
        TypeError,
        KeyError,
        Image.DecompressionBombError,
    )


@dataclass
class Decoder:
    """Bytes of one file -> uint8 (H, W, C) at the configured size, deterministically for a
    given Pillow: decode, convert to the mode, resize with the named filter."""

    size: tuple[int, int]  # (height, width)
    channels: int
    interpolation: Interpolation = "bilinear"
    cap: int = field(init=False)
    errors: tuple[type[BaseException], ...] = field(init=False)

    def __post_init__(self) -> None:
        from PIL import Image

        self.cap = bounded.IMAGE_PIXELS.value()
        # Pillow's own guard warns at its limit and raises at twice it; ours refuses at the
        # cap, from the header, before a pixel is decoded.
        Image.MAX_IMAGE_PIXELS = self.cap
        # that warning is for the images refused below; the refusal says it, once per file
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        self.errors = _decode_errors()

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size[0], self.size[1], self.channels)

    def decode(self, data: bytes) -> np.ndarray:
        """uint8 (H, W, C), or Unreadable saying why."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                w, h = im.size
                if w <= 0 or h <= 0 or w * h > self.cap:
                    raise Unreadable(
                        f"{w}x{h} pixels, more than {bounded.IMAGE_PIXELS.describe(self.cap)}"
                    )
                im.load()  # truncated data raises here (LOAD_TRUNCATED_IMAGES stays off)
                mode = MODES[self.channels]
                out = im if im.mode == mode else im.convert(mode)
                if out.size != (self.size[1], self.size[0]):
                    resample = getattr(Image.Resampling, self.interpolation.upper())
                    out = out.resize((self.size[1], self.size[0]), resample)
                arr = np.asarray(out, dtype=np.uint8)
        except Unreadable:
            raise
        except UnidentifiedImageError:
            raise Unreadable(f"not an image in a known format ({', '.join(FORMATS)})") from None
        except self.errors as e:
            text = str(e) or type(e).__name__
            raise Unreadable(text[:200]) from e
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape != self.shape:  # unreachable after convert+resize; refuse, not crash
            raise Unreadable(f"decoded to shape {arr.shape}, not {self.shape}")
        return arr


def split_key(seed: int, path: str) -> float:
    """Where a file falls in [0, 1): sha256 of the seed and its path, so adding or removing
    files never moves another file between train and test."""
    h = hashlib.sha256(f"{seed}\0{path}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


SPLIT_RULE = "test if int(sha256(f'{seed}\\0{path}')[:8 bytes], big-endian) / 2**64 < test_fraction"


def _class_sort_key(name: str) -> tuple[int, int | str]:
    # numeric class names in numeric order ("2" before "10"), then the rest as text
    return (0, int(name)) if name.isdigit() else (1, name)


def parse_labels(name: str, data: bytes, where: str) -> dict[str, str]:
    """{relative path: class name} from a CSV (header `path,label`) or a JSON object."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StageError(f"{where}: labels file {name} is not UTF-8 text") from e
    out: dict[str, str] = {}
    if name.lower().endswith(".json"):
        try:
            doc = bounded.loads_json(data, source=f"labels file {name}")
        except InputError as e:
            raise StageError(f"{where}: {e.message}") from e
        if not isinstance(doc, dict):
            raise StageError(f"{where}: labels file {name} must be a JSON object {{path: label}}")
        for k, v in doc.items():
            if isinstance(v, bool) or not isinstance(v, str | int):
                raise StageError(f"{where}: {name}: the label of {k!r} is not text or an integer")
            out[k] = str(v)
        return out
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header[:2]] != ["path", "label"]:
        raise StageError(
            f"{where}: labels file {name} must start with the header `path,label`",
            hint="one row per image: its path inside the dataset, then its class",
        )
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0] or not row[1].strip():
            raise StageError(f"{where}: {name}:{line}: expected `path,label`, got {row[:3]!r}")
        if row[0] in out:
            raise StageError(f"{where}: {name}:{line}: {row[0]} is labelled twice")
        out[row[0]] = row[1].strip()
    return out


@dataclass
class Ingested:
    """What the source stage records about an image dataset."""

    manifest: Manifest
    class_names: list[str]
    shards: list[dict[str, Any]]
    split: dict[str, Any]
    skipped: list[dict[str, str]]
    input_range: list[float]
    examples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _pillow_version() -> str:
    import PIL

    return str(PIL.__version__)


class _Scratch:
    """Decoded rows by index in an unlinked scratch file (pwrite/pread: page cache, not
    this process's memory, however many images there are)."""

    def __init__(self, row_bytes: int) -> None:
        fd, name = tempfile.mkstemp(prefix="decoded-", suffix=".u8")
        os.unlink(name)
        self.fd, self.row = fd, row_bytes

    def put(self, i: int, arr: np.ndarray) -> None:
        os.pwrite(self.fd, arr.tobytes(), i * self.row)

    def get(self, i: int) -> bytes:
        return os.pread(self.fd, self.row, i * self.row)

    def close(self) -> None:
        os.close(self.fd)


def ingest(
    source: DatasetSource,
    manifest: Manifest,
    out_dir: Path,
    *,
    decoder: Decoder,
    labels: str | None,
    on_unreadable: Literal["refuse", "skip"],
    seed: int,
    test_fraction: float,
    shard_size: int,
    say: Callable[[str], None] = print,
) -> Ingested:
    """Decode, label, split and shard every file of the (already pin-checked) manifest."""
    import numpy as np  # imported when images are ingested, not when the config is loaded

    where = str(source.path)
    pinned = manifest.by_path()
    if labels is not None and labels not in pinned:
        raise StageError(
            f"{where} has no labels file {labels!r}",
            hint="`labels:` names a CSV or JSON file inside the dataset, relative to its root",
        )
    examples = [f.path for f in manifest.files if f.path != labels]
    index = {p: i for i, p in enumerate(examples)}
    if not examples:
        raise StageError(f"{where} holds no image files")
    scratch = _Scratch(int(np.prod(decoder.shape)))
    bad: dict[str, str] = {}
    lo, hi = 255, 0
    label_bytes: bytes | None = None
    try:
        with ThreadPoolExecutor(max_workers=workers()) as pool:
            pending: list[Future[list[tuple[str, np.ndarray | str]]]] = []

            def drain(keep: int) -> None:
                nonlocal lo, hi
                while len(pending) > keep:
                    for name, result in pending.pop(0).result():
                        if isinstance(result, str):
                            bad[name] = result
                            if on_unreadable == "refuse":
                                raise StageError(
                                    f"{where}: {name} is not an image that can be decoded to "
                                    f"{decoder.shape[1]}x{decoder.shape[0]} "
                                    f"{MODES[decoder.channels]}: {result}",
                                    hint="remove or replace the file (then pin the new "
                                    "digest), or set `on_unreadable: skip` to leave it out",
                                )
                        else:
                            scratch.put(index[name], result)
                            lo, hi = min(lo, int(result.min())), max(hi, int(result.max()))

            batch: list[tuple[str, bytes]] = []
            for name, data in source.read_all():
                entry = pinned.get(name)
                # The bytes decoded are the bytes pinned: re-hashed as they are read, so a file
                # rewritten after the manifest was checked is refused, not silently used.
                if entry is None or hashlib.sha256(data).hexdigest() != entry.sha256:
                    raise StageError(
                        f"{where}: {name} changed after its digest was checked",
                        hint="nothing may write the dataset while a run reads it; run again",
                    )
                if name == labels:
                    label_bytes = data
                    continue
                batch.append((name, data))
                if len(batch) >= BATCH:
                    pending.append(pool.submit(_decode_batch, decoder, batch))
                    batch = []
                    drain(2 * workers())
            if batch:
                pending.append(pool.submit(_decode_batch, decoder, batch))
            drain(0)
        kept = [p for p in examples if p not in bad]
        if not kept:
            raise StageError(f"{where}: none of its {len(examples)} files could be decoded")
        class_of = _labels(where, kept, labels, label_bytes, examples)
        class_names = sorted(set(class_of.values()), key=_class_sort_key)
        if len(class_names) < 2:
            raise StageError(
                f"{where} has {len(class_names)} class ({class_names}); a classifier needs two"
            )
        class_index = {c: i for i, c in enumerate(class_names)}
        keyed = sorted((split_key(seed, p), p) for p in kept)
        test = [p for k, p in keyed if k < test_fraction]
        train = [p for k, p in keyed if k >= test_fraction]
        if not test or not train:
            raise StageError(
                f"{where}: the split gives {len(train)} training and {len(test)} held-out "
                f"images (test_fraction {test_fraction}); each needs at least one",
                hint="add images, or change test_fraction",
            )
        shards: list[dict[str, Any]] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for split_name, names in (("train", train), ("test", test)):
            for n, start in enumerate(range(0, len(names), shard_size)):
                chunk = names[start : start + shard_size]
                x = np.frombuffer(
                    b"".join(scratch.get(index[p]) for p in chunk), dtype=np.uint8
                ).reshape((len(chunk), *decoder.shape))
                y = np.array([class_index[class_of[p]] for p in chunk], dtype=np.int64)
                rel = f"{split_name}-{n:05d}.npz"
                write_npz(out_dir / rel, {"x": x, "y": y})
                shards.append(
                    {
                        "file": rel,
                        "split": split_name,
                        "rows": len(chunk),
                        "sha256": sha256_file(out_dir / rel),
                    }
                )
            say(f"{split_name}: {len(names)} images in {n + 1} shard(s)")
    finally:
        scratch.close()
    return Ingested(
        manifest=manifest,
        class_names=class_names,
        shards=shards,
        split={
            "method": SPLIT_RULE,
            "seed": seed,
            "test_fraction": test_fraction,
            "train": len(train),
            "test": len(test),
        },
        skipped=[{"path": p, "reason": r} for p, r in sorted(bad.items())],
        input_range=[float(lo), float(hi)],
        examples=len(kept),
        extra={
            "library": f"Pillow {_pillow_version()}",
            "mode": MODES[decoder.channels],
            "image_size": list(decoder.size),
            "interpolation": decoder.interpolation,
        },
    )


def _decode_batch(decoder: Decoder, batch: list[tuple[str, bytes]]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name, data in batch:
        try:
            out.append((name, decoder.decode(data)))
        except Unreadable as e:
            out.append((name, str(e)))
    return out


def _labels(
    where: str,
    kept: list[str],
    labels: str | None,
    label_bytes: bytes | None,
    examples: list[str],
) -> dict[str, str]:
    """{path: class name}: from the labels file, else each file's top-level folder."""
    if labels is None:
        loose = [p for p in kept if "/" not in p]
        if loose:
            raise StageError(
                f"{where}: {loose[0]} (and {len(loose) - 1} more) is not in a class folder",
                hint="put each image in a sub-folder named after its class, or give `labels:`",
            )
        return {p: p.split("/", 1)[0] for p in kept}
    if label_bytes is None:  # listed, pinned, but not read: the archive lied
        raise StageError(f"{where}: its labels file {labels} could not be read")
    given = parse_labels(labels, label_bytes, where)
    present = set(examples)
    unknown = sorted(set(given) - present)
    if unknown:
        raise StageError(
            f"{where}: {labels} labels {unknown[0]}, which is not in the dataset "
            f"({len(unknown)} such path(s))",
            hint="paths in the labels file are relative to the dataset's root",
        )
    unlabelled = [p for p in kept if p not in given]
    if unlabelled:
        raise StageError(
            f"{where}: {unlabelled[0]} has no label in {labels} ({len(unlabelled)} such file(s))",
            hint="label every image, or remove the ones without a label",
        )
    return {p: given[p] for p in kept}
