"""The runner checks each lock's environment once per run, however many stages use it."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config
from pipeline.runner import run as runmod
from pipeline.workspace import Workspace
from tests.conftest import FAST_PIPELINE, write_config


def test_each_lock_is_checked_once_per_run(tmp_path, monkeypatch):
    calls: list[str] = []

    def counting_check(lock, **kwargs):
        calls.append(lock.sha256)
        return "fingerprint"

    monkeypatch.setattr(runmod, "check_environment", counting_check)
    cfg = load_config(write_config(tmp_path / "cfg", FAST_PIPELINE))
    runner = runmod.Runner(cfg, Workspace(tmp_path / "ws"))
    got = [runner.environment_for(stage) for stage in cfg.stages]
    assert len(cfg.stages) == 4 and len(calls) == 1, "one check for the one lock of this run"
    assert {python for python, _ in got} == {Path(runmod.sys.executable)}
    assert runmod.Runner(cfg, Workspace(tmp_path / "ws")).environment_for(cfg.stages[0])
    assert len(calls) == 2, "a new run checks again (its result may come from the sealed cache)"
