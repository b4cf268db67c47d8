"""Stage kinds by name, found through the `chainproof.stages` entry-point group.

pipeline/ never imports stages/: a kind is whatever a distribution registers, so third-party
stage kinds plug in the same way as the built-in ones.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.stage import Stage

GROUP = "chainproof.stages"


@cache
def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def known_kinds() -> list[str]:
    return sorted(_entry_points())


def stage_module(kind: str) -> str:
    """The module run as `python -I -m <module>` for this kind."""
    return _entry_points()[kind].split(":", 1)[0]


@cache
def stage_class(kind: str) -> type[Stage] | None:
    value = _entry_points().get(kind)
    if value is None:
        return None
    module_name, _, attr = value.partition(":")
    import importlib

    module = importlib.import_module(module_name)
    return getattr(module, attr)
