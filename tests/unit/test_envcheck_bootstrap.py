"""The isolated start: real virtualenvs in tmp_path, a tiny wheel built here, offline.

Each attack is run against the interpreter first (it works there), then against chainproof's
bootstrap, which must refuse it (exit 3) before any of it runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import marshal
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline.envmanifest import SEAL_KEY_ENV, check_tree, isolated_command
from tests.conftest import CHAINPROOF, ROOT

pytestmark = pytest.mark.slow

BOOTSTRAP = isolated_command(sys.executable)[3]
PYC = "tiny/__pycache__/__init__.cpython-311.pyc"


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(dest: Path, files: dict[str, bytes]) -> Path:
    """A minimal, valid pure-Python wheel (tiny 1.0)."""
    info = "tiny-1.0.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = b"Metadata-Version: 2.1\nName: tiny\nVersion: 1.0\n"
    entries[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: chainproof-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n"
    )
    rows = [f"{p},{record_hash(d)},{len(d)}" for p, d in entries.items()] + [f"{info}/RECORD,,"]
    entries[f"{info}/RECORD"] = ("\n".join(rows) + "\n").encode()
    wheel = dest / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return wheel


class TinyVenv:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.python = root / "venv" / "bin" / "python"
        self.site = root / "venv" / "lib" / "python3.11" / "site-packages"

    def run(self, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            capture_output=True,
            text=True,
            env={**self.env, **env},
            timeout=120,
        )

    def bootstrap(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-I", "-S", BOOTSTRAP, *args)


@pytest.fixture
def tiny(tmp_path) -> TinyVenv:
    """A venv built from a hash-pinned lock of one tiny wheel, then sealed, as setup does."""
    env = {"PATH": os.environ["PATH"], SEAL_KEY_ENV: str(tmp_path / "seal.key")}
    t = TinyVenv(tmp_path, env)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = build_wheel(wheels, {"tiny/__init__.py": b"X = 'genuine'\n"})
    lock = tmp_path / "lock.txt"
    lock.write_text(f"tiny==1.0 --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}\n")
    steps = [
        (sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv"),
        (sys.executable, "-m", "pip", "--python", t.python, "--disable-pip-version-check")
        + ("install", "--quiet", "--no-index", "--find-links", wheels)
        + ("--no-deps", "--require-hashes", "-r", lock),
        (t.python, "-I", "-S", BOOTSTRAP, "env", "seal", "--lock", lock),
    ]
    for cmd in steps:
        proc = t.run(*cmd)
        assert proc.returncode == 0, proc.stderr
    assert (t.site / PYC).is_file(), "sealing byte-compiles every module"
    return t


def test_a_sealed_environment_matches_and_reports_nothing(tiny, monkeypatch):
    monkeypatch.setenv(SEAL_KEY_ENV, tiny.env[SEAL_KEY_ENV])
    assert check_tree(tiny.root / "venv").diff == ()


def test_a_poisoned_pyc_runs_in_python_but_the_bootstrap_refuses_it(tiny):
    pyc = tiny.site / PYC
    header = pyc.read_bytes()[:16]  # checked-hash flags and the source's hash, unchanged
    code = compile("X = 'poisoned'", str(tiny.site / "tiny/__init__.py"), "exec")
    pyc.write_bytes(header + marshal.dumps(code))
    plain = tiny.run(tiny.python, "-c", "import tiny; print(tiny.X)")
    assert plain.stdout.strip() == "poisoned", "the attack is real: Python runs the .pyc"
    proc = tiny.bootstrap("--version")
    assert proc.returncode == 3, proc.stderr
    assert f"! {PYC}: differs from the sealed manifest" in proc.stderr


def test_a_pth_listed_in_a_record_is_refused_before_it_runs(tiny, tmp_path):
    marker = tmp_path / "pth-ran"
    hook = f"import os; open({str(marker)!r}, 'w').close()\n".encode()
    (tiny.site / "zz-hook.pth").write_bytes(hook)
    record = tiny.site / "tiny-1.0.dist-info" / "RECORD"
    record.write_text(record.read_text() + f"zz-hook.pth,{record_hash(hook)},{len(hook)}\n")
    proc = tiny.bootstrap("--version")
    assert proc.returncode == 3, proc.stderr
    assert "+ zz-hook.pth: a start-up file in site-packages, not in the sealed manifest" in (
        proc.stderr
    )
    assert not marker.exists(), "the bootstrap judged the .pth before site ran it"
    tiny.run(tiny.python, "-c", "pass")
    assert marker.exists(), "the attack is real: any ordinary start runs the .pth"


def test_env_check_of_another_environment_exits_3_on_drift(tiny):
    # One seal key per user: the runner's own environment and this one share it.
    lock = tiny.root / "lock.txt"
    user = {k: v for k, v in os.environ.items() if k != SEAL_KEY_ENV}
    subprocess.run(
        [tiny.python, "-I", "-S", BOOTSTRAP, "env", "seal", "--force", "--lock", lock],
        check=True,
        capture_output=True,
        env=user,
    )
    (tiny.site / "tiny" / "__init__.py").write_text("X = 'edited'\n")
    proc = subprocess.run(
        [*CHAINPROOF, "env", "check", "--lock", lock, "--python", tiny.python],
        capture_output=True,
        text=True,
        env=user,
        cwd=ROOT,
    )
    assert proc.returncode == 3, proc.stderr
    assert "! tiny/__init__.py: sha256 differs from its wheel RECORD" in proc.stderr


@pytest.mark.parametrize(
    "command",
    [CHAINPROOF, [str(Path(sys.executable).parent / "chainproof")]],
    ids=["isolated-form", "console-script"],
)
def test_a_sitecustomize_on_pythonpath_never_runs(tmp_path, command):
    marker = tmp_path / "sitecustomize-ran"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    for name in ("sitecustomize.py", "usercustomize.py"):
        (hooks / name).write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": str(hooks), "PYTHONSTARTUP": str(hooks / "sitecustomize.py")}
    proc = subprocess.run([*command, "--version"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "a sitecustomize on PYTHONPATH ran inside chainproof"
    control = subprocess.run([sys.executable, "-c", "pass"], env=env)
    assert control.returncode == 0 and marker.exists(), "the attack is real without -I"


def test_a_sitecustomize_in_site_packages_is_refused_and_never_runs(tiny, tmp_path):
    marker = tmp_path / "sitecustomize-ran"
    (tiny.site / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    proc = tiny.bootstrap("--version")
    assert proc.returncode == 3, proc.stderr
    assert "+ sitecustomize.py: a start-up file in site-packages" in proc.stderr
    assert not marker.exists(), "judged before anything could import it"


def test_env_check_json_is_the_fingerprint_and_drift_keeps_exit_3(tiny):
    lock = tiny.root / "lock.txt"
    user = {k: v for k, v in os.environ.items() if k != SEAL_KEY_ENV}
    subprocess.run(
        [tiny.python, "-I", "-S", BOOTSTRAP, "env", "seal", "--force", "--lock", lock],
        check=True,
        capture_output=True,
        env=user,
    )
    check = [*CHAINPROOF, "env", "check", "--lock", lock, "--python", tiny.python, "--json"]
    proc = subprocess.run(check, capture_output=True, text=True, env=user, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["matches"] is True and answer["lock"] == str(lock)
    assert answer["fingerprint"]["lock"] == "lock.txt" and "python" in answer["fingerprint"]
    (tiny.site / "tiny" / "__init__.py").write_text("X = 'edited'\n")
    proc = subprocess.run(check, capture_output=True, text=True, env=user, cwd=ROOT)
    assert proc.returncode == 3 and proc.stdout == ""  # drift: its diff on stderr, as before
