"""One side of `chainproof diff`: a run directory or a release bundle read into a `Lineage`.

Config, locks, links, the signed dependency scan, dataset, metrics and the released model, all
as recorded and NOT verified (that is `chainproof verify`'s job).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from pipeline import bounded
from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.provenance.links import Link, read_link
from pipeline.provenance.statements import payload_of
from pipeline.release.verify import is_bundle
from pipeline.scan import deps
from pipeline.workspace import DEPENDENCIES, read_run_record

RUN, BUNDLE = "run", "bundle"
METRICS, MANIFEST, MODEL_CARD, RELEASE = (
    "metrics.json",
    "manifest.json",
    "model_card.json",
    "release.json",
)
NOT_VERIFIED = (
    "read as recorded, NOT verified: run `chainproof verify` on each side before relying on this"
)
_WHERE = "pass runs/<run-id>, runs/latest or releases/<name>/<version>"
# Bounds on what a side may make us read: far above anything chainproof writes (a link of a
# big SavedModel is a few hundred KB), far below what would exhaust memory or the stack.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_LINKS = 1000
MAX_DEPTH = 64  # nesting of any JSON/YAML value
FRAMEWORK_FIELDS = ("tensorflow", "keras")


@dataclass(frozen=True)
class StageRecord:
    """One stage as recorded. `params` is None where the shape does not record them."""

    name: str
    kind: str | None
    params: Mapping[str, Any] | None
    environment: Mapping[str, Any]  # the link's environment; {} without a link
    materials: Mapping[str, str]  # artifact name -> sha256
    products: Mapping[str, str]
    linked: bool


@dataclass(frozen=True)
class LockRecord:
    name: str
    sha256: str
    graph: deps.DepGraph
    hashes: Mapping[str, frozenset[str]]  # pin -> its --hash digests; {} for a hashless lock


@dataclass(frozen=True)
class VulnFinding:
    id: str
    aliases: tuple[str, ...]
    package: str
    version: str
    severity: str
    lock: str
    paths: tuple[str, ...]

    @property
    def names(self) -> frozenset[str]:
        return frozenset((self.id, *self.aliases))


@dataclass(frozen=True)
class ScanRecord:
    """A dependency scan: `state` is "scanned", "not scanned" or "no statement"."""

    state: str
    detail: str
    database: str | None  # the OSV store's content sha256
    findings: tuple[VulnFinding, ...] = ()

    def describe(self) -> str:
        if self.state != "scanned":
            return f"{self.state.upper()} ({self.detail})" if self.detail else self.state.upper()
        n = len(self.findings)
        return f"scanned against db {short(self.database)}: {self.detail}, {n} finding(s)"


@dataclass(frozen=True)
class Lineage:
    """Everything `diff` compares about one run directory or release bundle.

    Gathered by reading the files as they are, WITHOUT verifying signatures, digests or the
    layout: a tampered side diffs like any other. Verification is `chainproof verify`'s job;
    run it on both sides before relying on a diff. Treat the mappings as read-only. What a
    shape does not record is None or empty: a bundle has no config.yaml, no stage specs
    (only the training params its metrics carry) and no dataset file.
    """

    path: Path
    kind: str  # RUN | BUNDLE
    label: str
    pipeline: str | None
    run_id: str | None
    source_commit: str | None
    status: str | None
    config_sha256: str | None
    config: Mapping[str, Any] | None  # the recorded config.yaml, parsed, not validated
    stages: tuple[StageRecord, ...]
    locks: Mapping[str, LockRecord]
    scan: ScanRecord
    dataset: Mapping[str, Any]
    metrics: Mapping[str, Any]  # the held-out `test` block of metrics.json
    framework: Mapping[str, Any]
    model: Mapping[str, Any]
    base_model: Mapping[str, str]  # where it was named -> its value or digest

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name), None)


def require_target(path: Path) -> None:
    """`path` must be an existing directory: a run or a release bundle (InputError if not)."""
    if not path.exists():
        raise InputError(f"{path} does not exist", hint=_WHERE)
    if not path.is_dir():
        raise InputError(f"{path} is not a directory", hint=_WHERE)


def load_lineage(path: Path) -> Lineage:
    """Read a run (`runs/<id>`, `runs/latest`) or a release bundle, without verifying it."""
    require_target(path)
    return _load_bundle(path) if is_bundle(path) else _load_run(path)


def _load_run(path: Path) -> Lineage:
    run_dir = path.resolve()
    record = run_record(run_dir)
    links = _links(run_links_dir(run_dir, record))
    names = [n for n in _list(record.get("stages")) if _stage_name(n)]
    names += [n for n in stage_order(links) if n not in names]
    stages = []
    for name in names:
        spec = _read_json(run_dir / "specs" / f"{name}.json")
        link = links.get(name)
        kind = _str(spec.get("kind")) or (_kind(link.command) if link else None)
        stages.append(_stage_record(name, kind, spec.get("params"), link))
    config_path = run_dir / "config.yaml"
    config = _read_yaml(config_path) if config_path.is_file() else None
    return _finish(
        path,
        kind=RUN,
        root=run_dir,
        metrics=released_json(run_dir, names, METRICS),
        card=released_json(run_dir, names, MODEL_CARD),
        label=f"run {_str(record.get('run_id')) or run_dir.name}",
        pipeline=_str(record.get("pipeline")),
        run_id=_str(record.get("run_id")),
        source_commit=_str(record.get("source_commit")),
        status=_str(record.get("status")),
        config_sha256=_str(record.get("config_sha256")),
        config=config if isinstance(config, Mapping) else None,
        stages=stages,
        locks_dir=run_dir / "locks",
        statement=run_dir / DEPENDENCIES,
    )


def _load_bundle(path: Path) -> Lineage:
    bundle = path.resolve()
    root = bundle / "artifacts"
    links = _links(bundle / "attestations")
    order = stage_order(links)
    metrics = released_json(root, order, METRICS)
    card = released_json(root, order, MODEL_CARD)
    train_params = (
        metrics.get("params") or card.get("training_params") or card.get("training_config")
    )
    kinds = {name: _kind(link.command) for name, link in links.items()}
    trainers = [n for n, k in kinds.items() if k == "train"]
    stages = [
        # A bundle ships no specs: only the training params, via metrics.json / the model card.
        _stage_record(n, kinds[n], train_params if [n] == trainers else None, links[n])
        for n in order
    ]
    name, version, run_id = release_identity(bundle, order)
    config_digests = {_str(s.environment.get("config_sha256")) for s in stages} - {None}
    return _finish(
        path,
        kind=BUNDLE,
        root=root,
        metrics=metrics,
        card=card,
        label=f"release {name} {version}",
        pipeline=name,
        run_id=run_id,
        source_commit=None,
        status=None,
        config_sha256=next(iter(config_digests)) if len(config_digests) == 1 else None,
        config=None,
        stages=stages,
        locks_dir=bundle / "locks",
        statement=bundle / "attestations" / DEPENDENCIES,
    )


def _finish(
    path: Path,
    *,
    root: Path,
    metrics: Mapping[str, Any],
    card: Mapping[str, Any],
    stages: list[StageRecord],
    locks_dir: Path,
    statement: Path,
    **identity: Any,
) -> Lineage:
    """The parts both shapes read the same way: `root` holds `<stage>/<file>` products, and
    `metrics` / `card` are the released metrics.json and model card ({} when absent)."""
    framework = _map(metrics.get("framework") or card.get("framework") or card.get("environment"))
    return Lineage(
        path=path,
        stages=tuple(stages),
        locks=_locks(locks_dir),
        scan=scan_record(statement),
        dataset=_dataset(root, stages, metrics.get("dataset") or card.get("training_data")),
        metrics=_metrics(metrics.get("test") or card.get("metrics")),
        framework={k: framework.get(k) for k in FRAMEWORK_FIELDS if framework.get(k)},
        model=_model(stages, metrics),
        base_model=_base_model(stages),
        **identity,
    )


def run_record(run_dir: Path) -> dict[str, Any]:
    """`run.json`, bounded like every other file a side supplies."""
    _check_size(run_dir / "run.json")
    try:
        record = read_run_record(run_dir)
    except RecursionError:
        raise InputError(
            f"{run_dir / 'run.json'} is nested too deeply to be a run record"
        ) from None
    _check_depth(record, run_dir / "run.json")
    return record


def run_links_dir(run_dir: Path, record: Mapping[str, Any]) -> Path | None:
    """Where the run record says its links are (relative to the run), if it says."""
    links = record.get("links")
    return (run_dir / links).resolve() if isinstance(links, str) and links else None


def link_files(directory: Path | None) -> dict[str, tuple[Path, Link]]:
    """Stage name -> (file, payload) of its link; the first by file name if a stage has several.

    Read UNVERIFIED. A file that is not a link, too big, or nested too deeply is an InputError."""
    out: dict[str, tuple[Path, Link]] = {}
    if directory is None or not directory.is_dir():
        return out
    paths = sorted(directory.glob("*.link"))
    if len(paths) > MAX_LINKS:
        raise InputError(
            f"{directory} holds {len(paths)} link files, more than the {MAX_LINKS} a chainproof "
            "run or bundle may have",
            hint="this is not a directory chainproof wrote; do not trust it",
        )
    for path in paths:
        _check_size(path)
        link = read_link(path)
        if not _stage_name(link.name):
            raise InputError(f"{path}: the link names no usable step ({link.name!r})")
        for part in (link.materials, link.products, link.environment, link.byproducts):
            _check_depth(part, path)
        out.setdefault(link.name, (path, link))
    return out


def _links(directory: Path | None) -> dict[str, Link]:
    return {name: link for name, (_, link) in link_files(directory).items()}


def release_identity(bundle: Path, order: list[str]) -> tuple[str, str, str | None]:
    """A bundle's (name, version, run id): release.json's, else the directory names."""
    release = released_json(bundle / "artifacts", order, RELEASE)
    name = _str(release.get("name")) or bundle.parent.name
    version = _str(release.get("version")) or bundle.name
    return name, version, _str(release.get("run_id"))


def stage_order(links: Mapping[str, Link]) -> list[str]:
    """Stages in dependency order: a stage consumes `<upstream>/...` materials."""
    needs = {
        name: {m.split("/", 1)[0] for m in link.materials} & (set(links) - {name})
        for name, link in links.items()
    }
    order: list[str] = []
    while len(order) < len(needs):
        ready = sorted(n for n, up in needs.items() if n not in order and up <= set(order))
        order.append(ready[0] if ready else min(set(needs) - set(order)))  # a cycle: any order
    return order


@cache
def _kinds_by_module() -> dict[str, str]:
    from pipeline.registry import known_kinds, stage_module

    return {stage_module(k): k for k in known_kinds()}


def _kind(command: Iterable[str]) -> str | None:
    """The stage kind from the recorded `python -I -m <module> ...` command."""
    cmd = list(command)
    if "-m" not in cmd or cmd.index("-m") + 1 >= len(cmd):
        return None
    module = cmd[cmd.index("-m") + 1]
    if not isinstance(module, str):
        return None
    return _kinds_by_module().get(module, module.rsplit(".", 1)[-1])


def _stage_record(name: str, kind: str | None, params: Any, link: Any) -> StageRecord:
    digests = lambda d: {n: v.get("sha256", "") for n, v in d.items()}  # noqa: E731
    return StageRecord(
        name=name,
        kind=kind,
        params=params if isinstance(params, Mapping) else None,
        environment=dict(link.environment) if link else {},
        materials=digests(link.materials) if link else {},
        products=digests(link.products) if link else {},
        linked=link is not None,
    )


def _check_size(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError:
        return  # absent or unreadable: the reader that follows says which
    if size > MAX_FILE_BYTES:
        raise InputError(
            f"{path} is {size} bytes, more than the {MAX_FILE_BYTES} any chainproof record has",
            hint="this is not a file chainproof wrote; do not trust the run or bundle",
        )


def _check_depth(value: Any, path: Path) -> None:
    """Refuse a value nested deeper than MAX_DEPTH (iteratively: the check cannot overflow)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InputError(
                f"{path} nests values more than {MAX_DEPTH} deep; chainproof never writes that",
                hint="this is not a file chainproof wrote; do not trust the run or bundle",
            )
        if isinstance(item, Mapping):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list | tuple):
            stack += [(v, depth + 1) for v in item]


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object, or {} when the file is absent (a stage that did not run)."""
    _check_size(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    _check_depth(data, path)
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> Any:
    """A recorded config copy: unsigned, so read within pipeline.bounded's caps (no alias bomb)."""
    _check_size(path)
    try:
        data = bounded.read_yaml(path, what="recorded config")
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    _check_depth(data, path)
    return data


def released_json(root: Path, stages: list[str], name: str) -> dict[str, Any]:
    """`<stage>/<name>` of the last stage that has one: what the run released."""
    for stage in reversed(stages):
        if (root / stage / name).is_file():
            return _read_json(root / stage / name)
    return {}


def _map(value: Any) -> Mapping[str, Any]:
    """A side's value where a mapping belongs; anything else reads as absent."""
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _stage_name(value: Any) -> bool:
    """A name usable as `<stage>/...` and as a file name: what the config schema allows."""
    return isinstance(value, str) and bool(value) and "/" not in value and value not in (".", "..")


def _metrics(block: Any) -> Mapping[str, Any]:
    """The held-out metrics: numbers stay, per-class entries that are not mappings are dropped."""
    m = dict(_map(block))
    if "per_class" in m:
        m["per_class"] = {str(c): v for c, v in _map(m["per_class"]).items() if _map(v)}
    return m


def _locks(directory: Path) -> dict[str, LockRecord]:
    from pipeline.envcheck import parse_lock

    out = {}
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if not path.is_file():
            continue
        _check_size(path)
        try:
            hashes = {n: frozenset(p.hashes) for n, p in parse_lock(path).pins.items()}
        except InputError:  # a lock without --hash lines still diffs by version
            hashes = {}
        out[path.name] = LockRecord(path.name, sha256_file(path), deps.from_lock(path), hashes)
    return out


def scan_record(path: Path) -> ScanRecord:
    """What a signed dependency-scan Statement says (UNVERIFIED): scanned or not, and findings."""
    if not path.is_file():
        return ScanRecord("no statement", f"no {DEPENDENCIES}", None)
    _check_size(path)
    try:
        payload = payload_of(path)
        _check_depth(payload, path)
        cp = _map(_map(_map(payload).get("predicate")).get("chainproof"))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return ScanRecord("no statement", f"{DEPENDENCIES} is unreadable: {e}", None)
    if cp.get("scanned") is not True:
        return ScanRecord("not scanned", str(cp.get("reason") or ""), None)
    findings = tuple(
        VulnFinding(
            id=str(f.get("id")),
            aliases=tuple(sorted(str(x) for x in _list(f.get("aliases")))),
            package=str(f.get("package")),
            version=str(f.get("version")),
            severity=str(f.get("severity") or "unknown"),
            lock=str(lock.get("lock")),
            paths=tuple(str(x) for x in _list(f.get("paths"))),
        )
        for lock in map(_map, _list(cp.get("locks")))
        for f in map(_map, _list(lock.get("findings")))
        if f
    )
    db = _map(cp.get("database"))
    return ScanRecord("scanned", str(cp.get("verdict", "")), _str(db.get("sha256")), findings)


def _dataset(root: Path, stages: list[StageRecord], block: Any) -> dict[str, Any]:
    if not isinstance(block, Mapping):  # no metrics: the source stage's manifest, if any
        manifest = released_json(root, [s.name for s in stages if s.kind == "source"], MANIFEST)
        block = {**manifest, "sha256": manifest.get("dataset_sha256")} if manifest else {}
    split = _map(block.get("split"))
    origin = _map(block.get("source"))
    train, test = split.get("train"), split.get("test")
    digest = block.get("sha256")
    size = None
    for stage in stages:  # the file itself is in a run, never in a bundle
        for name, d in stage.products.items():
            if d == digest and (root / name).is_file():
                size = (root / name).stat().st_size
    return {
        "name": block.get("name"),
        "sha256": digest,
        "origin": origin.get("location") or origin.get("url") or origin.get("path"),
        "origin_sha256": origin.get("sha256"),
        "samples": train + test if isinstance(train, int) and isinstance(test, int) else None,
        "train": train,
        "test": test,
        "test_fraction": split.get("test_fraction"),
        "split_seed": split.get("seed"),
        "bytes": size,
    }


def _model(stages: list[StageRecord], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The released weights: the last `.keras` product in stage order."""
    out: dict[str, Any] = {"file": None, "sha256": None}
    for stage in stages:
        for name, digest in stage.products.items():
            if name.endswith(".keras"):
                out = {"file": name, "sha256": digest}
    arch = _map(metrics.get("model"))
    out["parameters"] = arch.get("parameters")
    out["layers"] = " ".join(str(x) for x in _list(arch.get("layers"))) or None
    return out


def _base_model(stages: list[StageRecord]) -> dict[str, str]:
    found = {}
    for stage in stages:
        for key, value in flatten(stage.params or {}).items():
            if key.split(".")[-1].split("[")[0] == "base_model" and value is not None:
                found[f"{stage.name} param {key}"] = str(value)
        for name, digest in stage.materials.items():
            if fnmatch.fnmatch(PurePosixPath(name).name.lower(), "*base*"):
                found[f"{stage.name} material {name}"] = f"sha256:{digest}"
    return found


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as `a.b[0].c` -> leaf; empty containers are leaves."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list | tuple) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value} if prefix else {}


def short(digest: Any) -> str:
    text = str(digest) if digest else "?"
    return text[:12] + "…" if len(text) > 12 else text
