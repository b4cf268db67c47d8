"""The remote-worker protocol (distribution.hosts): the job a runner sends and the answers it
accepts. Every tamper is refused naming what is wrong; nothing here needs a second host."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cluster
from pipeline.envcheck import Fingerprint
from pipeline.errors import EnvironmentDrift, InputError
from pipeline.runner import remote
from pipeline.runner.distributed import Plan, worker_counts
from pipeline.runner.remote import JobRefused, Reader, ReportRefused

ADDRESSES = ("10.0.0.1:2222", "node-2.cluster:2222")
FP = Fingerprint(
    lock="main.txt",
    lock_sha256="a" * 64,
    python="3.11.9",
    implementation="cpython",
    platform="Linux-6.1-x86_64",
    machine="x86_64",
    distributions_sha256="b" * 64,
    distributions=120,
    files_verified=9000,
    files_sealed=9100,
    manifest_sha256="c" * 64,
)


def run_dir(tmp_path: Path) -> tuple[Path, list[tuple[str, Path]]]:
    run = tmp_path / "run"
    for name, data in {
        "specs/train.json": b'{"stage": "train"}',
        "locks/main.txt": b"numpy==2.0 --hash=sha256:00\n",
        "source/dataset.npz": bytes(range(256)) * 40,
    }.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    files = remote.job_files([run / "specs", run / "locks", run / "source"], run, "train")
    return run, files


def job(tmp_path: Path, index: int = 1) -> tuple[remote.Job, list[tuple[str, Path]]]:
    run, files = run_dir(tmp_path)
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for _, p in files}
    built = remote.build_job(
        files,
        digests,
        stage="train",
        index=index,
        addresses=ADDRESSES,
        module="stages.train",
        lock="locks/main.txt",
        timeout=600,
        sandbox=True,
    )
    return built, files


def wire(j: remote.Job, files: list[tuple[str, Path]]) -> bytes:
    out = io.BytesIO()
    remote.write_job(out, j, files)
    return out.getvalue()


def receive(data: bytes, dest: Path) -> remote.Job:
    return remote.read_job(Reader(io.BytesIO(data).read), dest)


def header_doc(j: remote.Job) -> dict[str, object]:
    doc: dict[str, object] = json.loads(j.header())
    return doc


def framed(doc: dict[str, object]) -> bytes:
    raw = json.dumps(doc).encode()
    return b"chainproof-job %d\n" % len(raw) + raw


def test_a_job_arrives_whole_and_re_hashed(tmp_path: Path) -> None:
    j, files = job(tmp_path)
    got = receive(wire(j, files), tmp_path / "there")
    assert got == j and got.sha256 == hashlib.sha256(j.header()).hexdigest()
    for name, path in files:
        assert (tmp_path / "there" / name).read_bytes() == path.read_bytes()
    assert got.cluster == ADDRESSES and got.spec == "specs/train.json"


def test_a_changed_material_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    j, files = job(tmp_path)
    data = bytearray(wire(j, files))
    data[data.index(bytes(range(256))) + 100] ^= 0xFF  # one byte of the dataset
    with pytest.raises(JobRefused, match=r"job file 'source/dataset.npz' has sha256 .* changed"):
        receive(bytes(data), tmp_path / "there")


def test_a_material_changed_after_it_was_hashed_is_refused(tmp_path: Path) -> None:
    j, files = job(tmp_path)
    dict(files)["specs/train.json"].write_bytes(b'{"stage": "tra1n"}')  # same size
    with pytest.raises(JobRefused, match="job file 'specs/train.json'"):
        receive(wire(j, files), tmp_path / "there")


@pytest.mark.parametrize(
    "path",
    ["../outside/x", "/etc/passwd", "specs/../../x", "specs/./x", "specs\\x", "train/model.keras",
     "logs/train.stdout", "top-level", "specs//x"],
)  # fmt: skip
def test_a_path_escape_is_refused(tmp_path: Path, path: str) -> None:
    j, files = job(tmp_path)
    doc = header_doc(j)
    doc["files"][0]["path"] = path  # type: ignore[index]
    with pytest.raises(JobRefused, match="job file path"):
        receive(framed(doc), tmp_path / "there")
    assert not (tmp_path / "outside").exists() and not list((tmp_path / "there").rglob("*"))


def test_a_file_named_twice_is_refused(tmp_path: Path) -> None:
    j, files = job(tmp_path)
    doc = header_doc(j)
    doc["files"] = [doc["files"][0], doc["files"][0]]  # type: ignore[index]
    with pytest.raises(JobRefused, match="named twice"):
        receive(framed(doc), tmp_path / "there")


def test_oversized_jobs_are_refused_before_reading_them(tmp_path: Path) -> None:
    with pytest.raises(JobRefused, match="the job header is .* bytes; at most"):
        receive(b"chainproof-job %d\n" % (remote.MAX_HEADER + 1), tmp_path)
    j, files = job(tmp_path)
    doc = header_doc(j)
    doc["files"][0]["size"] = remote.MAX_FILE_BYTES + 1  # type: ignore[index]
    with pytest.raises(JobRefused, match="size .* is not an integer in"):
        receive(framed(doc), tmp_path / "a")
    entry = doc["files"][0]  # type: ignore[index]
    doc["files"] = [{**entry, "path": f"source/{i}", "size": 1} for i in range(10_001)]
    with pytest.raises(JobRefused, match="at most 10000 entries"):
        receive(framed(doc), tmp_path / "b")
    with pytest.raises(JobRefused, match="first line is longer"):
        receive(b"x" * 1000, tmp_path / "c")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("index", 0, "job index 0"),  # worker 0 is the chief: never remote
        ("index", 2, "job index 2"),
        ("command", ["-c", "import os"], "is not `-I -m <module>"),
        ("command", ["-I", "-m", "stages.train", "../specs/other.json"], "is not `-I -m"),
        ("command", ["-I", "-m", "x;y", "../specs/train.json"], "is not `-I -m"),
        ("cluster", ["10.0.0.1:2222", "-oProxyCommand=x:1"], "job cluster"),
        ("lock", "source/dataset.npz", "is not under locks/"),
        ("lock", "locks/other.txt", "does not ship its lock"),
        ("protocol", 2, "this worker speaks 1"),
        ("sandbox", "yes", "sandbox is not true or false"),
        ("timeout", True, "timeout"),
    ],
)
def test_a_malformed_header_is_refused_naming_the_field(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    j, files = job(tmp_path)
    doc = header_doc(j)
    doc[field] = value
    with pytest.raises(JobRefused, match=message.replace("(", r"\(").replace("`", "`")):
        receive(framed(doc), tmp_path / "there")


def test_a_job_cut_short_is_refused(tmp_path: Path) -> None:
    j, files = job(tmp_path)
    with pytest.raises(
        JobRefused, match="the job ended early: job file 'specs/train.json' is cut short"
    ):
        receive(wire(j, files)[:-10], tmp_path / "there")


def test_a_material_outside_the_run_cannot_be_shipped(tmp_path: Path) -> None:
    run, _ = run_dir(tmp_path)
    outside = tmp_path / "data.csv"
    outside.write_text("x")
    with pytest.raises(InputError, match="lies outside the run directory"):
        remote.job_files([outside], run, "train")


# --------------------------------------------------------------------------- the answers


def ready(j: remote.Job, **over: object) -> dict[str, object]:
    return {
        "type": "ready",
        "index": j.index,
        "job_sha256": j.sha256,
        "environment": FP.as_dict(),
        **over,
    }


def report(j: remote.Job, out: bytes = b"epoch 1/1\n", err: bytes = b"", **over: object):  # type: ignore[no-untyped-def]
    doc = {
        "type": "report",
        "index": j.index,
        "job_sha256": j.sha256,
        "environment": FP.as_dict(),
        "return-value": 0,
        "duration_ms": 1234,
        "stdout": {"size": len(out), "sha256": hashlib.sha256(out).hexdigest(), "truncated": False},
        "stderr": {"size": len(err), "sha256": hashlib.sha256(err).hexdigest(), "truncated": False},
        **over,
    }
    return doc, out + err


def test_a_ready_worker_in_the_chiefs_environment_is_accepted(tmp_path: Path) -> None:
    j, _ = job(tmp_path)
    assert remote.check_ready(ready(j), 1, j.sha256, FP, "node-2") == FP


def test_a_worker_in_another_environment_is_refused_before_training(tmp_path: Path) -> None:
    j, _ = job(tmp_path)
    drifted = {**FP.as_dict(), "distributions_sha256": "d" * 64}
    with pytest.raises(EnvironmentDrift) as info:
        remote.check_ready(ready(j, environment=drifted), 1, j.sha256, FP, "node-2")
    assert "distributions_sha256" in info.value.message and info.value.exit_code == 3
    assert "no worker was started" in (info.value.hint or "")


def test_a_drift_refusal_from_the_worker_keeps_its_diff(tmp_path: Path) -> None:
    j, _ = job(tmp_path)
    doc = {
        "type": "refused",
        "index": 1,
        "job_sha256": j.sha256,
        "exit_code": 3,
        "message": "environment drift",
        "diff": ["~ numpy: lock pins 2.0, installed 2.1"],
    }
    with pytest.raises(EnvironmentDrift, match="numpy: lock pins 2.0, installed 2.1") as info:
        remote.check_ready(doc, 1, j.sha256, FP, "node-2")
    assert "worker 1 (node-2)" in info.value.message


def test_a_report_is_accepted_with_its_logs(tmp_path: Path) -> None:
    j, _ = job(tmp_path)
    doc, payload = report(j, b"out\n", b"err\n")
    got = remote.check_report(doc, payload, 1, j.sha256, FP)
    assert (got.return_value, got.stdout, got.stderr, got.truncated) == (0, b"out\n", b"err\n", ())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"index": 2}, "for worker 2, not worker 1"),
        ({"job_sha256": "0" * 64}, "answers another job"),
        ({"type": "ready"}, "expected the worker's 'report'"),
        ({"return-value": "0"}, "no valid return-value"),
        ({"duration_ms": -1}, "no valid duration_ms"),
        ({"environment": {**FP.as_dict(), "lock_sha256": "e" * 64}}, "another environment"),
        ({"environment": {**FP.as_dict(), "distributions": "120"}}, "distributions is not a int"),
        ({"environment": {"lock": "main.txt"}}, "no valid environment fingerprint"),
        ({"stdout": {"size": 3, "sha256": "x", "truncated": False}}, "stdout does not match"),
        (
            {"stderr": {"size": remote.MAX_LOG + 1, "sha256": "", "truncated": False}},
            "stderr entry",
        ),
    ],
)
def test_a_bad_report_is_refused_naming_what(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    j, _ = job(tmp_path)
    doc, payload = report(j, **change)
    with pytest.raises(ReportRefused, match=message):
        remote.check_report(doc, payload, 1, j.sha256, FP)


def test_a_report_with_extra_bytes_is_refused(tmp_path: Path) -> None:
    j, _ = job(tmp_path)
    doc, payload = report(j)
    with pytest.raises(ReportRefused, match="extra bytes"):
        remote.check_report(doc, payload + b"x", 1, j.sha256, FP)


def test_frames_split_whole_and_refuse_oversize() -> None:
    data = remote.frame({"type": "ready"}, b"abc") + b"chainproof-msg"
    doc, payload, used = remote.split_frame(data)  # type: ignore[misc]
    assert (doc, payload) == ({"type": "ready"}, b"abc") and data[used:] == b"chainproof-msg"
    assert remote.split_frame(data[:10]) is None, "incomplete: wait for more"
    with pytest.raises(ReportRefused, match="oversized"):
        remote.split_frame(b"chainproof-msg %d 0\n" % (remote.MAX_MESSAGE + 1))
    with pytest.raises(ReportRefused, match="oversized"):
        remote.split_frame(b"chainproof-msg 2 %d\n" % (remote.MAX_PAYLOAD + 1))
    with pytest.raises(ReportRefused, match="not a chainproof"):
        remote.split_frame(b"Warning: Permanently added 'node-2' to the list of known hosts.\n")
    with pytest.raises(ReportRefused, match="not a JSON object"):
        remote.split_frame(b"chainproof-msg 2 0\n[]")


# --------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "host",
    ["-oProxyCommand=touch /tmp/x:22", "a b:1", "a;b:1", "$(id):1", "a:0", "a:", "[zz]:1",
     "a..b:1", "ex_ample.com:1", "a:１２"],
)  # fmt: skip
def test_hosts_are_strict(host: str) -> None:
    with pytest.raises(cluster.ClusterConfigError):
        cluster.parse_host(host)


def test_hosts_parse_names_and_addresses() -> None:
    assert cluster.parse_host("node-2.cluster:2222") == ("node-2.cluster", 2222)
    assert cluster.parse_host("10.0.0.1:1") == ("10.0.0.1", 1)
    assert cluster.parse_host("[fd00::1]:2222") == ("fd00::1", 2222)
    with pytest.raises(cluster.ClusterConfigError, match="named twice"):
        cluster.check_hosts(["a:1", "A:1"], 2)


def test_the_default_launcher_is_ssh_without_a_shell_here() -> None:
    argv = cluster.launcher_argv(cluster.default_launcher("/srv/chain-proof"), "node-2")
    assert argv[:6] == ["ssh", "-o", "BatchMode=yes", "-T", "--", "node-2"]
    assert argv[6] == "cd /srv/chain-proof && exec .venv/bin/python -I -m pipeline worker"
    with pytest.raises(cluster.ClusterConfigError, match="remote_checkout"):
        cluster.default_launcher("/srv/$(id)")


def test_a_bad_cluster_config_is_refused_before_the_run() -> None:
    from pipeline.config import StageConfig

    def stage(d: dict[str, object]) -> StageConfig:
        return StageConfig(
            name="train",
            kind="train",
            needs=(),
            timeout=5,
            lock=None,
            outputs=(),
            params={"distribution": {"strategy": "multi_worker_mirrored", "workers": 2, **d}},
            impl=None,  # type: ignore[arg-type]
        )

    assert worker_counts([stage({"hosts": ["a:1", "b:1"]})]) == {"train": 2}
    for bad in ({"hosts": ["a:1", "-b:1"]}, {"hosts": ["a:1", "b:1"], "launcher": [""]}):
        with pytest.raises(InputError) as info:
            worker_counts([stage(bad)])
        assert info.value.exit_code == 2 and "stage 'train': distribution:" in info.value.message
    plan = Plan("train", 2, ("a:1", "b:1"), ("my-launch", "{host}"))
    assert remote.cluster_of(plan).launcher == ("my-launch", "{host}")


# --------------------------------------------------------------------------- chainproof worker

WORKER = [sys.executable, "-I", "-m", "pipeline", "worker"]


def start_worker(tmp_path: Path) -> subprocess.Popen[bytes]:
    (tmp_path / "remote-tmp").mkdir(exist_ok=True)
    return subprocess.Popen(
        WORKER,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path / "remote-tmp")},
    )


def test_the_worker_refuses_a_stream_that_is_not_a_job(tmp_path: Path) -> None:
    proc = start_worker(tmp_path)
    out, err = proc.communicate(b"GET / HTTP/1.1\r\n\r\n", timeout=120)
    assert proc.returncode == 2, err
    assert b"the job: not a chainproof frame" in err and out == b""
    assert not list((tmp_path / "remote-tmp").iterdir()), "nothing left behind"


def test_the_worker_answers_ready_and_leaves_when_its_stdin_closes(tmp_path: Path) -> None:
    from tests.conftest import MAIN_LOCK

    run, files = run_dir(tmp_path)
    (run / "locks/main.txt").write_bytes(MAIN_LOCK.read_bytes())
    files = remote.job_files([run / "specs", run / "locks", run / "source"], run, "train")
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for _, p in files}
    j = remote.build_job(
        files,
        digests,
        stage="train",
        index=1,
        addresses=ADDRESSES,
        module="stages.train",
        lock="locks/main.txt",
        timeout=600,
        sandbox=False,
    )
    proc = start_worker(tmp_path)
    assert proc.stdin is not None and proc.stdout is not None
    remote.write_job(proc.stdin, j, files)
    proc.stdin.flush()
    buf = b""
    while (got := remote.split_frame(buf)) is None:
        chunk = proc.stdout.read1(65536)
        assert chunk, proc.stderr.read() if proc.stderr else ""
        buf += chunk
    doc, _, _ = got
    assert doc["type"] == "ready" and doc["index"] == 1 and doc["job_sha256"] == j.sha256
    assert doc["environment"]["lock_sha256"] == hashlib.sha256(MAIN_LOCK.read_bytes()).hexdigest()
    proc.stdin.close()  # the runner went away before `start`
    assert proc.wait(timeout=60) == 4
    err = proc.stderr.read() if proc.stderr else b""
    assert b"the runner went away before `start`; nothing ran" in err
    assert not list((tmp_path / "remote-tmp").iterdir()), "its job directory is removed"


def test_a_cut_log_is_accepted_and_says_so(tmp_path: Path) -> None:
    j, _ = job(tmp_path)
    out = b"x" * 100
    doc, payload = report(j, out)
    doc["stdout"] = {**doc["stdout"], "truncated": True}
    assert remote.check_report(doc, payload, 1, j.sha256, FP).truncated == ("stdout",)
