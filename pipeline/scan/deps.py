"""The dependency graph: every pinned distribution, who pulls it in, and the paths from the roots.

A graph is built either from a pip-compile lock (its `# via` annotations give the edges, `-r
file.in` entries mark the direct requirements) or from an installed environment (each
distribution's `Requires-Dist`, markers evaluated for this interpreter). Nodes are PEP 503
canonical names with one pinned version each; edges point from a parent to what it requires; the
roots are the direct requirements. `paths_to` answers "why is this installed"; the renderers
show the graph as a text tree, JSON, or Graphviz DOT.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib.metadata import Distribution, distributions
from pathlib import Path

from packaging.markers import InvalidMarker, UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from pipeline.envcheck import read_install_report
from pipeline.errors import InputError

PROJECT = "chainproof"

# Where a root came from when no `-r file` names it: kept visible so a reader can tell an
# explicit direct requirement from one we had to promote.
UNANNOTATED = "(no '# via' annotation)"
UNREQUIRED = "(installed, required by nothing)"
CYCLE = "(only reachable through a cycle)"


@dataclass(frozen=True)
class Package:
    """One node: a canonical name pinned to one version. `line` is its line in the lock.

    `hashes` are the sha256 digests of the files this pin may come from: the lock's `--hash`
    entries, or for an installed distribution the file pip's install report says it came from.
    Malicious-package records are matched against them, whatever the name.
    """

    name: str
    version: str
    line: int | None = None
    hashes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DepGraph:
    """A dependency DAG (cycles tolerated). Treat the mappings as read-only.

    `requires` maps a parent to the names it requires (sorted); `roots` maps each direct
    requirement to where it was declared (e.g. `requirements/main.in`); `unpinned` lists lock
    entries that are not `name==version` (editable installs, URLs) and so cannot be scanned.
    """

    source: str
    kind: str  # "lock" | "installed"
    packages: Mapping[str, Package]
    requires: Mapping[str, tuple[str, ...]]
    roots: Mapping[str, tuple[str, ...]]
    unpinned: tuple[str, ...] = field(default=())

    @cached_property
    def required_by(self) -> dict[str, tuple[str, ...]]:
        parents: dict[str, list[str]] = {name: [] for name in self.packages}
        for parent, children in self.requires.items():
            for child in children:
                parents[child].append(parent)
        return {name: tuple(sorted(ps)) for name, ps in parents.items()}

    def version(self, name: str) -> str:
        return self.packages[name].version

    def node(self, name: str) -> tuple[str, str]:
        return (name, self.packages[name].version)

    def resolve(self, name: str) -> str:
        """The canonical name of `name` in this graph, or an InputError that suggests one."""
        canon = canonicalize_name(name)
        if canon in self.packages:
            return canon
        close = difflib.get_close_matches(canon, list(self.packages), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see: chainproof deps graph"
        raise InputError(f"{name} is not in the dependency graph of {self.source}", hint=hint)


# --------------------------------------------------------------------------- from a lock

# "chainproof (pyproject.toml)": a requirement of the project being compiled.
_VIA_FILE = re.compile(r"^(?P<name>[^\s(]+)\s+\((?P<file>[^)]+)\)$")
_PIN_OPERATORS = ("==", "===")
_VIA = re.compile(r"^\s*via(\s|$)")


@dataclass
class _Entry:
    name: str
    version: str
    line: int
    via: list[str]
    hashes: tuple[str, ...] = ()


_HASH = re.compile(r"--hash[= ]sha256:([0-9a-fA-F]{64})\b")


def from_lock(path: Path) -> DepGraph:
    """Build the graph of a pip-compile lock from its pins and `# via` annotations.

    Unlike `envcheck.parse_lock` (which drops comments and demands hashes, as installing
    needs), this reads the annotations and accepts locks compiled without hashes.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read lock {path}: {e}") from e
    entries, unpinned = _parse_lock_text(text, path)
    if not entries:
        raise InputError(
            f"{path}: no pinned requirements (name==version) found",
            hint="pass a lock compiled by pip-compile, e.g. requirements/main.txt",
        )
    packages = {en.name: Package(en.name, en.version, en.line, en.hashes) for en in entries}
    requires: dict[str, set[str]] = {name: set() for name in packages}
    roots: dict[str, set[str]] = {}
    for entry in entries:
        for via in entry.via:
            parent, declared_in = _classify_via(via)
            if declared_in is not None:
                roots.setdefault(entry.name, set()).add(declared_in)
            elif parent in packages and parent != entry.name:
                requires[parent].add(entry.name)
            # A parent that is not pinned here (excluded by a marker, or listed as unsafe and
            # left out) has no node: the edge has nowhere to start, so it is dropped.
    return _finish(str(path), "lock", packages, requires, roots, tuple(unpinned))


def _parse_lock_text(text: str, path: Path) -> tuple[list[_Entry], list[str]]:
    entries: list[_Entry] = []
    unpinned: list[str] = []
    current: _Entry | None = None
    in_via = False
    lines = text.splitlines()
    lineno = 0
    while lineno < len(lines):
        start = lineno + 1
        raw = lines[lineno]
        lineno += 1
        # Join backslash continuations (the --hash lines) into one logical line.
        while raw.rstrip().endswith("\\") and lineno < len(lines):
            raw = raw.rstrip()[:-1] + " " + lines[lineno]
            lineno += 1
        stripped = raw.strip()
        if not stripped:
            in_via = False
            continue
        if stripped.startswith("#"):
            comment = stripped[1:]
            if current is not None and _VIA.match(comment):
                rest = comment.strip()[3:].strip()
                current.via.extend(_split_via(rest))
                in_via = not rest  # a bare "# via" is followed by one "#   name" per line
            elif current is not None and in_via and comment.startswith("  "):
                current.via.append(comment.strip())
            else:
                in_via = False
            continue
        in_via = False
        current = None
        requirement, _, inline = stripped.partition(" #")
        if requirement.startswith("-"):
            if requirement.startswith(("-e", "--editable")):
                unpinned.append(requirement)
            continue  # index/find-links options say nothing about the graph
        req = _requirement(requirement, path, start)
        if req.marker is not None and not req.marker.evaluate():
            continue  # not installed on this interpreter, as pip would decide
        spec = list(req.specifier)
        if req.url or len(spec) != 1 or spec[0].operator not in _PIN_OPERATORS:
            unpinned.append(str(req))
            continue
        hashes = tuple(sorted({h.lower() for h in _HASH.findall(requirement)}))
        entry = _Entry(canonicalize_name(req.name), spec[0].version, start, [], hashes)
        if _VIA.match(inline):  # pip-tools <5 and --annotation-style=line
            inline = inline.strip()
            entry.via.extend(_split_via(inline[3:].strip()))
        entries.append(entry)
        current = entry
    return entries, unpinned


def _requirement(text: str, path: Path, line: int) -> Requirement:
    req_text = " ".join(p for p in text.split() if not p.startswith("--hash="))
    try:
        return Requirement(req_text)
    except InvalidRequirement as e:
        raise InputError(f"{path}:{line}: not a requirement: {req_text!r} ({e})") from e


def _split_via(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


def _classify_via(via: str) -> tuple[str, str | None]:
    """A via entry -> (canonical parent, None) or ("", declared-in) for a direct requirement."""
    if via.startswith(("-r ", "-c ")):
        # -c (a constraints file) constrains a version but requires nothing: not a root.
        return ("", via[3:].strip()) if via.startswith("-r ") else ("", None)
    m = _VIA_FILE.match(via)
    if m:  # "name (pyproject.toml)": required by the project being compiled
        return "", m.group("file")
    return canonicalize_name(via.split("[", 1)[0]), None


# --------------------------------------------------------------------------- from site-packages


def from_installed(site_packages: Path) -> DepGraph:
    """Build the graph of the distributions installed in `site_packages`.

    Requirements are filtered by their markers for this interpreter; an `extra == "x"`
    requirement counts only when some installed parent asks for `dist[x]`. If the project
    distribution (`chainproof`) is installed, its requirements are the roots and it is not a
    node itself (it is not a PyPI package to scan); otherwise the roots are the distributions
    nothing requires. Installed distributions unreachable from those roots become roots too,
    so every installed distribution is in the graph.
    """
    if not site_packages.is_dir():
        raise InputError(f"{site_packages} is not a directory", hint="pass a site-packages dir")
    dists: dict[str, Distribution] = {}
    for d in distributions(path=[str(site_packages)]):
        name = canonicalize_name(d.metadata["Name"] or "")
        if name and name not in dists:  # first on the path wins, as the import system would
            dists[name] = d
    if not dists:
        raise InputError(f"no installed distributions found in {site_packages}")
    reqs = {name: _requirements(d) for name, d in dists.items()}
    active = _active_requirements(reqs, set(dists))
    project_roots = active.pop(PROJECT, None)
    keep = [n for n in sorted(dists) if n != PROJECT or project_roots is None]
    installed_from = install_report_hashes(site_packages)
    packages = {
        n: Package(n, dists[n].version, None, installed_from.get((n, dists[n].version), ()))
        for n in keep
    }
    requires = {n: {c for c in active.get(n, set()) if c in packages and c != n} for n in packages}
    roots: dict[str, set[str]] = {}
    if project_roots is not None:
        label = f"{PROJECT} (installed project)"
        for child in project_roots:
            if child in packages:
                roots.setdefault(child, set()).add(label)
    return _finish(str(site_packages), "installed", packages, requires, roots, ())


def install_report_hashes(site_packages: Path) -> dict[tuple[str, str], tuple[str, ...]]:
    """(name, version) -> sha256 of the file pip installed it from, per the venv's install report.

    The report (`pip install --report`, kept by the environment builder at the venv's root)
    names the exact wheel of each distribution. Absent or unreadable: no hashes, not an error
    (an environment built by other means simply has no such evidence).
    """
    env_root = site_packages.parent.parent.parent  # <env>/lib/pythonX.Y/site-packages
    return {k: (f.sha256,) for k, f in read_install_report(env_root).items()}


def _requirements(dist: Distribution) -> list[Requirement]:
    out = []
    for text in dist.requires or []:
        try:
            out.append(Requirement(text))
        except InvalidRequirement:
            continue  # a malformed Requires-Dist cannot be installed by pip either
    return out


def _active_requirements(
    reqs: Mapping[str, list[Requirement]], installed: set[str]
) -> dict[str, set[str]]:
    """Parent -> required children, with the extras each parent requests propagated.

    Extras are a fixpoint: `a` requiring `b[x]` turns on `b`'s `extra == "x"` requirements,
    which may request further extras in turn.
    """
    extras: dict[str, set[str]] = {name: set() for name in reqs}
    changed = True
    while changed:
        changed = False
        for name, rs in reqs.items():
            for r in rs:
                child = canonicalize_name(r.name)
                if child not in installed or not _marker_holds(r, extras[name]):
                    continue
                wanted = {canonicalize_name(x) for x in r.extras} - extras[child]
                if wanted:
                    extras[child] |= wanted
                    changed = True
    return {
        name: {canonicalize_name(r.name) for r in rs if _marker_holds(r, extras[name])}
        for name, rs in reqs.items()
    }


def _marker_holds(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    try:
        return any(req.marker.evaluate({"extra": e}) for e in ("", *sorted(extras)))
    except (InvalidMarker, UndefinedComparison, UndefinedEnvironmentName):
        return False


# --------------------------------------------------------------------------- shared


def _finish(
    source: str,
    kind: str,
    packages: dict[str, Package],
    requires: dict[str, set[str]],
    roots: dict[str, set[str]],
    unpinned: tuple[str, ...],
) -> DepGraph:
    """Freeze the graph, promoting parentless and cycle-only nodes to roots."""
    has_parent = {c for cs in requires.values() for c in cs}
    orphan_label = UNANNOTATED if kind == "lock" else UNREQUIRED
    for name in packages:
        if name not in roots and name not in has_parent:
            roots.setdefault(name, set()).add(orphan_label)
    # Nodes reachable only through a cycle (a <-> b, nothing else requires either) would be
    # invisible to every path; promote the first of each such group until all are reachable.
    unreached = set(packages) - _reachable(roots, requires)
    while unreached:
        first = min(unreached)
        roots[first] = {CYCLE}
        unreached -= _reachable({first: set()}, requires)
    return DepGraph(
        source=source,
        kind=kind,
        packages=dict(sorted(packages.items())),
        requires={n: tuple(sorted(requires.get(n, ()))) for n in sorted(packages)},
        roots={n: tuple(sorted(v)) for n, v in sorted(roots.items())},
        unpinned=unpinned,
    )


def _reachable(start: Iterable[str], requires: Mapping[str, Iterable[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(start)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(requires.get(n, ()))
    return seen


def paths_to(
    graph: DepGraph, name: str, *, limit: int | None = None
) -> list[list[tuple[str, str]]]:
    """Every path from a root down to `name`, each a list of (name, version) root first.

    A path never visits a node twice, so cycles terminate. A root that is also required by
    another root yields both the one-node path and the longer ones. Sorted shortest first;
    `limit` caps how many are returned (the count can grow exponentially in dense graphs).
    """
    target = graph.resolve(name)
    parents = graph.required_by
    found: list[list[str]] = []

    # Walk upwards from the target so only ancestors are visited, not the whole graph.
    def climb(node: str, suffix: list[str], on_path: set[str]) -> None:
        if node in graph.roots:
            found.append([node, *suffix])
        for parent in parents[node]:
            if parent not in on_path:
                on_path.add(parent)
                climb(parent, [node, *suffix], on_path)
                on_path.discard(parent)

    climb(target, [], {target})
    found.sort(key=lambda p: (len(p), p))
    if limit is not None:
        found = found[:limit]
    return [[graph.node(n) for n in p] for p in found]


def format_path(path: Iterable[tuple[str, str]], graph: DepGraph) -> str:
    """`urllib3 1.23 <- requests 2.19.0 <- requirements/main.in`: the package first."""
    nodes = list(path)
    parts = [f"{n} {v}" for n, v in reversed(nodes)]
    if nodes:
        parts.append(", ".join(graph.roots.get(nodes[0][0], ())) or "?")
    return " <- ".join(parts)


# --------------------------------------------------------------------------- renderers


def render_tree(graph: DepGraph) -> str:
    """A `pipdeptree`-like text tree from each root; a subtree already shown is not repeated."""
    lines: list[str] = []
    expanded: set[str] = set()

    def walk(name: str, prefix: str, on_path: frozenset[str]) -> None:
        children = graph.requires[name]
        for i, child in enumerate(children):
            last = i == len(children) - 1
            branch = "└── " if last else "├── "
            label = f"{child}=={graph.version(child)}"
            if child in on_path:
                lines.append(f"{prefix}{branch}{label} (cycle)")
                continue
            if child in expanded and graph.requires[child]:
                lines.append(f"{prefix}{branch}{label} (dependencies shown above)")
                continue
            lines.append(f"{prefix}{branch}{label}")
            expanded.add(child)
            walk(child, prefix + ("    " if last else "│   "), on_path | {child})

    for root, declared in graph.roots.items():
        lines.append(f"{root}=={graph.version(root)}  [{', '.join(declared)}]")
        expanded.add(root)
        walk(root, "", frozenset({root}))
    return "\n".join(lines)


def render_json(graph: DepGraph) -> str:
    """Deterministic JSON: source, roots, and every package with its edges both ways."""
    doc = {
        "source": graph.source,
        "kind": graph.kind,
        "roots": [{"name": n, "declared_in": list(d)} for n, d in graph.roots.items()],
        "packages": [
            {
                "name": p.name,
                "version": p.version,
                "direct": p.name in graph.roots,
                "requires": list(graph.requires[p.name]),
                "required_by": list(graph.required_by[p.name]),
            }
            for p in graph.packages.values()
        ],
        "unpinned": list(graph.unpinned),
    }
    return json.dumps(doc, indent=2, sort_keys=True)


def _dot_id(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(graph: DepGraph) -> str:
    """Graphviz DOT: one node per package (roots bold), one edge per requirement."""
    out = [
        "digraph dependencies {",
        "  rankdir=LR;",
        "  node [shape=box, fontname=Helvetica];",
    ]
    for p in graph.packages.values():
        style = ", style=bold" if p.name in graph.roots else ""
        label = _dot_id(p.name)[:-1] + "\\n" + _dot_id(p.version)[1:]  # two-line label
        out.append(f"  {_dot_id(p.name)} [label={label}{style}];")
    for parent, children in graph.requires.items():
        for child in children:
            out.append(f"  {_dot_id(parent)} -> {_dot_id(child)};")
    out.append("}")
    return "\n".join(out) + "\n"


def render_why(graph: DepGraph, name: str, *, limit: int | None = None) -> str:
    """Every path that pulls `name` in, one per line, the package first."""
    paths = paths_to(graph, name, limit=limit)
    target = graph.resolve(name)
    head = f"{target} {graph.version(target)}: {len(paths)} path(s) from a direct requirement"
    return "\n".join([head, *(f"  {format_path(p, graph)}" for p in paths)])
