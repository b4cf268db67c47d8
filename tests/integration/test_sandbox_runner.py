"""The sandbox as the runner uses it: materials changed during a stage fail it with no link,
an input inside the keys is refused, bwrap absent is exit 2 (or a recorded --no-sandbox), and
a URL source reaches the network only when the stage declares it."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import StageFailed
from pipeline.runner import sandbox as sb
from pipeline.runner.run import Runner
from pipeline.workspace import Workspace
from tests.conftest import CHAINPROOF, ROOT, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def bwrap() -> sb.Sandbox:
    try:
        return sb.find_bubblewrap()
    except sb.SandboxUnavailable as e:
        pytest.skip(
            f"bubblewrap is not usable here ({e.message}); `make setup` as root installs it"
        )


def make_npz(path: Path) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((40, 4, 4, 1)).astype(np.float32), y=np.arange(40) % 2)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def two_stages(data: Path, sha: str) -> str:
    return f"""
        schema: 1
        name: tiny
        lock: @MAIN_LOCK@
        stages:
          - name: source
            kind: source
            params: {{path: {data}, sha256: {sha}}}
          - name: copy
            kind: source
            needs: [source]
            params: {{path: {data}, sha256: {sha}}}
    """


def runner(tmp_path: Path, body: str, on_event: Callable[[str], None] = lambda _m: None) -> Runner:
    cfg = load_config(write_config(tmp_path, body))
    # The environment check is another test's subject; here it would only cost time.
    return Runner(
        cfg, Workspace(tmp_path / "ws"), on_event=on_event, verify_environment_files=False
    )


def link_payload(path: Path) -> dict:
    envelope = json.loads(path.read_text())
    return json.loads(base64.b64decode(envelope["payload"]))


def swap(path: Path) -> None:
    """Another file renamed over `path` (a new inode, as an attacker's `mv` would)."""
    fresh = path.with_name(path.name + ".poisoned")
    fresh.write_bytes(path.read_bytes() + b"\n# poisoned")
    os.replace(fresh, path)


def rewrite(path: Path) -> None:
    """The same inode rewritten in place."""
    with open(path, "ab") as fh:
        fh.write(b"\n# poisoned")


@pytest.mark.parametrize("change", [swap, rewrite], ids=["rename-swap", "in-place"])
def test_a_material_changed_during_a_stage_fails_it_with_exit_4_and_no_link(
    tmp_path: Path, change: Callable[[Path], None]
):
    data = tmp_path / "d.npz"
    sha = make_npz(data)
    hits: list[Path] = []

    def during(msg: str) -> None:  # called just before the stage's process starts
        if msg.startswith("[copy] running"):
            target = r.run_dir / "source" / "dataset.npz"
            change(target)
            hits.append(target)

    r = runner(tmp_path, two_stages(data, sha), during)
    with pytest.raises(StageFailed) as info, r.session():
        r.run_stages(r.config.stages)
    assert hits, "the material was changed while the stage ran"
    err = info.value
    assert err.exit_code == 4
    assert "its materials changed while it ran; no link was written" in err.message
    before = link_payload(next(r.links_dir.glob("source.*.link")))["products"]
    was = before["source/dataset.npz"]["sha256"]
    now = hashlib.sha256(hits[0].read_bytes()).hexdigest()
    assert f"source/dataset.npz: sha256 {was} before the stage, {now} after" in err.message
    assert not list(r.links_dir.glob("copy.*.link"))
    assert json.loads((r.run_dir / "run.json").read_text())["status"] == "failed"


def test_an_input_inside_the_keys_directory_is_refused_before_the_stage_runs(tmp_path: Path):
    ws = tmp_path / "ws"
    key = ws / "attestations" / "keys" / "functionary.pem"
    body = f"""
        schema: 1
        name: tiny
        lock: @MAIN_LOCK@
        stages:
          - name: source
            kind: source
            params: {{path: {key}, sha256: {"a" * 64}}}
    """
    r = runner(tmp_path, body)
    with pytest.raises(sb.SandboxRefused) as info, r.session():
        r.run_stages(r.config.stages)
    assert info.value.exit_code == 2
    assert "stages never see the signing keys" in info.value.message
    assert not (r.run_dir / "logs" / "source.stdout").exists(), "the stage never started"
    assert not list(r.links_dir.glob("*.link"))


def cli(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHAINPROOF, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_without_bubblewrap_a_run_is_refused_with_the_fix_or_runs_recorded_as_unsandboxed(
    tmp_path: Path,
):
    data = tmp_path / "d.npz"
    cfg = write_config(tmp_path, two_stages(data, make_npz(data)))
    ws = tmp_path / "ws"
    bin_dir = tmp_path / "bin"  # a PATH with the tools a run uses (git), but no bwrap
    bin_dir.mkdir()
    for tool in ("git",):
        if found := shutil.which(tool):
            (bin_dir / tool).symlink_to(found)
    no_bwrap = {**os.environ, "PATH": str(bin_dir)}
    proc = cli("run", cfg, "--workspace", ws, env=no_bwrap)
    assert proc.returncode == 2, proc.stderr
    assert "bubblewrap (bwrap) is not installed" in proc.stderr
    assert "apt-get install -y bubblewrap" in proc.stderr and "--no-sandbox" in proc.stderr
    assert not (ws / "runs").exists(), "refused before the run existed"

    proc = cli("run", cfg, "--workspace", ws, "--no-sandbox", env=no_bwrap)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: --no-sandbox" in proc.stderr
    run_dir = (ws / "runs" / "latest").resolve()
    assert json.loads((run_dir / "run.json").read_text())["sandbox"] == "none"
    links = sorted((ws / "attestations" / "runs" / run_dir.name).glob("*.link"))
    assert [link_payload(p)["environment"]["sandbox"] for p in links] == ["none", "none"]


@pytest.fixture
def http_dataset(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(url, sha256) of a dataset served over HTTP on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    sha = make_npz(root / "d.npz")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/d.npz", sha
    server.shutdown()
    t.join()


URL_SOURCE = """
    schema: 1
    name: tiny
    lock: @MAIN_LOCK@
    stages:
      - name: source
        kind: source
        {network}
        params: {{url: "{url}", sha256: {sha}, download_timeout: 5}}
"""


def test_a_url_source_that_declares_network_downloads_and_records_it(
    tmp_path: Path, http_dataset: tuple[str, str], monkeypatch: pytest.MonkeyPatch
):
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    url, sha = http_dataset
    r = runner(tmp_path, URL_SOURCE.format(network="network: true", url=url, sha=sha))
    with r.session():
        link = r.run_stage(r.config.stages[0])
    env = link_payload(link)["environment"]
    assert env["sandbox"]["network"] is True and env["sandbox"]["tool"] == "bubblewrap"
    manifest = json.loads((r.run_dir / "source" / "manifest.json").read_text())
    assert manifest["source"]["location"] == url
