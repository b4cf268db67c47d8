"""No code at install: environments are built from wheels only, a pin without a wheel for
this platform is refused before anything is built, and pip's install report is kept.

These ask the package index (as a real install would); they skip where it is unreachable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.envcheck import (
    INSTALL_REPORT,
    IndexUnreachable,
    NoWheel,
    check_wheels_only,
    ensure_environment,
    parse_lock,
    site_packages_of,
)
from pipeline.scan.deps import from_installed
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SIX = (
    "six==1.16.0 \\\n"
    "    --hash=sha256:8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254\n"
)
# docopt publishes only an sdist (pip download --only-binary :all: docopt fails): the hash is
# that of docopt-0.6.2.tar.gz.
DOCOPT = (
    "docopt==0.6.2 \\\n"
    "    --hash=sha256:49b3a825280bd66b3aa83585ef59c4a8c82f2c8a522dbe754a8bc8d08c85c491\n"
)

# wget 3.2 is sdist-only too (a zip).
WGET = (
    "wget==3.2 \\\n"
    "    --hash=sha256:35e630eca2aa50ce998b9b1a127bb26b30dfee573702782aa982f875e3f16061\n"
)


@pytest.fixture(scope="module")
def index_reachable(tmp_path_factory: pytest.TempPathFactory) -> None:
    lock = tmp_path_factory.mktemp("probe") / "six.txt"
    lock.write_text(SIX)
    try:
        check_wheels_only(lock, timeout=120)
    except IndexUnreachable as e:
        pytest.skip(f"the package index is unreachable: {e.message}")


def test_an_sdist_only_pin_is_refused_by_name_before_anything_is_built(
    index_reachable: None, tmp_path: Path
) -> None:
    lock = tmp_path / "tiny.txt"
    lock.write_text(SIX + DOCOPT)
    with pytest.raises(NoWheel, match=r"docopt==0\.6\.2 has no wheel for this platform"):
        check_wheels_only(lock)
    envs = tmp_path / "envs"
    with pytest.raises(NoWheel, match="setup.py"):
        ensure_environment(parse_lock(lock), envs, lambda _m: None)
    assert not envs.exists() or not any(envs.iterdir()), "nothing was built or staged"


def test_setup_env_refuses_an_sdist_only_pin(index_reachable: None, tmp_path: Path) -> None:
    lock = tmp_path / "tiny.txt"
    lock.write_text(SIX + DOCOPT)
    venv = tmp_path / "venv"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "setup_env.py"),
            "--venv",
            str(venv),
            "--lock",
            str(lock),
            "--no-project",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "docopt==0.6.2 has no wheel for this platform" in proc.stderr
    assert not venv.exists()


def test_a_wheels_only_environment_keeps_pips_install_report(
    index_reachable: None, tmp_path: Path
) -> None:
    lock = tmp_path / "six.txt"
    lock.write_text(SIX)
    python = ensure_environment(parse_lock(lock), tmp_path / "envs", lambda _m: None)
    report = json.loads((python.parent.parent / INSTALL_REPORT).read_text())
    [six] = [i for i in report["install"] if i["metadata"]["name"] == "six"]
    assert six["download_info"]["url"].endswith("six-1.16.0-py2.py3-none-any.whl")
    wheel_sha = six["download_info"]["archive_info"]["hashes"]["sha256"]
    graph = from_installed(site_packages_of(python))
    assert graph.packages["six"].hashes == (wheel_sha,)  # the file actually installed


def test_every_sdist_only_pin_is_named_at_once(index_reachable: None, tmp_path: Path) -> None:
    lock = tmp_path / "two.txt"
    lock.write_text(DOCOPT + SIX + WGET)
    with pytest.raises(NoWheel, match=r"docopt==0\.6\.2, wget==3\.2 have no wheel"):
        check_wheels_only(lock)
