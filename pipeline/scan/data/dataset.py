"""Read a dataset to screen, within caps: an .npz of numeric arrays, or a run's canonical one.

An .npz is a zip of .npy files and hostile: every member's header is read (and object
arrays, which only a pickle can load, refused) before any array is allocated, and the total
decoded size is capped.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat

from pipeline import bounded
from pipeline.hashing import sha256_file
from pipeline.scan.data.interface import DataScreenError, Dataset

DATA_BYTES = bounded.Cap("CHAINPROOF_MAX_DATA_BYTES", 1024 * bounded.MIB, "bytes")
MAX_MEMBERS = 16
MAX_ROWS = 2_000_000
CANONICAL = "dataset.npz"  # what the source stage writes in its directory
_ARRAYS = ("x", "y", "x_train", "y_train", "x_test", "y_test")
_HINT = "write it with numpy.savez from numeric arrays x and y (no object arrays)"


def resolve(path: Path) -> Path:
    """A dataset file: the path itself, or the canonical dataset of a run directory."""
    if path.is_dir():
        found = sorted(path.glob(f"*/{CANONICAL}"))
        if len(found) != 1:
            raise DataScreenError(
                f"{path} is a directory but holds {len(found)} <stage>/{CANONICAL} files",
                hint="pass a run directory (runs/<id>) with one source stage, or the .npz itself",
            )
        return found[0]
    if not path.is_file():
        raise DataScreenError(f"no dataset at {path}", hint="pass an .npz or a run directory")
    return path


def _headers(
    path: Path, zf: zipfile.ZipFile, limit: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise DataScreenError(f"{path} has {len(infos)} members; a dataset has a few", hint=_HINT)
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    for info in infos:
        name = info.filename.removesuffix(".npy")
        if name not in _ARRAYS:
            continue
        with zf.open(info) as fh:
            version = npformat.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = npformat.read_array_header_1_0(fh, max_header_size=10_000)
            else:
                shape, _, dtype = npformat.read_array_header_2_0(fh, max_header_size=10_000)
        if dtype.hasobject:
            raise DataScreenError(
                f"{path}: array {name!r} has dtype {dtype.str!r}, which holds Python objects as "
                "a pickle; pickles are never loaded",
                hint=_HINT,
            )
        if dtype.kind not in "biuf":
            raise DataScreenError(
                f"{path}: array {name!r} is {dtype.str!r}, not numeric", hint=_HINT
            )
        total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if total > limit or info.file_size > limit:
            raise bounded.LimitExceeded(
                f"{path} decodes to more than {DATA_BYTES.describe(limit)}",
                cap=DATA_BYTES,
                limit=limit,
                source=str(path),
            )
        out[name] = (tuple(shape), dtype)
    return out


def load(path: Path) -> Dataset:
    """The arrays of an .npz (x, y; or x_train, y_train[, x_test, y_test]) as a Dataset."""
    path = resolve(path)
    limit = DATA_BYTES.value()
    if path.stat().st_size > limit:
        raise bounded.LimitExceeded(
            f"{path} is larger than {DATA_BYTES.describe(limit)}",
            cap=DATA_BYTES,
            limit=limit,
            source=str(path),
        )
    try:
        with zipfile.ZipFile(path) as zf:
            headers = _headers(path, zf, limit)
        pair = ("x", "y") if "x" in headers else ("x_train", "y_train")
        if pair[0] not in headers or pair[1] not in headers:
            raise DataScreenError(
                f"{path} must hold arrays x and y (or x_train and y_train); it has "
                f"{sorted(headers)}",
                hint=_HINT,
            )
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in headers}
    # A zip that is not one or is cut short, a member numpy cannot parse, an unreadable file.
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        raise DataScreenError(
            f"{path} is not a readable .npz of numeric arrays: {e}", hint=_HINT
        ) from e
    x, y = _checked(path, arrays[pair[0]], arrays[pair[1]], pair)
    x_test = y_test = None
    if pair[0] == "x_train" and "x_test" in arrays and "y_test" in arrays:
        x_test, y_test = _checked(path, arrays["x_test"], arrays["y_test"], ("x_test", "y_test"))
        if x_test.shape[1] != x.shape[1]:
            raise DataScreenError(f"{path}: x_test rows differ in shape from x_train rows")
    return Dataset(
        x=x,
        y=y,
        name=path.name,
        x_test=x_test,
        y_test=y_test,
        image_shape=tuple(arrays[pair[0]].shape[1:]),
        sha256=sha256_file(path),
    )


def _checked(
    path: Path, x: np.ndarray, y: np.ndarray, names: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DataScreenError(
            f"{path}: {names[0]} has shape {x.shape} and {names[1]} {y.shape}; expected rows of "
            f"features and one label per row",
            hint=_HINT,
        )
    if not 2 <= len(x) <= MAX_ROWS:
        raise DataScreenError(f"{path}: {len(x)} rows; expected 2 to {MAX_ROWS}")
    flat = x.reshape(len(x), -1).astype(np.float64)
    if not np.isfinite(flat).all():
        raise DataScreenError(f"{path}: {names[0]} holds NaN or infinite values", hint=_HINT)
    if y.dtype.kind == "f" and not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataScreenError(f"{path}: {names[1]} holds non-integer labels")
    labels = y.astype(np.int64)
    if labels.min() < 0 or labels.max() >= 10_000:
        raise DataScreenError(
            f"{path}: labels must be 0..K-1 (K < 10000); found {labels.min()}..{labels.max()}"
        )
    return flat, labels
