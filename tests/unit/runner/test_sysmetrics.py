"""The runner's per-worker system metrics: sampled from a real process tree, bounded, and read
back as hostile data (MLflow system-metric names with node ids)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runner import sysmetrics
from pipeline.runner.sysmetrics import CPU, RSS, THREADS, Recorder, read_samples

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 30: pass\n"


@pytest.fixture
def busy_tree():
    """A shell whose child spins a core: the sampler must count the child, not just the root."""
    proc = subprocess.Popen(["/bin/sh", "-c", f'"{sys.executable}" -c "$0"; :', BUSY])
    yield proc
    proc.kill()
    subprocess.run(["pkill", "-f", "t < 30"], check=False)
    proc.wait()


def test_a_busy_worker_tree_is_sampled(tmp_path: Path, busy_tree) -> None:
    rec = Recorder({1: busy_tree.pid}, interval=0.2)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        rec.tick()
        time.sleep(0.05)
    out = rec.write({1: tmp_path / "w1.json"})
    assert set(out) == {1}
    doc = json.loads(out[1].read_text())
    assert doc["node_id"] == "worker-1"
    samples = read_samples(out[1])
    assert len(samples) >= 5
    later = [values for _, _, values in samples[2:]]
    # one spinning core of this machine's cores, seen through the shell that started it
    assert max(v[CPU] for v in later) > 20
    assert all(v[RSS] > 1 and v[THREADS] >= 2 for v in later)
    steps = [s for s, _, _ in samples]
    assert steps == list(range(len(samples)))


def test_a_gone_worker_records_nothing(tmp_path: Path) -> None:
    proc = subprocess.Popen(["/bin/true"])
    proc.wait()
    rec = Recorder({0: proc.pid}, interval=0)
    rec.tick()
    assert rec.write({0: tmp_path / "w0.json"}) == {}
    assert not (tmp_path / "w0.json").exists()


def test_samples_stay_bounded_on_a_long_run(monkeypatch, busy_tree) -> None:
    monkeypatch.setattr(sysmetrics, "MAX_SAMPLES", 8)
    rec = Recorder({0: busy_tree.pid}, interval=0)
    for _ in range(40):
        rec._next = 0.0
        rec.tick()
    assert len(rec.series[0]) <= 8 and rec.interval == 0  # halved, never grown


@pytest.mark.parametrize(
    "doc",
    [
        "[]",
        '{"samples": "many"}',
        '{"samples": [1, null, {"timestamp_ms": "now", "cpu_utilization_percentage": 1}]}',
        '{"samples": [{"timestamp_ms": 1, "cpu_utilization_percentage": true}]}',
        '{"samples": [{"timestamp_ms": 1, "cpu_utilization_percentage": 1e300}]}',
        '{"samples": [{"timestamp_ms": 1, "evil_metric": 3}]}',
    ],
    ids=["list", "string", "bad-samples", "bool", "huge", "unknown-metric"],
)
def test_hostile_metric_files_yield_no_metrics(tmp_path: Path, doc: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(doc)
    assert read_samples(path) == []


def test_an_oversized_metrics_file_is_refused(tmp_path: Path) -> None:
    from pipeline.errors import Error

    path = tmp_path / "m.json"
    path.write_text('{"samples": [' + ",".join(['{"timestamp_ms": 1}'] * 500_000) + "]}")
    with pytest.raises(Error):
        read_samples(path)
