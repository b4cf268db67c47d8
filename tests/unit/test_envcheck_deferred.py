"""`run`'s deferred walk: when the tree stamp answers, the DEFERRED packages (TensorFlow,
MLflow, numpy, ...) are walked in a forked child while the runner starts, and a drift there
is still refused (exit 3, naming the file) before anything runs or any of their code does."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from pipeline import envmanifest
from pipeline.envcheck import check_environment, parse_lock
from pipeline.envmanifest import CHANGED, STAMP_NAME, DeferredImports, check_tree
from pipeline.errors import EnvironmentDrift
from tests.unit.test_envcheck import FakeEnv, lock_file, seal_key  # noqa: F401 (a fixture)

PINS = {"alpha": "1.0", "numpy": "1.0"}


@pytest.fixture
def env(tmp_path) -> FakeEnv:
    e = FakeEnv(tmp_path / "venv")
    e.install("alpha", "1.0", {"alpha/__init__.py": b"A = 1\n"})
    e.install("numpy", "1.0", {"numpy/__init__.py": b"N = 1\n", "numpy/core/x.py": b"X = 1\n"})
    built_from = tmp_path / "built-from"
    built_from.mkdir()
    e.seal(lock_file(built_from, PINS))
    assert check_tree(e.root).diff == ()  # writes the stamp
    return e


@pytest.fixture(autouse=True)
def no_leftovers(monkeypatch):
    # The bootstrap that defers is single-threaded; the test process may not be (earlier
    # tests' servers), and the child only walks and exits, so it may fork here too.
    monkeypatch.setattr(envmanifest.forked, "may_fork", lambda: True)
    yield
    envmanifest.abandon()
    envmanifest._CHECKED.clear()
    envmanifest._DRIFT.clear()
    envmanifest._unguard()


def tamper(env: FakeEnv, how: str) -> str:
    """Changes the deferred package numpy; the diff line the full check gives for it."""
    target = env.site / "numpy" / "core" / "x.py"
    if how == "same size, mtime restored":
        st = target.stat()
        target.write_bytes(b"X = 2\n")
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        return f"! numpy/core/x.py: {CHANGED}"
    if how == "added file":
        (env.site / "numpy" / "evil.py").write_text("E = 1\n")
        return "+ numpy/evil.py: in site-packages, not in the sealed manifest (added after)"
    if how == "removed file":
        target.unlink()
        return "- numpy/core/x.py: in the sealed manifest, missing on disk"
    assert how == "directory swapped for a symlink"
    (env.site / "numpy" / "core" / "x.py").unlink()
    (env.site / "numpy" / "core").rmdir()
    (env.site / "numpy" / "core").symlink_to("/tmp")
    return "+ numpy/core: a symlink not in the sealed manifest (-> /tmp)"


def test_an_unchanged_tree_answers_with_a_pending_walk_that_matches(env):
    result = check_tree(env.root, defer=True)
    assert result.diff == () and result.loaded is None
    assert result.pending is not None, "the deferred packages are walked in the background"
    settled = envmanifest.settle(result)
    assert settled.pending is None and settled.diff == () and settled.loaded is None


def test_without_defer_both_parts_are_walked_in_line(env):
    result = check_tree(env.root)
    assert result.pending is None and result.diff == () and result.loaded is None


def test_a_threaded_process_walks_in_line(env, monkeypatch):
    monkeypatch.setattr(envmanifest.forked, "may_fork", lambda: False)
    result = check_tree(env.root, defer=True)
    assert result.pending is None and result.diff == () and result.loaded is None
    tamper(env, "added file")
    assert any("numpy/evil.py" in line for line in check_tree(env.root, defer=True).diff)


@pytest.mark.parametrize(
    "how",
    ["same size, mtime restored", "added file", "removed file", "directory swapped for a symlink"],
)
def test_a_drift_in_a_deferred_package_is_refused_by_the_environment_check(env, tmp_path, how):
    want = tamper(env, how)
    result = check_tree(env.root, defer=True)
    assert result.pending is not None and result.diff == (), "the rest of the tree is as stamped"
    envmanifest.remember(result)
    with pytest.raises(EnvironmentDrift) as info:  # what the runner's prepare() calls
        check_environment(parse_lock(lock_file(tmp_path, PINS)), python=env.python)
    assert info.value.exit_code == 3
    named = want.split(": ", 1)[0]  # "! numpy/core/x.py" (envcheck words it with RECORD at hand)
    assert any(line.startswith(named) for line in info.value.diff), info.value.diff
    assert any(isinstance(f, DeferredImports) for f in sys.meta_path), "refused for good"


def test_importing_a_deferred_package_waits_for_the_walk_and_refuses_on_drift(env):
    tamper(env, "added file")
    envmanifest.remember(check_tree(env.root, defer=True))
    assert any(isinstance(f, DeferredImports) for f in sys.meta_path)
    importlib.import_module("json.decoder")  # anything else imports as usual, unwaited
    assert envmanifest._CHECKED[env.root].pending is not None, "not waited for"
    with pytest.raises(EnvironmentDrift) as info:
        importlib.import_module("numpy.chainproof_never_imported")
    assert "+ numpy/evil.py" in "\n".join(info.value.diff)


def test_a_clean_deferred_walk_lets_the_import_go_on(env):
    envmanifest.remember(check_tree(env.root, defer=True))
    with pytest.raises(ModuleNotFoundError):  # found by nobody: the guard waited, then passed
        importlib.import_module("numpy.chainproof_never_imported")
    assert envmanifest._CHECKED[env.root].pending is None
    assert not any(isinstance(f, DeferredImports) for f in sys.meta_path)


def test_settle_all_reports_a_drift_no_command_waited_for(env):
    tamper(env, "removed file")
    envmanifest.remember(check_tree(env.root, defer=True))
    with pytest.raises(EnvironmentDrift):
        envmanifest.settle_all()


def test_a_forked_helper_may_not_wait_for_its_parents_walk(env):
    result = check_tree(env.root, defer=True)
    assert result.pending is not None
    owner = result.pending.owner
    result.pending.owner = owner + 1  # as in a child forked from the runner
    with pytest.raises(EnvironmentDrift, match="not yet checked"):
        envmanifest.settle(result)
    result.pending.owner = owner
    assert envmanifest.settle(result).diff == ()


def test_a_drift_outside_the_deferred_packages_is_found_at_once(env):
    (env.site / "alpha" / "evil.py").write_text("E = 1\n")
    result = check_tree(env.root, defer=True)
    assert result.pending is None
    assert "+ alpha/evil.py: in site-packages, not in the sealed manifest (added after)" in (
        result.diff
    )


def test_a_stamp_without_the_deferred_digest_is_no_stamp(env):
    import json

    stamp = env.root / STAMP_NAME
    sealed = json.loads(stamp.read_bytes())
    del sealed["body"]["deferred_listing_sha256"]  # an older stamp (and its seal no longer fits)
    stamp.write_text(json.dumps(sealed))
    result = check_tree(env.root, defer=True)
    assert result.pending is None and result.loaded is not None, "a full check, re-stamped"
    assert check_tree(env.root, defer=True).pending is not None


def test_a_refusal_that_was_caught_is_raised_again(env):
    # A `try: import numpy / except Exception` (or a .pth line, which site reports and skips)
    # swallows the first refusal: every later import and settle must still refuse.
    tamper(env, "added file")
    envmanifest.remember(check_tree(env.root, defer=True))
    for _ in range(2):
        with pytest.raises(EnvironmentDrift):
            importlib.import_module("numpy.chainproof_never_imported")
    assert any(isinstance(f, DeferredImports) for f in sys.meta_path), "still guarded"
    with pytest.raises(EnvironmentDrift):
        envmanifest.settle_all()
    with pytest.raises(EnvironmentDrift):
        envmanifest.take_checked(env.root)


def test_a_forked_helper_stays_refused(env):
    result = check_tree(env.root, defer=True)
    assert result.pending is not None
    envmanifest.remember(result)
    result.pending.owner += 1  # as in a child forked from the runner
    for _ in range(2):
        with pytest.raises(EnvironmentDrift, match="not yet checked"):
            importlib.import_module("numpy.chainproof_never_imported")
    result.pending.owner -= 1


def test_an_interrupted_wait_is_a_miss_not_a_hang(env, monkeypatch):
    result = check_tree(env.root, defer=True)
    assert result.pending is not None
    real_read = os.read

    def interrupted(fd, n):
        raise KeyboardInterrupt

    monkeypatch.setattr(envmanifest.forked.os, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        result.pending.matched()
    monkeypatch.setattr(envmanifest.forked.os, "read", real_read)
    assert result.pending.matched() is False, "never a read of a reused descriptor"
    settled = envmanifest.settle(result)  # a miss: checked again, in line
    assert settled.pending is None and settled.diff == ()


def test_a_fork_that_fails_walks_in_line(env, monkeypatch):
    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(envmanifest.forked.os, "fork", no_fork)
    result = check_tree(env.root, defer=True)
    assert result.pending is None and result.diff == ()
    assert len(os.listdir("/proc/self/fd")) == before, "no descriptor leaked"


def test_a_deferred_name_that_is_not_a_directory_keeps_the_stamp(tmp_path):
    # numpy as a top-level symlink: listed with the rest, so the stamp still answers.
    e = FakeEnv(tmp_path / "venv")
    e.install("alpha", "1.0", {"alpha/__init__.py": b"A = 1\n"})
    (e.site / "numpy").symlink_to("alpha")
    e.seal(lock_file(tmp_path, {"alpha": "1.0"}))
    assert check_tree(e.root).diff == ()
    assert check_tree(e.root).loaded is None, "answered by the stamp"
    result = check_tree(e.root, defer=True)
    assert result.pending is not None and envmanifest.settle(result).loaded is None


def test_abandon_stops_a_walk_nobody_waited_for(env):
    result = check_tree(env.root, defer=True)
    assert result.pending is not None
    envmanifest.remember(result)
    envmanifest.abandon()
    with pytest.raises(ChildProcessError):
        os.waitpid(result.pending.pid, os.WNOHANG)  # reaped
