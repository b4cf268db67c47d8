"""Locked environments: parse a pip-compile lock, check an interpreter against it, build one.

An environment matches its lock when every pinned distribution is installed at its version
from the lock's wheels, nothing else is installed but chainproof itself, and every entry of
site-packages still matches the manifest sealed when the environment was built
(`pipeline.envmanifest`): no file missing, changed or added, `.pyc` and `.pth` included.
RECORD files are never trusted: they sit in the tree they would vouch for.

Environments are built from wheels only (`--only-binary :all:`): building an sdist runs its
`setup.py`, code chosen by whoever uploaded it, before anything could check it. A pin with no
wheel for this platform is refused up front (`check_wheels_only`), naming it. pip's
installation report (`--report`) is kept in the environment (`INSTALL_REPORT`) as evidence of
exactly which file, name and sha256, each distribution was installed from.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import Distribution, distributions
from pathlib import Path
from typing import NamedTuple

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from pipeline import envmanifest
from pipeline.errors import EnvironmentDrift, Error, InputError
from pipeline.fsutil import atomic_write_text
from pipeline.hashing import sha256_bytes, sha256_file

PROJECT = "chainproof"
INSTALL_REPORT = ".chainproof-install-report.json"  # at the environment's root
WHEELS_ONLY = ("--only-binary", ":all:")


class NoWheel(InputError):
    """A pin has no wheel for this platform: installing it would run its build (exit 2)."""


class IndexUnreachable(Error):
    """The package index could not be asked whether the lock's wheels exist (exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: tuple[str, ...]


@dataclass(frozen=True)
class LockFile:
    path: Path
    sha256: str
    pins: dict[str, Pin]


def parse_lock(path: Path) -> LockFile:
    """Read a `pip-compile --generate-hashes` lock. Every pin must be `==` with hashes."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read lock {path}: {e.strerror}") from e
    pins: dict[str, Pin] = {}
    # Join backslash continuations, drop comments: one logical requirement per line.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"lock {path} is not UTF-8 text (byte {e.start}): not a pip-compile lock",
            hint="regenerate it with pip-compile --generate-hashes",
        ) from e
    logical = text.replace("\\\n", " ").splitlines()
    for line in logical:
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise InputError(
                f"{path}: option line {line.split()[0]!r} is not supported in a lock",
                hint="compile with --no-emit-index-url --no-emit-find-links",
            )
        parts = line.split()
        hashes = tuple(p.split(":", 1)[1] for p in parts if p.startswith("--hash=sha256:"))
        req_text = " ".join(p for p in parts if not p.startswith("--hash="))
        try:
            req = Requirement(req_text)
        except InvalidRequirement as e:
            raise InputError(f"{path}: not a requirement: {req_text!r} ({e})") from e
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==" or not hashes:
            raise InputError(
                f"{path}: {req_text!r} is not pinned with == and --hash",
                hint="compile the lock with `pip-compile --generate-hashes` (make lock)",
            )
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        pins[name] = Pin(name, spec[0].version, hashes)
    return LockFile(path=path, sha256=sha256_bytes(raw), pins=pins)


@dataclass(frozen=True)
class Fingerprint:
    """What went into the link's environment: enough to tell two environments apart."""

    lock: str
    lock_sha256: str
    python: str
    implementation: str
    platform: str
    machine: str
    distributions_sha256: str
    distributions: int
    files_verified: int  # distribution files (RECORD rows) confirmed by the sealed manifest
    files_sealed: int = 0  # every file under site-packages, checked against the manifest
    manifest_sha256: str = ""
    # sha256 of pip's install report kept in the environment (which wheel each distribution
    # came from); "" when the environment was not built with one.
    install_report_sha256: str = ""

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def site_packages_of(python: Path | None) -> Path:
    """site-packages of the current interpreter, or of the venv that owns `python`."""
    if python is None:
        return Path(sysconfig.get_paths()["purelib"])
    return envmanifest.site_packages(envmanifest.venv_of(python))


def _b64(hexdigest: str) -> str:
    return base64.urlsafe_b64encode(bytes.fromhex(hexdigest)).rstrip(b"=").decode()


class _Installed(NamedTuple):
    """One installed distribution's canonical name and version, read once.

    Distribution.metadata re-reads and re-parses METADATA on every access (and .version is
    .metadata["Version"]): this check used to parse each of ~160 files six times.
    """

    name: str
    version: str
    dist: Distribution

    @classmethod
    def of(cls, d: Distribution) -> _Installed:
        meta = d.metadata
        return cls(canonicalize_name(meta["Name"] or ""), meta["Version"], d)


def _record_rows(dists: list[_Installed]) -> dict[str, tuple[str, str]]:
    """{RECORD name: (distribution, urlsafe-b64 sha256 or "")} over every distribution.

    Only used to explain drift and to count distribution files; never to accept a file.
    """
    rows: dict[str, tuple[str, str]] = {}
    for name, _, d in dists:
        for row in csv.reader((d.read_text("RECORD") or "").splitlines()):
            if row:
                digest = row[1][7:] if len(row) > 1 and row[1].startswith("sha256=") else ""
                rows[os.path.normpath(row[0]).replace(os.sep, "/")] = (name, digest)
    return rows


def _explain(
    tree: envmanifest.TreeCheck, site: Path, rows: dict[str, tuple[str, str]]
) -> list[str]:
    """The tree's drift, with what RECORD claims about each changed or start-up file."""
    refined: dict[str, str] = {}
    for rel in tree.changed:
        owner = rows.get(rel)
        if owner is None or not owner[1]:
            continue
        if _b64(sha256_file(site / rel)) != owner[1]:
            refined[rel] = f"! {rel}: sha256 differs from its wheel RECORD (modified after install)"
        else:
            refined[rel] = (
                f"! {rel}: differs from the sealed manifest; its RECORD row was rewritten to match"
            )
    for rel in tree.startup_extra:
        owner = rows.get(rel)
        if owner is None:
            refined[rel] = f"+ {rel}: in site-packages but owned by no installed distribution"
        else:
            refined[rel] = (
                f"+ {rel}: a start-up file not in the sealed manifest (listed in {owner[0]}'s "
                "RECORD, which proves nothing)"
            )
    out = []
    for line in tree.diff:
        rel = line[2:].split(": ", 1)[0]
        out.append(refined.get(rel, line) if line[:1] in "!+" else line)
    return out


def _check_pins(
    lock: LockFile, installed: dict[str, _Installed], manifest: envmanifest.Manifest
) -> list[str]:
    """Pins whose version matches but whose wheels are not those the environment was built
    from (the same versions, other hashes: another lock's wheels)."""
    diff = []
    for name, pin in sorted(lock.pins.items()):
        have = installed.get(name)
        if have is None or have.version != pin.version:
            continue  # already reported
        sealed = manifest.pins.get(name)
        if sealed is None:
            diff.append(f"~ {name}=={pin.version}: not in the lock the environment was built from")
        elif sealed[0] != pin.version or sorted(pin.hashes) != sealed[1]:
            diff.append(
                f"~ {name}=={pin.version}: the environment was built from other wheels "
                f"({sealed[0]}, other hashes)"
            )
    return diff


def check_environment(
    lock: LockFile,
    *,
    python: Path | None = None,
    verify_files: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Fingerprint:
    """Compare the environment of `python` (default: this interpreter) with `lock`.

    Raises EnvironmentDrift listing every difference; returns the fingerprint otherwise.
    """
    site = site_packages_of(python)
    venv = envmanifest.venv_of(python) if python is not None else site.parent.parent.parent
    dists = [_Installed.of(d) for d in distributions(path=[str(site)])]
    installed: dict[str, _Installed] = {}
    diff: list[str] = []
    for d in dists:
        dist_name = d.name
        if dist_name in installed:
            diff.append(
                f"! {dist_name}: installed twice ({installed[dist_name].version}, {d.version})"
            )
        installed[dist_name] = d
    for pinned, pin in sorted(lock.pins.items()):
        have = installed.get(pinned)
        if have is None:
            diff.append(f"- {pinned}=={pin.version}: pinned in the lock, not installed")
        elif have.version != pin.version:
            diff.append(f"~ {pinned}: lock pins {pin.version}, installed {have.version}")
    for extra, d in sorted(installed.items()):
        if extra not in lock.pins and extra != PROJECT:
            diff.append(f"+ {extra}=={d.version}: installed, not in the lock")
    files = sealed = 0
    manifest_sha = ""
    if verify_files:
        tree = envmanifest.take_checked(venv)
        if tree is None:
            if progress:
                progress(f"checking {site} against its sealed install manifest")
            tree = envmanifest.check_tree(venv)
        assert tree.manifest is not None
        rows = _record_rows(dists)
        diff.extend(_check_pins(lock, installed, tree.manifest))
        diff.extend(_explain(tree, site, rows))
        files = sum(1 for rel, (_, h) in rows.items() if h and rel in tree.manifest.files)
        sealed, manifest_sha = tree.files, tree.manifest.sha256
    if diff:
        raise EnvironmentDrift(str(lock.path), diff)
    dist_lines = "".join(f"{n}=={installed[n].version}\n" for n in sorted(installed))
    return Fingerprint(
        lock=lock.path.name,
        lock_sha256=lock.sha256,
        python=platform.python_version(),
        implementation=sys.implementation.name,
        platform=platform.platform(),
        machine=platform.machine(),
        distributions_sha256=sha256_bytes(dist_lines.encode()),
        distributions=len(installed),
        files_verified=files,
        install_report_sha256=_report_digest(site.parent.parent.parent / INSTALL_REPORT),
        files_sealed=sealed,
        manifest_sha256=manifest_sha,
    )


def _report_digest(report: Path) -> str:
    try:
        if not report.is_file() or report.stat().st_size > _MAX_REPORT_BYTES:
            return ""
        return sha256_bytes(report.read_bytes())
    except OSError:
        return ""


# --------------------------------------------------------------------------- stage environments


def project_root() -> Path:
    """The chainproof source tree this code runs from (it must be an editable checkout)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise InputError(
            "stage-specific locks need the chainproof source tree (an editable install)",
            hint="run chainproof from its repository checkout (make setup)",
        )
    return root


_NO_MATCH = re.compile(r"No matching distribution found for (\S+)")
_NETWORK = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Could not fetch URL",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
)


@dataclass(frozen=True)
class InstalledFile:
    """The file pip installed a distribution from: its name and sha256 (pip's report)."""

    filename: str
    sha256: str


_MAX_REPORT_BYTES = 64 << 20


def read_install_report(env_root: Path) -> dict[tuple[str, str], InstalledFile]:
    """(canonical name, version) -> the file it came from, per the environment's install report.

    Absent or unreadable: {} (an environment built by other means has no such evidence; that
    is not an error, and nothing is made up in its place).
    """
    report = env_root / INSTALL_REPORT
    try:
        if report.stat().st_size > _MAX_REPORT_BYTES:
            return {}
        doc = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[tuple[str, str], InstalledFile] = {}
    items = doc.get("install") if isinstance(doc, dict) else None
    for item in items if isinstance(items, list) else []:
        try:
            meta, info = item["metadata"], item["download_info"]
            key = (canonicalize_name(str(meta["name"])), str(meta["version"]))
            archive = info["archive_info"]
            url = str(info.get("url", ""))
        except (KeyError, TypeError, AttributeError):
            continue
        digest = None
        if isinstance(archive, dict):
            hashes = archive.get("hashes")
            if isinstance(hashes, dict) and isinstance(hashes.get("sha256"), str):
                digest = hashes["sha256"]
            elif isinstance(archive.get("hash"), str) and archive["hash"].startswith("sha256="):
                digest = archive["hash"][7:]
        if digest and re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            out[key] = InstalledFile(url.rsplit("/", 1)[-1].split("#", 1)[0], digest.lower())
    return out


def platform_tag() -> str:
    """The most specific wheel tag this interpreter installs, e.g. cp311-cp311-manylinux_2_39."""
    from packaging.tags import sys_tags

    return str(next(iter(sys_tags())))


def check_wheels_only(lock_path: Path, *, timeout: float = 900, rounds: int = 20) -> None:
    """Refuse `lock_path` unless every pin has a wheel for this platform, before any build.

    Asks pip itself (a dry run with `--only-binary :all:`: metadata only, nothing is built or
    installed), so the answer is the one the real install would get from the same index.
    pip stops at the first pin it cannot satisfy, so that pin is set aside and the rest asked
    again (at most `rounds` times) to name every one. Raises NoWheel naming them,
    IndexUnreachable when the index cannot be asked.
    """
    try:
        text = lock_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read lock {lock_path}: {e}") from e
    missing: list[str] = []
    with tempfile.TemporaryDirectory(prefix="chainproof-wheels-") as tmp:
        current = lock_path
        for _ in range(rounds):
            proc = _dry_run(current, Path(tmp), timeout)
            if proc.returncode == 0:
                break
            found = [m for m in _NO_MATCH.findall(proc.stderr) if m not in missing]
            if not found:
                if any(marker in proc.stderr for marker in _NETWORK):
                    raise IndexUnreachable(
                        f"cannot reach the package index to check the wheels of {lock_path}",
                        hint="connect to the index (or a mirror holding these wheels) and retry",
                    )
                raise InputError(
                    f"pip refused the lock {lock_path}:\n{proc.stderr[-2000:]}",
                    hint="check the lock was compiled with --generate-hashes for this Python",
                )
            missing += found
            current = Path(tmp) / "rest.txt"
            current.write_text(_without(text, missing), encoding="utf-8")
    if missing:
        names = ", ".join(missing)
        one = len(missing) == 1
        raise NoWheel(
            f"refusing to build an environment from {lock_path}: {names} "
            f"{'has' if one else 'have'} no wheel for this platform ({platform_tag()}); "
            f"installing {'it' if one else 'them'} would build the sdist, running its setup.py "
            "before anything could check it",
            hint="pin a version that publishes a wheel for this platform, or replace the "
            "package; chainproof installs wheels only (--only-binary :all:)",
        )


def _dry_run(lock: Path, tmp: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--require-hashes",
        *WHEELS_ONLY,
        "--report",
        str(tmp / "report.json"),
        "-r",
        str(lock),
    ]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise IndexUnreachable(
            f"checking the wheels of {lock} took over {timeout:.0f}s",
            hint="check the network or the index (pip config list)",
        ) from e


def _without(text: str, pins: list[str]) -> str:
    """The lock text without the requirements `pins` (as pip printed them, `name==version`)."""
    drop = {canonicalize_name(p.split("==", 1)[0]) for p in pins}
    out = []
    for logical in text.replace("\\\n", " ").splitlines():
        head = logical.split(" #", 1)[0].strip()
        if head and not head.startswith(("#", "-")):
            try:
                req = " ".join(w for w in head.split() if not w.startswith("--hash"))
                if canonicalize_name(Requirement(req).name) in drop:
                    continue
            except InvalidRequirement:
                pass
        out.append(logical)
    return "\n".join(out) + "\n"


def ensure_environment(lock: LockFile, envs_dir: Path, log: Callable[[str], None]) -> Path:
    """The interpreter of the environment built from `lock`, building it once if needed.

    Keyed by the lock's sha256; every pin's wheel is checked to exist first (nothing is built
    from source); built in a staging directory with `--require-hashes --only-binary :all:`,
    sealed (`envmanifest.seal`) and renamed into place, so a half-built or unsealed
    environment is never used. pip's install report stays in it (INSTALL_REPORT).
    """
    final = envs_dir / lock.sha256[:32]
    python = final / "bin" / "python"
    if python.exists():
        return python
    check_wheels_only(lock.path)
    envs_dir.mkdir(parents=True, exist_ok=True)
    staging = envs_dir / f".build-{lock.sha256[:16]}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    log(f"building the environment for {lock.path.name} (sha256 {lock.sha256[:12]}…)")
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(staging)],
            check=True,
            capture_output=True,
        )
        pip = [sys.executable, "-m", "pip", "--python", str(staging / "bin" / "python")]
        _run(
            pip
            + ["install", "--quiet", "--no-deps", "--require-hashes", *WHEELS_ONLY]
            + ["--report", str(staging / INSTALL_REPORT), "-r", str(lock.path)]
        )
        wheel_dir = staging / ".chainproof-wheel"
        wheel = _build_editable_wheel(wheel_dir)
        _run(pip + ["install", "--quiet", "--no-deps", str(wheel)])
        shutil.rmtree(wheel_dir)
        atomic_write_text(staging / ".chainproof-lock", f"{lock.sha256}  {lock.path}\n")
        # Sealed before it is ever used: byte-compiled, every file of site-packages in a
        # manifest that the check of each later use compares against.
        python_staged = staging / "bin" / "python"
        seal = envmanifest.isolated_command(python_staged) + ["env", "seal", "--force"]
        _run(seal + ["--lock", str(lock.path)])
        try:
            os.rename(staging, final)
        except OSError:  # another run built it first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return python


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InputError(
            f"building a locked environment failed: {' '.join(cmd[-3:])}\n{proc.stderr[-2000:]}",
            hint="check the lock was compiled with --generate-hashes for this Python",
        )


def _build_editable_wheel(out: Path) -> Path:
    """An editable wheel of chainproof, built with this environment's locked setuptools."""
    out.mkdir(parents=True, exist_ok=True)
    code = "import sys, setuptools.build_meta as b;print(b.build_editable(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=project_root(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise InputError(f"building the chainproof wheel failed:\n{proc.stderr[-2000:]}")
    return out / proc.stdout.strip().splitlines()[-1]
