"""The issue's hostile inputs at the CLI: each is exit 1 or 2 with a message naming the file and
what is wrong — never exit 70 — and the padded link is refused quickly without being read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import run_cli
from pipeline.provenance.keys import load_public_key
from pipeline.provenance.links import link_filename
from tests.conftest import FAST_PIPELINE, ROOT, write_config

MIB = 1024 * 1024


def invoke(*args: str | Path) -> tuple[int, str, str]:
    """Run the CLI as `main` does (errors mapped to exit codes), capturing both streams."""
    with CliRunner().isolation() as (out, err, _):
        code = run_cli([str(a) for a in args])
    return code, out.getvalue().decode(), err.getvalue().decode()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys and an owner-signed layout; runs are made from it per test."""
    ws = tmp_path_factory.mktemp("ws")
    assert invoke("keys", "init", "--workspace", ws)[0] == 0
    cfg = write_config(ws / "configs", FAST_PIPELINE)
    code, out, err = invoke("layout", cfg, "-o", ws / "root.layout", "--workspace", ws)
    assert code == 0, out + err
    return ws


def _run(ws: Path, run_id: str, **record: object) -> tuple[Path, Path]:
    """runs/<id> with its run.json and layout, and an empty links directory: (run, links)."""
    run, links = ws / "runs" / run_id, ws / "attestations" / "runs" / run_id
    run.mkdir(parents=True)
    links.mkdir(parents=True)
    (links / "root.layout").write_bytes((ws / "root.layout").read_bytes())
    (run / "run.json").write_text(
        json.dumps(
            {
                "run_id": run_id,
                "pipeline": "digits-fast",
                "links": f"../../attestations/runs/{run_id}",
                "layout": f"../../attestations/runs/{run_id}/root.layout",
                "stages": ["source", "train", "package", "deploy"],
                "status": "succeeded",
                **record,
            }
        )
    )
    return run, links


def _source_link(ws: Path, links: Path) -> Path:
    functionary = load_public_key(ws / "attestations" / "keys" / "functionary.pub")
    return links / link_filename("source", functionary.keyid)


def _verify(ws: Path, run: Path) -> tuple[int, str, str]:
    owner = ws / "attestations" / "keys" / "owner.pub"
    return invoke("verify", run, "--owner-key-file", owner)


def test_a_100k_deep_link_in_a_run_is_a_verification_failure_not_a_crash(
    workspace: Path,
) -> None:
    run, links = _run(workspace, "deep")
    link = _source_link(workspace, links)
    link.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    code, _, err = _verify(workspace, run)
    assert code == 1, err
    assert "verification FAILED" in err and "check:    link format" in err
    assert f"{link}" in err and "nests values more than 64 deep" in err
    assert "$CHAINPROOF_MAX_DEPTH" in err


def test_a_link_padded_to_512_mib_is_refused_quickly_without_being_read(
    workspace: Path,
) -> None:
    run, links = _run(workspace, "padded")
    link = _source_link(workspace, links)
    link.write_text(json.dumps({"payload": "", "payloadType": "x", "signatures": []}))
    with open(link, "ab") as fh:
        fh.truncate(512 * MIB)  # sparse: the attacker's 512 MiB costs nothing on disk
    owner = workspace / "attestations" / "keys" / "owner.pub"
    # A fresh interpreter runs the CLI, so its peak RSS is the verify's alone.
    probe = textwrap.dedent(
        f"""
        import resource, subprocess, sys
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "verify", {str(run)!r},
             "--owner-key-file", {str(owner)!r}],
            capture_output=True, text=True,
        )
        sys.stderr.write(proc.stderr)
        print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
        """
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    code, peak_mib = map(int, proc.stdout.split())
    assert code == 1, proc.stderr
    assert f"is {512 * MIB} bytes, more than the {16 * MIB}-byte cap" in proc.stderr
    assert "$CHAINPROOF_MAX_RECORD_BYTES" in proc.stderr and str(link) in proc.stderr
    assert peak_mib < 250, f"verify peaked at {peak_mib} MiB"  # it was 1 GiB before the cap
    assert seconds < 60  # interpreter start-up and imports dominate; the refusal is instant


def test_a_yaml_alias_bomb_config_is_refused_in_seconds_naming_the_cap(tmp_path: Path) -> None:
    bomb = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    bomb += [
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("schema: 1\nname: bomb\n" + "\n".join(bomb) + "\n")
    t0 = time.perf_counter()
    code, _, err = invoke("layout", cfg, "--workspace", tmp_path)
    assert time.perf_counter() - t0 < 5
    assert code == 2
    assert f"{cfg}:8: <top>: aliases expand this document past the 100000-node cap" in err
    assert "$CHAINPROOF_MAX_YAML_NODES" in err


def test_a_run_record_field_of_the_wrong_type_is_exit_2_naming_the_field(
    workspace: Path,
) -> None:
    run, _ = _run(workspace, "wrongtype", links=["not", "a", "path"])
    code, _, err = _verify(workspace, run)
    assert code == 2, err
    assert f"{run / 'run.json'}: field 'links' is a list, expected text" in err


def test_a_deep_run_record_or_layout_is_exit_1_or_2_naming_the_file(workspace: Path) -> None:
    run, _ = _run(workspace, "deeprecord")
    (run / "run.json").write_bytes(b"{" * 50_000)
    code, _, err = _verify(workspace, run)
    assert code == 2 and f"{run / 'run.json'} nests values more than 64 deep" in err
    run, links = _run(workspace, "deeplayout")
    (links / "root.layout").write_bytes(b'{"payload": ' + b"[" * 100_000)
    code, _, err = _verify(workspace, run)
    assert code == 1 and "check:    layout signature" in err and "nests values" in err


def test_verify_json_names_the_failed_check_with_the_exit_code_unchanged(
    workspace: Path,
) -> None:
    run, links = _run(workspace, "json-deep")
    link = _source_link(workspace, links)
    link.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    owner = workspace / "attestations" / "keys" / "owner.pub"
    code, out, err = invoke("verify", run, "--owner-key-file", owner, "--json")
    assert code == 1 and "verification FAILED" in err
    answer = json.loads(out)
    assert answer["verified"] is False and answer["target"] == str(run)
    assert answer["error"]["check"] == "link format" and answer["error"]["exit_code"] == 1
    assert answer["error"]["artifact"] == str(link)
    code, out, _ = invoke("verify", workspace / "nope", "--owner-key-file", owner, "--json")
    assert code == 2 and json.loads(out)["error"]["exit_code"] == 2
