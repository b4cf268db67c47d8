"""The CLI in-process (click's CliRunner): commands, shared options, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli, run_cli
from tests.conftest import FAST_PIPELINE, write_config


def invoke(*args: str | Path) -> tuple[int, str, str]:
    """Run the CLI as `main` does (errors mapped to exit codes), capturing both streams."""
    with CliRunner().isolation() as (out, err, _):
        code = run_cli([str(a) for a in args])
    return code, out.getvalue().decode(), err.getvalue().decode()


def test_every_command_is_registered_once_and_has_help() -> None:
    names = set(cli.commands)
    assert names >= {
        "run",
        "verify",
        "layout",
        "keys",
        "env",
        "show",
        "lineage",
        "reproduce",
        "serve",
        "candidate",
        "scan",
        "deps",
        "diff",
        "vulndb",
    }
    scan = cli.commands["scan"]
    assert set(scan.commands) == {"deps", "model", "data"}  # type: ignore[attr-defined]
    for name in names:
        code, out, _ = invoke(name, "--help")
        assert code == 0 and "Usage:" in out, name


def test_owner_key_is_declared_once_and_shared() -> None:
    helps = {
        name: next(p.help for p in cli.commands[name].params if p.name == "owner_key")
        for name in ("verify", "serve", "candidate")
    }
    assert len(set(helps.values())) == 1, helps


def test_a_missing_target_is_bad_input_exit_2() -> None:
    code, _, err = invoke("verify", "/nonexistent/run")
    assert code == 2
    assert "does not exist" in err


def test_a_bad_config_is_exit_2_naming_file_line_and_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, FAST_PIPELINE.replace("name: digits-fast", "name: Bad Name"))
    code, _, err = invoke("layout", cfg, "--workspace", tmp_path)
    assert code == 2
    assert f"{cfg}:2: name: String should match pattern" in err


def test_keys_init_then_layout_writes_an_owner_signed_layout(tmp_path: Path) -> None:
    code, out, _ = invoke("keys", "init", "--workspace", tmp_path)
    assert code == 0 and "created owner" in out
    keyfile = tmp_path / "attestations" / "keys" / "owner.pem"
    assert keyfile.stat().st_mode & 0o777 == 0o600
    cfg = write_config(tmp_path, FAST_PIPELINE)
    dest = tmp_path / "digits.layout"
    code, out, _ = invoke("layout", cfg, "-o", dest, "--workspace", tmp_path)
    assert code == 0, out
    envelope = json.loads(dest.read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert len(envelope["signatures"]) == 1


def test_env_check_refuses_an_unpinned_lock(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy>=1\n")
    code, _, err = invoke("env", "check", "--lock", lock)
    assert code == 2
    assert "is not pinned with == and --hash" in err


def test_show_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    code, _, err = invoke("show", tmp_path)
    assert code == 2
    assert "is not a chainproof run" in err


@pytest.mark.parametrize("args", [("scan", "model", "/nonexistent"), ("deps", "why", "x")])
def test_bad_input_never_reaches_the_internal_error_code(args: tuple[str, ...], tmp_path) -> None:
    code, _, _ = invoke(*args, "--help")
    assert code == 0


def test_keys_export_pem_is_the_key_in_toto_verify_reads(tmp_path: Path) -> None:
    from in_toto.models._signer import load_public_key_from_file

    from pipeline.provenance.keys import load_public_key

    assert invoke("keys", "init", "--workspace", tmp_path)[0] == 0
    owner = load_public_key(tmp_path / "attestations" / "keys" / "owner.pub")
    code, out, _ = invoke("keys", "export", "owner", "--pem", "--workspace", tmp_path)
    assert code == 0 and out.startswith("-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in out
    dest = tmp_path / "owner.pem.pub"
    code, _, err = invoke("keys", "export", "owner", "--pem", "-o", dest, "--workspace", tmp_path)
    assert code == 0 and owner.keyid in err
    assert dest.read_text() == out
    # in-toto-verify's own loader computes the keyid that signed the layout
    assert load_public_key_from_file(str(dest))["keyid"] == owner.keyid


def test_keys_export_names_what_is_wrong(tmp_path: Path) -> None:
    code, _, err = invoke("keys", "export", "owner", "--pem", "--workspace", tmp_path)
    assert code == 2 and "keys init" in err  # no key yet
    assert invoke("keys", "init", "--workspace", tmp_path)[0] == 0
    code, _, err = invoke("keys", "export", "owner", "--workspace", tmp_path)
    assert code == 2 and "--pem" in err
    code, _, err = invoke("keys", "export", "release", "--pem", "--workspace", tmp_path)
    assert code == 2
