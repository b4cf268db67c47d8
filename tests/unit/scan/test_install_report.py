"""pip's install report as evidence: which wheel each distribution came from. Read from a
hostile file without ever failing; used by the installed-graph scan and the ML-BOM."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.envcheck import INSTALL_REPORT, InstalledFile, read_install_report
from pipeline.scan.deps import from_installed

SHA = "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254"
URL = "https://files.pythonhosted.org/packages/d9/5a/x/six-1.16.0-py2.py3-none-any.whl"


def report(items: list) -> str:
    return json.dumps({"version": "1", "install": items})


def six(**archive: object) -> dict:
    return {
        "metadata": {"name": "Six", "version": "1.16.0"},
        "download_info": {"url": URL, "archive_info": archive},
    }


def test_reads_the_wheel_of_each_distribution(tmp_path: Path) -> None:
    (tmp_path / INSTALL_REPORT).write_text(report([six(hashes={"sha256": SHA})]))
    assert read_install_report(tmp_path) == {
        ("six", "1.16.0"): InstalledFile("six-1.16.0-py2.py3-none-any.whl", SHA)
    }
    (tmp_path / INSTALL_REPORT).write_text(report([six(hash=f"sha256={SHA}")]))  # older pip
    assert read_install_report(tmp_path)[("six", "1.16.0")].sha256 == SHA


def test_a_missing_or_hostile_report_is_no_evidence_not_an_error(tmp_path: Path) -> None:
    assert read_install_report(tmp_path) == {}
    for text in (
        "not json",
        "[]",
        '{"install": 5}',
        report([1, None, {"metadata": 3}]),
        report([six(hashes={"sha256": "not-a-digest"})]),
        report([six(hash=7)]),
    ):
        (tmp_path / INSTALL_REPORT).write_text(text)
        assert read_install_report(tmp_path) == {}, text


def test_the_installed_graph_carries_the_installed_wheels_hash(tmp_path: Path) -> None:
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    dist = site / "six-1.16.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: six\nVersion: 1.16.0\n")
    assert from_installed(site).packages["six"].hashes == ()
    (tmp_path / INSTALL_REPORT).write_text(report([six(hashes={"sha256": SHA})]))
    assert from_installed(site).packages["six"].hashes == (SHA,)


def test_the_environment_fingerprint_names_the_install_report(tmp_path: Path) -> None:
    import hashlib

    from pipeline.envcheck import check_environment, parse_lock
    from tests.unit.test_envcheck import FakeEnv, lock_file

    env = FakeEnv(tmp_path / "venv")
    env.install("alpha", "1.0", {"alpha/__init__.py": b"A = 1\n"})
    lock = parse_lock(lock_file(tmp_path, {"alpha": "1.0"}))
    env.seal(lock.path)  # environments are sealed when they are built
    assert check_environment(lock, python=env.python).install_report_sha256 == ""
    text = report([six(hashes={"sha256": SHA})])
    (tmp_path / "venv" / INSTALL_REPORT).write_text(text)  # at the root, not in site-packages
    fp = check_environment(lock, python=env.python)
    assert fp.install_report_sha256 == hashlib.sha256(text.encode()).hexdigest()
