"""compile_layout: the owner-signed layout is the root of trust, so its rules get tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from pipeline.config import load_config
from pipeline.provenance.keys import PublicKey
from pipeline.provenance.layout import LayoutPins, compile_layout, pins_of
from pipeline.workspace import CANDIDATE, DEPENDENCIES, MODELS
from tests.conftest import FAST_PIPELINE, write_config


@pytest.fixture
def config(tmp_path: Path):
    return load_config(write_config(tmp_path, FAST_PIPELINE))


PINS = LayoutPins(
    pipeline="digits-fast",
    config_sha256="c" * 64,
    locks={"main.txt": "a" * 64},
    code_sha256="d" * 64,
    code={"pipeline/__init__.py": "e" * 64},
)


def _layout(config, **kw):
    functionary = PublicKey(CryptoSigner.generate_ed25519().public_key)
    return compile_layout(
        config,
        functionary=functionary,
        pins=PINS,
        modules={s.kind: s.impl.module for s in config.stages},
        gates=frozenset(s.kind for s in config.stages if s.impl.gate),
        **kw,
    )


def _rules(layout, step: str) -> list[list[str]]:
    return next(s for s in layout.steps if s.name == step).expected_materials


def test_a_candidate_layout_requires_its_candidate_statement(config) -> None:
    rules = _rules(_layout(config, extra_checks=(CANDIDATE,)), "deploy")
    assert ["REQUIRE", CANDIDATE] in rules
    assert ["REQUIRE", DEPENDENCIES] in rules and ["REQUIRE", MODELS] in rules


def test_an_ordinary_layout_requires_the_gate_checks_only_at_the_gate(config) -> None:
    layout = _layout(config)
    assert ["REQUIRE", CANDIDATE] not in _rules(layout, "deploy")
    assert ["REQUIRE", DEPENDENCIES] in _rules(layout, "deploy")
    assert not any(
        r[0] == "REQUIRE" and r[1].startswith("checks/") for r in _rules(layout, "train")
    )


def test_every_rule_list_ends_in_disallow_and_materials_match_upstream(config) -> None:
    layout = _layout(config)
    for step in layout.steps:
        assert step.expected_materials[-1] == ["DISALLOW", "*"], step.name
        assert step.expected_products[-1] == ["DISALLOW", "*"], step.name
    assert ["MATCH", "source/*", "WITH", "PRODUCTS", "FROM", "source"] in _rules(layout, "train")
    assert ["REQUIRE", "source/dataset.npz"] in _rules(layout, "train")
    train = next(s for s in layout.steps if s.name == "train")
    assert train.expected_command == ["python", "-I", "-m", "stages.train", "../specs/train.json"]


def test_the_layout_carries_the_pins_the_owner_signed(config) -> None:
    assert pins_of(_layout(config)) == PINS


def test_the_layout_inspects_the_run_directory_with_a_harmless_command(config) -> None:
    (insp,) = _layout(config).inspect
    assert insp.run == ["true"]
    for rules in (insp.expected_materials, insp.expected_products):
        assert rules[-1] == ["DISALLOW", "*"]
        for stage in ("source", "train", "package", "deploy"):
            match = ["MATCH", f"{stage}/*", "WITH", "PRODUCTS", "FROM", stage]
            assert rules.index(match) + 1 == rules.index(["DISALLOW", f"{stage}/*"])
        assert ["REQUIRE", "train/model.keras"] in rules
        assert ["ALLOW", "logs/*"] in rules and ["ALLOW", "run.json"] in rules
    assert insp.name not in {s.name for s in config.stages}
