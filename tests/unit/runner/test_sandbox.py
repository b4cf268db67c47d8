"""The stage sandbox, called directly with a tiny Python command: what a stage can and cannot
reach (keys, materials, network, the rest of the machine), and how it ends."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.runner import sandbox as sb


@pytest.fixture(scope="module")
def bwrap() -> sb.Sandbox:
    try:
        return sb.find_bubblewrap()
    except sb.SandboxUnavailable as e:
        pytest.skip(
            f"bubblewrap is not usable here ({e.message}); `make setup` as root installs it"
        )


class Workspace:
    """A workspace with signing keys, and one run with a material and a stage directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.keys = root / "attestations" / "keys"
        self.keys.mkdir(parents=True)
        (self.keys / "functionary.pem").write_text("PRIVATE KEY")
        self.run = root / "runs" / "r1"
        self.workdir = self.run / "train"
        self.workdir.mkdir(parents=True)
        (self.run / "logs").mkdir()
        (self.run / "source").mkdir()
        self.material = self.run / "source" / "dataset.npz"
        self.material.write_bytes(b"original")
        self.logs = sb.StageLogs(self.run / "logs" / "train.out", self.run / "logs" / "train.err")

    def execute(
        self,
        code: str,
        bwrap: sb.Sandbox,
        *,
        network: bool = False,
        read_only: tuple[Path, ...] | None = None,
        timeout: int = 60,
    ) -> int | None:
        return sb.execute(
            [sys.executable, "-I", "-c", textwrap.dedent(code)],
            workdir=self.workdir,
            scratch=self.run / "tmp" / "train",
            logs=self.logs,
            timeout=timeout,
            sandbox=bwrap,
            mounts=sb.Mounts(
                read_only=(self.material,) if read_only is None else read_only,
                network=network,
                forbidden=(self.keys,),
                anchor=self.run,
            ),
        )

    @property
    def out(self) -> str:
        return self.logs.stdout.read_text()

    @property
    def err(self) -> str:
        return self.logs.stderr.read_text()


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


def test_a_stage_that_opens_a_key_file_is_denied_and_fails(ws: Workspace, bwrap: sb.Sandbox):
    rc = ws.execute(
        f"""
        import os
        print(sorted(os.listdir({str(ws.root)!r})))
        open({str(ws.keys / "functionary.pem")!r}).read()
        """,
        bwrap,
    )
    assert rc == 1
    assert "FileNotFoundError" in ws.err and "functionary.pem" in ws.err
    assert ws.out.strip() == "['runs']", "only the run is visible, no attestations/ at all"


def test_a_stage_sees_no_repository_root_and_no_other_run(ws: Workspace, bwrap: sb.Sandbox):
    repo = Path(sb.package_dirs(["pipeline"])[0]).parent
    (ws.root / "runs" / "other").mkdir()
    rc = ws.execute(
        f"""
        import os
        print(sorted(os.listdir({str(repo)!r})))
        print(sorted(os.listdir({str(ws.run.parent)!r})))
        print(sorted(os.listdir({str(ws.run)!r})))
        print(os.path.exists("/root/.ssh"), os.path.exists("/etc/shadow"), os.path.exists("/home"))
        """,
        bwrap,
    )
    assert rc == 0, ws.err
    repo_view, runs_view, run_view, outside = ws.out.splitlines()
    assert "attestations" not in repo_view and "README.md" not in repo_view
    assert "pipeline" in repo_view
    assert runs_view == "['r1']"
    assert run_view == "['source', 'tmp', 'train']", "no logs/, only materials and its own dirs"
    assert outside == "False False False"


def test_a_stage_cannot_write_into_its_materials(ws: Workspace, bwrap: sb.Sandbox):
    rc = ws.execute(
        """
        import os
        print(open("../source/dataset.npz", "rb").read())
        for attempt in (lambda: open("../source/dataset.npz", "wb"),
                        lambda: os.chmod("../source/dataset.npz", 0o777),
                        lambda: os.rename("../source/dataset.npz", "stolen"),
                        lambda: os.link("../source/dataset.npz", "linked"),
                        lambda: open("../source/new", "w")):
            try:
                attempt()
                print("ALLOWED")
            except OSError as e:
                print(type(e).__name__, e.errno)
        open("model.keras", "w").write("its own output")
        """,
        bwrap,
    )
    assert rc == 0, ws.err
    lines = ws.out.splitlines()
    assert lines[0] == "b'original'"
    assert "ALLOWED" not in ws.out
    assert ws.material.read_bytes() == b"original"
    assert (ws.workdir / "model.keras").read_text() == "its own output"
    assert sorted(p.name for p in (ws.run / "source").iterdir()) == ["dataset.npz"]


@pytest.fixture
def tcp_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that answers every connection with b'hello'."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"hello")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


CONNECT = """
import socket
try:
    with socket.create_connection(("127.0.0.1", {port}), timeout=5) as s:
        print("connected", s.recv(5))
except OSError as e:
    print("refused", type(e).__name__)
"""


def test_a_stage_cannot_reach_the_network(ws: Workspace, bwrap: sb.Sandbox, tcp_server: int):
    with socket.create_connection(("127.0.0.1", tcp_server)) as s:  # the server is up
        assert s.recv(5) == b"hello"
    assert ws.execute(CONNECT.format(port=tcp_server), bwrap) == 0, ws.err
    assert ws.out.startswith("refused"), ws.out


def test_a_stage_that_declares_network_reaches_it(
    ws: Workspace, bwrap: sb.Sandbox, tcp_server: int
):
    assert ws.execute(CONNECT.format(port=tcp_server), bwrap, network=True) == 0, ws.err
    assert ws.out.strip() == "connected b'hello'"


def test_a_rename_swap_or_a_new_file_during_the_stage_is_not_what_it_reads(
    ws: Workspace, bwrap: sb.Sandbox
):
    code = """
        import os, time
        first = open("../source/dataset.npz", "rb").read()
        open("ready", "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists("go") and time.monotonic() < deadline:
            time.sleep(0.02)
        print(first, open("../source/dataset.npz", "rb").read(), sorted(os.listdir("../source")))
    """
    done: list[int | None] = []
    t = threading.Thread(target=lambda: done.append(ws.execute(code, bwrap)))
    t.start()
    deadline = time.monotonic() + 30
    while not (ws.workdir / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    poisoned = ws.material.with_name("poisoned")
    poisoned.write_bytes(b"poisoned")
    os.replace(poisoned, ws.material)  # swapped on the host while the stage runs
    (ws.run / "source" / "extra.npz").write_bytes(b"planted")  # and a file added beside it
    (ws.workdir / "go").touch()
    t.join()
    assert done == [0], ws.err
    assert ws.out.strip() == "b'original' b'original' ['dataset.npz']"
    assert ws.material.read_bytes() == b"poisoned", "the runner's re-hash sees the swap"


def test_a_timeout_kills_everything_the_stage_started(ws: Workspace, bwrap: sb.Sandbox):
    rc = ws.execute(
        """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c",
                          "import time; time.sleep(3); open('orphan', 'w').close()"])
        time.sleep(60)
        """,
        bwrap,
        timeout=1,
    )
    assert rc is None
    time.sleep(3.5)
    assert not (ws.workdir / "orphan").exists(), "the stage's child outlived the timeout"
    assert not (ws.run / "tmp").exists(), "the scratch directory is removed"


def test_a_stage_sees_a_scrubbed_environment_and_a_private_scratch(
    ws: Workspace, bwrap: sb.Sandbox, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CHAINPROOF_FUNCTIONARY_SIGNER", "file2:/secret/functionary.pem")
    rc = ws.execute(
        """
        import os, tempfile
        print(sorted(k for k in os.environ if k.startswith("CHAINPROOF")))
        print(os.environ["HOME"].endswith("tmp/train/home"), tempfile.gettempdir())
        open(os.path.join(os.environ["HOME"], "cache"), "w").write("x")
        try:
            open("/tmp/elsewhere", "w").write("x")
            print("ALLOWED")
        except OSError as e:
            print("refused", e.errno)
        print(os.getpid(), len([p for p in os.listdir("/proc") if p.isdigit()]))
        """,
        bwrap,
    )
    assert rc == 0, ws.err
    names, scratch, tmp, procs = ws.out.splitlines()
    assert names == "[]"
    assert tmp == "refused 30", "outside its scratch and workdir nothing is writable (EROFS)"
    assert scratch == f"True {ws.run / 'tmp' / 'train'}"
    pid, count = procs.split()
    assert int(count) <= 3, "its own pid namespace: bubblewrap's init, the stage, no host"
    assert not Path("/tmp/elsewhere").exists()


def test_a_material_inside_the_keys_directory_is_refused(ws: Workspace, bwrap: sb.Sandbox):
    with pytest.raises(sb.SandboxRefused) as info:
        ws.execute("print('ran')", bwrap, read_only=(ws.keys / "functionary.pem",))
    assert info.value.exit_code == 2
    assert "stages never see the signing keys" in info.value.message
    with pytest.raises(sb.SandboxRefused):  # nor a directory that contains them
        ws.execute("print('ran')", bwrap, read_only=(ws.root / "attestations",))
    assert not ws.logs.stdout.exists(), "nothing ran"


def test_an_external_input_in_the_keys_directory_is_refused_even_through_a_symlink(
    ws: Workspace,
):
    data = ws.root / "data"
    data.mkdir()
    (data / "innocent.npz").symlink_to(ws.keys / "functionary.pem")
    with pytest.raises(sb.SandboxRefused) as info:
        sb.resolve_external("data/innocent.npz", ws.root, [ws.keys])
    assert "functionary.pem" in info.value.message or "keys" in info.value.message
    (data / "real.npz").write_bytes(b"x")
    assert sb.resolve_external("data/real.npz", ws.root, [ws.keys]) == (data / "real.npz")


def test_bubblewrap_absent_is_a_clear_error_with_the_fix(tmp_path: Path):
    with pytest.raises(sb.SandboxUnavailable) as info:
        sb.find_bubblewrap(search_path=str(tmp_path))
    err = info.value
    assert err.exit_code == 2
    assert "bubblewrap (bwrap) is not installed" in err.message
    assert "apt-get install -y bubblewrap" in (err.hint or "")
    assert "--no-sandbox" in (err.hint or "")


def test_bubblewrap_that_cannot_create_namespaces_is_a_clear_error(tmp_path: Path):
    fake = tmp_path / "bwrap"
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    with pytest.raises(sb.SandboxUnavailable) as info:
        sb.find_bubblewrap(search_path=str(tmp_path))
    assert "No permissions to creating new namespace" in info.value.message
    assert "user namespaces" in (info.value.hint or "")


def test_a_sandbox_that_cannot_be_set_up_is_not_reported_as_the_stage_s_exit(
    ws: Workspace, bwrap: sb.Sandbox
):
    with pytest.raises(sb.SandboxUnavailable) as info:
        ws.execute("print('ran')", bwrap, read_only=(ws.run / "missing-material",))
    assert "could not set up the sandbox" in info.value.message
    assert "ran" not in ws.out


def test_many_materials_do_not_overflow_the_command_line(ws: Workspace, bwrap: sb.Sandbox):
    many = ws.run / "source" / ("d" * 200)
    many.mkdir()
    files = []
    for i in range(3000):
        f = many / f"{'f' * 100}{i}"
        f.write_text(str(i))
        files.append(f)
    rc = ws.execute(
        f"import os; print(len(os.listdir({str(many)!r})))", bwrap, read_only=tuple(files)
    )
    assert rc == 0, ws.err
    assert ws.out.strip() == "3000"


def test_what_the_link_records_about_the_sandbox(bwrap: sb.Sandbox):
    assert bwrap.record(network=False) == {
        "tool": "bubblewrap",
        "version": bwrap.version,
        "network": False,
    }
    assert sb.NO_SANDBOX.record(network=True) == "none"
    assert sb.NO_SANDBOX.describe() == "none"


def test_changed_materials_name_the_file_and_both_digests():
    before = {"a": {"sha256": "1" * 64}, "b": {"sha256": "2" * 64}}
    after = {"a": {"sha256": "1" * 64}, "b": {"sha256": "3" * 64}}
    assert sb.changed_materials(before, after) == [
        f"b: sha256 {'2' * 64} before the stage, {'3' * 64} after"
    ]
    assert sb.changed_materials(before, {"a": before["a"]}) == [
        f"b: sha256 {'2' * 64} before the stage, (absent) after"
    ]
    assert sb.changed_materials(before, dict(before)) == []


def test_materials_beyond_the_bind_limit_are_bound_by_directory(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b" / "deep"
    files = [a / f"{i}" for i in range(5)] + [b / "x", tmp_path / "c" / "y"]
    assert sb.coalesce(files, limit=10) == files, "files one by one while they fit"
    assert sorted(sb.coalesce(files, limit=3)) == sorted([a, b / "x", tmp_path / "c" / "y"])
    lifted = sb.coalesce(files, limit=1)
    assert len(lifted) == 1 and all(lifted[0] in f.parents for f in files)


def test_a_url_source_must_declare_network(tmp_path: Path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    cfg = tmp_path / "pipeline.yaml"
    body = f"""
        schema: 1
        name: tiny
        lock: {tmp_path / "lock.txt"}
        stages:
          - name: source
            kind: source
            params: {{url: "http://127.0.0.1:9/d.npz", sha256: {"a" * 64}}}
    """
    cfg.write_text(textwrap.dedent(body))
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "stages[0].network" in info.value.diagnostics()
    assert "add `network: true`" in info.value.diagnostics()
    cfg.write_text(
        textwrap.dedent(body).replace("kind: source\n", "kind: source\n    network: true\n")
    )
    assert load_config(cfg).stages[0].network is True
    cfg.write_text(
        textwrap.dedent(body).replace("kind: source\n", "kind: source\n    network: yes-please\n")
    )
    with pytest.raises(ConfigError):
        load_config(cfg)
