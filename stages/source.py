"""Data sourcing: one dataset, pinned by sha256, split reproducibly, written canonically.

Sources: scikit-learn's bundled digits (offline, the default), a local .npz/.csv file, an
image folder (one sub-folder per class, or a labels file) or a .zip/.tar.gz of one, or an
http(s) URL of a file or an archive. Every path or URL carries a sha256 pin: of the file's
bytes, or for images of the dataset's canonical manifest (pipeline/datasets.py); a mismatch
refuses and names both digests (and, given the pinned manifest, the files that differ).
Images are decoded with Pillow into .npz shards the train stage streams.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from pipeline import datasets
from pipeline.hashing import sha256_file
from pipeline.stage import Params, Stage, StageContext, StageError, main
from pipeline.workspace import DATA_MANIFEST, SHARDS_DIR
from stages import _images
from stages._io import write_json, write_npz

if TYPE_CHECKING:
    import numpy as np

DATASET = "dataset.npz"
MANIFEST = "manifest.json"
IMAGE_OUTPUTS = (MANIFEST, DATA_MANIFEST, SHARDS_DIR)
SHARD_MAX_BYTES = 256 << 20
_IMAGE_KEYS = (
    "image_size",
    "channels",
    "labels",
    "manifest",
    "on_unreadable",
    "interpolation",
    "shard_size",
)


class SourceParams(Params):
    dataset: Literal["sklearn-digits"] | None = None
    path: str | None = Field(
        None,
        description="local .npz (arrays x, y) or .csv (label last), or an image folder, "
        ".zip, .tar or .tar.gz",
    )
    url: str | None = Field(None, pattern=r"^https?://")
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="of the file's bytes; for images, of the manifest (`chainproof data digest`)",
    )
    name: str | None = None
    image_shape: tuple[int, ...] | None = None
    scale: float | None = Field(None, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 42
    download_timeout: int = Field(60, gt=0)
    # Image datasets only.
    image_size: tuple[int, int] = Field((64, 64), description="(height, width) after decoding")
    channels: Literal[1, 3, 4] = 3
    interpolation: _images.Interpolation = "bilinear"
    labels: str | None = Field(
        None, description="CSV (path,label) or JSON {path: label} inside the dataset"
    )
    manifest: str | None = Field(
        None, description="the pinned manifest file: a mismatch then names the files"
    )
    on_unreadable: Literal["refuse", "skip"] = "refuse"
    shard_size: int = Field(1024, gt=0, le=65536, description="images per .npz shard")

    @model_validator(mode="after")
    def _one_source(self) -> SourceParams:
        given = [k for k in ("dataset", "path", "url") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give exactly one of dataset, path, url (got {given})")
        if (self.path or self.url) and not self.sha256:
            raise ValueError("a path or url source needs a sha256 pin of its bytes")
        if self.images:
            if self.image_shape is not None:
                raise ValueError("image_shape is for .npz/.csv arrays; images use image_size")
            if min(self.image_size) < 1 or max(self.image_size) > 4096:
                raise ValueError(f"image_size {self.image_size} must be 1..4096 on each side")
            # one shard is what the source and train stages hold in memory at a time
            shard_bytes = self.shard_size * self.image_size[0] * self.image_size[1] * self.channels
            if shard_bytes > SHARD_MAX_BYTES:
                raise ValueError(
                    f"shard_size {self.shard_size} of {self.image_size[0]}x{self.image_size[1]}"
                    f"x{self.channels} images is {shard_bytes >> 20} MiB a shard; keep it under "
                    f"{SHARD_MAX_BYTES >> 20} MiB (fewer images a shard)"
                )
        else:
            # by value, not model_fields_set: a validated config is dumped with every default
            # and validated again in the stage
            fields = type(self).model_fields
            set_keys = sorted(k for k in _IMAGE_KEYS if getattr(self, k) != fields[k].default)
            if set_keys:
                raise ValueError(f"{', '.join(set_keys)} apply to image folders and archives only")
        return self

    @property
    def images(self) -> bool:
        """A folder or an archive of image files (by the name: a config is checked first)."""
        where = self.path or self.url
        if where is None:
            return False
        if Path(where.split("?", 1)[0]).suffix.lower() in (".npz", ".csv"):
            return False
        return self.url is None or datasets.container_of(where) != "folder"


def _fetch(url: str, dest: Path, timeout: int) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise StageError(f"cannot download {url}: {e}", hint="check the URL and network") from e


# What numpy and zipfile raise for a file that is not what its name says: a zip that is not
# one or is cut short (BadZipFile, EOFError, zlib.error), an object array refused because
# pickles are never loaded (ValueError), an unreadable member (OSError).
_UNREADABLE = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _load_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x and y from a pinned .npz or .csv; anything unusable is a StageError naming the file."""
    import numpy as np  # here, not at import: `status` and `layout` load this module for its

    # Params only, and numpy's import is ~0.2 s of their start
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as d:
                keys = set(d.files)
                xk = "x" if "x" in keys else "X" if "X" in keys else None
                if xk is None or "y" not in keys:
                    raise StageError(f"{path} must hold arrays 'x' and 'y'; it has {sorted(keys)}")
                x, y = d[xk], d["y"]
        except _UNREADABLE as e:
            raise StageError(
                f"{path} is not a readable .npz of numeric arrays: {_why(e)}",
                hint="write it with numpy.savez from numeric arrays (no object arrays)",
            ) from e
    elif path.suffix == ".csv":
        try:
            table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        except _UNREADABLE as e:
            raise StageError(
                f"{path} is not a numeric CSV (features then label on each row): {_why(e)}"
            ) from e
        if table.shape[1] < 2:
            raise StageError(f"{path} needs at least one feature column and a label column")
        x, y = table[:, :-1], table[:, -1]
    else:
        raise StageError(f"unsupported data file {path.name}; expected .npz or .csv")
    for name, array in (("x", x), ("y", y)):
        if array.dtype.kind not in "biuf" or array.ndim == 0:
            raise StageError(
                f"{path}: array '{name}' holds {array.dtype} values with shape {array.shape}; "
                "expected numbers, one row per example"
            )
    if y.ndim != 1:
        raise StageError(f"{path}: labels 'y' have shape {y.shape}; expected one label per row")
    return x, y


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 300 else text[:300] + "…"


class SourceStage(Stage):
    kind = "source"
    Params = SourceParams
    outputs = (DATASET, MANIFEST)

    @classmethod
    def needs_network(cls, params: SourceParams) -> bool:
        return params.url is not None

    @classmethod
    def outputs_for(cls, params: SourceParams) -> tuple[str, ...]:
        return IMAGE_OUTPUTS if params.images else tuple(cls.outputs)

    @classmethod
    def external_inputs(cls, params: SourceParams) -> dict[str, str]:
        out = {"path": params.path} if params.path else {}
        if params.manifest:
            out["manifest"] = params.manifest
        return out

    def run(self, ctx: StageContext) -> None:
        import numpy as np

        p: SourceParams = ctx.params
        if p.images:
            self._images(ctx, p)
            return
        if p.path or p.url:
            x, y, origin = self._pinned(ctx, p)
        else:
            x, y, origin = self._digits()
        if len(x) != len(y) or len(x) < 2:
            raise StageError(f"x has {len(x)} rows and y {len(y)}; expected equal, at least 2")
        shape = p.image_shape or origin.pop("image_shape", None)
        x = x.astype(np.float32)
        if p.scale or origin.get("scale"):
            x = x / np.float32(p.scale or origin["scale"])
        if shape:
            x = x.reshape((len(x), *shape))
        y = y.astype(np.int64)
        classes = sorted(int(c) for c in np.unique(y))
        if classes != list(range(len(classes))):
            raise StageError(f"labels must be 0..K-1; found {classes[:20]}")

        order = np.random.default_rng(p.seed).permutation(len(x))
        n_test = max(1, int(round(len(x) * p.test_fraction)))
        test, train = order[:n_test], order[n_test:]
        write_npz(
            ctx.output(DATASET),
            {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]},
        )
        write_json(
            ctx.output(MANIFEST),
            {
                "name": p.name or origin["name"],
                "source": origin,
                "dataset_file": DATASET,
                "dataset_sha256": sha256_file(ctx.output(DATASET)),
                "classes": len(classes),
                "input_shape": list(x.shape[1:]),
                "split": {
                    "seed": p.seed,
                    "test_fraction": p.test_fraction,
                    "train": int(len(train)),
                    "test": int(len(test)),
                },
            },
        )
        print(f"dataset: {len(train)} train / {len(test)} test, shape {x.shape[1:]}")

    def _images(self, ctx: StageContext, p: SourceParams) -> None:
        """An image folder or archive: pin-check its manifest, decode, split, shard."""
        local, where = self._local(ctx, p, "path")
        pinned = None
        if p.manifest:
            pinned_path, _ = self._local(ctx, p, "manifest")
            pinned = datasets.read_manifest(pinned_path)
            if pinned.digest != p.sha256:
                raise StageError(
                    f"manifest {p.manifest} has digest sha256:{pinned.digest}, but the config "
                    f"pins sha256:{p.sha256}; it is not the pinned manifest",
                    hint="give `manifest:` the file `chainproof data digest --write-manifest` "
                    "wrote for the pinned data",
                )
        if not local.exists():
            raise StageError(f"image dataset {local} does not exist")
        try:
            source = datasets.DatasetSource(local)
            manifest = source.manifest()
            datasets.check_pin(where, manifest, p.sha256 or "", pinned)
            canonical = manifest.canonical_bytes()
            result = _images.ingest(
                source,
                manifest,
                ctx.output(SHARDS_DIR.rstrip("/")),
                decoder=_images.Decoder(p.image_size, p.channels, p.interpolation),
                labels=p.labels,
                on_unreadable=p.on_unreadable,
                seed=p.seed,
                test_fraction=p.test_fraction,
                shard_size=p.shard_size,
            )
        except datasets.DatasetError as e:
            raise StageError(e.message, hint=e.hint) from e
        from pipeline.fsutil import atomic_write_bytes

        atomic_write_bytes(ctx.output(DATA_MANIFEST), canonical)
        scale = p.scale or 255.0
        write_json(
            ctx.output(MANIFEST),
            {
                "name": p.name or (local.name if p.path else Path(where).stem),
                "source": {
                    "kind": "url" if p.url else "images",
                    "container": source.container,
                    "location": where,
                    "sha256": manifest.digest,
                    "digest_of": f"{DATA_MANIFEST} (the canonical manifest of every file)",
                    "files": len(manifest.files),
                    "bytes": manifest.total_bytes,
                },
                "manifest_file": DATA_MANIFEST,
                "classes": len(result.class_names),
                "class_names": result.class_names,
                "labels": p.labels or "class folders",
                "input_shape": [*p.image_size, p.channels],
                "dtype": "uint8",
                "scale": scale,
                "input_range": [v / scale for v in result.input_range],
                "decode": result.extra,
                "examples": result.examples,
                "skipped": result.skipped,
                "split": result.split,
                "shards_dir": SHARDS_DIR,
                "shards": result.shards,
            },
        )
        split = result.split
        print(
            f"dataset: {len(manifest.files)} files (sha256:{manifest.digest}), "
            f"{split['train']} train / {split['test']} test, {len(result.shards)} shards, "
            f"{len(result.skipped)} skipped"
        )

    def _local(self, ctx: StageContext, p: SourceParams, param: str) -> tuple[Path, str]:
        """The file or folder a param names (downloaded first for a URL), and how to name it."""
        if param == "path" and p.url:
            suffix = "".join(Path(p.url.split("?", 1)[0]).suffixes[-2:])
            local = Path(tempfile.mkdtemp()) / f"download{suffix}"
            _fetch(p.url, local, p.download_timeout)
            return local, p.url
        resolved = (ctx.extra.get("external") or {}).get(param)
        value = getattr(p, param)
        local = (
            Path(resolved)
            if resolved
            else Path(ctx.extra.get("config_dir", ".")) / Path(value).expanduser()
        )
        return local, str(local)

    def _digits(self) -> tuple[np.ndarray, np.ndarray, dict]:
        # Read scikit-learn's bundled file directly: importing sklearn.datasets for it costs
        # over a second of the stage's start-up. The arrays equal load_digits()'s exactly.
        bundled, version = _bundled_digits_file()
        x, y = _read_digits_csv(bundled)
        return (
            x,
            y,
            {
                "name": "sklearn-digits",
                "kind": "package",
                "location": f"scikit-learn {version}: sklearn/datasets/data/digits.csv.gz",
                "sha256": sha256_file(bundled),
                "image_shape": [8, 8, 1],
                "scale": 16.0,
            },
        )

    def _pinned(self, ctx: StageContext, p: SourceParams) -> tuple[np.ndarray, np.ndarray, dict]:
        if p.url:
            suffix = Path(p.url.split("?", 1)[0]).suffix
            # TMPDIR is the runner's per-stage scratch dir, outside the stage's products.
            local = Path(tempfile.mkdtemp()) / f"download{suffix}"
            _fetch(p.url, local, p.download_timeout)
            where = p.url
        else:
            # The runner resolved the path (relative to the config file, like every path in
            # a config) and bound that file read-only into the sandbox.
            resolved = (ctx.extra.get("external") or {}).get("path")
            local = (
                Path(resolved)
                if resolved
                else Path(ctx.extra.get("config_dir", ".")) / Path(p.path).expanduser()  # type: ignore[arg-type]
            )
            if not local.is_file():
                raise StageError(f"data file {local} does not exist")
            where = str(local)
        got = sha256_file(local)
        if got != p.sha256:
            raise StageError(
                f"{where} has sha256 {got}, but the config pins {p.sha256}",
                hint="the data changed; check where it came from before updating the pin",
            )
        x, y = _load_file(local)
        return (
            x,
            y,
            {
                "name": local.stem,
                "kind": "url" if p.url else "file",
                "location": where,
                "sha256": got,
            },
        )


# scikit-learn's digits: 1797 rows of 64 pixels and a label (56 KiB gzipped, 500 KiB of text).
DIGITS_COLUMNS = 65
DIGITS_MAX_TEXT = 4 << 20


def _bundled_digits_file() -> tuple[Path, str]:
    """Where the installed scikit-learn keeps digits.csv.gz, and its version, without
    importing scikit-learn (find_spec of a top-level package does not execute it)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec else []
    hint = "install scikit-learn in the stage's lock, or give the source a path or url"
    if not roots:
        raise StageError(
            "dataset 'sklearn-digits' needs scikit-learn, which is not installed", hint=hint
        )
    bundled = Path(roots[0]) / "datasets" / "data" / "digits.csv.gz"
    if not bundled.is_file():
        raise StageError(f"scikit-learn has no bundled digits at {bundled}", hint=hint)
    try:
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        raise StageError(
            f"{roots[0]} has no scikit-learn distribution metadata", hint=hint
        ) from None
    return bundled, version


def _read_digits_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The arrays sklearn.datasets.load_digits() returns (float64 pixels, int labels), parsed
    the way it parses them, from a bounded read of the file."""
    import gzip
    import io
    import zlib

    import numpy as np

    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read(DIGITS_MAX_TEXT + 1)
        if len(raw) > DIGITS_MAX_TEXT:
            raise StageError(f"{path} holds over {DIGITS_MAX_TEXT >> 20} MiB; not the digits file")
        table = np.loadtxt(io.StringIO(raw.decode("utf-8")), delimiter=",", ndmin=2)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as e:
        raise StageError(
            f"cannot read scikit-learn's bundled digits {path}: {e}",
            hint="reinstall scikit-learn from the lock (`make setup`)",
        ) from e
    if table.shape[1] != DIGITS_COLUMNS or not len(table):
        raise StageError(f"{path} has shape {table.shape}; expected (N, {DIGITS_COLUMNS})")
    return table[:, :-1], table[:, -1].astype(int, copy=False)


if __name__ == "__main__":
    raise SystemExit(main(SourceStage))
