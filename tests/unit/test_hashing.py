from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.fsutil import atomic_directory, atomic_write_bytes
from pipeline.hashing import hash_artifacts, hash_files, list_tree, sha256_file


def test_digests_match_hashlib_for_small_and_multi_block_files(tmp_path):
    files = {}
    for name, size in {"empty": 0, "small": 10, "big": (1 << 20) * 3 + 7}.items():
        data = os.urandom(size)
        (tmp_path / name).write_bytes(data)
        files[tmp_path / name] = hashlib.sha256(data).hexdigest()
    assert hash_files(files) == files
    assert sha256_file(tmp_path / "big") == files[tmp_path / "big"]


def test_tree_names_are_relative_posix_with_prefix(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.bin").write_bytes(b"x")
    (tmp_path / "top.txt").write_bytes(b"t")
    tree = list_tree(tmp_path, prefix="train/")
    assert list(tree) == ["train/a/b/x.bin", "train/top.txt"]
    arts = hash_artifacts(tree)
    assert arts["train/top.txt"] == {"sha256": hashlib.sha256(b"t").hexdigest()}


def test_symlinks_in_products_are_refused(tmp_path):
    (tmp_path / "out").mkdir()
    os.symlink("/etc/passwd", tmp_path / "out" / "model.keras")
    with pytest.raises(InputError, match="symlink"):
        list_tree(tmp_path / "out")


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.link"
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"data")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "releases" / "m" / "1"
    with pytest.raises(RuntimeError), atomic_directory(final) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("refused midway")
    assert not final.exists() and list((tmp_path / "releases" / "m").iterdir()) == []
    with atomic_directory(final) as staging:
        (staging / "whole").write_text("x")
    assert (final / "whole").is_file()


def test_a_tree_nested_past_the_depth_cap_is_an_input_error_not_a_crash(tmp_path: Path) -> None:
    """A stage can nest directories ~2000 deep within PATH_MAX; Python's recursion limit would
    turn the runner's product walk into exit 70. It is refused, naming the path."""
    import os

    from pipeline import hashing
    from pipeline.errors import InputError

    deep = tmp_path
    for _ in range(hashing.MAX_DEPTH + 2):
        deep = deep / "a"
    os.makedirs(deep)
    (deep / "f").write_text("x")
    for walker in (hashing.walk_tree, hashing.list_tree, hashing.hash_tree):
        with pytest.raises(InputError, match="nested more than 64 directories"):
            walker(tmp_path)
    shallow = tmp_path / "b" / "c"
    shallow.mkdir(parents=True)
    assert hashing.list_tree(tmp_path / "b") == {}
