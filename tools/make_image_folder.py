"""Write an image folder for the images-cnn config, the tests and the bench: scikit-learn's
bundled 8x8 digits upscaled to 64x64 RGB PNGs, one sub-folder per class.

    .venv/bin/python tools/make_image_folder.py DIR [--count N] [--archive zip|tar.gz]

Nothing is downloaded. Image i is digit i mod 1797 with its index written into the corner
pixel, so every file is distinct (a content-addressed tool cannot deduplicate them). The
same N gives the same bytes with the same Pillow and zlib (the locked ones).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.source import _bundled_digits_file, _read_digits_csv  # noqa: E402


def make_image_folder(root: Path, count: int, *, size: int = 64) -> Path:
    """`count` PNGs under root/<class>/<index>.png; returns root."""
    from PIL import Image

    x, y = _read_digits_csv(_bundled_digits_file()[0])
    digits = (x.reshape(-1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
    block = np.ones((size // 8, size // 8), np.uint8)
    for label in sorted(set(int(v) for v in y)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        j = i % len(digits)
        gray = np.kron(digits[j], block)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        rgb[0, 0] = (i & 0xFF, (i >> 8) & 0xFF, (i >> 16) & 0xFF)
        Image.fromarray(rgb, "RGB").save(root / str(int(y[j])) / f"{i:06d}.png", optimize=False)
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--count", type=int, default=1797)
    ap.add_argument("--archive", choices=("zip", "tar.gz"))
    args = ap.parse_args()
    if args.dir.exists():
        print(f"{args.dir} exists; choose a new directory", file=sys.stderr)
        return 2
    make_image_folder(args.dir, args.count)
    if args.archive:
        fmt = "zip" if args.archive == "zip" else "gztar"
        out = shutil.make_archive(str(args.dir), fmt, args.dir.parent, args.dir.name)
        print(out)
    else:
        print(args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
