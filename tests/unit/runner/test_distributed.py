"""Workers of one stage, started and supervised for real (small Python processes, no TF): they
share a loopback-only network, one failing or hanging stops them all, drift starts none."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import StageConfig
from pipeline.errors import EnvironmentDrift, InputError, StageFailed
from pipeline.runner import distributed, sandbox
from pipeline.runner.distributed import STRATEGY, Plan, Workers

# A worker: reads its TF_CONFIG; worker 0 serves one connection, the others connect to it
# over 127.0.0.1 and also try an outside address (which must fail under the sandbox).
SCRIPT = r"""
import json, os, socket, sys, time
cfg = json.loads(os.environ["TF_CONFIG"])
me = cfg["task"]["index"]
host, port = cfg["cluster"]["worker"][0].rsplit(":", 1)
mode = sys.argv[1]
print("pid", os.getpid(), "index", me, flush=True)
if mode == "fail" and me == 1:
    sys.exit(3)
if mode == "hang" or (mode == "fail" and me == 0):
    time.sleep(600)
if me == 0:
    s = socket.socket(); s.bind((host, int(port))); s.listen(); c, _ = s.accept()
    print("got", c.recv(16).decode(), flush=True)
else:
    for _ in range(100):
        try:
            c = socket.create_connection((host, int(port)), timeout=5); break
        except OSError:
            time.sleep(0.1)
    c.sendall(b"hello %d" % me)
    try:
        socket.create_connection(("192.0.2.1", 80), timeout=2)
        print("outside: reachable", flush=True)
    except OSError as e:
        print("outside: unreachable", e.errno, flush=True)
"""


class FakeFingerprint:
    def as_dict(self) -> dict[str, object]:
        return {"lock_sha256": "l" * 64}


def workers(n: int, check=None) -> Workers:  # type: ignore[no-untyped-def]
    return Workers(Plan("train", n), check or (lambda: FakeFingerprint()))  # type: ignore[arg-type,return-value]


def run(
    tmp_path: Path, w: Workers, mode: str, box: sandbox.Sandbox, timeout: int = 60
) -> int | None:
    work = tmp_path / "run" / "train"
    work.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "logs").mkdir(exist_ok=True)
    logs = sandbox.StageLogs(tmp_path / "run/logs/train.stdout", tmp_path / "run/logs/train.stderr")
    return w.execute(
        [sys.executable, "-I", "-c", SCRIPT, mode, str(tmp_path)],  # a token to find them by
        workdir=work,
        scratch=tmp_path / "run" / "tmp" / "train",
        logs=logs,
        timeout=timeout,
        sandbox=box,
    )


@pytest.fixture(scope="module")
def bwrap() -> sandbox.Sandbox:
    try:
        return sandbox.find_bubblewrap()
    except sandbox.SandboxUnavailable as e:
        pytest.skip(f"bubblewrap unusable here: {e.message}")


def started(tmp_path: Path) -> int:
    """How many workers printed their start (pids inside a sandbox are its own)."""
    logs = (tmp_path / "run" / "logs").glob("*.stdout")
    return sum(log.read_text().count("pid ") for log in logs)


def survivors(tmp_path: Path) -> list[int]:
    """Host pids of any process still running a worker of this test (nsenter, bwrap, python)."""
    token = str(tmp_path).encode()
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if token in (proc / "cmdline").read_bytes():
                    out.append(int(proc.name))
            except OSError:
                continue
    return out


def test_plan_is_read_from_the_params() -> None:
    def stage(params: dict[str, object]) -> StageConfig:
        return StageConfig(
            name="train",
            kind="train",
            needs=(),
            timeout=5,
            lock=None,
            outputs=(),
            params=params,
            impl=None,  # type: ignore[arg-type]
        )

    assert distributed.plan_for(stage({})) is None
    assert distributed.plan_for(stage({"distribution": {"strategy": "mirrored"}})) is None
    plan = distributed.plan_for(
        stage({"distribution": {"strategy": "multi_worker_mirrored", "workers": 3}})
    )
    assert plan == Plan("train", 3)
    cfg = json.loads(distributed.tf_config(["127.0.0.1:1", "127.0.0.1:2"], 1))
    assert cfg == {
        "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
        "task": {"type": "worker", "index": 1},
    }


def test_workers_share_loopback_only_and_every_one_is_recorded(tmp_path, bwrap) -> None:
    w = workers(2)
    assert run(tmp_path, w, "ok", bwrap) == 0
    chief = (tmp_path / "run/logs/train.stdout").read_text()
    other = (tmp_path / "run/logs/train.worker-1.stdout").read_text()
    assert "got hello 1" in chief, "worker 1 reached worker 0 on 127.0.0.1"
    assert "outside: unreachable" in other, "the shared network is loopback only"
    assert "loopback only" in w.network
    rec = w.byproducts(lambda named: {n: {"sha256": "x"} for n in named})
    assert [r["index"] for r in rec["workers"]] == [0, 1]
    assert [r["return-value"] for r in rec["workers"]] == [0, 0]
    assert rec["workers"][1]["stdout"]["path"] == "logs/train.worker-1.stdout"
    assert not (tmp_path / "run" / "tmp").exists(), "scratch and private dirs removed"


def test_a_failed_worker_stops_every_worker(tmp_path, bwrap) -> None:
    t0 = time.monotonic()
    with pytest.raises(StageFailed) as info:
        run(tmp_path, workers(2), "fail", bwrap)
    assert time.monotonic() - t0 < 30, "the chief was not waited for"
    assert "worker 1 exited with code 3" in info.value.message
    assert info.value.exit_code == 4
    time.sleep(0.5)
    assert started(tmp_path) == 2 and survivors(tmp_path) == [], "no orphan"


def test_a_hung_worker_times_out_and_leaves_nothing(tmp_path) -> None:
    with pytest.raises(StageFailed) as info:
        run(tmp_path, workers(2), "hang", sandbox.NO_SANDBOX, timeout=3)
    assert "timed out after 3s with worker(s) 0, 1 still running" in info.value.message
    time.sleep(0.5)
    assert started(tmp_path) == 2 and survivors(tmp_path) == [], "no orphan"


def test_a_drifted_environment_starts_no_worker(tmp_path) -> None:
    def drifted() -> object:
        raise EnvironmentDrift("main.txt", ["! numpy/version.py: sha256 differs"])

    with pytest.raises(EnvironmentDrift) as info:
        run(tmp_path, workers(2, drifted), "ok", sandbox.NO_SANDBOX)
    assert "no worker of stage 'train' was started" in (info.value.hint or "")
    assert not list((tmp_path / "run/logs").iterdir()), "nothing ran"


def test_hosts_are_refused_not_half_run(tmp_path) -> None:
    w = Workers(Plan("train", 2, ("10.0.0.1:2222", "10.0.0.2:2222")), lambda: FakeFingerprint())  # type: ignore[arg-type,return-value]
    with pytest.raises(InputError, match="this runner starts workers on this machine only"):
        run(tmp_path, w, "ok", sandbox.NO_SANDBOX)


def test_a_cluster_config_is_refused_before_the_run() -> None:
    """From the layout's pins, computed before any stage runs."""
    stage = StageConfig(
        name="train",
        kind="train",
        needs=(),
        timeout=5,
        lock=None,
        outputs=(),
        params={"distribution": {"strategy": STRATEGY, "workers": 2, "hosts": ["a:1", "b:1"]}},
        impl=None,  # type: ignore[arg-type]
    )
    with pytest.raises(InputError) as info:
        distributed.worker_counts([stage])
    assert info.value.exit_code == 2


def test_workers_on_the_host_network_are_refused_before_any_starts(tmp_path, bwrap) -> None:
    # TensorFlow's worker servers authenticate no one: never on the host's interfaces
    work = tmp_path / "run" / "train"
    work.mkdir(parents=True)
    (tmp_path / "run" / "logs").mkdir()
    logs = sandbox.StageLogs(tmp_path / "run/logs/train.stdout", tmp_path / "run/logs/train.stderr")
    with pytest.raises(InputError) as info:
        workers(2).execute(
            [sys.executable, "-I", "-c", SCRIPT, "ok", str(tmp_path)],
            workdir=work,
            scratch=tmp_path / "run" / "tmp" / "train",
            logs=logs,
            timeout=30,
            sandbox=bwrap,
            mounts=sandbox.Mounts(network=True),
        )
    assert "network: true" in info.value.message
    assert started(tmp_path) == 0 and not survivors(tmp_path)
