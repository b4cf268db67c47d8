"""Per-worker system metrics read back as hostile data, and what a worker could hide from the
runner's sampler (an adversarial review's cases)."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import Error
from pipeline.runner.sysmetrics import CPU, TreeSampler, read_samples

HUGE_INT = "1" * 400  # valid JSON, a Python int; float() of it overflows


def _hostile(tmp_path: Path) -> Path:
    (tmp_path / "logs").mkdir(exist_ok=True)
    path = tmp_path / "logs" / "train.worker-0.system-metrics.json"
    path.write_text('{"samples":[{"timestamp_ms":1,"' + CPU + '":' + HUGE_INT + "}]}")
    return path


def test_read_samples_never_raises_on_a_huge_integer(tmp_path: Path) -> None:
    """'read as hostile data': math.isfinite(int) raises OverflowError (not an Error)."""
    with contextlib.suppress(Error):  # a bad-input error is fine; any other type fails
        read_samples(_hostile(tmp_path))


def test_read_samples_bounds_the_timestamp(tmp_path: Path) -> None:
    """A timestamp MLflow cannot store (int64 ms) fails the whole log_batch, and so the whole
    run's lineage; it should be dropped here."""
    path = tmp_path / "m.json"
    path.write_text('{"samples":[{"timestamp_ms":' + "9" * 40 + ',"' + CPU + '":1}]}')
    assert all(0 <= ts < 2**63 for _, ts, _ in read_samples(path))


def test_lineage_workers_survive_a_hostile_metrics_file(tmp_path: Path) -> None:
    """lineage reads links UNVERIFIED (read_link): the digest check is no barrier to a workspace
    writer. One hostile file must be left out, not abort the whole run's lineage."""
    mlflow = pytest.importorskip("mlflow")
    from pipeline.lineage import MLflowLineage

    path = _hostile(tmp_path)
    record = {
        "index": 0,
        "system-metrics": {
            "path": f"logs/{path.name}",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        },
    }

    class _Stop(Exception):
        pass

    class _Run:
        def __getattr__(self, _name):
            raise _Stop  # reached the MLflow calls: the file was handled

    orig = mlflow.active_run
    mlflow.active_run = lambda: _Run()
    try:
        with pytest.raises((_Stop, AttributeError)):
            MLflowLineage._workers(mlflow, tmp_path, "train", [record])
    finally:
        mlflow.active_run = orig


WORK_IN_CHILDREN = r"""
import os, time
end = time.time() + 5
while time.time() < end:
    pid = os.fork()
    if pid == 0:
        t = time.time()
        while time.time() - t < 0.3:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_cpu_of_short_lived_children_is_counted() -> None:
    """A worker that does its work in children that live less than a sampling interval shows
    ~0% CPU: their time is in the parent's children_user/children_system, which is ignored."""
    proc = subprocess.Popen([sys.executable, "-c", WORK_IN_CHILDREN])
    try:
        sampler = TreeSampler(proc.pid)
        shares = []
        for _ in range(5):
            values = sampler.sample(time.monotonic())
            if values is not None:
                shares.append(values[CPU])
            time.sleep(0.8)
    finally:
        proc.kill()
        proc.wait()
    import os

    one_core = 100.0 / (os.cpu_count() or 1)
    later = shares[1:]
    assert later and sum(later) / len(later) > one_core / 3, shares
