"""The sealed install manifest of a locked environment, and the check of site-packages against it.

Standard library only (plus chainproof's own stdlib-only modules): the bootstrap runs this
before anything from site-packages may be imported, so nothing it checks can fool it.
"""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline import forked
from pipeline.errors import EnvironmentDrift
from pipeline.fsutil import atomic_write_bytes
from pipeline.hashing import hash_many

SCHEMA = 1
MANIFEST_NAME = ".chainproof-manifest.json"
CACHE_NAME = ".chainproof-statcache.json"
# The last clean check, as one digest of every entry's lstat: see check_tree.
STAMP_NAME = ".chainproof-treestamp.json"
SEAL_KEY_ENV = "CHAINPROOF_SEAL_KEY"
# Modules the interpreter imports by itself at start-up: never acceptable in a locked
# environment, whichever wheel or RECORD claims them.
STARTUP_MODULES = ("sitecustomize", "usercustomize")
# A bound on what a manifest or cache file may be before it is parsed (hostile input).
MAX_MANIFEST_BYTES = 256 << 20
# The manifest file is `{"seal":"<64 hex>","body":<body json>}`: the seal is an HMAC over the
# body's exact bytes, so checking it needs no re-serialisation of 50k entries.
_PREFIX = b'{"seal":"'
_MIDDLE = b'","body":'
_HEAD = len(_PREFIX) + 64 + len(_MIDDLE)

# "dev:ino:size:mtime_ns:ctime_ns": one string per file parses several times faster than a
# list of five ints when 50k of them are read back at every start.
StatKey = str
CHANGED = "differs from the sealed manifest (modified after install)"


# --------------------------------------------------------------------------- where things are


def venv_of(python: Path | str) -> Path:
    """The virtualenv that owns interpreter `python` (its bin/ is not resolved: it links out)."""
    return Path(os.path.abspath(python)).parent.parent


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def is_venv(venv: Path) -> bool:
    return (venv / "pyvenv.cfg").is_file()


def seal_key_path() -> Path:
    """Where the seal key lives: $CHAINPROOF_SEAL_KEY, else ~/.config/chainproof/env-seal.key."""
    explicit = os.environ.get(SEAL_KEY_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "chainproof" / "env-seal.key"


def load_seal_key(*, create: bool = False) -> bytes:
    """The 32-byte HMAC key that seals manifests; made once (0600) when `create`."""
    path = seal_key_path()
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
    try:
        st = os.stat(path)
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise EnvironmentDrift(
            str(path),
            [f"- {path}: the environment seal key cannot be read ({e})"],
            hint="seal the environment where it was built: `make setup` (chainproof env seal)",
        ) from e
    if st.st_mode & 0o077:
        raise EnvironmentDrift(
            str(path),
            [f"! {path}: the seal key is readable by others (mode {st.st_mode & 0o777:o})"],
            hint=(
                f"treat it as leaked: `rm {path}`, then rebuild and re-seal every environment "
                "(rm -rf .venv && make setup)"
            ),
        )
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise EnvironmentDrift(
            str(path),
            [f"! {path}: not a chainproof seal key (64 hex digits)"],
            hint=f"remove {path} and rebuild the environment: `make setup`",
        )
    return bytes.fromhex(text)


# --------------------------------------------------------------------------- the tree


@dataclass
class Tree:
    """Every entry under site-packages: regular files with their stat, symlinks, oddities."""

    files: dict[str, tuple[str, int, StatKey]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)


def _walk(top: str, tree: Tree) -> None:
    # Iterative, so a hostile tree nested thousands deep is drift, never a RecursionError.
    stack = [(top, "")]
    while stack:
        directory, rel = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:
            tree.other.append(f"{rel or './'}: cannot be listed ({e.strerror})")
            continue
        files = tree.files
        for entry in entries:
            name = rel + entry.name
            try:
                # d_type answers "directory?" without a syscall; one lstat answers the rest.
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, name + "/"))
                    continue
                st = entry.stat(follow_symlinks=False)
                kind = st.st_mode & 0o170000
                if kind == 0o100000:  # regular file
                    files[name] = (
                        entry.path,
                        st.st_size,
                        f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}",
                    )
                elif kind == 0o120000:  # symlink: recorded, never followed
                    tree.links[name] = os.readlink(entry.path)
                else:
                    tree.other.append(f"{name}: not a regular file")
            except OSError as e:  # vanished or unreadable while we looked
                tree.other.append(f"{name}: {e.strerror}")


def scan_site(site: Path) -> Tree:
    """One pass over site-packages with os.scandir (symlinks recorded, never followed)."""
    tree = Tree()
    _walk(str(site), tree)
    return tree


def is_startup_file(rel: str) -> bool:
    """A `.pth` at the top of a site dir, or a sitecustomize/usercustomize module anywhere
    Python would import it from at start-up (a top-level module or package)."""
    top = rel.split("/", 1)[0]
    if "/" not in rel and rel.endswith(".pth"):
        return True
    stem = top.split(".", 1)[0]
    return stem in STARTUP_MODULES


# --------------------------------------------------------------------------- lock pins (stdlib)


def lock_pins(raw: bytes) -> dict[str, list[object]]:
    """{canonical name: [version, sorted sha256 hashes]} from a pip-compile lock's text.

    A stdlib-only reading (the seal runs before `packaging` may be imported); `envcheck`
    validates locks properly, this only records which wheels the environment was built from.
    """
    pins: dict[str, list[object]] = {}
    for line in raw.decode("utf-8", "replace").replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        parts = line.split()
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;]+)", parts[0])
        if not m:
            continue
        hashes = sorted(p.split(":", 1)[1] for p in parts if p.startswith("--hash=sha256:"))
        pins[canonical(m.group(1))] = [m.group(2), hashes]
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- sealing


def _seal(key: bytes, body: bytes) -> str:
    return hmac.new(key, b"chainproof-env-manifest-v1\0" + body, hashlib.sha256).hexdigest()


def _sealed_bytes(key: bytes, body: dict[str, object]) -> bytes:
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return _PREFIX + _seal(key, data).encode() + _MIDDLE + data + b"}"


def _unseal(key: bytes, raw: bytes, what: Path) -> dict[str, object] | None:
    """The body of a sealed file, or None when its seal does not verify with `key`."""
    if not (raw.startswith(_PREFIX) and raw[_HEAD - len(_MIDDLE) : _HEAD] == _MIDDLE):
        return None
    if not raw.endswith(b"}"):
        return None
    seal, body = raw[len(_PREFIX) : _HEAD - len(_MIDDLE)], raw[_HEAD:-1]
    if not hmac.compare_digest(seal, _seal(key, body).encode()):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def compile_site(python: Path, site: Path) -> None:
    """Byte-compile every module with checked-hash pycs, so Python itself re-checks each
    `.pyc` against its source, and no `.pyc` is ever written later (it would be drift)."""
    proc = subprocess.run(
        [str(python), "-I", "-S", "-m", "compileall", "-q", "-j0"]
        + ["--invalidation-mode", "checked-hash", str(site)],
        capture_output=True,
        text=True,
    )
    # compileall exits 1 when some file does not compile (test fixtures written for another
    # Python ship in wheels); those simply have no .pyc, and importing them fails anyway.
    if proc.returncode not in (0, 1):
        raise EnvironmentDrift(
            str(site), [f"! {site}: byte-compiling failed: {proc.stderr[-500:]}"]
        )


def seal(venv: Path, lock: Path, *, force: bool = False, compile_pyc: bool = True) -> Path:
    """Record and seal the manifest of `venv`'s site-packages right after it was built.

    Sealing trusts the tree as it is now: it is the act that says "this is what the
    hash-pinned wheels installed", so it belongs at the end of the build, nowhere else.
    """
    venv = Path(os.path.abspath(venv))
    site = site_packages(venv)
    dest = venv / MANIFEST_NAME
    if not is_venv(venv) or not site.is_dir():
        raise EnvironmentDrift(str(venv), [f"- {venv}: not a virtualenv with {site}"])
    if dest.exists() and not force:
        raise EnvironmentDrift(
            str(venv),
            [f"= {dest}: the environment is already sealed"],
            hint="re-seal only right after rebuilding it: `chainproof env seal --force`",
        )
    try:
        lock_raw = lock.read_bytes()
    except OSError as e:
        raise EnvironmentDrift(str(lock), [f"- {lock}: cannot read the lock ({e})"]) from e
    key = load_seal_key(create=True)
    if compile_pyc:
        compile_site(venv / "bin" / "python", site)
    tree = scan_site(site)
    paths = sorted(tree.files)
    digests = hash_many([tree.files[p][0] for p in paths], [tree.files[p][1] for p in paths])
    body: dict[str, object] = {
        "schema": SCHEMA,
        "kind": "chainproof-env-manifest",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": ".".join(map(str, sys.version_info[:3])),
        "site": os.path.relpath(site, venv),
        "lock": {
            "path": str(lock),
            "sha256": hashlib.sha256(lock_raw).hexdigest(),
            "pins": lock_pins(lock_raw),
        },
        "pyvenv_cfg_sha256": _file_sha256(venv / "pyvenv.cfg"),
        "files": {p: [tree.files[p][1], d] for p, d in zip(paths, digests, strict=True)},
        "links": dict(sorted(tree.links.items())),
    }
    atomic_write_bytes(dest, _sealed_bytes(key, body))
    # Every file was just hashed: the stat cache starts warm.
    _write_cache(venv, key, _file_sha256(dest), {p: tree.files[p][2] for p in paths})
    return dest


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the stat cache


def _write_cache(venv: Path, key: bytes, manifest_sha: str, entries: dict[str, StatKey]) -> None:
    body: dict[str, object] = {
        "manifest_sha256": manifest_sha,
        "entries": entries,
    }
    # A read-only environment (a sandbox) keeps no cache: the check is only slower next time.
    with contextlib.suppress(OSError):
        atomic_write_bytes(venv / CACHE_NAME, _sealed_bytes(key, body))


def _read_cache(venv: Path, key: bytes, manifest_sha: str) -> dict[str, StatKey]:
    """Entries of a sealed cache made for this exact manifest; anything else is no cache."""
    try:
        raw = (venv / CACHE_NAME).read_bytes()
    except OSError:
        return {}
    if len(raw) > MAX_MANIFEST_BYTES:
        return {}
    body = _unseal(key, raw, venv / CACHE_NAME)
    if not body or body.get("manifest_sha256") != manifest_sha:
        return {}
    entries = body.get("entries")
    if not isinstance(entries, dict):
        return {}
    # Values are only ever compared for equality with a fresh stat string: a malformed one
    # (impossible under a valid seal) simply never matches.
    return entries


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class Manifest:
    path: Path
    sha256: str
    lock_sha256: str
    pins: dict[str, list[object]]
    files: dict[str, list[object]]
    links: dict[str, str]
    pyvenv_cfg_sha256: str


_MANIFEST_HINT = "rebuild the environment from its lock: `make setup` (it seals the manifest)"


def _read_manifest(venv: Path) -> bytes:
    """The manifest file's bytes, size-capped; EnvironmentDrift when absent or unreadable."""
    path = venv / MANIFEST_NAME
    hint = _MANIFEST_HINT
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise EnvironmentDrift(str(path), [f"! {path}: {size} bytes, too big"], hint=hint)
        return path.read_bytes()
    except FileNotFoundError:
        raise EnvironmentDrift(
            str(venv),
            [f"- {path}: no sealed install manifest (the environment was never sealed)"],
            hint=hint,
        ) from None
    except OSError as e:
        raise EnvironmentDrift(str(path), [f"- {path}: cannot read it ({e})"], hint=hint) from e


def load_manifest(venv: Path, key: bytes, raw: bytes | None = None) -> Manifest:
    """The sealed manifest of `venv` (or of its bytes `raw`, already read); EnvironmentDrift
    when absent, unsealed or malformed."""
    path = venv / MANIFEST_NAME
    hint = _MANIFEST_HINT
    if raw is None:
        raw = _read_manifest(venv)
    body = _unseal(key, raw, path)
    if body is None:
        raise EnvironmentDrift(
            str(path),
            [f"! {path}: its seal does not verify (rewritten, or sealed with another key)"],
            hint=hint,
        )
    try:
        lock = body["lock"]
        assert isinstance(lock, dict) and body["schema"] == SCHEMA
        files, links = body["files"], body["links"]
        assert isinstance(files, dict) and isinstance(links, dict)
        assert all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[1], str) for v in files.values()
        )
        return Manifest(
            path=path,
            sha256=hashlib.sha256(raw).hexdigest(),
            lock_sha256=str(lock["sha256"]),
            pins=dict(lock["pins"]),
            files=files,
            links={str(k): str(v) for k, v in links.items()},
            pyvenv_cfg_sha256=str(body["pyvenv_cfg_sha256"]),
        )
    except (KeyError, TypeError, ValueError, AssertionError):
        raise EnvironmentDrift(
            str(path), [f"! {path}: sealed, but not a schema-{SCHEMA} manifest"], hint=hint
        ) from None


@dataclass(frozen=True)
class TreeCheck:
    """What checking one environment's site-packages against its manifest found."""

    venv: Path
    # None when the check was answered by the tree stamp: `manifest` then loads it on demand
    loaded: Manifest | None
    files: int
    hashed: int
    bytes_hashed: int
    diff: tuple[str, ...]
    # rels of the lines above that a caller with RECORD at hand may explain further
    changed: tuple[str, ...] = ()
    startup_extra: tuple[str, ...] = ()
    manifest_sha256: str = ""
    key: bytes = field(default=b"", repr=False)
    # A stamped check of `run` whose DEFERRED part is still being walked (settle() waits)
    pending: DeferredWalk | None = field(default=None, repr=False, compare=False)

    @property
    def manifest(self) -> Manifest:
        """The sealed manifest this check compared with. After a stamped check it is read
        only when asked for (the envcheck's pins), and it must still be the same bytes."""
        if self.loaded is not None:
            return self.loaded
        manifest = load_manifest(self.venv, self.key)
        if manifest.sha256 != self.manifest_sha256:
            raise EnvironmentDrift(
                str(manifest.path),
                [f"! {manifest.path}: replaced since this process checked the environment"],
                hint=_MANIFEST_HINT,
            )
        object.__setattr__(self, "loaded", manifest)
        return manifest


def _startup_on_path(dirs: list[Path]) -> list[str]:
    """sitecustomize/usercustomize importable from the interpreter's own (non-site) dirs."""
    found = []
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in sorted(names):
            if name.split(".", 1)[0] in STARTUP_MODULES:
                found.append(f"+ {d / name}: a start-up module on the interpreter's path")
    return found


def interpreter_dirs() -> list[Path]:
    """The standard library directories every interpreter of this Python searches."""
    import sysconfig

    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    stdlib = Path(paths["stdlib"])
    return sorted({stdlib, Path(paths["platstdlib"]), stdlib / "lib-dynload"})


def check_tree(venv: Path, *, key: bytes | None = None, defer: bool = False) -> TreeCheck:
    """Compare every entry under `venv`'s site-packages with its sealed manifest.

    Missing, changed and extra files are drift; a `.pth` or start-up module that is not in the
    manifest is drift whoever's RECORD lists it (RECORD is never consulted). A file whose
    (dev, inode, size, mtime_ns, ctime_ns) equals what a sealed cache recorded when it last
    hashed to the manifest's digest is not read again: ctime cannot be set from user space,
    so any rewrite since then misses the cache.

    `defer` (the bootstrap of `run` only): when the tree stamp answers, the DEFERRED packages
    are walked in a forked child while the caller goes on, and the result's `pending` holds
    it; settle() waits for it, and nothing of those packages is imported before (see
    DeferredImports).
    """
    venv = Path(os.path.abspath(venv))
    if key is None:  # an unsealed environment says so, whether or not a key exists yet
        key = b"" if not (venv / MANIFEST_NAME).exists() else load_seal_key()
    raw = _read_manifest(venv)
    manifest_sha = hashlib.sha256(raw).hexdigest()
    site = site_packages(venv)
    try:
        cfg_sha = _file_sha256(venv / "pyvenv.cfg")
    except OSError as e:
        cfg_sha = f"unreadable: {e.strerror}"
    on_path = _startup_on_path(interpreter_dirs())
    stamped = (
        _stamped(venv, key, manifest_sha, cfg_sha, site, defer=defer)
        if key and not on_path
        else None
    )
    if stamped is not None:
        return TreeCheck(
            venv=venv,
            loaded=None,
            files=stamped[0],
            hashed=0,
            bytes_hashed=0,
            diff=(),
            manifest_sha256=manifest_sha,
            key=key,
            pending=stamped[1],
        )
    manifest = load_manifest(venv, key, raw)
    diff: list[str] = []
    if cfg_sha != manifest.pyvenv_cfg_sha256:
        diff.append(f"! {venv / 'pyvenv.cfg'}: differs from when the environment was sealed")
    tree = scan_site(site)
    cache = _read_cache(venv, key, manifest.sha256)
    todo: list[tuple[str, str, int]] = []
    changed: list[str] = []
    verified: dict[str, StatKey] = {}
    sealed = manifest.files
    for rel in sorted(sealed.keys() - tree.files.keys()):
        diff.append(f"- {rel}: in the sealed manifest, missing on disk")
    for rel, (path, size, stat_key) in tree.files.items():
        if cache.get(rel) == stat_key:  # a cache entry exists only for a sealed, verified rel
            verified[rel] = stat_key
            continue
        want = sealed.get(rel)
        if want is None:
            continue
        if want[0] != size:
            changed.append(rel)
            diff.append(f"! {rel}: {CHANGED}")
        else:
            todo.append((rel, path, size))
    extra = sorted(tree.files.keys() - sealed.keys())
    startup_extra = [rel for rel in extra if is_startup_file(rel)]
    for rel in extra:
        if is_startup_file(rel):
            diff.append(f"+ {rel}: a start-up file in site-packages, not in the sealed manifest")
        else:
            diff.append(f"+ {rel}: in site-packages, not in the sealed manifest (added after)")
    for rel in sorted(r for r in sealed if r.startswith(STARTUP_MODULES)):
        if rel.split("/", 1)[0].split(".", 1)[0] in STARTUP_MODULES:
            diff.append(f"! {rel}: a start-up module runs in every interpreter; refused")
    for rel, target in sorted(tree.links.items()):
        if manifest.links.get(rel) != target:
            diff.append(f"+ {rel}: a symlink not in the sealed manifest (-> {target})")
    for rel in sorted(set(manifest.links) - set(tree.links)):
        diff.append(f"- {rel}: a symlink in the sealed manifest, missing on disk")
    diff.extend(f"? {what}" for what in sorted(tree.other))
    diff.extend(on_path)
    digests = _hash_or_none([t[1] for t in todo], [t[2] for t in todo])
    for (rel, _, _), digest in zip(todo, digests, strict=True):
        if digest is None:
            diff.append(f"? {rel}: cannot be read")
        elif digest == manifest.files[rel][1]:
            verified[rel] = tree.files[rel][2]
        else:
            changed.append(rel)
            diff.append(f"! {rel}: {CHANGED}")
    if todo:
        _write_cache(venv, key, manifest.sha256, verified)
    if not diff:
        _write_stamp(venv, key, manifest.sha256, cfg_sha, tree)
    return TreeCheck(
        venv=venv,
        loaded=manifest,
        files=len(tree.files),
        hashed=len(todo),
        bytes_hashed=sum(t[2] for t in todo),
        diff=tuple(sorted(diff, key=_diff_order)),
        changed=tuple(changed),
        startup_extra=tuple(startup_extra),
        manifest_sha256=manifest.sha256,
        key=key,
    )


# --------------------------------------------------------------------------- the tree stamp
#
# A clean check of ~50k files costs its walk plus parsing the manifest and the stat cache
# (~13 MB of JSON) and comparing 50k entries. The stamp, written after a clean check, holds
# one digest of the whole listing: every entry's relative name with its lstat (mode, device,
# inode, size, mtime_ns, ctime_ns; a symlink's target too). A later check that walks the tree
# and gets the same digest has seen, entry for entry, the tree that verified against this
# manifest (same bytes: its sha256 is in the stamp), so it trusts exactly what the stat cache
# trusts (an unchanged stat tuple means unchanged bytes; nothing sets ctime to a chosen
# value) and nothing more. Any difference at all (a file added, removed, touched, a directory
# that cannot be listed) misses, and the full check runs, naming what changed.


# The packages a `run` that the stamp answers walks in the background (~70% of the files, and
# nothing the runner imports before its environment check): see DeferredWalk. Their entries
# have a listing digest of their own in the stamp.
DEFERRED = frozenset(
    {
        "tensorflow",
        "keras",
        "mlflow",
        "pandas",
        "scipy",
        "sklearn",
        "numpy",
        "pyarrow",
        "matplotlib",
    }
)


def _deferred(rel: str) -> bool:
    top, sep, _ = rel.partition("/")
    return bool(sep) and top in DEFERRED


def _tree_listing(tree: Tree) -> tuple[str, str]:
    """The listing digests (the rest, DEFERRED) of a walked tree: the stats its check
    verified, nothing later."""
    parts: tuple[list[str], list[str]] = ([], [])
    for rel, (_, _, stat_key) in tree.files.items():
        parts[_deferred(rel)].append(f"{rel}\0{stat_key}")
    for rel, target in tree.links.items():
        parts[_deferred(rel)].append(f"{rel}\0->{target}")
    return _digest_lines(parts[0]), _digest_lines(parts[1])


def _digest_lines(lines: list[str]) -> str:
    # Each line is "name\0stat key" or "name\0->target", joined by NUL too: a file name or a
    # link target may hold a newline but never a NUL, so no two listings join to one text.
    lines.sort()
    return hashlib.sha256("\0".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def _listing_sha256(site: Path, *, deferred: bool) -> str | None:
    """What _tree_listing gives for `site` as it is now (the DEFERRED packages' digest, or
    that of everything else), from a walk that keeps nothing but the lines; None when the tree
    holds anything else (a FIFO, an unlistable directory, an entry vanishing): the full check
    then says what."""
    lines: list[str] = []
    stack = [(str(site), "")]
    try:
        if deferred:  # the DEFERRED names that are real directories; anything else is listed
            stack = [  # by the other walk, as _tree_listing files it
                (os.path.join(site, top), top + "/")
                for top in sorted(DEFERRED)
                if _is_real_dir(os.path.join(site, top))
            ]
        while stack:
            directory, rel = stack.pop()
            # Listed through a descriptor, so each lstat is an fstatat relative to it: one path
            # lookup per directory, not one per file (~15% of the walk). O_NOFOLLOW: a directory
            # swapped for a symlink since its parent was listed is an error, so a miss.
            fd = os.open(directory, _DIR_FLAGS)
            try:
                with os.scandir(fd) as it:  # entry.stat uses fd: it is closed after this
                    for entry in it:
                        name = rel + entry.name
                        if entry.is_dir(follow_symlinks=False):
                            if not rel and entry.name in DEFERRED:
                                continue  # the other walk's
                            stack.append((os.path.join(directory, entry.name), name + "/"))
                            continue
                        st = entry.stat(follow_symlinks=False)
                        kind = st.st_mode & 0o170000
                        if kind == 0o100000:  # the same stat key as _walk's
                            lines.append(
                                f"{name}\0{st.st_dev}:{st.st_ino}:{st.st_size}:"
                                f"{st.st_mtime_ns}:{st.st_ctime_ns}"
                            )
                        elif kind == 0o120000:
                            lines.append(f"{name}\0->{os.readlink(entry.name, dir_fd=fd)}")
                        else:
                            return None
            finally:
                os.close(fd)
    except OSError:
        return None
    return _digest_lines(lines)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:  # a DEFERRED package not installed here
        return False


def _stamp_body(
    manifest_sha: str, cfg_sha: str, listing: str, deferred: str, files: int
) -> dict[str, object]:
    return {
        "kind": "chainproof-tree-stamp",
        "manifest_sha256": manifest_sha,
        "pyvenv_cfg_sha256": cfg_sha,
        "listing_sha256": listing,
        "deferred_listing_sha256": deferred,
        "files": files,
    }


def _write_stamp(venv: Path, key: bytes, manifest_sha: str, cfg_sha: str, tree: Tree) -> None:
    # From the check's own walk, never a second one: a file changed after the check looked
    # at it must not be stamped as verified.
    if not key:
        return
    (listing, deferred), files = _tree_listing(tree), len(tree.files)
    with contextlib.suppress(OSError):  # read-only (a sandbox): the next check is only slower
        atomic_write_bytes(
            venv / STAMP_NAME,
            _sealed_bytes(key, _stamp_body(manifest_sha, cfg_sha, listing, deferred, files)),
        )


def _stamped(
    venv: Path, key: bytes, manifest_sha: str, cfg_sha: str, site: Path, *, defer: bool
) -> tuple[int, DeferredWalk | None] | None:
    """The file count of the last clean check when the tree is exactly as it was then, and
    (with `defer`) the DEFERRED packages' walk, still under way."""
    try:
        raw = (venv / STAMP_NAME).read_bytes()
    except OSError:
        return None
    if len(raw) > 4096:
        return None
    body = _unseal(key, raw, venv / STAMP_NAME)
    if not body or body.get("manifest_sha256") != manifest_sha:
        return None
    files, want = body.get("files"), body.get("deferred_listing_sha256")
    if body.get("pyvenv_cfg_sha256") != cfg_sha or not isinstance(files, int):
        return None
    if not isinstance(want, str):  # a stamp from before the split: the full check re-stamps
        return None
    pending = DeferredWalk.start(site, want) if defer else None
    listing = _listing_sha256(site, deferred=False)
    if listing is None or body != _stamp_body(manifest_sha, cfg_sha, listing, want, files):
        if pending is not None:
            pending.cancel()  # the full check that follows walks everything
        return None
    if pending is None and _listing_sha256(site, deferred=True) != want:
        return None
    return files, pending


@dataclass
class DeferredWalk:
    """The DEFERRED packages' listing, computed in a forked child (stdlib only, from the
    single-threaded bootstrap) on the other core while the parent goes on; matched() is its
    answer. A child that fails, dies or answers anything but the stamped digest, or a wait
    that was interrupted, is a miss: settle() then runs the full check, which names what
    changed."""

    pid: int
    fd: int
    want: str
    owner: int  # the process that forked it: only it may wait for the child
    _answer: bool | None = None

    @classmethod
    def start(cls, site: Path, want: str) -> DeferredWalk | None:
        if _usable_cpus() < 2 or not forked.may_fork():
            return None  # nothing to overlap with, or not safe to fork: walked in line
        child = forked.start(lambda: (_listing_sha256(site, deferred=True) or "-").encode())
        return None if child is None else cls(*child, want, os.getpid())

    def matched(self) -> bool:
        """Wait for the child (once): whether it saw exactly the stamped DEFERRED tree."""
        if self._answer is None:
            fd, self.fd = self.fd, -1
            self._answer = False  # until the whole answer is in: an interrupted wait misses
            try:
                data = forked.read_answer(fd, 64)
            finally:
                os.close(fd)
                status = forked.reap(self.pid)
            self._answer = status == 0 and data == self.want.encode()
        return self._answer

    def cancel(self) -> None:
        """Stop the walk unanswered (a miss), and reap it."""
        if self._answer is None:
            self._answer = False
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
            forked.reap(self.pid, kill=True)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may run on, not the machine
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def settle(result: TreeCheck) -> TreeCheck:
    """`result` once its deferred walk has answered: itself when the DEFERRED packages are
    as stamped, else a full check of the environment (whose diff says what changed)."""
    if result.pending is None:
        return result
    if os.getpid() != result.pending.owner:
        raise EnvironmentDrift(
            str(result.venv),
            [f"? {', '.join(sorted(DEFERRED))}: not yet checked (a forked helper process)"],
        )
    if result.pending.matched():
        return replace(result, pending=None)
    return check_tree(result.venv, key=result.key)


def _hash_or_none(paths: list[str], sizes: list[int]) -> list[str | None]:
    """hash_many, except that a file that cannot be read is None instead of an abort."""
    try:
        return list(hash_many(paths, sizes))
    except OSError:
        out: list[str | None] = []
        for p, size in zip(paths, sizes, strict=True):
            try:
                out.append(hash_many([p], [size])[0])
            except OSError:
                out.append(None)
        return out


def _diff_order(line: str) -> str:
    return line[2:]


# One check per environment per process: the bootstrap's result is what the runner reuses
# for the main lock within the same run.
_CHECKED: dict[Path, TreeCheck] = {}


def take_checked(venv: Path) -> TreeCheck | None:
    """The bootstrap's check of `venv` in this process, once: the first check of a run
    (settled: a drift its deferred walk found raises EnvironmentDrift, every time)."""
    key = Path(os.path.abspath(venv))
    if key in _CHECKED:
        settle_all()
    return _CHECKED.pop(key, None)


def remember(result: TreeCheck) -> None:
    """Keep the bootstrap's check for the run's environment check; while its deferred walk
    is under way, importing a DEFERRED package first waits for it (DeferredImports)."""
    _CHECKED[result.venv] = result
    if result.pending is not None and not any(
        isinstance(f, DeferredImports) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, DeferredImports())


# A drift a deferred walk found: raised again by every later settle and guarded import, so a
# caller that catches the first one (a `try: import numpy`, a .pth line) gets no further.
_DRIFT: list[EnvironmentDrift] = []
_SETTLING = _thread.RLock()  # two threads importing DEFERRED packages wait for one answer


def settle_all() -> None:
    """Wait for every deferred walk of this process; EnvironmentDrift on a drift it found
    (sticky). The import guard goes only once every walk has answered clean."""
    with _SETTLING:
        if _DRIFT:
            raise _DRIFT[0]
        for venv, result in list(_CHECKED.items()):
            if result.pending is None:
                continue
            settled = settle(result)  # a forked helper: raises, and stays guarded
            if settled.diff:
                _DRIFT.append(EnvironmentDrift(str(venv / MANIFEST_NAME), list(settled.diff)))
                raise _DRIFT[0]
            _CHECKED[venv] = settled
        _unguard()


def abandon() -> None:
    """Stop every deferred walk nobody waited for (a command that failed before it did): no
    child outlives the command holding its stdout and stderr."""
    for result in _CHECKED.values():
        if result.pending is not None and result.pending.owner == os.getpid():
            result.pending.cancel()


def _unguard() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, DeferredImports)]


class DeferredImports:
    """On sys.meta_path, ahead of the path finders, while a deferred walk is under way:
    importing a DEFERRED package waits for the walk (and refuses on drift, every time), so
    none of its code runs unchecked. It finds nothing itself: the import then goes on."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] in DEFERRED:
            settle_all()
        return None


# --------------------------------------------------------------------------- start-up

_bootstrapped = False


def mark_bootstrapped() -> None:
    global _bootstrapped
    _bootstrapped = True


def bootstrapped() -> bool:
    """True in a process the stdlib-only bootstrap started after checking its environment."""
    return _bootstrapped


def bootstrap_script() -> Path:
    return Path(__file__).resolve().parent / "bootstrap.py"


def isolated_command(python: Path | str) -> list[str]:
    """The command that starts chainproof isolated: no PYTHONPATH, user site or site at all
    until site-packages has been checked against its manifest."""
    return [str(python), "-I", "-S", str(bootstrap_script())]


WRAPPER = """#!/bin/sh
# chainproof, started isolated (written by `chainproof env seal`; pip's script would let
# PYTHONPATH, sitecustomize and every .pth run before site-packages is checked).
exec "$(dirname -- "$0")/python" -I -S "{script}" "$@"
"""


def install_wrapper(venv: Path) -> Path | None:
    """Replace pip's `bin/chainproof` with a script that starts the isolated bootstrap."""
    dest = venv / "bin" / "chainproof"
    if not dest.parent.is_dir():
        return None
    atomic_write_bytes(dest, WRAPPER.format(script=bootstrap_script()).encode(), mode=0o755)
    os.chmod(dest, 0o755)
    return dest
