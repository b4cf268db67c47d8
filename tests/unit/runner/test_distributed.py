"""Workers of one stage, started and supervised for real (small Python processes, no TF): they
share a loopback-only network, one failing or hanging stops them all, drift starts none."""

from __future__ import annotations

import contextlib
import json
import os
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


def test_a_cluster_config_is_refused_before_the_run() -> None:
    """From the layout's pins, computed before any stage runs."""
    stage = StageConfig(
        name="train",
        kind="train",
        needs=(),
        timeout=5,
        lock=None,
        outputs=(),
        # a host that would be an option to ssh: refused, never substituted into a launcher
        params={"distribution": {"strategy": STRATEGY, "workers": 2, "hosts": ["a:1", "-b:1"]}},
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


# --------------------------------------------------------------------------- hosts
# A cluster whose "remote" worker is started on this machine by a launcher that runs
# `chainproof worker` directly (no ssh here): the real protocol, the real environment check.
# The stage command is a stdlib module (json.tool prints the spec): no TensorFlow.


@pytest.fixture(scope="module")
def this_environment() -> object:
    from pipeline.envcheck import check_environment, parse_lock
    from tests.conftest import MAIN_LOCK

    return check_environment(parse_lock(MAIN_LOCK), verify_files=True)


def cluster_run(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    launcher: list[str],
    fingerprint: object,
    lock: bytes = b"",
    spec: str = "",
    module: str = "json.tool",
):
    from tests.conftest import MAIN_LOCK

    run_dir = tmp_path / "run"
    for d in ("train", "logs", "specs", "locks", "source"):
        (run_dir / d).mkdir(parents=True, exist_ok=True)
    (run_dir / "specs/train.json").write_text(
        spec or json.dumps({"stage": "train", "token": str(tmp_path)})
    )
    (run_dir / "locks/main.txt").write_bytes(lock or MAIN_LOCK.read_bytes())
    (run_dir / "source/data.bin").write_bytes(b"\x00\x01" * 1000)
    port0, port1 = distributed.free_ports(2)
    plan = Plan("train", 2, (f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"), tuple(launcher))
    w = Workers(plan, lambda: fingerprint)  # type: ignore[arg-type,return-value]
    logs = sandbox.StageLogs(run_dir / "logs/train.stdout", run_dir / "logs/train.stderr")
    rc = w.execute(
        [sys.executable, "-I", "-m", module, "../specs/train.json"],
        workdir=run_dir / "train",
        scratch=run_dir / "tmp" / "train",
        logs=logs,
        timeout=120,
        sandbox=sandbox.NO_SANDBOX,
        mounts=sandbox.Mounts(
            read_only=(run_dir / "specs", run_dir / "locks", run_dir / "source"), anchor=run_dir
        ),
    )
    return rc, w, run_dir


WORKER = [sys.executable, "-I", "-m", "pipeline", "worker"]


@pytest.fixture
def remote_tmp(tmp_path, monkeypatch) -> Path:
    """The "remote" worker's TMPDIR (its job directory is made there, and must go)."""
    where = tmp_path / "remote-tmp"
    where.mkdir()
    monkeypatch.setenv("TMPDIR", str(where))
    return where


def left_behind(remote_tmp: Path) -> list[str]:
    """Job directories, and processes working in one, still there after the stage."""
    out = [p.name for p in remote_tmp.iterdir()]
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and str(remote_tmp) in os.readlink(proc / "cwd"):
                out.append(proc.name)
    return out


def test_a_remote_worker_runs_its_job_and_reports_back(
    tmp_path, this_environment, remote_tmp
) -> None:
    rc, w, run_dir = cluster_run(tmp_path, WORKER, this_environment)
    assert rc == 0
    remote_out = (run_dir / "logs/train.worker-1.stdout").read_text()
    assert json.loads(remote_out)["token"] == str(tmp_path), "the worker ran on the shipped spec"
    rec = w.byproducts(lambda named: {n: {"sha256": "x"} for n in named})
    assert [(r["index"], r["host"], r["return-value"]) for r in rec["workers"]] == [
        (0, "127.0.0.1", 0),
        (1, "127.0.0.1", 0),
    ]
    assert rec["workers"][1]["environment"] == this_environment.as_dict()  # type: ignore[attr-defined]
    assert "unsandboxed" in rec["distribution"]["network"]
    assert left_behind(remote_tmp) == [], "the worker removed its job directory"


def test_a_launcher_that_fails_starts_no_worker(tmp_path, this_environment) -> None:
    ssh_down = [
        sys.executable,
        "-c",
        "import sys; sys.stderr.write('ssh: connect to host {host} port 22: No route\\n'); "
        "sys.exit(255)",
    ]
    with pytest.raises(StageFailed) as info:
        cluster_run(tmp_path, ssh_down, this_environment)
    assert "worker 1 (127.0.0.1) its launcher exited with code 255" in info.value.message
    assert "no worker trained and no link was written" in info.value.message
    assert "ssh: connect to host 127.0.0.1 port 22" in info.value.log_tail
    assert info.value.exit_code == 4
    assert not (tmp_path / "run/logs/train.stdout").exists(), "the chief never started"


def test_a_remote_worker_in_another_environment_is_refused_before_training(
    tmp_path, remote_tmp
) -> None:
    from pipeline.envcheck import Fingerprint

    chief = Fingerprint(
        "main.txt", "0" * 64, "3.11.0", "cpython", "Linux", "x86_64", "1" * 64, 1, 0
    )
    with pytest.raises(EnvironmentDrift) as info:
        cluster_run(tmp_path, WORKER, chief)
    assert "on worker 1 (127.0.0.1)" in info.value.message and "lock_sha256" in info.value.message
    assert info.value.exit_code == 3
    assert not (tmp_path / "run/logs/train.stdout").exists(), "the chief never started"
    assert left_behind(remote_tmp) == []


def test_a_drifted_remote_environment_is_refused_with_its_diff(
    tmp_path, this_environment, remote_tmp
) -> None:
    """The worker's own check against the shipped lock: a pin its venv does not have."""
    from tests.conftest import MAIN_LOCK

    lock = MAIN_LOCK.read_bytes() + b"zz-not-installed==1.0 --hash=sha256:" + b"0" * 64 + b"\n"
    with pytest.raises(EnvironmentDrift) as info:
        cluster_run(tmp_path, WORKER, this_environment, lock=lock)
    assert "- zz-not-installed==1.0: pinned in the lock, not installed" in info.value.message
    assert "the lock on worker 1 (127.0.0.1)" in info.value.message
    assert info.value.exit_code == 3 and "no worker was started" in (info.value.hint or "")
    assert not (tmp_path / "run/logs/train.stdout").exists(), "the chief never started"
    assert left_behind(remote_tmp) == []


# cProfile runs the spec file as a script: a stage command of the right shape that the test
# controls. The chief fails while worker 1 trains on.
CHIEF_FAILS = """
import json, os, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
print("pid", os.getpid(), "index", index, flush=True)
if index == 0:
    time.sleep(3)
    os._exit(3)  # cProfile swallows SystemExit
time.sleep(600)
"""


def test_a_failing_chief_stops_the_remote_worker_through_its_stdin(
    tmp_path, this_environment, remote_tmp
) -> None:
    t0 = time.monotonic()
    with pytest.raises(StageFailed) as info:
        cluster_run(tmp_path, WORKER, this_environment, spec=CHIEF_FAILS, module="cProfile")
    assert "worker 0 exited with code 3" in info.value.message
    assert time.monotonic() - t0 < 90, "the remote worker was not waited for"
    time.sleep(0.5)
    assert left_behind(remote_tmp) == [], "its stage killed and its job removed"


def test_a_worker_that_does_not_speak_the_protocol_is_refused(tmp_path, this_environment) -> None:
    chatty = [sys.executable, "-c", "print('Welcome to node-2!'); import sys; sys.stdin.read()"]
    with pytest.raises(StageFailed) as info:
        cluster_run(tmp_path, chatty, this_environment)
    assert "worker 1 (127.0.0.1) the worker's message: not a chainproof frame" in (
        info.value.message
    )
    assert not (tmp_path / "run/logs/train.stdout").exists(), "the chief never started"


def test_a_launcher_that_is_not_installed_is_a_config_error(tmp_path, this_environment) -> None:
    with pytest.raises(InputError) as info:
        cluster_run(tmp_path, ["/nonexistent/ssh", "{host}"], this_environment)
    assert "the launcher of worker 1 (127.0.0.1) cannot be started" in info.value.message
    assert info.value.exit_code == 2


# A worker that speaks the protocol but reports as another worker: a hostile or broken host.
FORGER = r"""
import hashlib, json, os, sys, tempfile
from pathlib import Path
from pipeline.runner import remote
job = remote.read_job(remote.Reader(lambda n: os.read(0, n)), Path(tempfile.mkdtemp()) / "run")
env = json.loads(sys.argv[1])
base = {"job_sha256": job.sha256, "environment": env}
sys.stdout.buffer.write(remote.frame({"type": "ready", "index": job.index, **base}))
sys.stdout.buffer.flush()
assert os.read(0, 6) == b"start\n"
out = b"forged\n"
log = {"size": len(out), "sha256": hashlib.sha256(out).hexdigest(), "truncated": False}
doc = {"type": "report", "index": job.index + 1, **base, "return-value": 0, "duration_ms": 1,
       "stdout": log, "stderr": {**log, "size": 0, "sha256": hashlib.sha256(b"").hexdigest()}}
sys.stdout.buffer.write(remote.frame(doc, out))
"""


def test_a_report_for_another_worker_fails_the_stage_closed(tmp_path, remote_tmp) -> None:
    from pipeline.envcheck import Fingerprint

    chief = Fingerprint(
        "main.txt", "0" * 64, "3.11.0", "cpython", "Linux", "x86_64", "1" * 64, 1, 0
    )
    forger = [sys.executable, "-I", "-c", FORGER, json.dumps(chief.as_dict())]
    with pytest.raises(StageFailed) as info:
        cluster_run(tmp_path, forger, chief)
    assert "worker 1 (127.0.0.1): the message is for worker 2, not worker 1" in info.value.message
    assert "every worker was stopped and no link was written" in info.value.message
    assert info.value.exit_code == 4
    assert not (tmp_path / "run/logs/train.worker-1.stdout").read_bytes(), "nothing of it kept"
