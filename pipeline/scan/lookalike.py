"""Look-alike package names: is a locked name a near miss of a popular PyPI project?

The reference is a list of popular projects shipped in `pipeline/scan/data/popular-pypi.txt`
(its header names its source and date; `chainproof deps popular-refresh` rebuilds it). A name
on the list is never a look-alike of another. A name off the list is flagged when it is one
of these near misses of a popular name, checked in this order:

- the same letters with other separators (`scikitlearn`, `num-py`);
- the same after mapping digits and Unicode confusables to the letters they imitate
  (`reque5ts`, a Cyrillic `а` in `pаndas`);
- a popular name with a prefix or suffix such as `python-`, `py-`, `-lib`, `-py`, `-sdk` (the
  short ones only set apart by a separator: `pytoml` is not `py-` + `toml`);
- one edit away (optimal string alignment): a doubled or dropped letter, two swapped
  neighbours, one character changed, added or removed (`0requests`, `nump`, `tensorflows`);
  a digit added or dropped at the end is not counted (`nose2`, `boto`: major versions in names).

Edits are only counted between names of at least four characters: below that, every
short name is one edit from another. Two ways to find the names one edit away, chosen by how
many names are checked: a few hundred (a lock) generate their own edits and look each up
(no index to build, so a scan stays fast); thousands use an index of the single-character
deletes of every popular name, built once, after which a name costs a few lookups.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from packaging.utils import canonicalize_name

from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_text

DATA_FILE = Path(__file__).resolve().parent / "data" / "popular-pypi.txt"
MIN_EDIT_LENGTH = 4
_MAX_LIST_BYTES = 32 << 20
_MAX_NAMES = 200_000
_MAX_NAME = 200

# Affixes that add nothing but credibility to a stolen name (`py-requests`, `numpy-lib`).
PREFIXES = ("python", "py", "lib", "the", "real", "official", "extra", "secure")
SUFFIXES = (
    "python",
    "py",
    "lib",
    "library",
    "sdk",
    "dev",
    "data",
    "utils",
    "util",
    "tools",
    "core",
    "official",
    "pkg",
    "package",
    "client",
    "api",
    "latest",
    "new",
    "ui",
    "mcp",
    "weights",
)

# Digits and other characters that stand in for letters. Applied to both sides, so a popular
# name with a digit (`boto3`) still matches itself.
_DIGITS = str.maketrans({"0": "o", "1": "l", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b"})
# The common Cyrillic and Greek homoglyphs of Latin letters (after NFKD, which already folds
# fullwidth and accented forms). Package names on PyPI are ASCII, but a name read from an
# installed distribution's metadata is not bound by that.
# fmt: off
_CONFUSABLES = str.maketrans(
    {
        "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
        "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
        "ӏ": "l", "һ": "h", "ɡ": "g", "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k",
        "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ı": "i", "ℓ": "l",
    }
)
# fmt: on

# Widely used ML and security projects, added to the downloaded ranking whatever their rank,
# because they are what an attacker imitating an ML pipeline's dependencies would pick.
# fmt: off
CURATED = (
    "tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-io", "tensorflow-hub",
    "tensorflow-datasets", "tensorboard", "keras", "tf-keras", "numpy", "scipy", "pandas",
    "scikit-learn", "sklearn", "matplotlib", "seaborn", "torch", "torchvision", "torchaudio",
    "pytorch-lightning", "lightning", "jax", "jaxlib", "flax", "transformers", "tokenizers",
    "datasets", "huggingface-hub", "safetensors", "accelerate", "diffusers", "sentencepiece",
    "tiktoken", "openai", "anthropic", "langchain", "mlflow", "wandb", "optuna", "xgboost",
    "lightgbm", "catboost", "onnx", "onnxruntime", "opencv-python", "pillow", "h5py",
    "deepface", "keras-tuner", "ml-dtypes", "protobuf", "grpcio", "requests", "urllib3",
    "in-toto", "securesystemslib", "sigstore", "cryptography", "pyopenssl", "pip-audit",
    "pip-tools", "cyclonedx-python-lib", "model-signing", "modelscan", "fickling",
    "picklescan", "bandit", "safety", "tenacity", "colorama", "setuptools", "pip", "wheel",
)
# fmt: on


@dataclass(frozen=True)
class Lookalike:
    """A locked name that imitates a popular project."""

    name: str  # canonical, as locked
    version: str
    resembles: str  # the popular project it imitates
    how: str  # what differs, in words


@dataclass(frozen=True)
class PopularNames:
    """The reference list: canonical names, most popular first, with where they came from."""

    names: tuple[str, ...]
    source: str
    date: str
    path: str

    @cached_property
    def _rank(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    @cached_property
    def _by_flat(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for n in self.names:
            out.setdefault(_flat(n), n)
        return out

    @cached_property
    def _by_skeleton(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for n in self.names:
            out.setdefault(_skeleton(_flat(n)), n)
        return out

    @cached_property
    def _deletes(self) -> dict[str, list[str]]:
        """Each one-character deletion of a (flat) popular name -> the flat names it came from."""
        index: dict[str, list[str]] = {}
        for flat in self._by_flat:
            if len(flat) < MIN_EDIT_LENGTH:
                continue
            for i in range(len(flat)):
                if i and flat[i] == flat[i - 1]:
                    continue  # deleting either of a doubled letter gives the same string
                d = flat[:i] + flat[i + 1 :]
                if d in index:
                    index[d].append(flat)
                else:
                    index[d] = [flat]
        return index  # read-only from here on

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonicalize_name(name) in self._rank

    def resembles(self, name: str, *, indexed: bool = False) -> tuple[str, str] | None:
        """(popular name, how) when `name` imitates a popular project; None otherwise."""
        canon = canonicalize_name(name)[:_MAX_NAME]
        if canon in self._rank:
            return None
        flat = _flat(canon)
        by_flat = self._by_flat
        if flat in by_flat:
            return by_flat[flat], "the same letters with different separators"
        skeleton = _skeleton(flat)
        if skeleton in self._by_skeleton:
            kind = "Unicode confusables" if not flat.isascii() else "digits"
            return self._by_skeleton[skeleton], f"{kind} in place of letters"
        affixed = self._affixed(canon, flat)
        if affixed is not None:
            return affixed
        edited = self._one_edit(flat, indexed=indexed)
        if edited is not None:
            return edited
        return None

    def _affixed(self, canon: str, flat: str) -> tuple[str, str] | None:
        # One slice and one set lookup per distinct affix length, not one per affix.
        by_flat = self._by_flat
        if not flat or (flat[0] not in _PREFIX_FIRST and flat[-1] not in _SUFFIX_LAST):
            return None  # most names start and end unlike any affix: two set lookups
        for k in _PREFIX_LENGTHS:
            rest = flat[k:]
            if len(rest) >= MIN_EDIT_LENGTH and flat[:k] in _PREFIX_SET and rest in by_flat:
                separated = canon[:k] == flat[:k] and canon[k : k + 1] in _SEPARATORS
                if k > _SHORT_AFFIX or separated:
                    shown = canon[: k + 1] if separated else flat[:k]
                    return by_flat[rest], f"prefix '{shown}' added"
        for k in _SUFFIX_LENGTHS:
            rest = flat[:-k]
            if len(rest) >= MIN_EDIT_LENGTH and flat[-k:] in _SUFFIX_SET and rest in by_flat:
                separated = canon[-k:] == flat[-k:] and canon[-k - 1 : -k] in _SEPARATORS
                if k > _SHORT_AFFIX or separated:
                    shown = canon[-k - 1 :] if separated else flat[-k:]
                    return by_flat[rest], f"suffix '{shown}' added"
        return None

    def _one_edit(self, flat: str, *, indexed: bool = False) -> tuple[str, str] | None:
        if len(flat) < MIN_EDIT_LENGTH:
            return None  # three letters are one edit from dozens of real projects
        candidates = self._indexed_edits(flat) if indexed else self._generated_edits(flat)
        best: tuple[int, str, str] | None = None
        for target in candidates:
            how = _describe_edit(flat, target)
            if how is None:
                continue
            popular = self._by_flat[target]
            key = (self._rank[popular], popular, how)
            if best is None or key < best:
                best = key
        return (best[1], best[2]) if best else None

    def _indexed_edits(self, flat: str) -> set[str]:
        deletes, known = self._deletes, self._by_flat
        candidates: set[str] = set(deletes.get(flat, ()))  # a character dropped
        long_enough = len(flat) > MIN_EDIT_LENGTH
        for i in range(len(flat)):
            shorter = flat[:i] + flat[i + 1 :]
            if long_enough and shorter in known:
                candidates.add(shorter)  # a character added
            hit = deletes.get(shorter)
            if hit:
                candidates.update(hit)  # changed or swapped
        return candidates

    def _generated_edits(self, flat: str) -> set[str]:
        """Popular names one edit from `flat`, found by trying every edit (no index)."""
        known = self._by_flat
        found: set[str] = set()
        n = len(flat)
        for i in range(n + 1):
            head, tail = flat[:i], flat[i:]
            if i < n:
                rest = tail[1:]
                cut = head + rest  # a character added to the popular name
                if cut in known:
                    found.add(cut)
                if i + 1 < n:  # neighbours swapped
                    swapped = head + tail[1] + tail[0] + tail[2:]
                    if swapped in known:
                        found.add(swapped)
                for c in _ALPHABET:  # a character changed
                    changed = head + c + rest
                    if changed in known:
                        found.add(changed)
            for c in _ALPHABET:  # a character dropped from the popular name
                grown = head + c + tail
                if grown in known:
                    found.add(grown)
        found.discard(flat)
        return {f for f in found if len(f) >= MIN_EDIT_LENGTH}

    def check(self, names: Mapping[str, str]) -> tuple[Lookalike, ...]:
        """Every look-alike among `names` (canonical name -> version), sorted by name."""
        # Generating every edit costs ~0.5 ms a name; building the index over all popular
        # names once costs ~0.3 s (measured): past a few hundred names the index is cheaper.
        indexed = len(names) > _INDEX_ABOVE
        out = []
        for name in sorted(names):
            hit = self.resembles(name, indexed=indexed)
            if hit is not None:
                out.append(Lookalike(name, names[name], hit[0], hit[1]))
        return tuple(out)


_INDEX_ABOVE = 500
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"  # what a flat PyPI name is made of
_SEPARATORS = ("-", "_", ".")
# Affixes this short (`py`, `lib`, `-ui`) are common inside real names (`pytoml`, `scanpy`):
# they count only when a separator sets them apart (`py-requests`, `numpy-lib`).
_SHORT_AFFIX = 3
_PREFIX_SET = frozenset(PREFIXES)
_SUFFIX_SET = frozenset(SUFFIXES)
_PREFIX_FIRST = frozenset(p[0] for p in PREFIXES)
_SUFFIX_LAST = frozenset(x[-1] for x in SUFFIXES)
_PREFIX_LENGTHS = tuple(sorted({len(p) for p in PREFIXES}))
_SUFFIX_LENGTHS = tuple(sorted({len(s) for s in SUFFIXES}))


def _flat(canon: str) -> str:
    return canon.replace("-", "").replace("_", "").replace(".", "")


def _skeleton(flat: str) -> str:
    if flat.isascii():  # the common case: only digits can stand in for letters
        return flat.translate(_DIGITS)
    folded = unicodedata.normalize("NFKD", flat)
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    return folded.translate(_CONFUSABLES).translate(_DIGITS)


def _describe_edit(name: str, target: str) -> str | None:
    """How `name` is one edit (optimal string alignment) from `target`, or None if it is not."""
    if name == target:
        return None
    if len(name) == len(target) + 1:  # one character added
        if name[-1].isdigit() and name[:-1] == target:
            return None  # `nose2`, `gitdb2`: a major version in the name, the usual way
        for i in range(len(name)):
            if name[:i] + name[i + 1 :] == target:
                c = name[i]
                doubled = (i > 0 and name[i - 1] == c) or (i + 1 < len(name) and name[i + 1] == c)
                return f"letter '{c}' doubled" if doubled else f"'{c}' added"
        return None
    if len(name) + 1 == len(target):  # one character dropped
        if target[-1].isdigit() and target[:-1] == name:
            return None  # `boto` beside `boto3`: the same convention the other way round
        for i in range(len(target)):
            if target[:i] + target[i + 1 :] == name:
                return f"'{target[i]}' dropped"
        return None
    if len(name) != len(target):
        return None
    diff = [i for i in range(len(name)) if name[i] != target[i]]
    if len(diff) == 1:
        i = diff[0]
        return f"'{target[i]}' changed to '{name[i]}'"
    if (
        len(diff) == 2
        and diff[1] == diff[0] + 1
        and name[diff[0]] == target[diff[1]]
        and name[diff[1]] == target[diff[0]]
    ):
        return f"'{target[diff[0]]}{target[diff[1]]}' swapped"
    return None


# --------------------------------------------------------------------------- the list on disk


def load_popular(path: Path | None = None) -> PopularNames:
    """The reference list at `path` (default: the one shipped with chainproof)."""
    path = path or DATA_FILE
    try:
        if path.stat().st_size > _MAX_LIST_BYTES:
            raise InputError(f"{path}: larger than {_MAX_LIST_BYTES >> 20} MiB; not a name list")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"cannot read the popular-projects list {path}: {e}",
            hint="rebuild it: chainproof deps popular-refresh SOURCE",
        ) from e
    header: dict[str, str] = {}
    names: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep:
                header.setdefault(key.strip().lower(), value.strip())
            continue
        if line:
            canon = canonicalize_name(line)[:_MAX_NAME]
            if canon not in seen:
                seen.add(canon)
                names.append(canon)
    if not names:
        raise InputError(f"{path}: no project names", hint="chainproof deps popular-refresh")
    return PopularNames(
        tuple(names[:_MAX_NAMES]),
        header.get("source", "unknown"),
        header.get("date", ""),
        str(path),
    )


def _names_from(source: Path) -> tuple[list[str], str]:
    """(names most popular first, data date) from a top-PyPI-packages export or a text list.

    Accepted: hugovk's top-pypi-packages JSON (`{"last_update", "rows": [{"project"}]}`),
    the same list as GuardDog ships it (`{"downloaded_timestamp", "packages": [...]}`), or
    a text file with one name per line.
    """
    try:
        if source.stat().st_size > _MAX_LIST_BYTES:
            raise InputError(f"{source}: larger than {_MAX_LIST_BYTES >> 20} MiB")
        raw = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {source}: {e}") from e
    if source.suffix != ".json":
        lines = [ln.strip() for ln in raw.splitlines()]
        return [ln for ln in lines if ln and not ln.startswith("#")], ""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON: {e}") from e
    if isinstance(doc, dict) and isinstance(doc.get("rows"), list):
        names = [r.get("project") for r in doc["rows"] if isinstance(r, dict)]
        when = str(doc.get("last_update") or "")
    elif isinstance(doc, dict) and isinstance(doc.get("packages"), list):
        names = list(doc["packages"])
        stamp = doc.get("downloaded_timestamp")
        when = (
            datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d")
            if isinstance(stamp, int | float) and 0 < stamp < 1e11
            else ""
        )
    else:
        raise InputError(
            f"{source}: not a top-PyPI-packages export",
            hint='expected {"rows": [{"project": ...}]} or {"packages": [...]}, or a text list',
        )
    return [n for n in names if isinstance(n, str) and n.strip()], when


def refresh_popular(
    source: Path,
    out: Path = DATA_FILE,
    *,
    top: int = 5000,
    label: str | None = None,
    extra: Iterable[str] = CURATED,
    today: datetime | None = None,
) -> PopularNames:
    """Rebuild the reference list from `source`: its `top` names, then the curated ones."""
    if top < 1:
        raise InputError("--top must be at least 1")
    names, when = _names_from(source)
    if not names:
        raise InputError(f"{source}: no project names in it")
    ranked: list[str] = []
    seen: set[str] = set()
    for n in names[:top]:
        canon = canonicalize_name(n.strip())[:_MAX_NAME]
        if canon and canon not in seen:
            seen.add(canon)
            ranked.append(canon)
    curated = [c for c in (canonicalize_name(e) for e in extra) if c not in seen]
    date = when or (today or datetime.now(UTC)).strftime("%Y-%m-%d")
    header = [
        "# chainproof: popular PyPI projects, the reference for look-alike names",
        f"# source: {label or source.name} (top {len(ranked)} by downloads)"
        + (f", plus {len(curated)} curated ML/security projects" if curated else ""),
        f"# date: {date}",
        f"# count: {len(ranked) + len(curated)}",
        "# refresh: chainproof deps popular-refresh SOURCE  (see README, Dependency supply chain)",
    ]
    atomic_write_text(out, "\n".join([*header, *ranked, *curated]) + "\n")
    return load_popular(out)
