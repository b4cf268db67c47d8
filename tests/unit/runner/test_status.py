"""`chainproof status`: what the next run would reuse, said before anything exists too."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import load_config
from pipeline.provenance.keys import init_dev_keys
from pipeline.runner.status import render, stage_status
from pipeline.workspace import Workspace
from tests.conftest import FAST_PIPELINE, write_config


def test_status_of_a_fresh_workspace_says_every_stage_runs_and_why(tmp_path):
    config = write_config(tmp_path, FAST_PIPELINE)
    result = CliRunner().invoke(
        cli, ["status", str(config), "--workspace", str(tmp_path / "ws"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["stage"] for s in report["stages"]] == ["source", "train", "package", "deploy"]
    for stage in report["stages"]:
        assert stage["reusable"] is False and stage["from"] is None
        assert stage["reason"]["kind"] == "no earlier run"
        assert "no functionary key" in stage["reason"]["detail"]
    assert not (tmp_path / "ws").exists(), "status writes nothing"


def test_status_with_keys_but_no_runs_names_the_upstream_that_must_run(tmp_path):
    ws = Workspace(tmp_path / "ws")
    init_dev_keys(ws.keys)
    report = stage_status(load_config(write_config(tmp_path, FAST_PIPELINE)), ws, sandbox=False)
    kinds = {v.stage: v.reason.kind for v in report.verdicts if v.reason}
    assert kinds == {
        "source": "no earlier run",
        "train": "upstream reruns",
        "package": "upstream reruns",
        "deploy": "upstream reruns",
    }
    lines = render(report)
    assert lines[0].startswith("source   runs      no earlier run")
    assert "'source' runs" in lines[1]
    assert not ws.runs.exists()
