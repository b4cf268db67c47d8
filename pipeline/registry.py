"""Stage kinds by name, found through the `chainproof.stages` entry-point group.

pipeline/ never imports stages/: a kind is whatever a distribution registers, so third-party
stage kinds plug in the same way as the built-in ones. Each kind is resolved once into a
frozen `StageKind`; everything downstream asks it, never the stage class.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.stage import Params

GROUP = "chainproof.stages"


@dataclass(frozen=True)
class StageKind:
    """What the runner, the layout and the comparisons need to know about a kind."""

    name: str
    module: str  # run as `python -I -m <module> <spec>`
    params: type[Params]
    outputs: tuple[str, ...]
    gate: bool  # consumes the runner's signed gate Statements as materials
    publishes: bool  # a release is published after it (its products name their run)
    model_output: str | None  # the model file it writes, if any
    determinism: Mapping[str, Any]  # switches recorded in its link's environment
    # given validated params (as dumped into StageConfig.params): does it reach the network,
    # and which files outside the run does it read (param name -> path as configured)
    needs_network: Callable[[Mapping[str, Any]], bool]
    external_inputs: Callable[[Mapping[str, Any]], dict[str, str]]
    # a data screen: the runner signs its report's verdict (checks/data.intoto.json), which
    # every gate step then REQUIREs
    screens: bool = False
    # the outputs it writes with these params (by default `outputs`)
    outputs_for: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None


@cache
def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def known_kinds() -> list[str]:
    return sorted(_entry_points())


@cache
def stage_kind(name: str) -> StageKind | None:
    """The resolved kind, or None when no distribution registers `name`."""
    value = _entry_points().get(name)
    if value is None:
        return None
    module_name, _, attr = value.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    return StageKind(
        name=name,
        module=module_name,
        params=cls.Params,
        outputs=tuple(cls.outputs),
        gate=bool(cls.gate),
        publishes=bool(cls.publishes),
        model_output=cls.model_output,
        determinism=MappingProxyType(dict(cls.determinism)),
        needs_network=lambda p: bool(cls.needs_network(cls.Params.model_validate(dict(p)))),
        external_inputs=lambda p: dict(cls.external_inputs(cls.Params.model_validate(dict(p)))),
        screens=bool(getattr(cls, "screens", False)),
        outputs_for=lambda p: tuple(cls.outputs_for(cls.Params.model_validate(dict(p)))),
    )


def require_kind(name: str) -> StageKind:
    """The resolved kind of a validated config's stage (config validation checked it exists)."""
    kind = stage_kind(name)
    if kind is None:
        from pipeline.errors import InputError

        raise InputError(
            f"unknown stage kind {name!r}; expected one of {', '.join(known_kinds())}",
            hint="is the package that registers it installed?",
        )
    return kind


def stage_module(name: str) -> str:
    """The module run as `python -I -m <module>` for this kind."""
    return require_kind(name).module
