"""`chainproof diff A B`: what changed between two runs or release bundles.

Each side is read into a `Lineage` (as recorded, NOT verified) and compared group by group:
dependencies (per lock, with the path that pulls each changed distribution in), vulnerabilities
(from the signed scan Statements, or a rescan of both locks against one database), data, base
model, config, environment, metrics and the released model. Renderers: a table and JSON.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from packaging.version import InvalidVersion, Version

from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.provenance.links import read_link
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
# Link environment fields worth comparing; run ids, counts and timings differ on every run.
ENV_FIELDS = (
    "python",
    "implementation",
    "platform",
    "machine",
    "lock",
    "lock_sha256",
    "distributions_sha256",
    "stage_environment",
)
FRAMEWORK_FIELDS = ("tensorflow", "keras")
PATHS_SHOWN = 3  # paths kept per changed distribution (their number can grow exponentially)


# --------------------------------------------------------------------------- one side


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
        return f"scanned against db {_short(self.database)}: {self.detail}, {n} finding(s)"


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


def load_lineage(path: Path) -> Lineage:
    """Read a run (`runs/<id>`, `runs/latest`) or a release bundle, without verifying it."""
    if not path.exists():
        raise InputError(f"{path} does not exist", hint=_WHERE)
    if not path.is_dir():
        raise InputError(f"{path} is not a directory", hint=_WHERE)
    return _load_bundle(path) if is_bundle(path) else _load_run(path)


def _load_run(path: Path) -> Lineage:
    run_dir = path.resolve()
    record = read_run_record(run_dir)
    links = _links((run_dir / record["links"]).resolve() if record.get("links") else None)
    names = list(record.get("stages") or [])
    names += [n for n in _order(links) if n not in names]
    stages = []
    for name in names:
        spec = _read_json(run_dir / "specs" / f"{name}.json")
        link = links.get(name)
        kind = spec.get("kind") or (_kind(link.command) if link else None)
        stages.append(_stage_record(name, kind, spec.get("params"), link))
    config_path = run_dir / "config.yaml"
    config = _read_yaml(config_path) if config_path.is_file() else None
    return _finish(
        path,
        kind=RUN,
        root=run_dir,
        metrics=_released_json(run_dir, names, METRICS),
        card=_released_json(run_dir, names, MODEL_CARD),
        label=f"run {record.get('run_id', run_dir.name)}",
        pipeline=record.get("pipeline"),
        run_id=record.get("run_id"),
        source_commit=record.get("source_commit"),
        status=record.get("status"),
        config_sha256=record.get("config_sha256"),
        config=config if isinstance(config, Mapping) else None,
        stages=stages,
        locks_dir=run_dir / "locks",
        statement=run_dir / DEPENDENCIES,
    )


def _load_bundle(path: Path) -> Lineage:
    bundle = path.resolve()
    root = bundle / "artifacts"
    links = _links(bundle / "attestations")
    order = _order(links)
    metrics = _released_json(root, order, METRICS)
    card = _released_json(root, order, MODEL_CARD)
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
    release = _released_json(root, order, RELEASE)
    name = release.get("name") or bundle.parent.name
    version = release.get("version") or bundle.name
    config_digests = {s.environment.get("config_sha256") for s in stages} - {None}
    return _finish(
        path,
        kind=BUNDLE,
        root=root,
        metrics=metrics,
        card=card,
        label=f"release {name} {version}",
        pipeline=name,
        run_id=release.get("run_id"),
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
    framework = metrics.get("framework") or card.get("framework") or card.get("environment") or {}
    return Lineage(
        path=path,
        stages=tuple(stages),
        locks=_locks(locks_dir),
        scan=_scan_record(statement),
        dataset=_dataset(root, stages, metrics.get("dataset") or card.get("training_data")),
        metrics=metrics.get("test") or card.get("metrics") or {},
        framework={k: framework.get(k) for k in FRAMEWORK_FIELDS if framework.get(k)},
        model=_model(stages, metrics),
        base_model=_base_model(stages),
        **identity,
    )


def _links(directory: Path | None) -> dict[str, Any]:
    """Stage name -> its link payload (the first by file name if a stage has several)."""
    out: dict[str, Any] = {}
    if directory is None or not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.link")):
        link = read_link(path)
        out.setdefault(link.name, link)
    return out


def _order(links: Mapping[str, Any]) -> list[str]:
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


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object, or {} when the file is absent (a stage that did not run)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read {path}: {e}") from e


def _released_json(root: Path, stages: list[str], name: str) -> dict[str, Any]:
    """`<stage>/<name>` of the last stage that has one: what the run released."""
    for stage in reversed(stages):
        if (root / stage / name).is_file():
            return _read_json(root / stage / name)
    return {}


def _locks(directory: Path) -> dict[str, LockRecord]:
    from pipeline.envcheck import parse_lock

    out = {}
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if not path.is_file():
            continue
        try:
            hashes = {n: frozenset(p.hashes) for n, p in parse_lock(path).pins.items()}
        except InputError:  # a lock without --hash lines still diffs by version
            hashes = {}
        out[path.name] = LockRecord(path.name, sha256_file(path), deps.from_lock(path), hashes)
    return out


def _scan_record(path: Path) -> ScanRecord:
    if not path.is_file():
        return ScanRecord("no statement", f"no {DEPENDENCIES}", None)
    try:
        cp = payload_of(path).get("predicate", {}).get("chainproof", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        return ScanRecord("no statement", f"{DEPENDENCIES} is unreadable: {e}", None)
    if not cp.get("scanned"):
        return ScanRecord("not scanned", str(cp.get("reason") or ""), None)
    findings = tuple(
        VulnFinding(
            id=str(f.get("id")),
            aliases=tuple(sorted(f.get("aliases") or ())),
            package=str(f.get("package")),
            version=str(f.get("version")),
            severity=str(f.get("severity") or "unknown"),
            lock=str(lock.get("lock")),
            paths=tuple(f.get("paths") or ()),
        )
        for lock in cp.get("locks") or []
        for f in lock.get("findings") or []
    )
    db = cp.get("database") or {}
    return ScanRecord("scanned", str(cp.get("verdict", "")), db.get("sha256"), findings)


def _dataset(root: Path, stages: list[StageRecord], block: Any) -> dict[str, Any]:
    if not isinstance(block, Mapping):  # no metrics: the source stage's manifest, if any
        manifest = _released_json(root, [s.name for s in stages if s.kind == "source"], MANIFEST)
        block = {**manifest, "sha256": manifest.get("dataset_sha256")} if manifest else {}
    split = block.get("split") or {}
    origin = block.get("source") or {}
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
    arch = metrics.get("model") or {}
    out["parameters"] = arch.get("parameters")
    out["layers"] = " ".join(arch.get("layers") or ()) or None
    return out


def _base_model(stages: list[StageRecord]) -> dict[str, str]:
    found = {}
    for stage in stages:
        for key, value in _flatten(stage.params or {}).items():
            if key.split(".")[-1].split("[")[0] == "base_model" and value is not None:
                found[f"{stage.name} param {key}"] = str(value)
        for name, digest in stage.materials.items():
            if fnmatch.fnmatch(PurePosixPath(name).name.lower(), "*base*"):
                found[f"{stage.name} material {name}"] = f"sha256:{digest}"
    return found


# --------------------------------------------------------------------------- the diff


@dataclass(frozen=True)
class Change:
    key: str
    a: Any
    b: Any


@dataclass(frozen=True)
class FieldsDiff:
    """Named values on both sides; `changes` lists those known on both sides that differ."""

    a: Mapping[str, Any]
    b: Mapping[str, Any]
    changes: tuple[Change, ...]

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class DependencyChange:
    package: str
    change: str  # added | removed | upgraded | downgraded | changed | rehashed
    a_version: str | None
    b_version: str | None
    direct: bool
    paths: tuple[str, ...]  # in the lock that has it: B's, or A's for a removal


@dataclass(frozen=True)
class LockDiff:
    a_name: str | None  # None: the lock is only on the other side
    b_name: str | None
    a_sha256: str | None
    b_sha256: str | None
    packages: int  # pinned in B's lock (A's if only A has it)
    changes: tuple[DependencyChange, ...]
    digest_only: str | None = None  # "A"/"B": that side ships no lock file, only its links' digest

    @property
    def name(self) -> str:
        if self.a_name and self.b_name and self.a_name != self.b_name:
            return f"{self.a_name} -> {self.b_name}"
        return str(self.a_name or self.b_name)

    @property
    def changed(self) -> bool:
        return self.a_sha256 != self.b_sha256

    def of(self, change: str) -> tuple[DependencyChange, ...]:
        return tuple(c for c in self.changes if c.change == change)


@dataclass(frozen=True)
class DependencyDiff:
    locks: tuple[LockDiff, ...]
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return any(lock.changed for lock in self.locks)


@dataclass(frozen=True)
class VulnChange:
    id: str
    aliases: tuple[str, ...]
    package: str
    a_version: str | None
    b_version: str | None
    severity: str
    locks: tuple[str, ...]
    paths: tuple[str, ...]  # B's paths; A's for a fixed one


@dataclass(frozen=True)
class VulnDiff:
    """new/fixed/still only when both sides were scanned; else `unknown` holds the findings
    of the side that was, since "new" cannot be told from "never looked"."""

    basis: str
    a_scan: str
    b_scan: str
    compared: bool
    new: tuple[VulnChange, ...] = ()
    fixed: tuple[VulnChange, ...] = ()
    still: tuple[VulnChange, ...] = ()
    unknown: tuple[VulnChange, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.new or self.fixed or self.unknown) or self.a_scan != self.b_scan


@dataclass(frozen=True)
class ParamChange:
    scope: str  # a stage name, or "(pipeline)" for top-level config keys
    key: str  # dotted, with [i] for list items
    change: str  # added | removed | changed
    a: Any
    b: Any


@dataclass(frozen=True)
class ConfigDiff:
    a_sha256: str | None
    b_sha256: str | None
    stages_added: tuple[str, ...]
    stages_removed: tuple[str, ...]
    kinds: tuple[Change, ...]  # key: the stage
    params: tuple[ParamChange, ...]  # resolved hyperparameters (specs / training params)
    settings: tuple[ParamChange, ...]  # the rest of config.yaml (runs only)
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(
            self.a_sha256 != self.b_sha256
            or self.stages_added
            or self.stages_removed
            or self.kinds
            or self.params
            or self.settings
        )


@dataclass(frozen=True)
class EnvChange:
    field: str
    stages: tuple[str, ...]  # () when it differs for every stage both sides ran
    a: Any
    b: Any


@dataclass(frozen=True)
class EnvDiff:
    a: Mapping[str, Any]  # per field: the value, or "stage: value, ..." when stages differ
    b: Mapping[str, Any]
    changes: tuple[EnvChange, ...]

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class Delta:
    a: float | None
    b: float | None
    delta: float | None  # b - a when both are known

    @property
    def changed(self) -> bool:
        return self.a != self.b


@dataclass(frozen=True)
class ClassDelta:
    label: str
    precision: Delta
    recall: Delta
    f1: Delta
    support: Delta

    @property
    def changed(self) -> bool:
        return any(d.changed for d in (self.precision, self.recall, self.f1, self.support))


@dataclass(frozen=True)
class MetricsDiff:
    accuracy: Delta
    loss: Delta
    per_class: tuple[ClassDelta, ...]  # the classes both sides report
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.accuracy.changed or self.loss.changed or any(c.changed for c in self.per_class)


@dataclass(frozen=True)
class Side:
    kind: str
    label: str
    path: str
    pipeline: str | None
    run_id: str | None
    source_commit: str | None
    status: str | None


@dataclass(frozen=True)
class LineageDiff:
    a: Side
    b: Side
    dependencies: DependencyDiff
    vulnerabilities: VulnDiff
    data: FieldsDiff
    base_model: FieldsDiff
    config: ConfigDiff
    environment: EnvDiff
    metrics: MetricsDiff
    model: FieldsDiff
    verified: bool = False  # never: diff reads, `chainproof verify` checks

    GROUPS = (
        "dependencies",
        "vulnerabilities",
        "data",
        "base_model",
        "config",
        "environment",
        "metrics",
        "model",
    )

    @property
    def changed(self) -> tuple[str, ...]:
        return tuple(g for g in self.GROUPS if getattr(self, g).changed)

    def to_dict(self) -> dict[str, Any]:
        return {**_plain(self), "changed": list(self.changed), "note": NOT_VERIFIED}


def diff(a: Lineage, b: Lineage, *, db: Path | None = None) -> LineageDiff:
    """Compare two lineages, A the baseline and B the candidate.

    With `db`, both sides' locks are rescanned against that one OSV store so that new and
    fixed vulnerabilities reflect the dependencies, not two databases of different ages;
    without it the comparison uses each side's own signed scan Statement.
    """
    return LineageDiff(
        a=_side(a),
        b=_side(b),
        dependencies=diff_dependencies(a, b),
        vulnerabilities=diff_vulnerabilities(a, b, db=db),
        data=_fields(a.dataset, b.dataset),
        base_model=_fields(a.base_model, b.base_model, absent_is_none=True),
        config=diff_config(a, b),
        environment=diff_environment(a, b),
        metrics=diff_metrics(a.metrics, b.metrics),
        model=_fields(a.model, b.model),
    )


def _side(x: Lineage) -> Side:
    return Side(x.kind, x.label, str(x.path), x.pipeline, x.run_id, x.source_commit, x.status)


def _fields(
    a: Mapping[str, Any], b: Mapping[str, Any], *, absent_is_none: bool = False
) -> FieldsDiff:
    """Differences in values known on both sides (or, with absent_is_none, on either)."""
    changes = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va != vb and (absent_is_none or (va is not None and vb is not None)):
            changes.append(Change(key, va, vb))
    return FieldsDiff(dict(a), dict(b), tuple(changes))


# --------------------------------------------------------------------------- dependencies


def diff_dependencies(a: Lineage, b: Lineage) -> DependencyDiff:
    """Per lock (paired by name; a lone renamed lock on each side is paired too)."""
    notes = [f"{side} ships no lock files" for side, x in (("A", a), ("B", b)) if not x.locks]
    pairs = [(a.locks[n], b.locks[n]) for n in sorted(set(a.locks) & set(b.locks))]
    only_a = [a.locks[n] for n in sorted(set(a.locks) - set(b.locks))]
    only_b = [b.locks[n] for n in sorted(set(b.locks) - set(a.locks))]
    if len(only_a) == 1 and len(only_b) == 1:
        pairs.append((only_a.pop(), only_b.pop()))
    out = [_lock_diff(la, lb) for la, lb in pairs]
    out += [_one_sided(x, here="A", recorded=_recorded_locks(b).get(x.name)) for x in only_a]
    out += [_one_sided(x, here="B", recorded=_recorded_locks(a).get(x.name)) for x in only_b]
    return DependencyDiff(tuple(out), tuple(notes))


def _one_sided(x: LockRecord, *, here: str, recorded: str | None) -> LockDiff:
    """A lock file only one side ships; the other side's links may still name its digest."""
    mine = (x.name, x.sha256)
    theirs = (x.name, recorded) if recorded else (None, None)
    (a_name, a_sha), (b_name, b_sha) = (mine, theirs) if here == "A" else (theirs, mine)
    gap = None if recorded is None else ("B" if here == "A" else "A")
    return LockDiff(a_name, b_name, a_sha, b_sha, len(x.graph.packages), (), gap)


def _recorded_locks(x: Lineage) -> dict[str, str]:
    """Lock name -> the sha256 the links recorded for it (when every link agrees)."""
    seen: dict[str, set[str]] = {}
    for s in x.stages:
        name, digest = s.environment.get("lock"), s.environment.get("lock_sha256")
        if name and digest:
            seen.setdefault(str(name), set()).add(str(digest))
    return {name: next(iter(d)) for name, d in seen.items() if len(d) == 1}


def _lock_diff(la: LockRecord, lb: LockRecord) -> LockDiff:
    ga, gb = la.graph, lb.graph
    changes = []
    for name in sorted(set(ga.packages) | set(gb.packages)):
        pa, pb = ga.packages.get(name), gb.packages.get(name)
        if pa is None:
            changes.append(_dep_change(name, "added", None, pb.version, gb))
        elif pb is None:
            changes.append(_dep_change(name, "removed", pa.version, None, ga))
        else:
            kind = _compare_versions(pa.version, pb.version)
            ha, hb = la.hashes.get(name), lb.hashes.get(name)
            if kind is None and ha and hb and ha != hb:
                kind = "rehashed"  # same version, other artifacts: worth a look
            if kind is not None:
                changes.append(_dep_change(name, kind, pa.version, pb.version, gb))
    return LockDiff(la.name, lb.name, la.sha256, lb.sha256, len(gb.packages), tuple(changes))


def _compare_versions(a: str, b: str) -> str | None:
    """upgraded / downgraded by PEP 440; "changed" if either is not a PEP 440 version."""
    try:
        va, vb = Version(a), Version(b)
    except InvalidVersion:
        return None if a == b else "changed"
    if va == vb:
        return None
    return "upgraded" if vb > va else "downgraded"


def _dep_change(
    name: str, change: str, a: str | None, b: str | None, graph: deps.DepGraph
) -> DependencyChange:
    paths = deps.paths_to(graph, name, limit=PATHS_SHOWN)
    return DependencyChange(
        package=name,
        change=change,
        a_version=a,
        b_version=b,
        direct=name in graph.roots,
        paths=tuple(deps.format_path(p, graph) for p in paths),
    )


# --------------------------------------------------------------------------- vulnerabilities


def diff_vulnerabilities(a: Lineage, b: Lineage, *, db: Path | None = None) -> VulnDiff:
    if db is not None:
        sa, sb = _rescan_both(a, b, db)
        basis = f"rescanned both sides' locks against {db} (db {_short(sa.database)})"
        notes = [f"signed statements: A {a.scan.describe()}; B {b.scan.describe()}"]
    else:
        sa, sb = a.scan, b.scan
        basis = "each side's signed dependency-scan statement"
        notes = []
        if sa.state == sb.state == "scanned" and sa.database != sb.database:
            notes.append(
                f"A was scanned against db {_short(sa.database)}, B against "
                f"{_short(sb.database)}: a 'new' finding may be a new advisory rather than a new "
                "dependency; pass --db PATH to compare both against one database"
            )
    both = sa.state == sb.state == "scanned"
    out = VulnDiff(basis=basis, a_scan=sa.describe(), b_scan=sb.describe(), compared=both)
    if both:
        new, fixed, still = _match_findings(sa.findings, sb.findings)
        return replace(out, new=new, fixed=fixed, still=still, notes=tuple(notes))
    for side, scan in (("A", sa), ("B", sb)):
        if scan.state != "scanned":
            what = "was NOT scanned" if scan.state == "not scanned" else "has no scan statement"
            notes.append(f"{side} {what}: new and fixed cannot be told apart")
    unknown: tuple[VulnChange, ...] = ()
    for side, scan in (("a", sa), ("b", sb)):
        if scan.state == "scanned":
            unknown = tuple(_vuln(g, side=side) for g in _grouped(scan.findings))
    return replace(out, unknown=unknown, notes=tuple(notes))


def _rescan_both(a: Lineage, b: Lineage, db: Path) -> tuple[ScanRecord, ScanRecord]:
    from pipeline.scan.vulndb import ScanUnavailable, VulnDB

    try:
        opened = VulnDB.open(db)
    except ScanUnavailable as e:
        raise InputError(
            f"cannot rescan against {db}: {e.message}",
            hint="pass --db with a store made by `chainproof vulndb import`, or omit --db to "
            "compare the signed scan statements",
        ) from e
    with opened:
        return _rescan(a, opened), _rescan(b, opened)


def _rescan(side: Lineage, db: Any) -> ScanRecord:
    from pipeline.scan.vulns import scan

    if not side.locks:
        return ScanRecord("not scanned", "it ships no lock files to rescan", None)
    findings = []
    for lock in side.locks.values():
        result = scan(lock.graph, db)
        findings += [
            VulnFinding(
                id=f.id,
                aliases=tuple(sorted(f.advisory.aliases)),
                package=f.package,
                version=f.version,
                severity=f.severity.rating,
                lock=lock.name,
                paths=tuple(deps.format_path(p, result.graph) for p in f.paths[:PATHS_SHOWN]),
            )
            for f in result.findings
        ]
    return ScanRecord("scanned", "rescanned", db.info.digest, tuple(findings))


def _grouped(findings: Iterable[VulnFinding]) -> list[list[VulnFinding]]:
    """One group per (package, advisory), however many locks it appears in."""
    groups: dict[tuple[str, str], list[VulnFinding]] = {}
    for f in findings:
        groups.setdefault((f.package, f.id), []).append(f)
    return [groups[k] for k in sorted(groups)]


def _match_findings(
    fa: Iterable[VulnFinding], fb: Iterable[VulnFinding]
) -> tuple[tuple[VulnChange, ...], tuple[VulnChange, ...], tuple[VulnChange, ...]]:
    """Same package and a shared id or alias: the same vulnerability (databases re-key)."""
    ga, gb = _grouped(fa), _grouped(fb)
    unmatched = list(ga)
    new, still = [], []
    for group in gb:
        names = frozenset().union(*(f.names for f in group))
        match = next(
            (g for g in unmatched if g[0].package == group[0].package and g[0].names & names),
            None,
        )
        if match is None:
            new.append(_vuln(group, side="b"))
        else:
            unmatched.remove(match)
            still.append(_vuln(group, side="b", other=match))
    fixed = [_vuln(g, side="a") for g in unmatched]
    return tuple(new), tuple(fixed), tuple(still)


def _vuln(
    group: list[VulnFinding], *, side: str, other: list[VulnFinding] | None = None
) -> VulnChange:
    """One vulnerability as found on `side` ("a" or "b"), with `other` the other side's."""
    f = group[0]
    here = ", ".join(sorted({g.version for g in group}))
    there = ", ".join(sorted({g.version for g in other})) if other else None
    aliases = {x for g in group + (other or []) for x in g.names} - {f.id}
    return VulnChange(
        id=f.id,
        aliases=tuple(sorted(aliases)),
        package=f.package,
        a_version=here if side == "a" else there,
        b_version=here if side == "b" else there,
        severity=f.severity,
        locks=tuple(sorted({g.lock for g in group})),
        paths=tuple(dict.fromkeys(p for g in group for p in g.paths)),
    )


# --------------------------------------------------------------------------- config


def diff_config(a: Lineage, b: Lineage) -> ConfigDiff:
    names_a, names_b = [s.name for s in a.stages], [s.name for s in b.stages]
    common = [n for n in names_a if n in names_b]
    kinds, params, notes = [], [], []
    unrecorded: dict[str, list[str]] = {}
    for name in common:
        sa, sb = a.stage(name), b.stage(name)
        assert sa is not None and sb is not None
        if sa.kind != sb.kind and None not in (sa.kind, sb.kind):  # unknown is not a change
            kinds.append(Change(name, sa.kind, sb.kind))
        if sa.params is None or sb.params is None:
            where = (
                "on either side"
                if sa.params is sb.params
                else "in A"
                if sa.params is None
                else "in B"
            )
            unrecorded.setdefault(where, []).append(name)
            continue
        params += _param_changes(name, sa.params, sb.params)
    for where, stages in unrecorded.items():
        notes.append(f"parameters of {', '.join(stages)} not recorded {where}")
    settings: list[ParamChange] = []
    if a.config is not None and b.config is not None:
        settings = _settings_changes(a.config, b.config, common)
    elif a.config is not None or b.config is not None:
        notes.append("config.yaml is recorded in runs only: settings outside params not compared")
    return ConfigDiff(
        a_sha256=a.config_sha256,
        b_sha256=b.config_sha256,
        stages_added=tuple(n for n in names_b if n not in names_a),
        stages_removed=tuple(n for n in names_a if n not in names_b),
        kinds=tuple(kinds),
        params=tuple(params),
        settings=tuple(settings),
        notes=tuple(notes),
    )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as `a.b[0].c` -> leaf; empty containers are leaves."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list | tuple) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value} if prefix else {}


def _param_changes(scope: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> list[ParamChange]:
    fa, fb = _flatten(a), _flatten(b)
    out = []
    for key in sorted(set(fa) | set(fb)):
        if key not in fa:
            out.append(ParamChange(scope, key, "added", None, fb[key]))
        elif key not in fb:
            out.append(ParamChange(scope, key, "removed", fa[key], None))
        elif fa[key] != fb[key]:
            out.append(ParamChange(scope, key, "changed", fa[key], fb[key]))
    return out


def _settings_changes(
    a: Mapping[str, Any], b: Mapping[str, Any], common: list[str]
) -> list[ParamChange]:
    """config.yaml outside the stage params: top-level keys, and stage fields but params."""
    top = lambda c: {k: v for k, v in c.items() if k != "stages"}  # noqa: E731
    out = _param_changes("(pipeline)", top(a), top(b))

    def stage(c: Mapping[str, Any], name: str) -> dict[str, Any]:
        for s in c.get("stages") or []:
            if isinstance(s, Mapping) and s.get("name") == name:
                return {k: v for k, v in s.items() if k not in ("name", "params")}
        return {}

    for name in common:
        out += _param_changes(name, stage(a, name), stage(b, name))
    return out


# --------------------------------------------------------------------------- environment


def _env_values(x: Lineage) -> dict[str, dict[str, Any]]:
    """field -> stage -> value, for every linked stage; frameworks under the pseudo-stage "*"."""
    out: dict[str, dict[str, Any]] = {}
    for s in x.stages:
        if not s.linked:
            continue
        env = {k: s.environment.get(k) for k in ENV_FIELDS}
        env.update(_flatten(s.environment.get("determinism") or {}, "determinism"))
        for k, v in env.items():
            out.setdefault(k, {})[s.name] = v
    for k in FRAMEWORK_FIELDS:
        out[k] = {"*": x.framework.get(k)}
    return out


def _summary_value(per_stage: Mapping[str, Any]) -> Any:
    values = {json.dumps(v, sort_keys=True, default=str) for v in per_stage.values()}
    if len(values) <= 1:
        return next(iter(per_stage.values()), None)
    return ", ".join(f"{s}: {v}" for s, v in per_stage.items())


def diff_environment(a: Lineage, b: Lineage) -> EnvDiff:
    ea, eb = _env_values(a), _env_values(b)
    changes = []
    for key in dict.fromkeys([*ENV_FIELDS, *FRAMEWORK_FIELDS, *sorted(set(ea) | set(eb))]):
        va, vb = ea.get(key, {}), eb.get(key, {})
        common = [s for s in va if s in vb]
        groups: dict[str, list[str]] = {}
        pair_of: dict[str, tuple[Any, Any]] = {}
        for s in common:
            if va[s] != vb[s] and not (s == "*" and (va[s] is None or vb[s] is None)):
                tag = json.dumps([va[s], vb[s]], sort_keys=True, default=str)
                groups.setdefault(tag, []).append(s)
                pair_of[tag] = (va[s], vb[s])
        for tag, stages in groups.items():
            everywhere = len(stages) == len(common) or stages == ["*"]
            changes.append(EnvChange(key, () if everywhere else tuple(stages), *pair_of[tag]))
    summary = lambda e: {k: _summary_value(v) for k, v in e.items()}  # noqa: E731
    return EnvDiff(summary(ea), summary(eb), tuple(changes))


# --------------------------------------------------------------------------- metrics


def _delta(a: Any, b: Any) -> Delta:
    fa = float(a) if isinstance(a, int | float) else None
    fb = float(b) if isinstance(b, int | float) else None
    return Delta(fa, fb, fb - fa if fa is not None and fb is not None else None)


def diff_metrics(a: Mapping[str, Any], b: Mapping[str, Any]) -> MetricsDiff:
    """Held-out accuracy and loss, and per class the precision, recall, f1 and support."""
    ca, cb = a.get("per_class") or {}, b.get("per_class") or {}
    notes = []
    if bool(ca) != bool(cb):  # an older metrics.json without per-class figures
        notes.append(f"{'A' if not ca else 'B'} records no per-class metrics")
    elif ca:
        for side, mine, theirs in (("A", ca, cb), ("B", cb, ca)):
            if alone := sorted(set(mine) - set(theirs)):
                notes.append(f"class(es) {', '.join(map(str, alone))} only in {side}")
    per_class = tuple(
        ClassDelta(
            label=str(c),
            **{
                m: _delta(ca[c].get(m), cb[c].get(m))
                for m in ("precision", "recall", "f1", "support")
            },
        )
        for c in sorted(set(ca) & set(cb), key=lambda c: (len(str(c)), str(c)))  # "2" before "10"
    )
    return MetricsDiff(
        _delta(a.get("accuracy"), b.get("accuracy")),
        _delta(a.get("loss"), b.get("loss")),
        per_class,
        tuple(notes),
    )


# --------------------------------------------------------------------------- renderers


def _plain(value: Any) -> Any:
    """JSON-safe: dataclasses as objects (with their `changed` verdict), tuples as lists."""
    if is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(getattr(type(value), "changed", None), property):
            out["changed"] = _plain(value.changed)
        return out
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(_plain(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    return value


def render_json(d: LineageDiff) -> str:
    return json.dumps(d.to_dict(), indent=2, sort_keys=True)


def _short(digest: Any) -> str:
    text = str(digest) if digest else "?"
    return text[:12] + "…" if len(text) > 12 else text


def _val(v: Any) -> str:
    if isinstance(v, str):
        return _short(v) if len(v) == 64 and all(c in "0123456789abcdef" for c in v) else v
    if isinstance(v, float):
        return f"{v:.6g}"
    return json.dumps(v, default=str)


def _num(d: Delta, digits: int = 4) -> str:
    fmt = lambda x: "?" if x is None else f"{x:.{digits}f}"  # noqa: E731
    if not d.changed:
        return fmt(d.a)
    sign = "" if d.delta is None else f" ({d.delta:+.{digits}f})"
    return f"{fmt(d.a)} -> {fmt(d.b)}{sign}"


def _table(rows: list[tuple[str, ...]], indent: str = "    ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def _deps_section(g: DependencyDiff) -> tuple[str, list[str]]:
    parts, lines = [], []
    for lock in g.locks:
        if lock.a_name is None or lock.b_name is None:
            side = "B" if lock.a_name is None else "A"
            parts.append(f"{lock.name} only in {side} ({lock.packages} packages)")
            continue
        counts = [
            f"{len(lock.of(c))} {c}"
            for c in ("added", "removed", "upgraded", "downgraded", "changed", "rehashed")
            if lock.of(c)
        ]
        if not lock.changed:
            parts.append(f"{lock.name} ({lock.packages} packages, sha256 {_short(lock.b_sha256)})")
            continue
        if lock.digest_only:
            parts.append(
                f"{lock.name} sha256 {_short(lock.a_sha256)} -> {_short(lock.b_sha256)} "
                f"(pins not compared: {lock.digest_only} ships no lock file)"
            )
            continue
        parts.append(f"{lock.name}: " + (", ".join(counts) or "same pins, other bytes"))
        lines.append(f"    {lock.name}  sha256 {_short(lock.a_sha256)} -> {_short(lock.b_sha256)}")
        rows = []
        for c in lock.changes:
            if c.change == "added":
                version = f"{c.b_version} (new)"
            elif c.change == "removed":
                version = f"{c.a_version} (gone)"
            else:
                version = f"{c.a_version} -> {c.b_version}"
            more = f" (+{len(c.paths) - 1} more)" if len(c.paths) > 1 else ""
            rows.append(
                (
                    c.change,
                    c.package,
                    version,
                    "direct" if c.direct else "transitive",
                    (c.paths[0] if c.paths else "") + more,
                )
            )
        lines += _table(rows, indent="      ")
    parts += list(g.notes)
    return "; ".join(parts) or "no locks on either side", lines


def _vuln_section(g: VulnDiff) -> tuple[str, list[str]]:
    if g.compared:
        head = f"{len(g.new)} new, {len(g.fixed)} fixed, {len(g.still)} still present"
        if not g.changed and g.still:
            head += " (" + ", ".join(f"{v.id} in {v.package}" for v in g.still) + ")"
    else:
        head = f"not comparable: A {g.a_scan}; B {g.b_scan}"
    head += f" [{g.basis}]"
    lines = [f"    A: {g.a_scan}", f"    B: {g.b_scan}"] if g.compared else []
    rows = []
    for label, items in (
        ("new", g.new),
        ("fixed", g.fixed),
        ("still", g.still),
        ("", g.unknown),  # only one side was scanned: say which
    ):
        for v in items:
            tag = label or ("in B" if v.b_version is not None else "in A")
            if label == "still" and v.a_version != v.b_version:
                version = f"{v.a_version} -> {v.b_version}"
            else:
                version = str(v.b_version or v.a_version)
            ids = v.id + (f" ({', '.join(v.aliases)})" if v.aliases else "")
            path = v.paths[0] if v.paths else ""
            rows.append((tag, ids, f"{v.package} {version}", v.severity, ",".join(v.locks), path))
    lines += _table(rows)
    return head, lines + _notes(g.notes)


def _notes(notes: Iterable[str]) -> list[str]:
    return [f"    note: {n}" for n in notes]


def _fields_lines(g: FieldsDiff, *, skip: tuple[str, ...] = ()) -> list[str]:
    show = lambda v: "(none)" if v is None else _val(v)  # noqa: E731
    return _table([(c.key, show(c.a), "->", show(c.b)) for c in g.changes if c.key not in skip])


def _data_section(g: FieldsDiff) -> tuple[str, list[str]]:
    x = g.b
    if g.changed:
        return f"{len(g.changes)} field(s) differ", _fields_lines(g)
    if not x.get("sha256"):
        return "no dataset recorded", []
    size = f" ({x['samples']} samples: {x['train']} train / {x['test']} test)"
    return f"{x.get('name') or 'dataset'} sha256 {_short(x['sha256'])}" + (
        size if x.get("samples") else ""
    ), []


def _base_model_section(g: FieldsDiff) -> tuple[str, list[str]]:
    if not g.a and not g.b:
        return "none on either side", []
    if g.changed:
        return f"{len(g.changes)} difference(s)", _fields_lines(g)
    return ", ".join(f"{k}: {_val(v)}" for k, v in g.b.items()), []


def _config_section(g: ConfigDiff) -> tuple[str, list[str]]:
    counts = []
    if g.a_sha256 != g.b_sha256:
        counts.append(f"config sha256 {_short(g.a_sha256)} -> {_short(g.b_sha256)}")
    if g.params:
        counts.append(f"{len(g.params)} hyperparameter(s)")
    if g.settings:
        counts.append(f"{len(g.settings)} setting(s)")
    if g.stages_added:
        counts.append(f"stages added: {', '.join(g.stages_added)}")
    if g.stages_removed:
        counts.append(f"stages removed: {', '.join(g.stages_removed)}")
    if g.kinds:
        counts.append(f"{len(g.kinds)} kind(s)")
    if not counts:
        counts.append(f"config sha256 {_short(g.b_sha256)}")
    rows = [(c.key, "kind", c.a or "?", "->", c.b or "?") for c in g.kinds]
    for p in (*g.params, *g.settings):
        a = "(absent)" if p.change == "added" else _val(p.a)
        b = "(absent)" if p.change == "removed" else _val(p.b)
        rows.append((p.scope, p.key, a, "->", b))
    return "; ".join(counts), _table(rows) + _notes(g.notes)


def _environment_section(g: EnvDiff) -> tuple[str, list[str]]:
    if g.changed:
        where = any(c.stages for c in g.changes)  # else every change is in every stage
        rows = [
            (c.field, *([f"[{', '.join(c.stages) or 'all stages'}]"] if where else []))
            + (_val(c.a), "->", _val(c.b))
            for c in g.changes
        ]
        return f"{len(g.changes)} difference(s)", _table(rows)
    x = g.b
    return ", ".join(
        [
            f"Python {x.get('python') or '?'}",
            f"TensorFlow {x.get('tensorflow') or '?'}",
            f"Keras {x.get('keras') or '?'}",
            str(x.get("platform") or "?"),
            f"lock sha256 {_val(x.get('lock_sha256'))}",
        ]
    ), []


def _metrics_section(g: MetricsDiff) -> tuple[str, list[str]]:
    head = f"accuracy {_num(g.accuracy)}, loss {_num(g.loss)}"
    rows = [
        (c.label, _num(c.precision), _num(c.recall))
        for c in g.per_class
        if c.precision.changed or c.recall.changed
    ]
    lines = _table([("class", "precision", "recall"), *rows]) if rows else []
    support = [c.label for c in g.per_class if c.support.changed]
    if support:
        lines += _notes([f"test support differs for class(es) {', '.join(support)}"])
    return head, lines + _notes(g.notes)


def _model_section(g: FieldsDiff) -> tuple[str, list[str]]:
    a, b = _short(g.a.get("sha256")), _short(g.b.get("sha256"))
    head = f"{g.b.get('file') or 'model'} sha256 " + (f"{a} -> {b}" if a != b else b)
    return head, _fields_lines(g, skip=("sha256",))


def render_table(d: LineageDiff) -> str:
    """One line per group; only the groups that changed are expanded below their line."""
    sections = {
        "dependencies": _deps_section(d.dependencies),
        "vulnerabilities": _vuln_section(d.vulnerabilities),
        "data": _data_section(d.data),
        "base_model": _base_model_section(d.base_model),
        "config": _config_section(d.config),
        "environment": _environment_section(d.environment),
        "metrics": _metrics_section(d.metrics),
        "model": _model_section(d.model),
    }
    lines = [f"A  {d.a.label}  ({d.a.path})", f"B  {d.b.label}  ({d.b.path})", f"   {NOT_VERIFIED}"]
    lines.append("")
    for group in d.GROUPS:
        head, detail = sections[group]
        changed = getattr(d, group).changed
        lines.append(
            f"{group.replace('_', ' '):<16} {'CHANGED' if changed else 'unchanged'}: {head}"
        )
        if changed:
            lines += detail
    changed = [g.replace("_", " ") for g in d.changed]
    lines += ["", f"{len(changed)} of {len(d.GROUPS)} groups changed" + (": " if changed else "")]
    lines[-1] += ", ".join(changed)
    return "\n".join(lines)


def render(d: LineageDiff, fmt: str = "table") -> str:
    if fmt == "json":
        return render_json(d)
    if fmt == "table":
        return render_table(d)
    raise InputError(f"unknown format {fmt!r}", hint="use table or json")
