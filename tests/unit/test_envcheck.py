"""Environment check against a lock, on a fake site-packages the tests build."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from pipeline.envcheck import check_environment, parse_lock
from pipeline.errors import EnvironmentDrift, InputError

H = "--hash=sha256:" + "a" * 64


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


class FakeEnv:
    """A venv-shaped directory with hand-made dist-info folders."""

    def __init__(self, root: Path) -> None:
        self.python = root / "bin" / "python"
        self.site = root / "lib" / "python3.11" / "site-packages"
        self.site.mkdir(parents=True)

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
