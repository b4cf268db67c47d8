"""Fixtures of the model scanner's unit tests: the sentinel a payload would create, the pickle
samples, and a guard that fails any test in which the scanner deserialises something."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests import model_samples as ms


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sentinel") / "PWNED"


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory, sentinel: Path) -> list[ms.Sample]:
    return ms.write_pickle_samples(tmp_path_factory.mktemp("samples"), sentinel)


@pytest.fixture(autouse=True)
def nothing_is_ever_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any deserialiser the scanner might be tempted to call fails the test instead."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scanner tried to deserialise the artifact")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(np, "load", refuse)
