"""`chainproof show`: the chain of a run or a release bundle, as a tree for people or as JSON.

Read as recorded and NOT verified (that is `chainproof verify`): the header says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.compare.recorded import (
    BUNDLE,
    RUN,
    link_files,
    release_identity,
    require_target,
    run_links_dir,
    run_record,
    scan_record,
    stage_order,
)
from pipeline.provenance.links import Link
from pipeline.release.verify import is_bundle
from pipeline.workspace import DEPENDENCIES, UPSTREAM

UNVERIFIED = "unverified view: use `chainproof verify` to check"
DIGEST_SHOWN = 16  # hex characters of each digest in the tree; JSON has them whole


@dataclass(frozen=True)
class StageView:
    """One step of the chain as its link records it; `link` is None for a step that left none."""

    name: str
    link: str | None  # the link's file name
    keyid_prefix: str | None  # the first 8 hex of the signer's keyid, from the file name
    return_value: Any
    command: tuple[str, ...]
    materials: Mapping[str, str | None]  # artifact -> sha256
    products: Mapping[str, str | None]
    # What the step fine-tuned from, as its link records it: kind, location, sha256, and
    # `upstream`, the shipped upstream release (itself `chainproof show`-able), if present.
    base_model: Mapping[str, str | None] | None = None


@dataclass(frozen=True)
class ChainView:
    kind: str  # RUN | BUNDLE
    path: str
    label: str  # "run <id>" / "release <name> <version>"
    pipeline: str | None
    run_id: str | None
    status: str | None  # a run's recorded status; None for a bundle
    links: str | None  # the directory the links were read from
    dependency_scan: str  # what the signed dependency-scan Statement says
    dependencies_scanned: bool
    stages: tuple[StageView, ...]
    verified: bool = False  # never: show reads, `chainproof verify` checks

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "note": UNVERIFIED}


def read_chain(path: Path) -> ChainView:
    """A run (`runs/<id>`, `runs/latest`) or a release bundle's chain, without verifying it."""
    require_target(path)
    return _read_bundle(path) if is_bundle(path) else _read_run(path)


def _read_run(path: Path) -> ChainView:
    run_dir = path.resolve()
    record = run_record(run_dir)
    links_dir = run_links_dir(run_dir, record)
    found = link_files(links_dir)
    recorded = record.get("stages")
    names = [n for n in recorded if isinstance(n, str)] if isinstance(recorded, list) else []
    names += [n for n in stage_order({n: link for n, (_, link) in found.items()}) if n not in names]
    scan = scan_record(run_dir / DEPENDENCIES)
    return ChainView(
        kind=RUN,
        path=str(run_dir),
        label=f"run {_text(record.get('run_id')) or run_dir.name}",
        pipeline=_text(record.get("pipeline")),
        run_id=_text(record.get("run_id")),
        status=_text(record.get("status")),
        links=str(links_dir) if links_dir else None,
        dependency_scan=scan.describe(),
        dependencies_scanned=scan.state == "scanned",
        stages=tuple(_stage(n, found.get(n), run_dir) for n in dict.fromkeys(names)),
    )


def _read_bundle(path: Path) -> ChainView:
    bundle = path.resolve()
    links_dir = bundle / "attestations"
    found = link_files(links_dir)
    order = stage_order({n: link for n, (_, link) in found.items()})
    name, version, run_id = release_identity(bundle, order)
    scan = scan_record(links_dir / DEPENDENCIES)
    return ChainView(
        kind=BUNDLE,
        path=str(bundle),
        label=f"release {name} {version}",
        pipeline=name,
        run_id=run_id,
        status=None,
        links=str(links_dir),
        dependency_scan=scan.describe(),
        dependencies_scanned=scan.state == "scanned",
        stages=tuple(_stage(n, found[n], bundle / "artifacts") for n in order),
    )


def _stage(name: str, found: tuple[Path, Link] | None, root: Path) -> StageView:
    """`root` holds `upstream/<stage>/` (a run directory, or a bundle's artifacts)."""
    if found is None:
        return StageView(name, None, None, None, (), {}, {})
    path, link = found
    # `<step>.<keyid8>.link`: the step name may itself contain dots.
    keyid = path.name[: -len(".link")].rsplit(".", 1)[-1] if path.name.count(".") >= 2 else None
    byproducts = link.byproducts if isinstance(link.byproducts, Mapping) else {}
    return StageView(
        name=name,
        link=path.name,
        keyid_prefix=keyid,
        return_value=byproducts.get("return-value"),
        command=tuple(str(c) for c in link.command),
        materials=_digests(link.materials),
        products=_digests(link.products),
        base_model=_base_model(link, root / UPSTREAM / name),
    )


def _base_model(link: Link, upstream: Path) -> dict[str, str | None] | None:
    origin = link.environment.get("base_model") if isinstance(link.environment, Mapping) else None
    if not isinstance(origin, Mapping):
        return None
    return {
        "kind": _text(origin.get("kind")),
        "location": _text(origin.get("location")),
        "sha256": _text(origin.get("sha256")),
        "upstream": str(upstream) if upstream.is_dir() else None,
    }


def _digests(artifacts: Mapping[str, Any]) -> dict[str, str | None]:
    return {
        str(n): (h.get("sha256") if isinstance(h, Mapping) else None) for n, h in artifacts.items()
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------- rendering


def _printable(value: Any) -> str:
    """A recorded name as one safe line: control characters (a newline or a terminal escape
    in a hostile artifact name could forge lines of the report) are shown escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _branches(items: list[str], indent: str) -> Iterator[str]:
    """`items` as the children of one node: ├── for each but the last, └── for the last."""
    for i, item in enumerate(items):
        yield f"{indent}{'└──' if i == len(items) - 1 else '├──'} {item}"


def render_tree(view: ChainView) -> str:
    if view.kind == BUNDLE:
        head = f"{view.label}  pipeline {_printable(view.pipeline)}  run {view.run_id or '?'}"
    else:
        head = f"{view.label}  pipeline {view.pipeline}  status {view.status}"
    lines = [
        _printable(head),
        f"links {_printable(view.links or '(none recorded)')}  ({UNVERIFIED})",
        _printable(f"dependencies: {view.dependency_scan}"),
    ]
    for i, stage in enumerate(view.stages):
        last = i == len(view.stages) - 1
        glyph, indent = ("└──", "    ") if last else ("├──", "│   ")
        if stage.link is None:
            lines.append(f"{glyph} {_printable(stage.name)}: no link (did not complete)")
            continue
        lines.append(
            f"{glyph} {_printable(stage.name)}  key {_printable(stage.keyid_prefix or '?')}"
            f"  return {_printable(stage.return_value)}"
        )
        children = [
            f"{role:<4} {_printable(digest or '?')[:DIGEST_SHOWN]:<{DIGEST_SHOWN}}  {_printable(n)}"
            for role, files in (("in", stage.materials), ("out", stage.products))
            for n, digest in files.items()
        ]
        if stage.base_model:
            b = stage.base_model
            where = f"; its chain: chainproof show {b['upstream']}" if b["upstream"] else ""
            children.insert(
                0,
                _printable(
                    f"base {(b['sha256'] or '?')[:DIGEST_SHOWN]:<{DIGEST_SHOWN}}  fine-tuned from "
                    f"{b['kind'] or '?'} {b['location'] or '?'}{where}"
                ),
            )
        lines += _branches(children, indent)
    if not view.stages:
        lines.append("└── (no links)")
    return "\n".join(lines)


def render_json(view: ChainView) -> str:
    return json.dumps(view.to_dict(), indent=2, sort_keys=True)


def render_chain(path: Path) -> str:
    """The tree `chainproof show` prints."""
    return render_tree(read_chain(path))
