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
