"""Datasets of files: one manifest digest for a folder and its archives, the files that differ
named with both digests, and hostile archives (escapes, links, devices, bombs) refused."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline import datasets
from pipeline.datasets import DatasetError, DatasetMismatch, DatasetSource, digest_path


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


FILES = {"cat/a.png": b"aaaa", "cat/b.png": b"bb", "dog/c.png": b"c" * 1000}


def zip_of(path: Path, members: dict[str, bytes], *, top: str = "") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(top + name, data)
    return path


def tar_of(path: Path, members: dict[str, bytes], *, top: str = "", gz: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(top + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_the_manifest_is_canonical_json_of_every_file_sorted(tmp_path: Path) -> None:
    _, m = digest_path(make_tree(tmp_path / "d", FILES))
    doc = json.loads(m.canonical_bytes())
    assert doc["format"] == datasets.FORMAT
    assert [f["path"] for f in doc["files"]] == sorted(FILES)
    assert doc["files"][0] == {
        "path": "cat/a.png",
        "size": 4,
        "sha256": "61be55a8e2f6b4e172338bddf184d6dbee29c98853e0a0485ecee7f27b9af0b4",
    }
    assert m.canonical_bytes() == (
        json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    )


def test_the_canonical_bytes_escape_names_as_json_dumps_does(tmp_path: Path) -> None:
    _, m = digest_path(make_tree(tmp_path / "d", {'cl"ass/é ü.png': b"1", "b/\u2603.png": b"2"}))
    doc = {
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in m.files],
        "format": datasets.FORMAT,
    }
    expected = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert m.canonical_bytes() == expected.encode() + b"\n"


def test_a_folder_and_its_zip_and_tar_gz_have_one_digest(tmp_path: Path) -> None:
    _, folder = digest_path(make_tree(tmp_path / "d", FILES))
    _, z = digest_path(zip_of(tmp_path / "d.zip", FILES, top="d/"))
    _, t = digest_path(tar_of(tmp_path / "d.tar.gz", FILES, top="d/"))
    _, plain = digest_path(tar_of(tmp_path / "d.tar", FILES, gz=False))
    assert folder.digest == z.digest == t.digest == plain.digest


@pytest.mark.parametrize(
    "change, kind, name",
    [
        (lambda d: (d / "cat/a.png").write_bytes(b"AAAA"), "changed", "cat/a.png"),
        (lambda d: (d / "dog/new.png").write_bytes(b"new"), "added", "dog/new.png"),
        (lambda d: (d / "cat/b.png").unlink(), "removed", "cat/b.png"),
    ],
)
def test_a_tampered_folder_is_refused_naming_the_file_and_both_digests(
    tmp_path: Path, change, kind: str, name: str
) -> None:
    root = make_tree(tmp_path / "d", FILES)
    _, pinned = digest_path(root)
    change(root)
    _, now = digest_path(root)
    with pytest.raises(DatasetMismatch) as e:
        datasets.check_pin(str(root), now, pinned.digest, pinned)
    assert f"  {kind}: {name}" in e.value.message
    assert pinned.digest in e.value.message and now.digest in e.value.message
    assert e.value.exit_code == 2
    # without the pinned manifest: both digests, and how to get the names
    with pytest.raises(DatasetMismatch) as bare:
        datasets.check_pin(str(root), now, pinned.digest, None)
    assert pinned.digest in bare.value.message and now.digest in bare.value.message
    assert "manifest:" in (bare.value.hint or "")


def test_a_written_manifest_reads_back_to_the_same_digest(tmp_path: Path) -> None:
    _, m = digest_path(make_tree(tmp_path / "d", FILES))
    (tmp_path / "m.json").write_bytes(m.canonical_bytes())
    assert datasets.read_manifest(tmp_path / "m.json").digest == m.digest


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"format": "other", "files": []},
        {"format": datasets.FORMAT, "files": {}},
        {"format": datasets.FORMAT, "files": [{"path": "a", "size": "1", "sha256": "0" * 64}]},
        {"format": datasets.FORMAT, "files": [{"path": "../a", "size": 1, "sha256": "0" * 64}]},
        {"format": datasets.FORMAT, "files": [{"path": "a", "size": 1, "sha256": '"' * 64}]},
        {"format": datasets.FORMAT, "files": [{"path": "a", "size": -1, "sha256": "0" * 64}]},
    ],
)
def test_a_malformed_manifest_file_is_bad_input(tmp_path: Path, doc) -> None:
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError):
        datasets.read_manifest(tmp_path / "m.json")


# --------------------------------------------------------------------------- hostile


def test_a_symlink_in_a_folder_is_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", FILES)
    (root / "cat" / "evil.png").symlink_to("/etc/passwd")
    with pytest.raises(DatasetError, match=r"cat/evil.png is a symlink"):
        DatasetSource(root)


def test_a_fifo_in_a_folder_is_refused_without_blocking(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", FILES)
    os.mkfifo(root / "dog" / "pipe.png")
    with pytest.raises(DatasetError, match=r"dog/pipe.png is not a regular file"):
        DatasetSource(root)


@pytest.mark.parametrize("name", ["../escape.png", "/etc/passwd", "cat/../../x.png", "C:/x.png"])
def test_a_zip_member_that_escapes_is_refused(tmp_path: Path, name: str) -> None:
    path = zip_of(tmp_path / "bad.zip", {**FILES, name: b"x"})
    with pytest.raises(DatasetError, match="escapes the dataset"):
        DatasetSource(path)


@pytest.mark.parametrize("name", ["../escape.png", "/abs.png"])
def test_a_tar_member_that_escapes_is_refused(tmp_path: Path, name: str) -> None:
    path = tar_of(tmp_path / "bad.tar.gz", {**FILES, name: b"x"})
    with pytest.raises(DatasetError, match="escapes the dataset"):
        DatasetSource(path)


def test_a_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    path = zip_of(tmp_path / "link.zip", FILES)
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("cat/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DatasetError, match="cat/link.png is a symlink"):
        DatasetSource(path)


@pytest.mark.parametrize(
    "kind, message",
    [
        (tarfile.SYMTYPE, "a symlink"),
        (tarfile.LNKTYPE, "a hard link"),
        (tarfile.CHRTYPE, "a device"),
    ],
)
def test_tar_links_and_devices_are_refused(tmp_path: Path, kind: bytes, message: str) -> None:
    path = tar_of(tmp_path / "t.tar.gz", FILES)
    with tarfile.open(path, "r:gz") as src, tarfile.open(tmp_path / "u.tar.gz", "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        info = tarfile.TarInfo("cat/odd.png")
        info.type = kind
        info.linkname = "/etc/passwd"
        dst.addfile(info)
    with pytest.raises(DatasetError, match=f"cat/odd.png is {message}"):
        DatasetSource(tmp_path / "u.tar.gz")


def test_a_zip_bomb_member_is_refused_from_its_header(tmp_path: Path) -> None:
    path = zip_of(tmp_path / "bomb.zip", {**FILES, "cat/zeros.png": b"\0" * (32 << 20)})
    with pytest.raises(DatasetError, match="zip bomb"):
        DatasetSource(path)


def test_overlapping_zip_entries_are_refused(tmp_path: Path) -> None:
    path = zip_of(tmp_path / "o.zip", {"cat/a.png": b"a" * 100, "cat/b.png": b"b"})
    data = bytearray(path.read_bytes())
    # point the second central-directory entry at the first local header
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 42 : cd + 46] = (0).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="overlapping"):
        DatasetSource(path)


def test_a_gzip_bomb_tar_is_refused_within_the_ratio(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CHAINPROOF_MAX_DATASET_FILE_BYTES", str(1 << 30))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo("cat/zeros.png")
        info.size = 200 << 20
        tf.addfile(info, io.BytesIO(b"\0" * info.size))
    (tmp_path / "bomb.tar.gz").write_bytes(gzip.compress(raw.getvalue(), 9))
    assert (tmp_path / "bomb.tar.gz").stat().st_size < 1 << 20
    with pytest.raises(DatasetError, match="a decompression bomb") as e:
        DatasetSource(tmp_path / "bomb.tar.gz")  # refused from the header, before inflating
    assert "CHAINPROOF_MAX_ARCHIVE_RATIO" in e.value.message


def test_a_huge_pax_header_is_refused_not_buffered(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CHAINPROOF_MAX_DATASET_FILE_BYTES", "4096")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("cat/a.png")
        info.pax_headers = {"comment": "x" * 100_000}
        info.size = 1
        tf.addfile(info, io.BytesIO(b"a"))
    (tmp_path / "pax.tar").write_bytes(raw.getvalue())
    with pytest.raises(DatasetError, match="at once"):
        DatasetSource(tmp_path / "pax.tar")


def test_a_member_over_the_file_cap_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CHAINPROOF_MAX_DATASET_FILE_BYTES", "100")
    with pytest.raises(DatasetError, match=r"dog/c.png is 1,000 bytes.*CHAINPROOF_MAX_DATASET"):
        DatasetSource(make_tree(tmp_path / "d", FILES))


def test_too_many_files_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CHAINPROOF_MAX_DATASET_FILES", "2")
    with pytest.raises(DatasetError, match="more than 2 files"):
        DatasetSource(make_tree(tmp_path / "d", FILES))


def test_a_duplicate_member_is_refused(tmp_path: Path) -> None:
    path = tar_of(tmp_path / "dup.tar", {"cat/a.png": b"1"}, gz=False)
    with tarfile.open(path, "a") as tf:
        info = tarfile.TarInfo("cat/a.png")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"2"))
    with pytest.raises(DatasetError, match="appears twice"):
        DatasetSource(path)


@pytest.mark.parametrize("data", [b"", b"PK\x03\x04garbage", b"\x1f\x8b\x08\x00broken"])
def test_a_broken_archive_is_bad_input(tmp_path: Path, data: bytes) -> None:
    name = "x.zip" if data.startswith(b"PK") or not data else "x.tar.gz"
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DatasetError, match="not a readable"):
        DatasetSource(tmp_path / name).manifest()


def test_a_truncated_tar_gz_is_bad_input(tmp_path: Path) -> None:
    path = tar_of(tmp_path / "t.tar.gz", FILES)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DatasetError):
        DatasetSource(path).manifest()
