"""`chainproof data digest`: the pin of an image folder or archive, printed, written, compared."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import run_cli
from pipeline.datasets import FORMAT, digest_path


def invoke(*args: str | Path) -> tuple[int, str, str]:
    with CliRunner().isolation() as (out, err, _):
        code = run_cli([str(a) for a in args])
    return code, out.getvalue().decode(), err.getvalue().decode()


def tree(root: Path) -> Path:
    for name, data in {"a/1.png": b"1", "a/2.png": b"22", "b/3.png": b"333"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_digest_prints_the_pin_and_writes_the_manifest(tmp_path: Path) -> None:
    root = tree(tmp_path / "d")
    code, out, _ = invoke("data", "digest", root, "--write-manifest", tmp_path / "m.json")
    digest = digest_path(root)[1].digest
    assert code == 0 and out == f"sha256:{digest}  3 files  {root}\n"
    written = (tmp_path / "m.json").read_bytes()
    assert json.loads(written)["format"] == FORMAT
    assert __import__("hashlib").sha256(written).hexdigest() == digest


def test_digest_json_is_for_programs(tmp_path: Path) -> None:
    root = tree(tmp_path / "d")
    code, out, _ = invoke("data", "digest", root, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["files"] == 3 and doc["bytes"] == 6 and doc["container"] == "folder"
    assert doc["sha256"] == digest_path(root)[1].digest


def test_a_zip_of_the_folder_prints_the_same_digest(tmp_path: Path) -> None:
    root = tree(tmp_path / "d")
    archive = shutil.make_archive(str(tmp_path / "d"), "zip", tmp_path, "d")
    assert (
        invoke("data", "digest", archive)[1].split()[0]
        == invoke("data", "digest", root)[1].split()[0]
    )


def test_against_an_earlier_manifest_names_what_changed(tmp_path: Path) -> None:
    root = tree(tmp_path / "d")
    invoke("data", "digest", root, "--write-manifest", tmp_path / "m.json")
    (root / "a" / "1.png").write_bytes(b"changed")
    (root / "b" / "3.png").unlink()
    code, _, err = invoke("data", "digest", root, "--against", tmp_path / "m.json")
    assert code == 2
    assert "changed: a/1.png" in err and "removed: b/3.png" in err
    assert "traceback" not in err.lower()


def test_a_hostile_archive_is_exit_2_naming_the_member(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("a/1.png", b"1")
        zf.writestr("../../etc/cron.d/x", b"boom")
    code, out, err = invoke("data", "digest", tmp_path / "evil.zip")
    assert code == 2 and not out
    assert "../../etc/cron.d/x" in err and "escapes the dataset" in err
