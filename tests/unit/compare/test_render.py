"""The report formats of `chainproof diff`: each `--format` choice has one implementation."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from pipeline.cli.compare import FORMAT_NAMES
from pipeline.cli.compare import diff as diff_command
from pipeline.compare.diff import diff, load_lineage
from pipeline.compare.render import FORMATS, DiffFormat, JsonFormat, TableFormat, format_for, render
from pipeline.errors import InputError
from tests.unit.compare.lineages import make_bundle, side


def _format_choices() -> list[str]:
    (option,) = [p for p in diff_command.params if p.name == "fmt"]
    assert isinstance(option.type, click.Choice)
    return list(option.type.choices)


def test_every_format_choice_maps_to_exactly_one_implementation() -> None:
    choices = _format_choices()
    assert sorted(choices) == sorted(FORMAT_NAMES) == sorted(FORMATS)
    implementations = [type(format_for(name)) for name in choices]
    assert len(set(implementations)) == len(choices)  # no two choices share one
    assert all(issubclass(cls, DiffFormat) for cls in implementations)
    # ... and no implementation is left without a choice that selects it.
    assert set(DiffFormat.__subclasses__()) == set(implementations)
    assert all(FORMATS[name].name == name for name in choices)


def test_an_unknown_format_is_bad_input_naming_the_known_ones() -> None:
    with pytest.raises(InputError) as e:
        format_for("yaml")
    assert e.value.exit_code == 2 and "json, table" in (e.value.hint or "")


def test_each_format_renders_the_same_diff(tmp_path: Path, signer) -> None:
    a = load_lineage(make_bundle(tmp_path, "1", side(), signer))
    d = diff(a, a)
    assert render(d, "table") == TableFormat().format(d)
    assert "0 of 8 groups changed" in render(d, "table")
    doc = json.loads(JsonFormat().format(d))
    assert doc["changed"] == [] and doc["verified"] is False
    assert render(d) == render(d, "table")  # the default
