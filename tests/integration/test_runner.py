"""The runner's promises: drift refused, failures fail closed, kills leave nothing valid."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import StageFailed
from pipeline.runner.run import Runner
from pipeline.workspace import Workspace
from tests.conftest import CHAINPROOF, MAIN_LOCK, ROOT, SMALL_LOCK, chainproof, write_config

pytestmark = pytest.mark.slow


def make_npz(path: Path) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((40, 4, 4, 1)).astype(np.float32), y=np.arange(40) % 2)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_only(data: Path, sha: str, extra: str = "") -> str:
    return f"""
        schema: 1
        name: tiny
        lock: @MAIN_LOCK@
        stages:
          - name: source
            kind: source
            {extra}
            params: {{path: {data}, sha256: {sha}}}
    """


def test_lock_drift_refuses_before_any_stage(tmp_path):
    lock = tmp_path / "drifted.txt"
    text = MAIN_LOCK.read_text()
    assert "\nclick==8.5.1 " in text
    lock.write_text(text.replace("\nclick==8.5.1 ", "\nclick==8.5.0 "))
    data = tmp_path / "d.npz"
    cfg = write_config(
        tmp_path, source_only(data, make_npz(data)).replace("@MAIN_LOCK@", str(lock))
    )
    proc = chainproof("run", cfg, "--workspace", tmp_path / "ws")
    assert proc.returncode == 3, proc.stderr
    assert "~ click: lock pins 8.5.0, installed 8.5.1" in proc.stderr
    assert not list((tmp_path / "ws" / "attestations").rglob("*.link"))


def test_stage_with_a_wrong_pin_fails_closed(tmp_path):
    data = tmp_path / "d.npz"
    make_npz(data)
    cfg = write_config(tmp_path, source_only(data, "f" * 64))
    ws = tmp_path / "ws"
    proc = chainproof("run", cfg, "--workspace", ws)
    assert proc.returncode == 4, proc.stderr
    assert "stage 'source' failed: exited with code 1" in proc.stderr
    assert f"the config pins {'f' * 64}" in proc.stderr, "the log's tail is shown"
    assert not list(ws.rglob("*.link")), "a failed stage gets no link"
    record = json.loads((ws / "runs" / "latest" / "run.json").read_text())
    assert record["status"] == "failed"
    assert not (ws / "releases").exists()
    assert chainproof("verify", ws / "runs" / "latest", "--workspace", ws).returncode == 1


def test_stage_timeout_kills_it(tmp_path):
    cfg = write_config(
        tmp_path,
        """
        schema: 1
        name: slow
        lock: @MAIN_LOCK@
        stages:
          - {name: source, kind: source, params: {dataset: sklearn-digits}}
          - {name: train, kind: train, needs: [source], timeout: 1, params: {epochs: 50}}
    """,
    )
    t0 = time.monotonic()
    proc = chainproof("run", cfg, "--workspace", tmp_path / "ws")
    assert proc.returncode == 4 and "stage 'train' failed: timed out" in proc.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.tensorflow
def test_dataset_changed_between_source_and_train_is_refused_by_the_deploy_gate(tmp_path):
    from tests.conftest import FAST_PIPELINE

    ws = Workspace(tmp_path / "ws")
    runner = Runner(load_config(write_config(tmp_path, FAST_PIPELINE)), ws)
    runner.start()
    stages = {s.name: s for s in runner.config.stages}
    runner.run_stage(stages["source"])
    dataset = runner.run_dir / "source" / "dataset.npz"
    data = bytearray(dataset.read_bytes())
    data[-100] ^= 0xFF  # a poisoned sample, after source signed its products
    dataset.write_bytes(bytes(data))
    runner.run_stage(stages["train"])
    runner.run_stage(stages["package"])
    with pytest.raises(StageFailed) as info:
        runner.run_stage(stages["deploy"])
    tail = info.value.log_tail
    assert "refusing to deploy" in tail and "source/dataset.npz" in tail
    assert not (tmp_path / "ws" / "releases").exists()
    assert not list(runner.links_dir.glob("deploy.*.link"))


def start_run_until_training(tmp_path: Path, ws: Path) -> tuple[subprocess.Popen, Path]:
    """A long run started as a user would, returned once its train stage is fitting."""
    from tests.conftest import FAST_PIPELINE

    cfg = write_config(tmp_path, FAST_PIPELINE.replace("epochs: 2", "epochs: 200"))
    proc = subprocess.Popen(
        [*CHAINPROOF, "run", cfg, "--workspace", ws],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = list(ws.glob("runs/*/logs/train.stdout"))
        if logs and "Epoch" in logs[0].read_text():
            return proc, logs[0].parent.parent.resolve()
        time.sleep(0.2)
    proc.kill()
    pytest.fail("training never started")


@pytest.mark.tensorflow
def test_killed_run_leaves_nothing_valid_and_a_rerun_is_clean(tmp_path):
    from tests.conftest import FAST_PIPELINE

    ws = tmp_path / "ws"
    proc, killed = start_run_until_training(tmp_path, ws)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    assert not any(
        p.name.startswith("train.") for p in (ws / "attestations/runs" / killed.name).iterdir()
    )
    # the stage died with its runner: no orphan keeps writing into the run
    before = sorted((p.name, p.stat().st_size) for p in (killed / "logs").iterdir())
    time.sleep(2)
    assert before == sorted((p.name, p.stat().st_size) for p in (killed / "logs").iterdir())
    bad = chainproof("verify", killed, "--workspace", ws)
    assert bad.returncode == 1 and "step:     train" in bad.stderr

    cfg2 = write_config(tmp_path, FAST_PIPELINE, name="again.yaml")
    again = chainproof("run", cfg2, "--workspace", ws)
    assert again.returncode == 0, again.stderr
    assert os.readlink(ws / "runs" / "latest") != killed.name
    assert chainproof("verify", ws / "runs" / "latest", "--workspace", ws).returncode == 0


def test_stage_with_its_own_small_lock_runs_in_its_own_environment(tmp_path):
    """The small lock (numpy + pydantic) is built once, keyed by its digest, and checked."""
    data = tmp_path / "d.npz"
    sha = make_npz(data)
    cfg = write_config(tmp_path, source_only(data, sha, extra=f"lock: {SMALL_LOCK}"))
    ws = tmp_path / "ws"
    proc = chainproof("run", cfg, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    (link,) = ws.glob("attestations/runs/*/source.*.link")
    from in_toto.models.metadata import Metadata

    env = Metadata.load(str(link)).get_payload().environment
    assert env["lock_sha256"] == hashlib.sha256(SMALL_LOCK.read_bytes()).hexdigest()
    assert env["stage_environment"] == "own lock"
    assert env["distributions"] < 10, "only the small lock's distributions and chainproof"
    (envdir,) = (ws / ".chainproof" / "envs").iterdir()

    # A file modified inside that environment is drift: the next run refuses the stage.
    site = next(envdir.glob("lib/python3.11/site-packages"))
    target = site / "numpy" / "version.py"
    target.write_text(target.read_text() + "\n# tampered\n")
    proc = chainproof("run", cfg, "--workspace", ws)
    assert proc.returncode == 3, proc.stderr
    assert "numpy/version.py: sha256 differs" in proc.stderr


@pytest.mark.tensorflow
def test_sigterm_records_a_failed_run_and_cleans_up(tmp_path):

    ws = tmp_path / "ws"
    proc, run = start_run_until_training(tmp_path, ws)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode != 0
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "tmp").exists(), "the stage's scratch directory is removed"
    assert not any(
        p.name.startswith("train.") for p in (ws / "attestations/runs" / run.name).iterdir()
    )
