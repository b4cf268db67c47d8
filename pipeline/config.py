"""Pipeline configs (declared intent): YAML validated once into frozen values.

Every problem is reported with the file, the line, the dotted key and what was expected, and
all of them are found before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

from pipeline import bounded
from pipeline.errors import ConfigError, ConfigProblem, InputError
from pipeline.hashing import sha256_bytes
from pipeline.registry import StageKind, known_kinds, stage_kind
from pipeline.workspace import RUN_DIRS

SCHEMA_VERSION = 1
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageSpec(_Strict):
    name: StrictStr = Field(pattern=NAME_PATTERN, description="unique stage name")
    kind: StrictStr = Field(description="a registered stage kind: source, train, package, deploy")
    needs: tuple[StrictStr, ...] = ()
    timeout: StrictInt = Field(600, gt=0, description="seconds before the stage is killed")
    lock: StrictStr | None = Field(None, description="own lock file (relative to the config)")
    network: StrictBool = Field(False, description="let the sandboxed stage reach the network")
    outputs: tuple[StrictStr, ...] | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class LayoutSpec(_Strict):
    expires_days: StrictInt = Field(30, gt=0, le=3650)


class ReleaseSpec(_Strict):
    dir: StrictStr = "releases"
    version: StrictStr | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class LineageSpec(_Strict):
    enabled: bool = True
    tracking_uri: StrictStr = "sqlite:///mlruns.db"
    experiment: StrictStr | None = None
    registered_model: StrictStr | None = None


class AllowSpec(_Strict):
    id: StrictStr = Field(min_length=1, description="advisory id or alias, e.g. PYSEC-2023-74")
    reason: StrictStr = Field(min_length=1)
    expires: date


class AcceptLookalikeSpec(_Strict):
    name: StrictStr = Field(min_length=1, description="a locked name that resembles a popular one")
    reason: StrictStr = Field(min_length=1)
    expires: date


class DependencyPolicySpec(_Strict):
    database: StrictStr = ".chainproof/vulndb.sqlite"
    required: bool = False
    # as `scan deps`: pipeline.scan.vulns.DEFAULT_THRESHOLD (a test holds them equal)
    severity: Literal["low", "medium", "high", "critical"] = "high"
    max_age_days: StrictInt = Field(30, gt=0)
    allow: tuple[AllowSpec, ...] = ()
    accept_lookalikes: tuple[AcceptLookalikeSpec, ...] = ()
    # Owner-signed OpenVEX documents (relative to the workspace): findings they declare
    # not_affected, until they expire.
    vex: tuple[StrictStr, ...] = ()


class ModelPolicySpec(_Strict):
    fail_on: Literal["info", "low", "medium", "high", "critical"] = "medium"


class SecuritySpec(_Strict):
    dependencies: DependencyPolicySpec = DependencyPolicySpec()
    models: ModelPolicySpec = ModelPolicySpec()


class CandidateSpec(_Strict):
    accuracy_drop: float = Field(0.02, ge=0, le=1)
    recall_drop: float = Field(0.05, ge=0, le=1)
    agreement: float = Field(0.9, ge=0, le=1)
    severity: Literal["low", "medium", "high", "critical"] | None = None


class _PipelineSchema(_Strict):
    schema_: Literal[1] = Field(alias="schema")
    name: StrictStr = Field(pattern=NAME_PATTERN)
    description: StrictStr = ""
    lock: StrictStr
    layout: LayoutSpec = LayoutSpec()
    release: ReleaseSpec = ReleaseSpec()
    lineage: LineageSpec = LineageSpec()
    security: SecuritySpec = SecuritySpec()
    candidate: CandidateSpec = CandidateSpec()
    stages: tuple[StageSpec, ...] = Field(min_length=1)


@dataclass(frozen=True)
class StageConfig:
    name: str
    kind: str
    needs: tuple[str, ...]
    timeout: int
    lock: Path | None
    outputs: tuple[str, ...]
    params: Mapping[str, Any]
    impl: StageKind  # the kind, resolved once from the registry
    network: bool = False  # the sandbox shares the host's network only when this is declared


@dataclass(frozen=True)
class PipelineConfig:
    """A validated pipeline: stages in dependency order, every path resolved."""

    path: Path
    base_dir: Path  # relative paths in the config are relative to this directory
    sha256: str
    name: str
    description: str
    lock: Path
    layout_expires_days: int
    release_dir: str
    release_version: str | None
    lineage: LineageSpec
    security: SecuritySpec  # frozen and validated: read it as is, never re-validate a dump
    candidate: CandidateSpec
    stages: tuple[StageConfig, ...]

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


# --------------------------------------------------------------------------- YAML with lines


class _Located:
    """Parsed YAML plus the line of every key path, for error messages."""

    def __init__(self) -> None:
        self.lines: dict[tuple[Any, ...], int] = {}
        self.problems: list[ConfigProblem] = []

    def build(self, node: yaml.Node, path: tuple[Any, ...]) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for knode, vnode in node.value:
                key = self.build(knode, path + ("<key>",))
                if not isinstance(key, str):
                    self.problems.append(
                        ConfigProblem(knode.start_mark.line + 1, _dotted(path), "keys must be text")
                    )
                    continue
                if key in out:
                    self.problems.append(
                        ConfigProblem(
                            knode.start_mark.line + 1,
                            _dotted(path + (key,)),
                            "duplicate key (YAML would silently keep the last one)",
                        )
                    )
                self.lines[path + (key,)] = knode.start_mark.line + 1
                out[key] = self.build(vnode, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, path + (i,)) for i, v in enumerate(node.value)]
        try:
            return _scalar(node)
        except (yaml.YAMLError, ValueError) as e:
            # a date like 2026-13-45, an integer past Python's digit limit, a bad !!binary
            self.problems.append(
                ConfigProblem(node.start_mark.line + 1, _dotted(path), f"unreadable value: {e}")
            )
            return None

    def line(self, path: tuple[Any, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _parse(path: Path) -> tuple[Any, _Located]:
    """The config's values and their lines, read within pipeline.bounded's caps.

    Size is checked before reading, nesting while composing, and aliases are counted as what
    they expand to, so a hostile config (an alias bomb) is a ConfigError, not a hang.
    """
    try:
        raw = bounded.read_bytes(path, what="config", max_bytes=bounded.CONFIG_BYTES)
        text = raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(str(path), [ConfigProblem(None, "", f"cannot read: {e.strerror}")]) from e
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [ConfigProblem(None, "", f"not UTF-8 text ({e})")]) from e
    except InputError as e:
        raise ConfigError(str(path), [ConfigProblem(None, "", e.message)]) from e
    loc = _Located()
    try:
        node = bounded.compose_yaml(text, source=str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigError(str(path), [ConfigProblem(line, "", f"not valid YAML: {e}")]) from e
    except (bounded.LimitExceeded, bounded.RecursiveYAML) as e:
        problem = ConfigProblem(e.line, "", e.reason)
        raise ConfigError(str(path), [problem]) from e
    if node is None:
        raise ConfigError(str(path), [ConfigProblem(1, "", "empty file; expected a mapping")])
    data = loc.build(node, ())
    return data, loc


# --------------------------------------------------------------------------- validation


def _pydantic_problems(err: ValidationError, loc: _Located, prefix: tuple = ()) -> list:
    problems = []
    for e in err.errors():
        key_path = prefix + tuple("schema" if p == "schema_" else p for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the config reference)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "literal_error" and key_path[-1:] == ("schema",):
            msg = f"unsupported schema version; expected {SCHEMA_VERSION}"
        if "input" in e and e["type"] not in ("missing", "extra_forbidden"):
            msg += f" (got {e['input']!r})"
        problems.append(ConfigProblem(loc.line(key_path), _dotted(key_path), msg))
    return problems


def _escapes(rel: str) -> bool:
    p = PurePosixPath(rel.rstrip("/") or rel)
    return p.is_absolute() or ".." in p.parts or rel.strip() in ("", ".")


def _toposort(stages: tuple[StageSpec, ...]) -> list[str] | None:
    """Kahn's algorithm, stable in declaration order. None when there is a cycle."""
    remaining = {s.name: set(s.needs) for s in stages}
    order: list[str] = []
    while remaining:
        ready = [n for n in remaining if not remaining[n]]
        if not ready:
            return None
        for n in ready:
            order.append(n)
            del remaining[n]
        for deps in remaining.values():
            deps.difference_update(ready)
    return order


def load_config(path: str | Path, *, base_dir: Path | None = None) -> PipelineConfig:
    """Read, validate and freeze a pipeline config. Raises ConfigError listing every problem.

    Relative paths in it are resolved against `base_dir`, by default the config's directory
    (a recorded copy of a config passes its original directory).
    """
    path = Path(path)
    base = (base_dir or path.parent).resolve()
    data, loc = _parse(path)
    problems = list(loc.problems)
    if not isinstance(data, dict):
        raise ConfigError(str(path), [ConfigProblem(1, "", "expected a mapping at the top")])
    if "schema" in data and data["schema"] != SCHEMA_VERSION:
        raise ConfigError(
            str(path),
            [
                ConfigProblem(
                    loc.line(("schema",)),
                    "schema",
                    f"unsupported schema version {data['schema']!r}; expected {SCHEMA_VERSION}",
                )
            ],
        )
    try:
        raw = _PipelineSchema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(str(path), problems + _pydantic_problems(e, loc)) from e

    names: dict[str, int] = {}
    stages_out = []
    for i, st in enumerate(raw.stages):
        at = ("stages", i)
        if st.name in names:
            problems.append(
                ConfigProblem(
                    loc.line(at + ("name",)),
                    _dotted(at + ("name",)),
                    f"duplicate stage name {st.name!r} (first at stages[{names[st.name]}])",
                )
            )
        names.setdefault(st.name, i)
        if st.name in RUN_DIRS:
            problems.append(
                ConfigProblem(
                    loc.line(at + ("name",)),
                    _dotted(at + ("name",)),
                    f"stage name {st.name!r} is a directory the runner keeps in each run "
                    f"(reserved: {', '.join(RUN_DIRS)}); choose another name",
                )
            )
        cls = stage_kind(st.kind)
        if cls is None:
            problems.append(
                ConfigProblem(
                    loc.line(at + ("kind",)),
                    _dotted(at + ("kind",)),
                    f"unknown stage kind {st.kind!r}; expected one of {', '.join(known_kinds())}",
                )
            )
            continue
        try:
            params = cls.params.model_validate(st.params).model_dump(mode="json")
        except ValidationError as e:
            problems.extend(_pydantic_problems(e, loc, at + ("params",)))
            continue
        if cls.needs_network(params) and not st.network:
            problems.append(
                ConfigProblem(
                    loc.line(at + ("params",)),
                    _dotted(at + ("network",)),
                    "this stage reaches the network with these params (a url: source), but "
                    "stages run without one; add `network: true` to the stage",
                )
            )
        always = cls.outputs_for(params) if cls.outputs_for else tuple(cls.outputs)
        outputs = st.outputs if st.outputs is not None else always
        for j, out in enumerate(outputs):
            if _escapes(out):
                problems.append(
                    ConfigProblem(
                        loc.line(at + ("outputs", j)),
                        _dotted(at + ("outputs", j)),
                        f"path {out!r} escapes the stage's directory in the run; expected a "
                        "relative path without '..'",
                    )
                )
        missing = [o for o in always if o not in outputs]
        if missing:
            problems.append(
                ConfigProblem(
                    loc.line(at + ("outputs",)),
                    _dotted(at + ("outputs",)),
                    f"kind {st.kind!r} always writes {missing}; list them too",
                )
            )
        lock = (base / st.lock).resolve() if st.lock else None
        stages_out.append(
            StageConfig(
                name=st.name,
                kind=st.kind,
                needs=st.needs,
                timeout=st.timeout,
                lock=lock,
                outputs=tuple(outputs),
                params=MappingProxyType(params),
                impl=cls,
                network=st.network,
            )
        )
    for i, st in enumerate(raw.stages):
        for j, dep in enumerate(st.needs):
            if dep not in names:
                problems.append(
                    ConfigProblem(
                        loc.line(("stages", i, "needs", j)),
                        _dotted(("stages", i, "needs", j)),
                        f"needs unknown stage {dep!r}; expected one of {sorted(names)}",
                    )
                )
            elif dep == st.name:
                problems.append(
                    ConfigProblem(
                        loc.line(("stages", i, "needs", j)),
                        _dotted(("stages", i, "needs", j)),
                        "a stage cannot need itself",
                    )
                )
    if _escapes(raw.release.dir) and not Path(raw.release.dir).is_absolute():
        problems.append(
            ConfigProblem(
                loc.line(("release", "dir")), "release.dir", "expected a path inside the workspace"
            )
        )
    if not problems:
        order = _toposort(raw.stages)
        if order is None:
            problems.append(
                ConfigProblem(
                    loc.line(("stages",)),
                    "stages",
                    "the stages' needs form a cycle; expected a DAG (remove one of the needs)",
                )
            )
    if problems:
        raise ConfigError(str(path), problems)
    by_name = {s.name: s for s in stages_out}
    return PipelineConfig(
        path=path.resolve(),
        base_dir=base,
        sha256=sha256_bytes(path.read_bytes()),
        name=raw.name,
        description=raw.description,
        lock=(base / raw.lock).resolve(),
        layout_expires_days=raw.layout.expires_days,
        release_dir=raw.release.dir,
        release_version=raw.release.version,
        lineage=raw.lineage,
        security=raw.security,
        candidate=raw.candidate,
        stages=tuple(by_name[n] for n in order),  # type: ignore[union-attr]
    )
