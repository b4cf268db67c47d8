"""Lineage off the critical path: the detached process logs a finished run and records it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.config import LineageSpec
from pipeline.errors import InputError
from pipeline.runner import detached
from tests.conftest import chainproof, free_port


def finished_run(ws: Path, lineage: str) -> Path:
    """A run directory as the runner leaves it once the session has ended (no stages)."""
    run = ws / "runs" / "20261202T000000Z-abcdef"
    (run / "logs").mkdir(parents=True)
    (ws / "attestations" / "runs" / run.name).mkdir(parents=True)
    (run / "config.yaml").write_text(f"schema: 1\nname: tiny\nlineage: {lineage}\n")
    record = {
        "run_id": run.name,
        "pipeline": "tiny",
        "links": f"../../attestations/runs/{run.name}",
        "layout": f"../../attestations/runs/{run.name}/tiny.layout",
        "stages": [],
        "status": "succeeded",
    }
    (run / "run.json").write_text(json.dumps(record))
    return run


def test_an_outage_is_recorded_in_run_json_by_the_detached_process(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ws = tmp_path / "ws"
    run = finished_run(ws, f"{{tracking_uri: '{url}'}}")
    spec = LineageSpec(tracking_uri=url)
    t0 = time.perf_counter()
    pending = detached.spawn(run, ws, spec, "tiny", published=False)
    assert time.perf_counter() - t0 < 2.0, "spawn returns without waiting for MLflow"
    assert pending.tracking_uri == url and pending.experiment == "tiny"
    assert "logs/lineage.log" in pending.describe() and url in pending.describe()
    assert pending.wait() == 0
    lineage = json.loads((run / "run.json").read_text())["lineage"]
    assert lineage["logged"] is False and f"NOT logged to {url}" in lineage["error"]
    log = (run / detached.LOG_NAME).read_text()
    assert "chainproof lineage sync" in log, "the log says how to log it later"
    assert detached.wait_for_lineage(run, timeout=1) == lineage


def test_an_unreadable_run_is_recorded_not_left_pending(tmp_path):
    ws = tmp_path / "ws"
    run = finished_run(ws, "{enabled: true}")
    (run / "config.yaml").write_text("- not\n- a mapping\n")
    proc = chainproof("lineage", "detached", run, "--workspace", ws)
    assert proc.returncode == 2, proc.stderr
    lineage = json.loads((run / "run.json").read_text())["lineage"]
    assert lineage["logged"] is False and "not a mapping" in lineage["error"]


def test_waiting_for_a_lineage_that_never_comes_says_what_to_do(tmp_path):
    run = finished_run(tmp_path / "ws", "{enabled: true}")
    with pytest.raises(InputError) as info:
        detached.wait_for_lineage(run, timeout=0.3)
    assert "lineage sync" in info.value.hint and "lineage.log" in info.value.hint


@pytest.mark.slow
def test_the_detached_process_logs_the_run_to_the_workspace_store(tmp_path):
    ws = tmp_path / "ws"
    run = finished_run(ws, "{experiment: tiny-exp}")
    pending = detached.spawn(run, ws, LineageSpec(experiment="tiny-exp"), "tiny", published=True)
    assert pending.tracking_uri == f"sqlite:///{(ws / 'mlruns.db').resolve()}"
    assert pending.wait() == 0, (run / detached.LOG_NAME).read_text()
    lineage = detached.wait_for_lineage(run, timeout=1)
    assert lineage["logged"] is True and len(lineage["parent_run_id"]) == 32
    assert "MLflow run" in (run / detached.LOG_NAME).read_text()
    # a second log of the same run is idempotent: the same MLflow run, nothing new
    again = chainproof("lineage", "detached", run, "--workspace", ws)
    assert again.returncode == 0, again.stderr
    assert lineage["parent_run_id"] in again.stdout
