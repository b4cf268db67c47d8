"""Two TensorFlow workers on 127.0.0.1, on the CPU: trained, verified, released and reproduced;
a killed worker fails the stage closed; a drifted worker environment is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import EnvironmentDrift
from pipeline.provenance.links import read_link
from pipeline.runner.run import Runner
from pipeline.workspace import Workspace
from tests.conftest import CHAINPROOF, ROOT, chainproof, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]

DISTRIBUTED = """
schema: 1
name: digits-dist
lock: @MAIN_LOCK@
layout:
  expires_days: 7
stages:
  - name: source
    kind: source
    params: {dataset: sklearn-digits, seed: 7}
  - name: train
    kind: train
    needs: [source]
    params:
      epochs: @EPOCHS@
      seed: 7
      distribution: {strategy: multi_worker_mirrored, workers: 2}
  - name: package
    kind: package
    needs: [train]
  - name: deploy
    kind: deploy
    needs: [package]
"""


def config(tmp_path: Path, epochs: int = 1) -> Path:
    return write_config(tmp_path / "cfg", DISTRIBUTED.replace("@EPOCHS@", str(epochs)))


def weights_digests(run: Path) -> list[str]:
    out = []
    for log in sorted((run / "logs").glob("train*.stdout")):
        out += [
            line.split()[-1] for line in log.read_text().splitlines() if "weights sha256" in line
        ]
    return out


def test_two_workers_trained_verified_released_and_reproduced(tmp_path):
    ws = tmp_path / "ws"
    proc = chainproof("run", config(tmp_path), "--workspace", ws, "--wait-lineage")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "starting 2 workers on 127.0.0.1:23456, 127.0.0.1:23457" in proc.stderr
    run = (ws / "runs" / "latest").resolve()
    assert list((ws / "releases" / "digits-dist").iterdir()), "released"
    (link,) = ws.glob(f"attestations/runs/{run.name}/train.*.link")
    bp = read_link(link).byproducts
    assert bp["distribution"]["workers"] == 2 and "loopback only" in bp["distribution"]["network"]
    assert [(w["index"], w["return-value"]) for w in bp["workers"]] == [(0, 0), (1, 0)]
    assert bp["workers"][1]["stdout"]["path"] == "logs/train.worker-1.stdout"
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    assert metrics["training"]["path"] == "custom_loop"
    assert metrics["training"]["replicas_in_sync"] == 2
    a, b = weights_digests(run)
    assert a == b, "both workers end with identical weights"

    # Each worker's system metrics, sampled by the runner, under MLflow's node-id names.
    for i in (0, 1):
        assert bp["workers"][i]["system-metrics"]["path"] == (
            f"logs/train.worker-{i}.system-metrics.json"
        )
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlruns.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "digits-dist"]
    (train_run,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`chainproof.stage` = 'train'"
    )
    for i in (0, 1):
        cpu = client.get_metric_history(
            train_run.info.run_id, f"system/worker-{i}/cpu_utilization_percentage"
        )
        rss = client.get_metric_history(
            train_run.info.run_id, f"system/worker-{i}/process_memory_rss_megabytes"
        )
        assert len(cpu) >= 3 and max(m.value for m in cpu) > 0
        assert max(m.value for m in rss) > 50  # a TensorFlow worker's resident memory

    verify = chainproof("verify", run, "--workspace", ws)
    assert verify.returncode == 0, verify.stderr
    assert "workers" in verify.stdout

    # A worker's log rewritten after the run: verify names it.
    log = run / "logs" / "train.worker-1.stdout"
    original = log.read_bytes()
    log.write_bytes(original + b"forged\n")
    tampered = chainproof("verify", run, "--workspace", ws)
    assert tampered.returncode == 1 and "logs/train.worker-1.stdout" in tampered.stderr
    log.write_bytes(original)

    # Same N, data, seed and lock: the reproduction's model.keras is byte-identical.
    again = chainproof("reproduce", run)
    assert again.returncode == 0, again.stderr + again.stdout
    assert "identical  train/model.keras" in again.stdout
    assert "reproduced: identical" in again.stdout


def worker_pids(token: str, index: int) -> list[int]:
    """Host pids of the python processes of worker `index` of the run under `token`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        ours = b"stages.train" in cmd and token.encode() in env
        if ours and b"python" in cmd.split(b"\0")[0] and f'"index": {index}'.encode() in env:
            found.append(int(proc.name))
    return found


def survivors(token: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if token.encode() in (proc / "environ").read_bytes():
                    out.append(int(proc.name))
            except OSError:
                continue
    return out


def test_a_killed_worker_fails_the_stage_closed(tmp_path):
    ws = tmp_path / "ws"
    proc = subprocess.Popen(
        [*CHAINPROOF, "run", config(tmp_path, epochs=50), "--workspace", ws],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    token = str(ws)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        logs = list(ws.glob("runs/*/logs/train.worker-1.stdout"))
        if logs and "epoch 1/" in logs[0].read_text():  # training under way on both
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the workers never started training")
    pids = worker_pids(token, 1)
    assert pids, "worker 1 is running"
    for pid in pids:
        subprocess.run(["kill", "-KILL", str(pid)], check=False)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    assert "stage 'train' failed: worker 1 exited with code" in err
    assert "every worker was stopped and no link was written" in err
    assert not list(ws.glob("attestations/runs/*/train.*.link")), "no link"
    time.sleep(1)
    assert survivors(token) == [], "no orphan worker, sandbox or holder"


def test_a_drifted_worker_environment_is_refused_before_training(tmp_path):
    """A start-up file appears in the environment after the run's own check: the workers'
    fresh check refuses it and no worker starts."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    drift = site / "zz-chainproof-test-drift.pth"

    def on_event(message: str) -> None:
        if "checking the environment of 2 worker(s)" in message:
            drift.write_text("")

    cfg = load_config(config(tmp_path))
    runner = Runner(cfg, Workspace(tmp_path / "ws"), on_event=on_event)
    try:
        with pytest.raises(EnvironmentDrift) as info:
            runner.run()
    finally:
        drift.unlink(missing_ok=True)
    assert "zz-chainproof-test-drift.pth" in info.value.message
    assert "no worker of stage 'train' was started" in (info.value.hint or "")
    assert info.value.exit_code == 3
    assert not (runner.run_dir / "logs" / "train.stdout").exists(), "no worker ran"
    assert not list(runner.links_dir.glob("train.*.link"))


def test_mirrored_trains_in_one_process_through_the_custom_loop(tmp_path):
    body = DISTRIBUTED.replace(
        "{strategy: multi_worker_mirrored, workers: 2}", "{strategy: mirrored}"
    ).replace("@EPOCHS@", "1")
    cfg = write_config(tmp_path / "cfg", body.split("  - name: package")[0])
    ws = tmp_path / "ws"
    proc = chainproof("run", cfg, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    assert "starting" not in proc.stderr, "no workers: one process"
    run = (ws / "runs" / "latest").resolve()
    training = json.loads((run / "train" / "metrics.json").read_text())["training"]
    assert training["path"] == "custom_loop" and training["strategy"] == "mirrored"
    assert not list((run / "logs").glob("train.worker-*"))
    (link,) = ws.glob(f"attestations/runs/{run.name}/train.*.link")
    assert "workers" not in read_link(link).byproducts


# --------------------------------------------------------------------------- hosts
# A two-host cluster on this machine: the chief here on the host network, worker 1 started
# through a launcher that runs `chainproof worker` in a session of its own (as ssh would on
# another host: the runner killing the launcher reaches the worker only through its stdin).

CLUSTER = (
    "distribution: {strategy: multi_worker_mirrored, workers: 2, hosts: [@HOSTS@], "
    "launcher: [@LAUNCHER@]}"
)


def cluster_config(tmp_path: Path, epochs: int = 1) -> tuple[Path, list[str]]:
    from pipeline.runner.distributed import free_ports

    hosts = [f"127.0.0.1:{p}" for p in free_ports(2)]
    launcher = ["/usr/bin/setsid", "--wait", sys.executable, "-I", "-m", "pipeline", "worker"]
    body = DISTRIBUTED.replace("@EPOCHS@", str(epochs)).replace(
        "distribution: {strategy: multi_worker_mirrored, workers: 2}",
        CLUSTER.replace("@HOSTS@", ", ".join(hosts)).replace(
            "@LAUNCHER@", ", ".join(json.dumps(a) for a in launcher)
        ),
    )
    return write_config(tmp_path / "cfg", body), hosts


def cluster_env(tmp_path: Path) -> dict[str, str]:
    """The remote worker's job directory under the test's tmp: every process of the run
    then carries the test's path in its environment (HOME, TMPDIR), to find orphans by."""
    where = tmp_path / "remote-tmp"
    where.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(where)}


@pytest.mark.skipif(not Path("/usr/bin/setsid").exists(), reason="needs setsid (util-linux)")
def test_a_cluster_of_two_hosts_trains_and_verifies(tmp_path):
    ws = tmp_path / "ws"
    cfg, hosts = cluster_config(tmp_path)
    proc = subprocess.run(
        [*CHAINPROOF, "run", cfg, "--workspace", ws],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=cluster_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert f"starting 2 workers on {hosts[0]}, {hosts[1]}" in proc.stderr
    run = (ws / "runs" / "latest").resolve()
    (link,) = ws.glob(f"attestations/runs/{run.name}/train.*.link")
    bp = read_link(link).byproducts
    assert "host network" in bp["distribution"]["network"]
    assert [(w["index"], w["address"], w["host"], w["return-value"]) for w in bp["workers"]] == [
        (0, hosts[0], "127.0.0.1", 0),
        (1, hosts[1], "127.0.0.1", 0),
    ]
    assert bp["workers"][1]["stdout"]["path"] == "logs/train.worker-1.stdout"
    a, b = weights_digests(run)
    assert a == b, "the remote worker's returned log: both ended with identical weights"
    verify = chainproof("verify", run, "--workspace", ws)
    assert verify.returncode == 0, verify.stderr
    # The remote worker's returned log is signed like a local one's.
    log = run / "logs" / "train.worker-1.stderr"
    log.write_bytes(log.read_bytes() + b"forged\n")
    tampered = chainproof("verify", run, "--workspace", ws)
    assert tampered.returncode == 1 and "logs/train.worker-1.stderr" in tampered.stderr
    assert not list((tmp_path / "remote-tmp").iterdir()), "the worker removed its job"


@pytest.mark.skipif(not Path("/usr/bin/setsid").exists(), reason="needs setsid (util-linux)")
def test_a_killed_launcher_fails_the_cluster_closed(tmp_path):
    ws = tmp_path / "ws"
    cfg, _ = cluster_config(tmp_path, epochs=50)
    proc = subprocess.Popen(
        [*CHAINPROOF, "run", cfg, "--workspace", ws],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cluster_env(tmp_path),
    )
    token = str(tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        logs = list(ws.glob("runs/*/logs/train.stdout"))
        if logs and "epoch 1/" in logs[0].read_text():  # the chief trains: so does worker 1
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the cluster never started training")
    launchers = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _cmd(p).startswith(b"/usr/bin/setsid\0--wait") and token in _env(p)
    ]
    assert len(launchers) == 1, "worker 1's launcher is running"
    subprocess.run(["kill", "-KILL", str(launchers[0])], check=False)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    assert "stage 'train' failed: worker 1 exited with code -9" in err
    assert "every worker was stopped and no link was written" in err
    assert not list(ws.glob("attestations/runs/*/train.*.link")), "no link"
    time.sleep(1)
    # the failed run's lineage is logged by a detached process of the runner's, by design
    left = [p for p in survivors(token) if b"\0lineage\0detached\0" not in _cmd(Path(f"/proc/{p}"))]
    assert left == [], [_cmd(Path(f"/proc/{p}")) for p in left]
    assert not list((tmp_path / "remote-tmp").iterdir()), "the worker removed its job"


def _cmd(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def _env(proc: Path) -> str:
    try:
        return (proc / "environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""
