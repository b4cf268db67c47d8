"""Publishing a release: SLSA provenance, the bundle, the OpenSSF signature, VERIFY.md.

Everything comes in as explicit inputs (`ReleaseInputs`), not as the Runner: the bundle is
assembled in a staging directory, verified there as a consumer would, and renamed into place,
so a release appears whole or not at all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pipeline.bounded import read_json
from pipeline.config import PipelineConfig
from pipeline.errors import InputError
from pipeline.fsutil import atomic_directory, atomic_symlink
from pipeline.hashing import list_tree, sha256_file
from pipeline.provenance import keys as keymod
from pipeline.provenance.chain import VerifyReport, load_layout, released_steps
from pipeline.provenance.links import Link, link_filename
from pipeline.provenance.openssf import SIGNATURE as MODEL_SIGNATURE
from pipeline.provenance.openssf import sign_model_dir
from pipeline.provenance.statements import (
    RELEASE_PREDICATE,
    slsa_provenance,
    statement,
    write_signed_statement,
)
from pipeline.release.verify import verify_bundle
from pipeline.workspace import (
    CHECKS_DIR,
    DATA_MANIFEST,
    LAYOUT_NAME,
    PROVENANCE,
    RELEASE_MANIFEST,
    UPSTREAM,
)


@dataclass(frozen=True)
class ReleaseInputs:
    """What a release is made from: one verified run and the keys that may sign for it."""

    config: PipelineConfig
    run_id: str
    run_dir: Path
    links_dir: Path
    layout_path: Path
    locks: dict[Path, str]  # lock path -> sha256
    links: dict[str, Link]  # step -> its (verified) link
    owner: keymod.PublicKey
    functionary: keymod.KeyPair
    release_key: tuple[Path, Path] | None  # the OpenSSF key pair (private, public)
    started: str
    finished: str
    source_commit: str | None
    code: dict[str, Any]  # the code digest and the git state of the tree it came from
    layout_signed_by: str  # "owner" (signed beforehand) or "runner" (one-machine convenience)
    destination: Path  # releases/<name>/<version>


@dataclass(frozen=True)
class Repository:
    """The git work tree a file of the build lives in, as others can name it."""

    top: Path
    remote: str | None  # a portable `git+<scheme>://host/path` URL, without credentials
    commit: str | None
    dirty: bool | None

    def name_of(self, path: Path) -> str | None:
        """`path` relative to the repository, or None when it lies outside it."""
        try:
            return path.resolve().relative_to(self.top).as_posix()
        except ValueError:
            return None

    def uri_of(self, path: Path) -> str | None:
        """`git+https://host/repo@<commit>#<path>`: where anyone can get this exact file."""
        rel = self.name_of(path)
        if rel is None or not self.remote or not self.commit:
            return None
        return f"{self.remote}@{self.commit}#{quote(rel)}"


_SCP_LIKE = re.compile(r"^(?:(?P<user>[\w.-]+)@)?(?P<host>[\w.-]+):(?P<path>(?!/)[^\s]+)$")


def portable_remote(url: str) -> str | None:
    """A git remote as a SPDX/pip-style VCS URL (`git+https://host/org/repo.git`), with any
    user name or token dropped (credentials must never reach a signed, published file); None
    for a local path or `file:` remote, which names only the builder's disk."""
    url = url.strip()
    scp = _SCP_LIKE.match(url)
    if scp and "://" not in url:
        return f"git+ssh://{scp['host']}/{scp['path']}"
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http", "ssh", "git") or not parts.hostname:
        return None
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return None
    return urlunsplit((f"git+{parts.scheme}", f"{parts.hostname}{port}", parts.path, "", ""))


def repository_of(directory: Path) -> Repository | None:
    """The repository holding `directory` (its first remote, preferring origin), or None."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top:
        return None
    remotes = (git("remote") or "").split()
    name = "origin" if "origin" in remotes else (remotes[0] if remotes else None)
    url = git("remote", "get-url", name) if name else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return Repository(
        top=Path(top).resolve(),
        remote=portable_remote(url) if url else None,
        commit=commit,
        dirty=None if status is None else bool(status),
    )


def _file_dependency(
    name: str, path: Path, digest: str, repo: Repository | None, bundled: str | None = None
) -> dict[str, Any]:
    """A resource descriptor for a file of the build: a git URI when the repository has a
    remote, and always a path relative to the repository (or to the bundle), never the
    builder's absolute path."""
    dep: dict[str, Any] = {"name": name, "digest": {"sha256": digest}}
    uri = repo.uri_of(path) if repo else None
    if uri:
        dep["uri"] = uri
    rel = repo.name_of(path) if repo else None
    dep["annotations"] = {"path": rel or bundled or path.name}
    return dep


_MEDIA_TYPES = {
    ".npz": "application/x-npz",
    ".npy": "application/x-npy",
    ".csv": "text/csv",
    ".gz": "application/gzip",
}


def dataset_uri(source: dict[str, Any]) -> str | None:
    """The dataset's origin as a URI: its URL, or a purl for a file a package bundles
    (`pkg:pypi/scikit-learn@1.6.1#sklearn/datasets/data/digits.csv.gz`); None for a local file."""
    location = str(source.get("location", ""))
    if source.get("kind") == "url" and location.startswith(("https://", "http://")):
        return location
    if source.get("kind") == "package":
        # as the source stage writes it: "scikit-learn 1.6.1: sklearn/datasets/data/digits.csv.gz"
        head, _, inner = location.partition(": ")
        dist, _, ver = head.partition(" ")
        if dist and ver and inner:
            return f"pkg:pypi/{quote(dist.lower(), safe='')}@{quote(ver, safe='')}#{quote(inner)}"
    return None


def _dataset_dependencies(inp: ReleaseInputs, repo: Repository | None) -> list[dict[str, Any]]:
    deps: list[dict[str, Any]] = []
    for step, link in inp.links.items():
        for name, d in link.products.items():
            # the split file, or an image source's canonical manifest (its digest is the pin)
            if name.endswith(("/dataset.npz", f"/{DATA_MANIFEST}")):
                path = inp.run_dir / step / "manifest.json"  # a stage's product: hostile
                manifest = read_json(path, what="dataset manifest")
                if not isinstance(manifest, dict):
                    raise InputError(f"{path} is not a dataset manifest (not a JSON object)")
                origin = manifest.get("source")
                origin = origin if isinstance(origin, dict) else {}
                location = str(origin.get("location", ""))
                # The descriptor is the origin (what the uri names, with its own digest); the
                # canonical split file the chain starts from is named in the annotations.
                dep: dict[str, Any] = {"name": f"dataset:{manifest.get('name')}"}
                uri = dataset_uri(origin)
                if origin.get("kind") in ("file", "images") and repo is not None:
                    uri = repo.uri_of(Path(location))
                if uri:
                    dep["uri"] = uri
                digest = origin.get("sha256")
                dep["digest"] = {"sha256": digest if isinstance(digest, str) else d["sha256"]}
                media = _MEDIA_TYPES.get(Path(location.split("?", 1)[0]).suffix)
                if media:
                    dep["mediaType"] = media
                dep["annotations"] = {
                    "kind": origin.get("kind"),
                    "dataset_file": name,
                    "dataset_sha256": d["sha256"],
                    "split": manifest.get("split"),
                }
                if isinstance(origin.get("files"), int):
                    dep["annotations"]["files"] = origin["files"]
                if origin.get("kind") in ("file", "images"):
                    rel = repo.name_of(Path(location)) if repo else None
                    dep["annotations"]["path"] = rel or Path(location).name
                deps.append(dep)
        base = link.environment.get("base_model")
        if base:
            location = str(base.get("location", ""))
            dep = {"name": f"base_model:{step}", "digest": {"sha256": base["sha256"]}}
            if urlsplit(location).scheme in ("https", "http"):
                dep["uri"] = location
            elif repo is not None and repo.uri_of(Path(location)):
                dep["uri"] = repo.uri_of(Path(location))
            dep["annotations"] = {
                **{k: v for k, v in base.items() if k not in ("location", "sha256")},
                "path": (repo.name_of(Path(location)) if repo else None) or Path(location).name,
            }
            deps.append(dep)
    return deps


def write_provenance(inp: ReleaseInputs, released: list[str]) -> Path:
    """SLSA provenance v1 for the released model files, signed by the runner's key.

    Every URI is portable: files of the repository as `git+<remote>@<commit>#<path>` (or, with
    no remote, a path relative to the repository), the locks also by their place in the bundle,
    the dataset by its origin URL or purl; no absolute path of the builder's machine."""
    config = inp.config
    repo = repository_of(config.base_dir)
    subjects = {
        name: d["sha256"]
        for step in released
        for name, d in inp.links[step].products.items()
        if name.endswith((".keras", ".h5")) or "/saved_model/" in name
    }
    deps: list[dict[str, Any]] = [_file_dependency("config", config.path, config.sha256, repo)]
    for lock, digest in inp.locks.items():
        deps.append(
            _file_dependency(f"lock:{lock.name}", lock, digest, repo, bundled=f"locks/{lock.name}")
        )
    deps += _dataset_dependencies(inp, repo)
    commit = inp.source_commit if inp.source_commit not in (None, "unknown") else None
    if commit:
        source: dict[str, Any] = {"name": "source", "digest": {"gitCommit": commit}}
        if repo and repo.remote:
            source["uri"] = f"{repo.remote}@{commit}"
        # The tree the config came from; a dirty tree means the commit alone does not
        # reproduce it (the code digest below still pins chainproof's own files).
        source["annotations"] = {"dirty": repo.dirty if repo else None}
        deps.append(source)
    deps.append(
        {
            "name": "code",
            "digest": {"sha256": inp.code["sha256"]},
            "annotations": {"gitCommit": inp.code.get("commit"), "dirty": inp.code.get("dirty")},
        }
    )
    byproducts = {
        f"attestations/{p.name}": sha256_file(p)
        for p in sorted(inp.links_dir.glob("*.link")) + [inp.layout_path]
    }
    config_ref = (repo.name_of(config.path) if repo else None) or config.path.name
    stmt = slsa_provenance(
        subjects=subjects,
        external={
            "pipeline": config.name,
            "config": {"path": config_ref, "sha256": config.sha256},
        },
        internal={
            "stages": [s.name for s in config.stages],
            "layout_sha256": sha256_file(inp.layout_path),
            "layout_signed_by": inp.layout_signed_by,
        },
        dependencies=deps,
        invocation_id=inp.run_id,
        started=inp.started,
        finished=inp.finished,
        byproducts=byproducts,
        builder_version={"chainproof": version("chainproof")},
    )
    path = inp.links_dir / PROVENANCE
    write_signed_statement(path, stmt, inp.functionary.signer)
    return path


def write_release_manifest(bundle: Path, inp: ReleaseInputs) -> None:
    """Sign the list of every file in the bundle (VERIFY.md, keys and locks included), with the
    release's name, version and run: verify refuses any file it does not cover, and a bundle
    sitting under another version's name."""
    files = list_tree(bundle)
    digests = {name: sha256_file(path) for name, path in files.items()}
    stmt = statement(
        digests,
        RELEASE_PREDICATE,
        {
            "name": inp.config.name,
            "version": inp.destination.name,
            "run_id": inp.run_id,
            "published": inp.finished,
            "layout_sha256": sha256_file(inp.layout_path),
        },
    )
    write_signed_statement(bundle / "attestations" / RELEASE_MANIFEST, stmt, inp.functionary.signer)


def _layout_names(inp: ReleaseInputs, release_pub: Path) -> bool:
    """Does the owner's layout bind this OpenSSF release key? (Only then is it used.)"""
    report = VerifyReport(target=str(inp.layout_path), owner_keyid=inp.owner.keyid)
    layout = load_layout(inp.layout_path, inp.owner, report)
    return keymod.release_public_key(release_pub.read_bytes()).keyid in layout.keys


def publish(inp: ReleaseInputs) -> Path:
    """Write the provenance, assemble and verify the bundle, rename it into place."""
    released = released_steps(inp.layout_path, inp.owner)
    write_provenance(inp, released)
    final = inp.destination
    if final.exists():
        raise InputError(
            f"release {final} already exists",
            hint="releases are immutable; set a new release.version in the config",
        )
    with atomic_directory(final) as staging:
        (staging / "attestations").mkdir()
        shutil.copyfile(inp.layout_path, staging / "attestations" / LAYOUT_NAME)
        for s in inp.config.stages:
            name = link_filename(s.name, inp.functionary.public.keyid)
            shutil.copyfile(inp.links_dir / name, staging / "attestations" / name)
        shutil.copyfile(inp.links_dir / PROVENANCE, staging / "attestations" / PROVENANCE)
        shutil.copytree(inp.run_dir / CHECKS_DIR, staging / "attestations" / CHECKS_DIR)
        shutil.copytree(inp.run_dir / "locks", staging / "locks")
        if (inp.run_dir / UPSTREAM).is_dir():
            shutil.copytree(inp.run_dir / UPSTREAM, staging / UPSTREAM)
        (staging / "keys").mkdir()
        for role in keymod.ROLES:
            shutil.copyfile(inp.run_dir / f"keys/{role}.pub", staging / f"keys/{role}.pub")
        for step in released:
            for name, path in list_tree(inp.run_dir / step, prefix=f"{step}/").items():
                dest = staging / "artifacts" / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
        if inp.release_key and _layout_names(inp, inp.release_key[1]):
            shutil.copyfile(inp.release_key[1], staging / "keys" / keymod.RELEASE_PUB)
            sign_model_dir(
                staging / "artifacts" / released[0],
                staging / "attestations" / MODEL_SIGNATURE,
                inp.release_key[0],
            )
        (staging / "VERIFY.md").write_text(verify_md(inp, released[0]))
        write_release_manifest(staging, inp)
        verify_bundle(staging, owner_key=inp.owner.keyid, expected_version=final.name)
    atomic_symlink(final.name, final.parent / "latest")
    return final


def verify_md(inp: ReleaseInputs, model_dir: str) -> str:
    """How to check this release, with the owner fingerprint (written into the bundle)."""
    kid, final = inp.owner.keyid, inp.destination
    return f"""# Verifying this release

Release `{inp.config.name}` version `{final.name}`, built by chainproof run `{inp.run_id}`.

Trust comes from the owner's key fingerprint, which you must get from the owner through a
channel other than this bundle:

    owner key fingerprint (sha256 keyid): {kid}

The model directory is also signed in the OpenSSF Model Signing format; its own CLI checks it:

    model_signing verify key artifacts/{model_dir} --signature attestations/model.sig \\
        --public_key keys/release-ec.pub.pem

Check the whole chain offline, with only this directory:

    chainproof verify {final.name} --owner-key {kid}

(run it from the directory that holds this one, or pass the bundle's path). It verifies the
owner's signature on `attestations/root.layout`, that the layout has not expired, that every
step's link is signed by the functionary key the layout names, ran the expected command and
exited 0, that each step's materials match the products of the step before it (from the
dataset's sha256 to the packaged weights), and that every file under `artifacts/` has the
digest its signed link records. Any failure names the check, the step, the rule and the file.
"""
