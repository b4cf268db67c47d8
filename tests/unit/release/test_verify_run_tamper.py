"""`verify` of a signed run after each tamper, in a process that already verified it once (its
stat-keyed digest cache warm, small files hashed during the walk): each fails, naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.bench_verify import build
from pipeline.errors import VerificationError
from pipeline.release.verify import verify_run

TARGET = "make/d003/f000003.bin"
OTHER = "make/d004/f000004.bin"


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, str]:
    run_dir, fingerprint, _, _ = build(tmp_path / "w", 30)
    report = verify_run(run_dir, owner_key=fingerprint)  # sound, and the caches are warm
    assert ("artifacts on disk", "31 file(s) match their signed digests") in report.checks
    return run_dir, fingerprint


def fails(run: tuple[Path, str]) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verify_run(run[0], owner_key=run[1])
    return info.value


def test_a_changed_byte_is_named(run) -> None:
    path = run[0] / TARGET
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    err = fails(run)
    assert err.check == "artifacts on disk" and err.artifact == str(path)
    assert err.message.startswith(f"{TARGET} on disk has sha256")


def test_a_same_size_rewrite_with_its_mtime_restored_is_named(run) -> None:
    path = run[0] / TARGET
    st = path.stat()
    path.write_bytes(bytes(st.st_size))  # same size, other bytes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as signed
    err = fails(run)
    assert err.check == "artifacts on disk" and err.artifact == str(path)


def test_two_files_swapped_by_rename_are_named(run) -> None:
    # same size, each keeps its own mtime: only the content (and ctime) gives it away
    a, b = run[0] / TARGET, run[0] / OTHER
    tmp = a.with_name("swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    err = fails(run)
    assert err.check == "artifacts on disk" and err.artifact in (str(a), str(b))


def test_an_added_file_is_named(run) -> None:
    extra = run[0] / "make" / "d003" / "extra.bin"
    extra.write_bytes(b"not signed")
    err = fails(run)
    assert err.artifact == str(extra)
    assert "make/d003/extra.bin is in step 'make' but its link does not record it" in err.message


def test_a_file_replaced_by_a_symlink_is_named(run) -> None:
    path = run[0] / TARGET
    content = path.read_bytes()
    (run[0] / "elsewhere.bin").write_bytes(content)  # the very bytes that were signed
    path.unlink()
    path.symlink_to(run[0] / "elsewhere.bin")
    err = fails(run)
    assert err.artifact == str(path) and err.check == "layout of files"
    assert f"{TARGET} is a symlink" in err.message


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(run) -> None:
    path = run[0] / TARGET
    path.unlink()
    os.mkfifo(path)  # opening it to hash it would block forever
    err = fails(run)
    assert err.check == "artifacts on disk" and err.artifact == str(path)
