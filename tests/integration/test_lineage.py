"""Lineage in a real MLflow tracking server, read back over its REST API."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import FAST_PIPELINE, chainproof, free_port, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]

MLFLOW = [str(Path(sys.executable).parent / "mlflow")]


class Server:
    """`mlflow server` on 127.0.0.1, killed at teardown (and by its own timeout)."""

    def __init__(self, root: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "timeout",
                "900",
                *MLFLOW,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{root}/server.db",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=open(root / "server.log", "wb"),  # noqa: SIM115 (lives as long as the server)
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def get(self, path: str, **params) -> dict:
        query = "&".join(f"{k}={urllib.parse.quote(str(v))}" for k, v in params.items())
        with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/{path}?{query}", timeout=20) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=20) as r:
            return json.loads(r.read())

    def runs_of(self, chainproof_run: str, experiment: str = "digits-fast") -> list[dict]:
        exp = self.get("experiments/get-by-name", experiment_name=experiment)["experiment"]
        found = self.post(
            "runs/search",
            {
                "experiment_ids": [exp["experiment_id"]],
                "filter": f"tags.`chainproof.run_id` = '{chainproof_run}'",
            },
        )
        return found.get("runs", [])


import urllib.parse  # noqa: E402  (used by Server.get)

AUGMENTED = FAST_PIPELINE.replace(
    "params: {epochs: 2, seed: 7}",
    "params:\n      epochs: 2\n      seed: 7\n      augmentation: {rotation_range: 10, "
    "width_shift_range: 0.1, height_shift_range: 0.1, shear_range: 5, zoom_range: 0.1, "
    "fill_mode: nearest}",
)


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_pipeline_lineage_in_a_real_tracking_server(tmp_path):
    server = Server(tmp_path / "mlflow", free_port())
    try:
        body = AUGMENTED + f"lineage:\n  tracking_uri: {server.url}\n"
        ws = tmp_path / "ws"
        proc = chainproof("run", write_config(tmp_path, body), "--workspace", ws, "--wait-lineage")
        assert proc.returncode == 0, proc.stderr
        assert f"lineage:   {server.url}" in proc.stdout and "alias production" in proc.stdout
        run_dir = (ws / "runs" / "latest").resolve()
        runs = server.runs_of(run_dir.name)
        parents = [r for r in runs if tags(r).get("chainproof.level") == "pipeline"]
        children = {
            tags(r)["chainproof.stage"]: r
            for r in runs
            if tags(r).get("chainproof.level") == "stage"
        }
        assert len(parents) == 1 and set(children) == {"source", "train", "package", "deploy"}
        parent_id = parents[0]["info"]["run_id"]
        assert all(tags(c)["mlflow.parentRunId"] == parent_id for c in children.values())

        links = ws / "attestations" / "runs" / run_dir.name
        (train_link,) = links.glob("train.*.link")
        t = tags(children["train"])
        assert t["chainproof.link_sha256"] == hashlib.sha256(train_link.read_bytes()).hexdigest()
        assert (
            len(t["chainproof.lock_sha256"]) == 64 and len(t["chainproof.functionary_keyid"]) == 8
        )
        assert t["mlflow.source.git.commit"]

        dataset_sha = hashlib.sha256((run_dir / "source" / "dataset.npz").read_bytes()).hexdigest()
        (ds_input,) = children["train"]["inputs"]["dataset_inputs"]
        assert ds_input["dataset"]["digest"] == f"sha256:{dataset_sha[:29]}"
        input_tags = {x["key"]: x["value"] for x in ds_input["tags"]}
        assert input_tags["chainproof.sha256"] == dataset_sha

        history = server.get(
            "metrics/get-history", run_id=children["train"]["info"]["run_id"], metric_key="loss"
        )["metrics"]
        assert [m["step"] for m in history] == [0, 1], "one loss value per epoch"

        version = server.get("registered-models/alias", name="digits-fast", alias="production")
        mv = version["model_version"]
        mv_tags = {x["key"]: x["value"] for x in mv["tags"]}
        weights = hashlib.sha256((run_dir / "package" / "model.keras").read_bytes()).hexdigest()
        assert mv_tags["chainproof.weights_sha256"] == weights
        assert mv_tags["chainproof.verification"] == "passed"
    finally:
        server.stop()


def test_tracking_server_down_does_not_fail_the_run_and_sync_logs_it_later(tmp_path):
    port = free_port()
    body = FAST_PIPELINE + f"lineage:\n  tracking_uri: http://127.0.0.1:{port}\n"
    ws = tmp_path / "ws"
    proc = chainproof("run", write_config(tmp_path, body), "--workspace", ws, "--wait-lineage")
    assert proc.returncode == 0, proc.stderr
    assert "lineage was NOT logged" in proc.stderr and "chainproof lineage sync" in proc.stderr
    run_dir = (ws / "runs" / "latest").resolve()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["lineage"]["logged"] is False and record["status"] == "succeeded"

    server = Server(tmp_path / "mlflow", port)
    try:
        sync = chainproof("lineage", "sync", run_dir)
        assert sync.returncode == 0, sync.stderr
        assert "logged:" in sync.stdout and "alias production" in sync.stdout
        assert len(server.runs_of(run_dir.name)) == 5
        again = chainproof("lineage", "sync", run_dir)
        assert "already logged" in again.stdout and len(server.runs_of(run_dir.name)) == 5
    finally:
        server.stop()


def test_run_returns_before_lineage_and_a_detached_process_logs_it(tmp_path):
    ws = tmp_path / "ws"
    proc = chainproof("run", write_config(tmp_path, FAST_PIPELINE), "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    run_dir = (ws / "runs" / "latest").resolve()
    store = f"sqlite:///{(ws / 'mlruns.db').resolve()}"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("lineage:"))
    assert f"logging in the background to {store}, experiment 'digits-fast'" in line
    assert f"runs/{run_dir.name}/logs/lineage.log" in line
    from pipeline.runner.detached import wait_for_lineage

    lineage = wait_for_lineage(run_dir, timeout=300)
    assert lineage["logged"] is True and lineage["production_alias"] is True, lineage
    assert lineage["tracking_uri"] == store and lineage["model_version"] == "1"
    assert lineage["parent_run_id"] in (run_dir / "logs" / "lineage.log").read_text()
    sync = chainproof("lineage", "sync", run_dir)
    assert "already logged" in sync.stdout and lineage["parent_run_id"] in sync.stdout
