"""Verified reuse on real runs: a second run reuses what is unchanged, its chain and bundle
verify on their own, and a change or a tamper makes exactly the affected stages run again.

The tests of this module share one workspace and run in file order (each adds runs to it).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import FAST_PIPELINE, chainproof, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]


def latest(ws: Path) -> Path:
    return (ws / "runs" / "latest").resolve()


def status(ws: Path, config: Path) -> dict[str, dict]:
    proc = chainproof("status", config, "--workspace", ws, "--json")
    assert proc.returncode == 0, proc.stderr
    return {s["stage"]: s for s in json.loads(proc.stdout)["stages"]}


def owner_fingerprint(ws: Path) -> str:
    return json.loads((ws / "attestations/keys/owner.pub").read_text())["keyid"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path, Path, Path, str]:
    """A workspace with a first run and a second, unchanged one."""
    ws = tmp_path_factory.mktemp("ws-reuse")
    config = write_config(ws / "configs", FAST_PIPELINE + "lineage: {enabled: false}\n")
    first = chainproof("run", config, "--workspace", ws)
    assert first.returncode == 0, first.stderr
    first_run = latest(ws)
    # --new-run: unchanged, it would otherwise be "up to date" and make no run at all
    second = chainproof("run", config, "--workspace", ws, "--new-run")
    assert second.returncode == 0, second.stderr
    return ws, config, first_run, latest(ws), second.stdout + second.stderr


def test_a_second_unchanged_run_reuses_every_stage_but_the_publishing_one(two_runs):
    ws, _, first, second, output = two_runs
    assert first != second
    for stage in ("source", "train", "package"):
        assert f"[{stage}] reused from run {first.name}" in output
    assert "[deploy] running" in output, "deploy publishes a release naming its run: it runs"
    assert "reused:    source, train, package" in output
    record = json.loads((second / "run.json").read_text())
    assert record["status"] == "succeeded"
    assert set(record["reused"]) == {"source", "train", "package"}
    assert record["reused"]["train"]["run_id"] == first.name
    # the new run's own link, bound to the new run, says where its products came from
    (train_link,) = (ws / "attestations/runs" / second.name).glob("train.*.link")
    payload = json.loads(base64.b64decode(json.loads(train_link.read_text())["payload"]))
    assert payload["environment"]["run_id"] == second.name
    assert payload["environment"]["reused"]["run_id"] == first.name
    # the products are in the new run, as files (copies), not symlinks
    model = second / "train" / "model.keras"
    assert model.is_file() and not model.is_symlink()
    assert model.read_bytes() == (first / "train" / "model.keras").read_bytes()


def test_a_reused_run_and_its_bundle_verify_on_their_own_offline(two_runs, tmp_path):
    ws, _, _, second, _ = two_runs
    proc = chainproof("verify", second, "--owner-key-file", ws / "attestations/keys/owner.pub")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    record = json.loads((second / "run.json").read_text())
    bundle = Path(record["release"])
    # the bundle alone, somewhere else, with only the owner's fingerprint
    alone = tmp_path / "elsewhere" / "releases" / "digits-fast" / bundle.name
    shutil.copytree(bundle, alone)
    proc = chainproof("verify", alone, "--owner-key", owner_fingerprint(ws), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "verified: ok" in proc.stdout


def test_status_names_the_run_and_link_each_stage_would_be_reused_from(two_runs):
    ws, config, _, second, _ = two_runs
    stages = status(ws, config)
    for name in ("source", "train", "package"):
        assert stages[name]["reusable"], stages[name]
        assert stages[name]["from"]["run_id"] == second.name
        assert stages[name]["from"]["link"].startswith(f"attestations/runs/{second.name}/{name}.")
    assert stages["deploy"]["reason"]["kind"] == "publishes"
    table = chainproof("status", config, "--workspace", ws).stdout
    assert f"train    reusable  from run {second.name}" in table


def test_status_refuses_an_edited_link(two_runs):
    ws, config, _, second, _ = two_runs
    (link,) = (ws / "attestations/runs" / second.name).glob("source.*.link")
    original = link.read_bytes()
    try:
        envelope = json.loads(original)
        envelope["signatures"][0]["sig"] = "00" * 64
        link.write_text(json.dumps(envelope))
        source = status(ws, config)["source"]
        rejected = [r for r in source["rejected"] if r["run"] == second.name]
        assert rejected and rejected[0]["kind"] == "signature invalid"
        assert source["from"] is None or source["from"]["run_id"] != second.name
    finally:
        link.write_bytes(original)


def runs_of(ws: Path) -> set[str]:
    return {p.name for p in (ws / "runs").iterdir() if not p.is_symlink()}


def test_an_unchanged_pipeline_is_up_to_date_and_makes_no_new_run(two_runs):
    ws, config, _, second, _ = two_runs
    before = runs_of(ws)
    proc = chainproof("run", config, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    assert f"up to date: run {second.name} would be reproduced stage for stage" in proc.stderr
    assert "up to date: nothing ran; source, train, package re-verified" in proc.stdout
    assert f"run id:    {second.name}" in proc.stdout
    assert "running python" not in proc.stderr, "no stage, deploy included, ran"
    assert runs_of(ws) == before and latest(ws) == second


def test_a_changed_param_reruns_that_stage_and_what_follows(two_runs):
    ws, _, _, second, _ = two_runs
    changed = write_config(
        ws / "configs",
        FAST_PIPELINE.replace("epochs: 2", "epochs: 1") + "lineage: {enabled: false}\n",
        name="changed.yaml",
    )
    stages = status(ws, changed)
    assert stages["source"]["reusable"]
    assert stages["train"]["reason"]["kind"] == "spec/params"
    assert "params.epochs: 2 then, 1 now" in stages["train"]["reason"]["detail"]
    assert stages["package"]["reason"]["kind"] == "upstream reruns"
    proc = chainproof("run", changed, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert f"[source] reused from run {second.name}" in out
    assert "[train] not reusable: spec/params: params.epochs: 2 then, 1 now" in out
    assert "[train] running" in out and "[package] running" in out
    record = json.loads((latest(ws) / "run.json").read_text())
    assert set(record["reused"]) == {"source"}


def test_a_product_tampered_after_signing_is_never_reused_and_status_names_it(two_runs):
    ws, config, _, _, _ = two_runs
    runs = [p for p in (ws / "runs").iterdir() if not p.is_symlink()]
    models = [r / "train" / "model.keras" for r in runs if (r / "train" / "model.keras").is_file()]
    # reuse copies: every run's model.keras is its own file; flip one byte of each, keeping
    # its size and mtime
    inodes = {os.stat(m).st_ino: m for m in models}
    assert len(inodes) == 3 and len(models) == 3
    for target in inodes.values():
        st = target.stat()
        data = bytearray(target.read_bytes())
        data[-50] ^= 0x01
        target.write_bytes(bytes(data))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    train = status(ws, config)["train"]
    assert not train["reusable"]
    assert train["reason"]["kind"] == "product tampered"
    assert "train/model.keras was changed after it was signed" in train["reason"]["detail"]
    proc = chainproof("run", config, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "[train] not reusable: product tampered: train/model.keras" in out
    assert "[train] running" in out
    assert "train" not in json.loads((latest(ws) / "run.json").read_text()).get("reused", {})
    assert chainproof("verify", latest(ws), "--workspace", ws).returncode == 0


def test_no_reuse_runs_every_stage(tmp_path):
    ws = tmp_path / "ws"
    config = write_config(
        tmp_path,
        """
        schema: 1
        name: digits-source
        lock: @MAIN_LOCK@
        lineage: {enabled: false}
        stages:
          - {name: source, kind: source, params: {dataset: sklearn-digits, seed: 3}}
        """,
    )
    assert chainproof("run", config, "--workspace", ws).returncode == 0
    forced = chainproof("run", config, "--workspace", ws, "--no-reuse")
    assert forced.returncode == 0, forced.stderr
    assert "[source] running" in forced.stderr + forced.stdout
    assert "reused" not in json.loads((latest(ws) / "run.json").read_text())
    again = chainproof("run", config, "--workspace", ws)
    assert "[source] reused from run" in again.stderr + again.stdout


def test_a_tampered_release_is_never_up_to_date(two_runs):
    """After the tamper test, the newest run made the latest release; one byte of that bundle
    changes: the next run is not "up to date", it makes a new run and a new release."""
    ws, config, _, _, _ = two_runs
    current = latest(ws)
    bundle = Path(json.loads((current / "run.json").read_text())["release"])
    card = bundle / "artifacts" / "package" / "model_card.json"
    card.write_bytes(card.read_bytes().replace(b"{", b"{ ", 1))
    before = runs_of(ws)
    proc = chainproof("run", config, "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" not in proc.stdout + proc.stderr
    assert "[deploy] running" in proc.stderr
    new = latest(ws)
    assert new.name not in before
    # and now that new run's release is current
    again = chainproof("run", config, "--workspace", ws)
    assert again.returncode == 0 and f"run id:    {new.name}" in again.stdout
    assert "up to date: nothing ran" in again.stdout
    assert runs_of(ws) == before | {new.name}
