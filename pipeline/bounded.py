"""Bounded reads of hostile files: JSON and YAML within caps on size, nesting and YAML expansion.

Everything a stage, a bundle or a download supplies goes through here before it is parsed: the
size is checked before a byte is read, nesting is checked before a recursive parser sees it, and
YAML aliases are counted as what they expand to. Each refusal is an `InputError` naming the file
and the cap; a caller that reads evidence for verification turns it into a VerificationError.

The API, for any reader of hostile files (links, Statements, records, configs, OSV records):

    read_bytes(path, what=..., max_bytes=RECORD_BYTES)    the bytes, size-capped
    read_json(path, what=..., max_bytes=..., max_depth=DEPTH)
    loads_json(data, source=..., max_depth=DEPTH)         bytes already in hand (a DSSE payload)
    check_nesting(data, source=..., max_depth=DEPTH)      only the nesting check, no parse
    read_yaml(path, what=..., max_bytes=CONFIG_BYTES)     safe-constructed values
    compose_yaml(text, source=...)                        the node tree (for line numbers)

Caps are `Cap` values: a default, overridable per process by an environment variable (README:
"Limits on hostile input"); any function also takes a plain int for one call.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Cap:
    """One limit: its default, and the environment variable that overrides it."""

    env: str
    default: int
    unit: str

    def value(self) -> int:
        raw = os.environ.get(self.env)
        if raw is None or raw == "":
            return self.default
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value <= 0:
            raise InputError(
                f"${self.env}={raw!r} is not a positive whole number of {self.unit}",
                hint=f"unset it to use the default ({self.default} {self.unit})",
            )
        return value

    def describe(self, limit: int) -> str:
        return f"the {limit}-{self.unit.rstrip('s')} cap (${self.env})"


# Links, layouts, Statements and run records: chainproof writes them well under 1 MiB for a
# small dataset; a link naming ~100k files (base64 inside its DSSE envelope) reaches this
# cap. Parsed JSON can take ~20x its size in memory (an empty list is 56 bytes, `[]` two), so
# this cap is also the memory bound.
RECORD_BYTES = Cap("CHAINPROOF_MAX_RECORD_BYTES", 16 * MIB, "bytes")
CONFIG_BYTES = Cap("CHAINPROOF_MAX_CONFIG_BYTES", 1 * MIB, "bytes")  # pipeline configs (YAML)
KEY_BYTES = Cap("CHAINPROOF_MAX_KEY_BYTES", 64 * KIB, "bytes")  # public key files
# Nesting of any JSON or YAML value. chainproof's own documents nest < 10 deep; well under the
# interpreter's recursion limit, so nothing that walks a parsed value can overflow.
DEPTH = Cap("CHAINPROOF_MAX_DEPTH", 64, "levels")
# Nodes a YAML document expands to once its aliases are followed (a billion-laughs bomb is
# small on disk and exponential in memory). Configs have a few hundred.
YAML_NODES = Cap("CHAINPROOF_MAX_YAML_NODES", 100_000, "nodes")
# Datasets of files (pipeline/datasets.py): a folder or an archive of images. An image file
# is kilobytes to megabytes; the caps bound the time and memory of listing, hashing and
# decoding a hostile one, and an archive's expansion over its size (a bomb).
DATASET_FILES = Cap("CHAINPROOF_MAX_DATASET_FILES", 5_000_000, "files")
DATASET_FILE_BYTES = Cap("CHAINPROOF_MAX_DATASET_FILE_BYTES", 64 * MIB, "bytes")
DATASET_BYTES = Cap("CHAINPROOF_MAX_DATASET_BYTES", 256 * 1024 * MIB, "bytes")
DATASET_MANIFEST_BYTES = Cap("CHAINPROOF_MAX_DATASET_MANIFEST_BYTES", 1024 * MIB, "bytes")
ARCHIVE_RATIO = Cap("CHAINPROOF_MAX_ARCHIVE_RATIO", 100, "fold")
# Pixels of one decoded image before it is resized (a 64x64 dataset has no 40-megapixel file).
IMAGE_PIXELS = Cap("CHAINPROOF_MAX_IMAGE_PIXELS", 40_000_000, "pixels")


class LimitExceeded(InputError):
    """A hostile file is over a cap. `cap` is the limit's variable, `limit` its value;
    `line` and `reason` (the message without its source) are set for YAML."""

    def __init__(
        self,
        message: str,
        *,
        cap: Cap,
        limit: int,
        source: str,
        line: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(
            message,
            hint=(
                "chainproof never writes that; do not trust where it came from "
                f"(if it is yours and genuine, raise ${cap.env})"
            ),
        )
        self.cap = cap
        self.limit = limit
        self.source = source
        self.line = line
        self.reason = reason or message


class RecursiveYAML(InputError):
    """A YAML alias inside the value it names: a structure that would expand forever."""

    def __init__(self, source: str, line: int) -> None:
        self.line = line
        self.reason = "an alias refers to a value that contains it (a recursive YAML structure)"
        super().__init__(
            f"{source}:{line}: {self.reason}",
            hint="write the value out; chainproof reads no recursive YAML",
        )


def _limit(given: Cap | int, default: Cap) -> tuple[int, Cap]:
    if isinstance(given, Cap):
        return given.value(), given
    return given, default


# --------------------------------------------------------------------------- bytes


def read_bytes(path: Path, *, what: str = "file", max_bytes: Cap | int = RECORD_BYTES) -> bytes:
    """The bytes of the regular file at `path`, refused unread when it is over the cap.

    FileNotFoundError propagates (a caller knows what a missing file means); every other
    problem is an InputError naming `what` and the path. Non-blocking open: a FIFO planted in a
    bundle cannot hang the reader, and a device (/dev/zero) is refused before it is read.
    """
    limit, cap = _limit(max_bytes, RECORD_BYTES)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"{what} {path} is not a regular file",
                hint="a record is always a plain file; do not trust where this one came from",
            )
        if st.st_size > limit:
            raise LimitExceeded(
                f"{what} {path} is {st.st_size} bytes, more than {cap.describe(limit)}",
                cap=cap,
                limit=limit,
                source=str(path),
            )
        # Read one byte more than stat promised: a file growing under us is seen, not trusted.
        chunks, want = [], st.st_size + 1
        while want > 0:
            chunk = os.read(fd, min(want, 4 * MIB))
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if len(data) > st.st_size:
        raise InputError(
            f"{what} {path} grew while it was read",
            hint="something is writing to it; read it again once it is complete",
        )
    return data


# --------------------------------------------------------------------------- JSON

# Escapes only matter inside strings: pairing backslashes left to right, as a JSON reader does,
# leaves every remaining quote a real one. Same length, so nothing else moves.
_ESCAPES = ((b"\\\\", b"__"), (b'\\"', b"__"))
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_SMALL = 1 * MIB  # below this a plain loop is quicker than importing numpy
_CHUNK = 1 * MIB  # numpy works a chunk at a time, so its scratch memory stays ~10x this
_FEW = 2_000_000  # quotes or brackets: up to this many, the plain loop stays well under 1 s


def _nests_deeper_than(data: bytes, limit: int) -> bool:
    """Whether the JSON text nests brackets outside strings past `limit`.

    Linear and non-recursive, before `json.loads` (whose recursion is the thing being
    protected) sees the text. Text that is not JSON may pass; `json.loads` then refuses it.
    """
    for old, new in _ESCAPES:
        data = data.replace(old, new)
    if len(data) <= _SMALL or (
        # a big file with few quotes and brackets (a link of 50k artifacts: ~300k quotes) is
        # scanned the same way, without numpy's ~0.5 s import; the counts are C-speed and
        # bound the pieces and the loop below
        data.count(b'"') <= _FEW and sum(data.count(c) for c in (b"[", b"]", b"{", b"}")) <= _FEW
    ):
        outside = b"".join(data.split(b'"')[0::2])  # even pieces lie between strings
        depth = 0
        for char in outside.translate(None, _NOT_BRACKET):
            depth += _DEPTH_STEP[char]
            if depth > limit:
                return True
        return False
    import numpy as np

    in_string, depth = False, 0
    for start in range(0, len(data), _CHUNK):
        a = np.frombuffer(data, dtype=np.uint8, count=min(_CHUNK, len(data) - start), offset=start)
        inside = np.logical_xor.accumulate(a == ord('"'))
        if in_string:
            inside = ~inside
        in_string = bool(inside[-1])
        free = ~inside
        opens = ((a == ord("[")) | (a == ord("{"))) & free
        step = opens.astype(np.int32) - (((a == ord("]")) | (a == ord("}"))) & free)
        levels = np.cumsum(step, dtype=np.int64) + depth
        if int(levels.max()) > limit:
            return True
        depth = int(levels[-1])
    return False


def check_nesting(data: bytes, *, source: str, max_depth: Cap | int = DEPTH) -> None:
    """Refuse JSON text nested past `max_depth` (LimitExceeded), without parsing it."""
    limit, cap = _limit(max_depth, DEPTH)
    if _nests_deeper_than(data, limit):
        raise LimitExceeded(
            f"{source} nests values more than {limit} deep, past {cap.describe(limit)}",
            cap=cap,
            limit=limit,
            source=source,
        )


def loads_json(data: bytes | str, *, source: str, max_depth: Cap | int = DEPTH) -> Any:
    """Parse JSON text that may be hostile: UTF-8, nested at most `max_depth`, else InputError."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{source} is not UTF-8 text (bad byte at offset {e.start})") from e
    check_nesting(raw, source=source, max_depth=max_depth)
    try:
        return json.loads(text)
    except RecursionError as e:  # unreachable after the scan; kept as a backstop, not a crash
        raise InputError(f"{source} nests values too deeply to parse") from e
    except ValueError as e:  # JSONDecodeError, and integers past Python's digit limit
        raise InputError(f"{source} is not valid JSON: {e}") from e


def read_json(
    path: Path,
    *,
    what: str = "JSON file",
    max_bytes: Cap | int = RECORD_BYTES,
    max_depth: Cap | int = DEPTH,
) -> Any:
    """`read_bytes` then `loads_json`: any JSON value (callers check its shape)."""
    return loads_json(
        read_bytes(path, what=what, max_bytes=max_bytes),
        source=f"{what} {path}",
        max_depth=max_depth,
    )


# --------------------------------------------------------------------------- YAML
# PyYAML is imported only by a YAML reader (pipeline/bounded_yaml.py): a stage process in a
# small lock of its own (numpy + pydantic) reads JSON through this module and has no PyYAML.


def compose_yaml(
    text: str,
    *,
    source: str,
    max_depth: Cap | int = DEPTH,
    max_nodes: Cap | int = YAML_NODES,
) -> Any:
    """The YAML node tree of one document (None if empty), within the nesting and expansion caps.

    Aliases are allowed, but counted as the nodes they expand to; a recursive alias is refused.
    yaml.YAMLError propagates (its mark has the line) for callers that report lines.
    """
    from pipeline import bounded_yaml

    return bounded_yaml.compose_yaml(text, source=source, max_depth=max_depth, max_nodes=max_nodes)


def construct_yaml(node: Any) -> Any:
    """Safe-construct Python values from a node tree `compose_yaml` accepted."""
    from pipeline import bounded_yaml

    return bounded_yaml.construct_yaml(node)


def read_yaml(
    path: Path,
    *,
    what: str = "YAML file",
    max_bytes: Cap | int = CONFIG_BYTES,
    max_depth: Cap | int = DEPTH,
    max_nodes: Cap | int = YAML_NODES,
) -> Any:
    """The safe-loaded value of the YAML file at `path` (None if empty), or an InputError."""
    from pipeline import bounded_yaml

    return bounded_yaml.read_yaml(
        path, what=what, max_bytes=max_bytes, max_depth=max_depth, max_nodes=max_nodes
    )
