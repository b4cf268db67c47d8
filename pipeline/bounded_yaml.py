"""Bounded YAML (see pipeline/bounded.py, which re-exports these): PyYAML's composer held to a
nesting and a node limit, aliases counted as what they expand to.

Its own module so that PyYAML is imported only where YAML is read (configs, policies, OSV
records), never by a stage process that reads JSON through pipeline.bounded.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from pipeline.bounded import (
    CONFIG_BYTES,
    DEPTH,
    YAML_NODES,
    Cap,
    LimitExceeded,
    RecursiveYAML,
    _limit,
    read_bytes,
)
from pipeline.errors import InputError


class _BoundedComposer(Composer):
    """PyYAML's (recursive, pure-Python) composer, held to a nesting and a node limit.

    It composes from whichever event parser it is mixed with: libyaml's when PyYAML has it
    (the events in C, ~5x faster: a 1 MiB config is refused in seconds, not half a minute),
    else PyYAML's own. libyaml's own composer cannot be used: it recurses in C, unbounded.
    """

    def _bound(self, *, source: str, max_depth: int, depth_cap: Cap, max_nodes: int) -> None:
        self._source, self._max_depth, self._depth_cap = source, max_depth, depth_cap
        self._max_nodes, self._depth, self._nodes = max_nodes, 0, 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if not self.check_event(yaml.AliasEvent):
            self._nodes += 1
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                self._refuse(
                    f"values nest more than {self._max_depth} deep, past "
                    f"{self._depth_cap.describe(self._max_depth)}",
                    self._depth_cap,
                    self._max_depth,
                )
            if self._nodes > self._max_nodes:
                self._refuse(
                    f"the document holds more than {YAML_NODES.describe(self._max_nodes)}",
                    YAML_NODES,
                    self._max_nodes,
                )
            node: yaml.Node = super().compose_node(parent, index)
            return node
        finally:
            self._depth -= 1

    def _refuse(self, reason: str, cap: Cap, limit: int) -> None:
        line = self.peek_event().start_mark.line + 1
        raise LimitExceeded(
            f"{self._source}:{line}: {reason}",
            cap=cap,
            limit=limit,
            source=self._source,
            line=line,
            reason=reason,
        )


class _PureComposer(_BoundedComposer, yaml.SafeLoader):
    def __init__(self, text: str) -> None:
        yaml.SafeLoader.__init__(self, text)


_CParser: Any = (
    getattr(importlib.import_module("yaml.cyaml"), "CParser", None)
    if getattr(yaml, "__with_libyaml__", False)
    else None
)  # libyaml's event parser, when PyYAML was built with it
_Composed: Any = _PureComposer
if _CParser is not None:

    class _CComposer(_BoundedComposer, _CParser, SafeConstructor, Resolver):
        def __init__(self, text: str) -> None:
            _CParser.__init__(self, text)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _Composed = _CComposer


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(
    root: yaml.Node, *, source: str, max_nodes: int, nodes_cap: Cap, max_depth: int, depth_cap: Cap
) -> None:
    """Refuse a node graph whose aliases expand past the caps, or that contains itself.

    Iterative post-order over the graph with each node's expanded size and depth memoised, so
    the cost is linear in what is on disk, not in what the aliases would expand to.
    """
    done: dict[int, tuple[int, int]] = {}
    open_: set[int] = set()  # the nodes on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            kids = [done[id(k)] for k in _children(node)]
            size = 1 + sum(s for s, _ in kids)
            depth = 1 + max((d for _, d in kids), default=0)
            open_.discard(key)
            line = node.start_mark.line + 1
            if size > max_nodes:
                reason = f"aliases expand this document past {nodes_cap.describe(max_nodes)}"
                raise LimitExceeded(
                    f"{source}:{line}: {reason}",
                    cap=nodes_cap,
                    limit=max_nodes,
                    source=source,
                    line=line,
                    reason=reason,
                )
            if depth > max_depth:
                reason = (
                    f"aliases nest values more than {max_depth} deep, past "
                    f"{depth_cap.describe(max_depth)}"
                )
                raise LimitExceeded(
                    f"{source}:{line}: {reason}",
                    cap=depth_cap,
                    limit=max_depth,
                    source=source,
                    line=line,
                    reason=reason,
                )
            done[key] = (size, depth)
            continue
        if key in done:
            continue
        open_.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in open_:
                raise RecursiveYAML(source, kid.start_mark.line + 1)
            if id(kid) not in done:
                stack.append((kid, False))


def compose_yaml(
    text: str,
    *,
    source: str,
    max_depth: Cap | int = DEPTH,
    max_nodes: Cap | int = YAML_NODES,
) -> yaml.Node | None:
    """The YAML node tree of one document (None if empty), within the nesting and expansion caps.

    Aliases are allowed, but counted as the nodes they expand to; a recursive alias is refused.
    yaml.YAMLError propagates (its mark has the line) for callers that report lines.
    """
    depth, depth_cap = _limit(max_depth, DEPTH)
    nodes, nodes_cap = _limit(max_nodes, YAML_NODES)
    loader = _Composed(text)
    loader._bound(source=source, max_depth=depth, depth_cap=depth_cap, max_nodes=nodes)
    try:
        root: yaml.Node | None = loader.get_single_node()
    finally:
        loader.dispose()
    if root is not None:
        _check_expansion(
            root,
            source=source,
            max_nodes=nodes,
            nodes_cap=nodes_cap,
            max_depth=depth,
            depth_cap=depth_cap,
        )
    return root


def construct_yaml(node: yaml.Node) -> Any:
    """Safe-construct Python values from a node tree `compose_yaml` accepted.

    ValueError (a date like 2026-13-45, an integer past Python's digit limit) and
    yaml.YAMLError propagate for the caller to name the file.
    """
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(
    path: Path,
    *,
    what: str = "YAML file",
    max_bytes: Cap | int = CONFIG_BYTES,
    max_depth: Cap | int = DEPTH,
    max_nodes: Cap | int = YAML_NODES,
) -> Any:
    """The safe-loaded value of the YAML file at `path` (None if empty), or an InputError."""
    data = read_bytes(path, what=what, max_bytes=max_bytes)
    source = f"{what} {path}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{source} is not UTF-8 text (bad byte at offset {e.start})") from e
    try:
        node = compose_yaml(text, source=source, max_depth=max_depth, max_nodes=max_nodes)
        return None if node is None else construct_yaml(node)
    except yaml.YAMLError as e:
        raise InputError(f"{source} is not valid YAML: {e}") from e
    except (ValueError, TypeError) as e:
        raise InputError(f"{source} holds a value YAML cannot construct: {e}") from e
