"""Archives judged member by member by content, within limits: zip bombs, tar, compressed
joblib, modern PyTorch checkpoints, members hidden behind a decoy layout."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.scan.model import ScanLimits, ScanReport, Severity, scan_path
from tests import model_samples as ms


def _rules(report: ScanReport) -> set[str]:
    return {f.rule for f in report.findings}


def _deflated(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# --- bombs and limits ----------------------------------------------------------------------------

SMALL = ScanLimits(ratio=10, ratio_floor=64 << 10)


def test_zip_member_expanding_past_the_ratio_is_a_bomb(tmp_path: Path) -> None:
    (tmp_path / "m.npz").write_bytes(_deflated({"w.npy": b"\0" * (1 << 20)}))
    report = scan_path(tmp_path / "m.npz", limits=SMALL)
    (hit,) = report.findings
    assert (hit.rule, hit.severity, hit.location.member) == ("zip-bomb", Severity.HIGH, "w.npy")
    assert "limit ratio" in hit.message


def test_same_size_member_that_does_not_compress_is_no_bomb(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).random(1 << 17))
    (tmp_path / "m.npz").write_bytes(_deflated({"w.npy": buf.getvalue()}))
    assert scan_path(tmp_path / "m.npz", limits=SMALL).findings == ()


def test_member_and_total_size_caps_name_the_cap(tmp_path: Path) -> None:
    (tmp_path / "m.npz").write_bytes(
        ms.zip_with({"a.npy": ms.clean_npy(), "b.npy": ms.clean_npy()})
    )
    size = len(ms.clean_npy())
    each = scan_path(tmp_path / "m.npz", limits=ScanLimits(member_bytes=size - 1)).findings
    assert [(f.rule, f.location.member) for f in each] == [
        ("zip-bomb", "a.npy"),
        ("zip-bomb", "b.npy"),
    ]
    assert all("member_bytes" in f.message for f in each)
    (total,) = scan_path(tmp_path / "m.npz", limits=ScanLimits(total_bytes=size + 1)).findings
    assert total.rule == "zip-bomb" and "total_bytes" in total.message
    assert scan_path(tmp_path / "m.npz").findings == ()


def test_overlapping_entries_are_a_bomb(tmp_path: Path) -> None:
    # Two directory entries pointing at one local header: the non-recursive zip bomb shape.
    data = bytearray(ms.zip_with({"a.npy": ms.clean_npy(), "b.npy": ms.clean_npy()}))
    second = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)
    struct.pack_into("<I", data, second + 42, 0)
    (tmp_path / "m.npz").write_bytes(bytes(data))
    (hit,) = scan_path(tmp_path / "m.npz").findings
    assert hit.rule == "zip-bomb" and "overlapping" in hit.message


def test_member_count_cap(tmp_path: Path) -> None:
    (tmp_path / "m.zip").write_bytes(ms.zip_with({f"{i}.npy": ms.clean_npy() for i in range(5)}))
    (hit,) = scan_path(tmp_path / "m.zip", limits=ScanLimits(members=4)).findings
    assert hit.rule == "zip-bomb" and "members" in hit.message


def test_nesting_cap(tmp_path: Path) -> None:
    data = ms.clean_npy()
    for i in range(4):
        data = ms.zip_with({f"level{i}.zip" if i else "w.npy": data})
    (tmp_path / "deep.zip").write_bytes(data)
    assert _rules(scan_path(tmp_path / "deep.zip", limits=ScanLimits(nesting=2))) == {
        "zip-too-deep"
    }
    assert scan_path(tmp_path / "deep.zip").findings == ()


def test_oversized_keras_config_is_refused_not_read(tmp_path: Path) -> None:
    cfg = ms.sequential_config(ms.dense_layer())
    (tmp_path / "m.keras").write_bytes(ms.keras_zip(cfg))
    (hit,) = scan_path(tmp_path / "m.keras", limits=ScanLimits(document_bytes=64)).findings
    assert hit.rule == "too-large" and "document_bytes" in hit.message


# --- layouts judged by content ---------------------------------------------------------------


def test_modern_torch_checkpoint_passes(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(ms.modern_torch_zip(ms.torch_style_clean_pickle()))
    report = scan_path(tmp_path / "m.pt")
    assert report.findings == ()
    assert "torch-storage" in {f.format for f in report.files}


def test_modern_torch_checkpoint_with_payload_is_caught(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / "m.pt").write_bytes(ms.modern_torch_zip(ms.pickle_os_system(sentinel, 2)))
    (hit,) = scan_path(tmp_path / "m.pt").findings
    assert hit.rule == "pickle-dangerous-import" and hit.location.member == "model/data.pkl"


@pytest.mark.parametrize("name", ["m.npz", "m.pt"])
def test_object_npy_behind_a_torch_decoy_is_read(tmp_path: Path, sentinel: Path, name: str) -> None:
    # A decoy data.pkl makes the archive look like a PyTorch checkpoint whose data/0 is raw
    # storage; np.load would read data/0 as an .npy and unpickle its object array.
    members = {"archive/data.pkl": ms.torch_style_clean_pickle()}
    members["archive/data/0"] = ms.object_npy(sentinel)
    (tmp_path / name).write_bytes(ms.zip_with(members))
    report = scan_path(tmp_path / name)
    crit = [f for f in report.findings if f.severity is Severity.CRITICAL]
    assert crit and crit[0].location.member == "archive/data/0"
    assert not sentinel.exists()


# --- tar ---------------------------------------------------------------------------------------


def _tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_tar_members_are_judged(tmp_path: Path, sentinel: Path) -> None:
    path = _tar(
        tmp_path / "m.tar.gz",
        {"w.npy": ms.clean_npy(), "x/evil.pkl": ms.pickle_os_system(sentinel)},
    )
    report = scan_path(path)
    (hit,) = report.findings
    assert hit.severity is Severity.CRITICAL and hit.location.member == "x/evil.pkl"


def test_clean_tar_passes(tmp_path: Path) -> None:
    path = _tar(tmp_path / "m.tar", {"w.npy": ms.clean_npy(), "b.npz": ms.clean_npz()}, "w")
    assert scan_path(path).findings == ()


def test_tar_links_and_escapes(tmp_path: Path) -> None:
    path = tmp_path / "m.tar"
    with tarfile.open(path, "w") as tf:
        link = tarfile.TarInfo("w.npy")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        info = tarfile.TarInfo("../../escape.npy")
        info.size = len(ms.clean_npy())
        tf.addfile(info, io.BytesIO(ms.clean_npy()))
    assert _rules(scan_path(path)) == {"tar-link", "tar-slip"}


# --- compressed joblib ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zlib", "gzip", "bz2", "xz", "lzma"])
def test_compressed_joblib_clean_passes(tmp_path: Path, method: str) -> None:
    import joblib

    obj = {"coef": np.arange(1000, dtype=np.float64), "n": 3}
    joblib.dump(obj, tmp_path / "m.joblib", compress=(method, 3))
    report = scan_path(tmp_path / "m.joblib")
    assert report.findings == (), report.findings
    assert report.files[0].format == f"compressed:{method}"


@pytest.mark.parametrize("method", ["zlib", "gzip", "bz2", "xz"])
def test_compressed_joblib_payload_is_caught(tmp_path: Path, sentinel: Path, method: str) -> None:
    import joblib

    evil = np.array([ms.Reduce(os.system, (ms.touch_cmd(sentinel),))], dtype=object)
    joblib.dump({"payload": evil}, tmp_path / "m.joblib", compress=(method, 3))
    report = scan_path(tmp_path / "m.joblib")
    assert report.max_severity is Severity.CRITICAL
    assert not sentinel.exists()


def test_decompression_bomb_is_a_finding(tmp_path: Path) -> None:
    import zlib

    (tmp_path / "m.joblib").write_bytes(zlib.compress(pickle.dumps(b"\0" * (4 << 20), 4)))
    (hit,) = scan_path(tmp_path / "m.joblib", limits=SMALL).findings
    assert hit.rule == "decompression-bomb" and "ratio" in hit.message
    assert scan_path(tmp_path / "m.joblib").findings == ()


def test_corrupt_compressed_stream_is_a_finding(tmp_path: Path) -> None:
    (tmp_path / "m.joblib").write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 64)
    report = scan_path(tmp_path / "m.joblib")
    assert not report.ok() and report.findings[0].severity >= Severity.HIGH
