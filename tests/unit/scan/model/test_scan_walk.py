"""Directories, the report values and the CLI of `chainproof scan model`."""

from __future__ import annotations

import json
import os
import pickle
from fractions import Fraction
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipeline.cli.scan import scan_model
from pipeline.errors import InputError
from pipeline.scan.model import ScanReport, Severity, UnsafeModelError, render_table, scan_path
from pipeline.scan.model.pickle import judge_global
from pipeline.scan.model.report import Finding
from tests import model_samples as ms

ROOT = Path(__file__).resolve().parents[4]


def _only(report: ScanReport, rule: str) -> list[Finding]:
    return [f for f in report.findings if f.rule == rule]


def test_unrecognised_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (hit,) = scan_path(tmp_path / "notes.txt").findings
    assert (hit.rule, hit.severity) == ("unrecognised-format", Severity.HIGH)


def test_directory_walk_and_symlinks(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "sub" / "evil.pkl").write_bytes(ms.pickle_os_system(sentinel))
    (tmp_path / "m" / "w.npy").write_bytes(ms.clean_npy())
    os.symlink("/etc/passwd", tmp_path / "m" / "link.pkl")
    report = scan_path(tmp_path / "m")
    by_rule = {f.rule: f.location.file for f in report.findings}
    assert by_rule == {"pickle-dangerous-import": "sub/evil.pkl", "symlink": "link.pkl"}
    assert [f.path for f in report.files] == ["sub/evil.pkl", "w.npy"]
    assert report.bytes_scanned == sum(f.size for f in report.files)


def test_fifo_is_refused_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.pkl")
    (hit,) = scan_path(tmp_path).findings
    assert (hit.rule, hit.location.file) == ("unrecognised-format", "pipe.pkl")
    assert scan_path(tmp_path / "pipe.pkl").findings[0].rule == "unrecognised-format"


def test_missing_path_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        scan_path(tmp_path / "nope")


def test_report_api(samples: list[ms.Sample]) -> None:
    report = scan_path(next(s.path for s in samples if s.name == "partial.pkl"))
    assert report.max_severity is Severity.CRITICAL
    assert not report.ok("medium") and not report.ok(Severity.CRITICAL)
    assert report.counts()["critical"] == 1 and report.counts()["high"] == 1
    doc = json.loads(report.to_json())
    assert doc["max_severity"] == "critical" and doc["findings"][0]["location"]["offset"] >= 0
    table = render_table(report)
    assert "pickle-dangerous-import" in table and "partial.pkl" in table
    assert report.duration_s >= 0 and report.bytes_scanned > 0


def test_judge_global_allowlist_and_denylist() -> None:
    assert judge_global("numpy.core.multiarray", "_reconstruct") is None
    assert judge_global("torch._utils", "_rebuild_tensor_v2") is None
    assert judge_global("os.path", "join")[0] is Severity.CRITICAL  # type: ignore[index]
    assert judge_global("builtins", "getattr")[0] is Severity.CRITICAL  # type: ignore[index]
    assert judge_global("sklearn.linear_model", "LogisticRegression")[0] is Severity.HIGH  # type: ignore[index]


def test_unsafe_model_error_names_rule_and_location(samples: list[ms.Sample]) -> None:
    report = scan_path(next(s.path for s in samples if s.name == "evil_torch.pt"))
    err = UnsafeModelError(report, "medium")
    assert err.exit_code == 1 and err.rule == "pickle-dangerous-import"
    assert "archive/data.pkl" in (err.artifact or "")
    assert "do not load" in err.diagnostics()


@pytest.fixture
def cli() -> click.Group:
    """Mount the command the way pipeline.cli will: `chainproof scan model`."""

    @click.group()
    def root() -> None: ...

    @root.group()
    def scan() -> None: ...

    scan.add_command(scan_model)
    return root


def test_cli_clean_exits_0(cli: click.Group, samples: list[ms.Sample]) -> None:
    path = next(s.path for s in samples if s.name == "clean.npz")
    result = CliRunner().invoke(cli, ["scan", "model", str(path)])
    assert result.exit_code == 0, result.output
    assert "no findings" in result.output


def test_cli_findings_raise_unsafe_model_error(cli: click.Group, samples: list[ms.Sample]) -> None:
    path = next(s.path for s in samples if s.name == "exec.pkl")
    result = CliRunner().invoke(cli, ["scan", "model", str(path), "--format", "json"])
    assert isinstance(result.exception, UnsafeModelError) and result.exception.exit_code == 1
    assert json.loads(result.output)["max_severity"] == "critical"


def test_cli_fail_on_threshold(cli: click.Group, tmp_path: Path) -> None:
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(Fraction(1, 3)))  # high, not critical
    args = ["scan", "model", str(tmp_path / "m.pkl")]
    ok = CliRunner().invoke(cli, [*args, "--fail-on", "critical"])
    assert ok.exit_code == 0 and "pickle-unsafe-import" in ok.output
    bad = CliRunner().invoke(cli, args)
    assert isinstance(bad.exception, UnsafeModelError)


def test_cli_missing_path_is_input_error(cli: click.Group, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["scan", "model", str(tmp_path / "missing.pt")])
    assert isinstance(result.exception, InputError) and result.exception.exit_code == 2


def test_cli_profile_option(cli: click.Group, tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(ms.torch_zip(ms.torch_style_clean_pickle()))
    args = ["scan", "model", str(tmp_path / "m.pt")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    strict = CliRunner().invoke(cli, [*args, "--profile", "numpy"])
    assert isinstance(strict.exception, UnsafeModelError)
    assert (
        CliRunner().invoke(cli, [*args, "--profile", "torch", "--profile", "sklearn"]).exit_code
        == 0
    )


def test_cli_directory_with_documents_passes(cli: click.Group, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "w.npy").write_bytes(ms.clean_npy())
    (tmp_path / "d" / "README.md").write_text("# model\n")
    result = CliRunner().invoke(cli, ["scan", "model", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "not-a-model" in result.output


def test_a_directory_nested_past_the_cap_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    """os.walk recurses: ~1000 levels would raise RecursionError (exit 70). The scan stops
    at the cap and says so, as a high finding."""
    from pipeline.scan.model import scan_path

    deep = tmp_path / "m"
    for _ in range(200):
        deep = deep / "a"
    os.makedirs(deep)
    report = scan_path(tmp_path / "m")
    assert [f.rule for f in report.findings] == ["nested-too-deep"]
