"""Each release as a real MLflow Model: loads by alias, verifies on load, serves, shows in UI."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FAST_PIPELINE, chainproof, free_port, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]

# `python -m mlflow`: the console script's shebang may name another environment's python
MLFLOW = [sys.executable, "-m", "mlflow"]
NAME = "digits-fast"


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A workspace of its own with one released run, logged to its SQLite store."""
    ws = tmp_path_factory.mktemp("ws-mlmodel")
    proc = chainproof(
        "run", write_config(ws / "configs", FAST_PIPELINE), "--workspace", ws, "--wait-lineage"
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "alias production" in proc.stdout
    return ws


def client(ws: Path):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    return mlflow, MlflowClient(uri)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def held_out(ws: Path, n: int = 3) -> np.ndarray:
    with np.load(ws / "runs" / "latest" / "source" / "dataset.npz") as data:
        return data["x_test"][:n].astype(np.float32)


def flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_production_alias_is_an_mlflow_model_that_predicts(released: Path, tmp_path):
    mlflow, c = client(released)
    run_dir = (released / "runs" / "latest").resolve()
    mv = c.get_model_version_by_alias(NAME, "production")
    assert mv.tags["weights.sha256"] == sha256(run_dir / "package" / "model.keras")
    assert mv.tags["data.sha256"] == sha256(run_dir / "source" / "dataset.npz")
    assert mv.tags["chainproof.verification"] == "passed"

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
    sig = model.metadata.signature
    assert sig.inputs.inputs[0].shape == (-1, 8, 8, 1) and sig.outputs.inputs[0].shape == (-1, 10)
    x = held_out(released)
    probs = model.predict(x)
    assert probs.shape == (3, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)

    from pipeline import load_verified

    bundle = Path(json.loads((run_dir / "run.json").read_text())["release"])
    owner = json.loads((released / "attestations/keys/owner.pub").read_text())["keyid"]
    direct = load_verified(bundle, owner_key=owner).predict(x, verbose=0)
    assert np.allclose(probs, direct, atol=1e-6), "the pyfunc serves the released weights"

    # the logged model is code + the bundle: nothing pickled, and our own scanner passes it
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{NAME}@production", dst_path=tmp_path)
    )
    assert not list(local.rglob("*.pkl")) and (local / "pyfunc_model.py").is_file()
    from pipeline.scan.model import scan_path

    assert scan_path(local).ok()
    example = json.loads((local / "input_example.json").read_text())
    assert np.asarray(example).shape[1:] == (8, 8, 1), "input example from the dataset"


@pytest.mark.parametrize("changed", ["package/model.keras", "package/model_card.md"])
def test_a_changed_byte_of_the_logged_model_fails_its_load(released: Path, tmp_path, changed):
    from pipeline.errors import VerificationError

    mlflow, _ = client(released)
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{NAME}@production", dst_path=tmp_path)
    )
    (target,) = local.glob(f"artifacts/*/artifacts/{changed}")
    flip(target)
    with pytest.raises(VerificationError):
        mlflow.pyfunc.load_model(str(local))


def test_a_configured_owner_key_wins_over_the_recorded_one(released: Path, monkeypatch):
    from pipeline.errors import Error

    mlflow, _ = client(released)
    monkeypatch.setenv("CHAINPROOF_OWNER_KEY", "ab" * 32)  # not the owner who signed
    with pytest.raises(Error, match="fingerprint|owner"):
        mlflow.pyfunc.load_model(f"models:/{NAME}@production")


def post(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, seconds: int = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url} exited: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not come up: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def this_python_first(tmp_path: Path) -> str:
    """A PATH whose `uvicorn` (which `models serve` execs by name) is this interpreter's: a
    copied virtualenv's console scripts may name the python they were installed with."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "uvicorn").write_text(f'#!/bin/sh\nexec {sys.executable} -m uvicorn "$@"\n')
    (shims / "uvicorn").chmod(0o755)
    return f"{shims}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def test_mlflow_models_serve_answers_invocations(released: Path, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{released}/mlruns.db",
        "PATH": this_python_first(tmp_path),
    }
    cmd = [*MLFLOW, "models", "serve", "-m", f"models:/{NAME}@production"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["timeout", "900", *cmd], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
        x = held_out(released)
        status, body = post(f"http://127.0.0.1:{port}/invocations", {"inputs": x.tolist()})
        assert status == 200, body
        predictions = np.asarray(json.loads(body)["predictions"])
        assert predictions.shape == (3, 10) and np.allclose(predictions.sum(axis=1), 1, atol=1e-4)
        status, body = post(f"http://127.0.0.1:{port}/invocations", {"inputs": (x * 16).tolist()})
        assert status >= 400 and "outside" in body, "unscaled pixels are refused"
    finally:
        stop(proc)


def visible_text(page: str) -> str:
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def dump_dom(chromium: str, url: str, profile: Path) -> str:
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # as root in a container; the page is our own local UI
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=30000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return visible_text(proc.stdout)


def test_the_lineage_is_readable_in_the_mlflow_ui(released: Path, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (`make test` as root installs it)")
    _, c = client(released)
    run_dir = (released / "runs" / "latest").resolve()
    weights = sha256(run_dir / "package" / "model.keras")
    data = sha256(run_dir / "source" / "dataset.npz")
    exp = c.get_experiment_by_name(NAME)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = c.search_runs(
        [exp.experiment_id], filter_string=f"tags.`chainproof.run_id` = '{run_dir.name}'"
    )
    train = next(r for r in runs if r.data.tags.get("chainproof.stage") == "train")
    parent = next(r for r in runs if r.data.tags.get("chainproof.level") == "pipeline")
    version = c.get_model_version_by_alias(NAME, "production").version

    port = free_port()
    log = tmp_path / "ui.log"
    cmd = [*MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{released}/mlruns.db"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(["timeout", "900", *cmd], stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/health", proc, log)
        page = dump_dom(chromium, f"{base}/#/models/{NAME}/versions/{version}", tmp_path / "p1")
        assert weights in page and data in page, page[:3000]
        assert "@ production" in page or "@production" in page, page[:3000]
        assert "weights.sha256" in page and "data.sha256" in page, "short tag keys, shown whole"
        route = f"{base}/#/experiments/{exp.experiment_id}/runs"
        page = dump_dom(chromium, f"{route}/{train.info.run_id}", tmp_path / "p2")
        assert weights in page and data in page and "production" in page, page[:3000]
        page = dump_dom(chromium, f"{route}/{parent.info.run_id}", tmp_path / "p3")
        assert "test_accuracy" in page and f"{NAME} v{version}" in page, page[:3000]
        assert "sha256:" + data[:29] in page, "the dataset is shown on the pipeline run"
    finally:
        stop(proc)


def test_the_same_weights_reuse_the_version_and_a_reproduce_run_is_verified(released: Path):
    """Last in this module: it adds a run to the shared workspace."""
    _, c = client(released)
    original = (released / "runs" / "latest").resolve()
    proc = chainproof("reproduce", original)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    reproduction = (released / "runs" / "latest").resolve()
    assert reproduction != original
    versions = c.search_model_versions(f"name = '{NAME}'")
    assert len(versions) == 1, "identical weights_sha256: one version"
    (mv,) = versions
    assert mv.tags["chainproof.runs"].split() == [original.name, reproduction.name]
    assert mv.tags["chainproof.verification"] == "passed"
    exp = c.get_experiment_by_name(NAME)
    (parent,) = c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`chainproof.run_id` = '{reproduction.name}' "
        "and tags.`chainproof.level` = 'pipeline'",
    )
    assert parent.data.tags["chainproof.model_version"] == str(mv.version)
    assert "verification: **passed**" in parent.data.tags["mlflow.note.content"]
