"""Verified stage reuse: an earlier run's stage stands in for running it again only on proof.

Proof is an earlier link of this workspace that verifies with the functionary key the layout
names, for this step and its expected command, recording the same spec (run ids and paths
aside), the same material digests, lock and code digests and the same sandbox, whose products
and logs still hash to what it signed. Nothing else is trusted: not run.json, not timestamps,
not a cache. The products are then copied into the new run, re-hashed there,
and the runner signs a fresh link for the new run recording where they came from.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline import bounded
from pipeline.codedigest import CodeManifest
from pipeline.config import StageConfig
from pipeline.errors import InputError
from pipeline.hashing import hash_many, scan_tree, sha256_bytes, sha256_file
from pipeline.provenance.keys import PublicKey
from pipeline.provenance.layout import stage_command
from pipeline.provenance.links import Link, LinkSignatureError, link_filename, read_signed_link
from pipeline.workspace import RUN_ID, Workspace, spec_name

# How many earlier runs are examined per stage, newest first: bounds the time a workspace
# full of old runs can cost (each examined link is a signature check, at most one re-hash).
MAX_CANDIDATES = 20

# Reason kinds, as `chainproof status --json` names them.
NO_RUN = "no earlier run"
NO_LINK = "no link"
SIGNATURE = "signature invalid"
NOT_THIS_STEP = "not a link for this stage"
COMMAND = "command"
SPEC = "spec/params"
MATERIAL = "material"
LOCK = "lock"
CODE = "code"
SANDBOX = "sandbox"
PRODUCT = "product tampered"
LOG = "log tampered"
UPSTREAM = "upstream reruns"
EXTERNAL = "external input"
PUBLISHES = "publishes"
UNKNOWN = "unknown"
# The order of the checks: a reason found later means an earlier link that matched more, so
# it is the one worth reporting ("the inputs are all the same, but a product was tampered").
_CHECK_ORDER: tuple[str, ...] = (SIGNATURE, NOT_THIS_STEP, COMMAND, CODE, LOCK, SANDBOX)
_CHECK_ORDER += (SPEC, MATERIAL, EXTERNAL, PRODUCT, LOG)


@dataclass(frozen=True)
class Reason:
    """Why one earlier run's link cannot stand in for this stage."""

    kind: str
    detail: str
    run_id: str | None = None

    def __str__(self) -> str:
        where = f" (run {self.run_id})" if self.run_id else ""
        return f"{self.kind}: {self.detail}{where}"


@dataclass(frozen=True)
class Earlier:
    """An earlier link that passed every check: the stage is reused from it."""

    run_id: str
    run_dir: Path
    link_path: Path
    link_sha256: str
    link: Link

    def record(self, workspace: Path) -> dict[str, str]:
        """Which run and link, as run.json and the new link record it."""
        return {
            "run_id": self.run_id,
            "link": os.path.relpath(self.link_path, workspace),
            "link_sha256": self.link_sha256,
        }


@dataclass(frozen=True)
class Verdict:
    stage: str
    earlier: Earlier | None
    reasons: tuple[Reason, ...] = ()  # one per earlier link refused, newest first

    @property
    def reusable(self) -> bool:
        return self.earlier is not None

    @property
    def reason(self) -> Reason | None:
        """The refusal of the earlier link that came closest (the newest among equals)."""
        if not self.reasons:
            return None
        rank = {kind: i for i, kind in enumerate(_CHECK_ORDER)}
        return max(reversed(self.reasons), key=lambda r: rank.get(r.kind, -1))


@dataclass(frozen=True)
class Expected:
    """What this run would record for the stage, to compare with an earlier link."""

    stage: StageConfig
    spec: dict[str, Any]  # the spec this run gives the stage
    materials: Mapping[str, Mapping[str, str]]  # its materials, the spec's own digest aside
    lock_sha256: str
    sandbox: dict[str, Any] | str
    external: Mapping[str, Path] = field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        # names and commands come from records on disk: escape what could forge report lines
        self.kind = kind
        self.detail = "".join(c if c.isprintable() else repr(c)[1:-1] for c in detail)


def earlier_runs(workspace: Workspace, *, exclude: str | None = None) -> list[str]:
    """Run ids of this workspace, newest first (a run id starts with its UTC start time).

    Only real directories with a run id's name count: `runs/latest` (a symlink) and anything
    else placed under runs/ are not runs."""
    try:
        entries = list(os.scandir(workspace.runs))
    except FileNotFoundError:
        return []
    ids = [
        e.name
        for e in entries
        if RUN_ID.match(e.name) and e.name != exclude and e.is_dir(follow_symlinks=False)
    ]
    return sorted(ids, reverse=True)


def _normalized(value: Any, subs: tuple[tuple[str, str], ...]) -> Any:
    """`value` with each run's own identity (its directory, links and id) replaced by a name."""
    if isinstance(value, str):
        for old, new in subs:
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {k: _normalized(v, subs) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v, subs) for v in value]
    return value


def _identity(workspace: Workspace, run_id: str) -> tuple[tuple[str, str], ...]:
    return (
        (str(workspace.links(run_id)), "<links>"),
        (str(workspace.runs / run_id), "<run>"),
        (run_id, "<run-id>"),
    )


def _spec_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted keys where two specs differ, for the user."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old:
                out.append(f"{sub} added")
            elif key not in new:
                out.append(f"{sub} removed")
            else:
                out += _spec_diff(old[key], new[key], sub)
        return out
    if old != new:
        return [f"{path or 'spec'}: {_short(old)} then, {_short(new)} now"]
    return []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(value: Any) -> dict[str, Any]:
    """A recorded value that should be an object, or an empty one (a hostile link's fields)."""
    return value if isinstance(value, dict) else {}


def _digest(entry: Any) -> str:
    return str(entry.get("sha256", "?")) if isinstance(entry, Mapping) else "?"


def _material_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            out.append(f"{name} is new (sha256 {_digest(new[name])[:12]}…)")
        elif name not in new:
            out.append(f"{name} is gone (was sha256 {_digest(old[name])[:12]}…)")
        elif _digest(old[name]) != _digest(new[name]):
            out.append(
                f"{name}: sha256 {_digest(new[name])[:12]}… now, "
                f"{_digest(old[name])[:12]}… in the earlier link"
            )
    return out


def _relative(name: str, prefix: str) -> PurePosixPath:
    """A recorded product or log name, refused unless it is a plain path under `prefix`."""
    pure = PurePosixPath(name)
    if (
        not name.startswith(prefix)
        or pure.is_absolute()
        or ".." in pure.parts
        or "\\" in name
        or "\x00" in name
    ):
        raise _Refused(NOT_THIS_STEP, f"it records {name!r}, which is not a file under {prefix}")
    return pure


def _hash(paths: list[Path]) -> list[str]:
    """Read every byte now: no stat-keyed cache, since a swap can keep size and mtime."""
    return hash_many([str(p) for p in paths], [os.lstat(p).st_size for p in paths])


def _place(src: Path, dest: Path) -> None:
    """Copy `src` to a new file `dest` that this process owns, never through a symlink.

    A copy, not a hard link: a hard link would share the inode with whoever can write the
    earlier file (its owner, any other link to it), who could then change this run's attested
    product in place while a later stage reads it. The copy is what gets re-hashed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise _Refused(PRODUCT, f"{src} is not a regular file")
        with open(dest, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


class StageReuse:
    """Finds, checks and adopts earlier links for the stages of one run (or of `status`)."""

    def __init__(
        self,
        workspace: Workspace,
        *,
        run_id: str,
        key: PublicKey,
        code: CodeManifest,
    ) -> None:
        """`key`: the functionary key the layout names for every step (the runner's own);
        `run_id`: the run being made (its own links are never candidates)."""
        self.ws = workspace
        self.run_id = run_id
        self.key = key
        self.code = code
        self._runs = earlier_runs(workspace, exclude=run_id)

    def _candidates(self, stage: str) -> Iterator[tuple[str, Path]]:
        """The newest MAX_CANDIDATES earlier links of `stage`: only runs that have one count,
        so empty or failed run directories cannot crowd the real ones out of the window."""
        found = 0
        for run_id in self._runs:
            path = self.ws.links(run_id) / link_filename(stage, self.key.keyid)
            if not path.is_file():
                continue
            yield run_id, path
            found += 1
            if found >= MAX_CANDIDATES:
                return

    def find(self, want: Expected, *, adopt_into: Path | None = None) -> Verdict:
        """The newest earlier link that proves `want`, or why none does.

        Without `adopt_into` (status), the earlier products and logs are re-hashed where they
        are; with it (the new run's directory), they are placed there first (`<stage>/...`,
        `logs/<stage>.*`) and re-hashed where they landed, so what the new run attests is
        exactly what was checked. A refused adoption takes back what it placed.
        """
        stage = want.stage
        if stage.impl.publishes:
            return Verdict(
                stage.name,
                None,
                (
                    Reason(
                        PUBLISHES, "its products name the run that published them; it always runs"
                    ),
                ),
            )
        reasons: list[Reason] = []
        for run_id, path in self._candidates(stage.name):
            if not path.is_file():
                continue  # that run did not get this far; not a reason worth reporting
            try:
                earlier = self._check(run_id, path, want, adopt_into)
            except _Refused as e:
                reasons.append(Reason(e.kind, e.detail, run_id))
                if adopt_into is not None:
                    _clear(adopt_into, stage.name)
                continue
            return Verdict(stage.name, earlier, tuple(reasons))
        if not reasons:
            reasons.append(Reason(NO_RUN, "no earlier run of this workspace has a link for it"))
        return Verdict(stage.name, None, tuple(reasons))

    def _check(self, run_id: str, path: Path, want: Expected, adopt_into: Path | None) -> Earlier:
        stage = want.stage
        try:
            link = read_signed_link(path, self.key)
        except LinkSignatureError as e:
            raise _Refused(SIGNATURE, e.message) from e
        except (InputError, OSError) as e:
            raise _Refused(SIGNATURE, f"link {path} cannot be read as a signed link: {e}") from e
        env = link.environment if isinstance(link.environment, dict) else {}
        if link.name != stage.name or env.get("run_id") != run_id:
            raise _Refused(
                NOT_THIS_STEP,
                f"{path.name} is a link for step {link.name!r} of run {env.get('run_id')!r}, "
                f"not for '{stage.name}' of run {run_id} (copied from elsewhere?)",
            )
        expected = stage_command(stage.impl.module, stage.name)
        if list(link.command) != expected:
            raise _Refused(COMMAND, f"it ran {list(link.command)}, the layout expects {expected}")
        if link.byproducts.get("return-value") != 0:
            raise _Refused(COMMAND, f"it returned {link.byproducts.get('return-value')!r}")
        code = _mapping(env.get("code"))
        if code.get("sha256") != self.code.sha256:
            changed = self.code.diff(dict(_mapping(code.get("manifest"))))[:5]
            raise _Refused(CODE, "chainproof's or a stage's code changed: " + "; ".join(changed))
        if env.get("lock_sha256") != want.lock_sha256:
            raise _Refused(
                LOCK,
                f"it ran under lock sha256 {str(env.get('lock_sha256'))[:12]}…, "
                f"the lock is {want.lock_sha256[:12]}… now",
            )
        if env.get("sandbox") != want.sandbox:
            raise _Refused(
                SANDBOX, f"it ran under sandbox {env.get('sandbox')!r}, not {want.sandbox!r}"
            )
        run_dir = self.ws.runs / run_id
        self._check_spec(run_id, run_dir, link, want)
        old = {n: d for n, d in link.materials.items() if n != spec_name(stage.name)}
        if diff := _material_diff(old, want.materials):
            lock_changed = [d for d in diff if d.startswith("locks/")]
            raise _Refused(
                LOCK if lock_changed else MATERIAL, "; ".join((lock_changed or diff)[:5])
            )
        for param, external in want.external.items():
            pins = {v for v in want.spec.get("params", {}).values() if isinstance(v, str)}
            try:
                pinned = external.is_file() and sha256_file(external) in pins
            except OSError:  # unreadable now: not proven, so not reused
                pinned = False
            if not pinned:
                raise _Refused(
                    EXTERNAL,
                    f"its input {param!r} ({external}) is not pinned by its sha256 in the spec",
                )
        self._check_products(run_dir, link, stage.name, adopt_into)
        return Earlier(run_id, run_dir, path, sha256_file(path), link)

    def _check_spec(self, run_id: str, run_dir: Path, link: Link, want: Expected) -> None:
        name = spec_name(want.stage.name)
        signed = link.materials.get(name)
        path = run_dir / name
        try:
            if os.path.islink(path):
                raise _Refused(SPEC, f"its spec {name} is a symlink")
            data = bounded.read_bytes(path, what="spec")  # hashed and parsed: the same bytes
            if sha256_bytes(data) != _digest(signed):
                raise _Refused(SPEC, f"its spec {name} is not the one its link signed")
            old = bounded.loads_json(data, source=str(path))
        except (OSError, InputError) as e:
            raise _Refused(SPEC, f"its spec {name} cannot be read: {e}") from e
        then = _normalized(old, _identity(self.ws, run_id))
        now = _normalized(want.spec, _identity(self.ws, self.run_id))
        if then != now:
            raise _Refused(SPEC, "; ".join(_spec_diff(then, now)[:5]) or "the spec differs")

    def _check_products(
        self, run_dir: Path, link: Link, stage: str, adopt_into: Path | None
    ) -> None:
        """The earlier products and logs are exactly what the link signed, as regular files;
        with `adopt_into` (the new run), placed there first and re-hashed where they landed."""
        prefix = f"{stage}/"
        signed = {_relative(n, prefix).as_posix(): _digest(d) for n, d in link.products.items()}
        logs: dict[str, str] = {}
        for which in ("stdout", "stderr"):
            entry = link.byproducts.get(which)
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                if entry["path"] != f"logs/{stage}.{which}":
                    raise _Refused(NOT_THIS_STEP, f"its {which} log is {entry['path']!r}")
                logs[entry["path"]] = _digest(entry)
        for directory in (run_dir / stage, run_dir / "logs"):
            if os.path.islink(directory) or not directory.is_dir():
                raise _Refused(PRODUCT, f"{directory} is a symlink or not a directory")
        try:
            present = {n for n, _, _ in scan_tree(run_dir / stage, prefix=prefix)}
        except (InputError, OSError) as e:  # a symlink among the products
            raise _Refused(PRODUCT, str(getattr(e, "message", e))) from e
        if present != set(signed):
            extra, missing = sorted(present - set(signed)), sorted(set(signed) - present)
            raise _Refused(
                PRODUCT,
                "its directory no longer holds exactly what it signed: "
                + ", ".join(
                    [*(f"{n} unsigned" for n in extra), *(f"{n} missing" for n in missing)][:5]
                ),
            )
        for name in logs:
            if os.path.islink(run_dir / name) or not (run_dir / name).is_file():
                raise _Refused(LOG, f"its log {name} is missing or not a regular file")
        names = sorted(signed)
        expected = {**signed, **logs}
        everything = [*names, *sorted(logs)]
        targets = [(adopt_into or run_dir) / n for n in everything]
        if adopt_into is not None:
            for name, dest in zip(everything, targets, strict=True):
                try:
                    _place(run_dir / name, dest)
                except OSError as e:
                    raise _Refused(PRODUCT, f"{run_dir / name} cannot be placed here: {e}") from e
        try:
            digests = _hash(targets)
        except OSError as e:  # unreadable or vanished: this candidate fails, the next is tried
            raise _Refused(PRODUCT, f"its products cannot be read: {e}") from e
        for name, digest in zip(everything, digests, strict=True):
            if digest != expected[name]:
                raise _Refused(
                    LOG if name in logs else PRODUCT,
                    f"{name} was changed after it was signed: sha256 {digest[:12]}… on disk, "
                    f"{expected[name][:12]}… in its link",
                )

    def link_fields(
        self, earlier: Earlier, *, environment: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(byproducts, environment) of the new run's link for a reused stage.

        The byproducts (return value, logs, duration) and the environment fingerprint are the
        earlier link's: they describe the process that made the products. `environment`
        overrides what binds the link to this run (run id, config, code), and `reused` says
        where the products came from."""
        env = dict(earlier.link.environment)
        env.update(environment)
        env["reused"] = earlier.record(self.ws.root)
        return dict(earlier.link.byproducts), env


def _clear(run_dir: Path, stage: str) -> None:
    """Take back what a refused adoption placed: the stage's directory is left empty, as a
    stage about to run expects it, and its logs are left to the stage."""
    directory = run_dir / stage
    if directory.is_dir():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for which in ("stdout", "stderr"):
        (run_dir / "logs" / f"{stage}.{which}").unlink(missing_ok=True)
