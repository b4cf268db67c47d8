"""The screen as a gate: the signed verdict binds one run and the screened files, deploy and
verify refuse a Statement from another run, changed data or a failing verdict, and every gate
step of a screened pipeline REQUIREs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import VerificationError
from pipeline.scan.data.attest import data_screen_statement, recheck_data_screen
from pipeline.workspace import DATA

ROOT = Path(__file__).resolve().parents[4]


def _run(tmp_path: Path, verdict: str = "pass") -> Path:
    (tmp_path / "source").mkdir()
    np.savez(tmp_path / "source" / "dataset.npz", x_train=np.zeros((4, 2)), y_train=np.arange(4))
    (tmp_path / "screen").mkdir()
    report = {
        "dataset": {"path": "source/dataset.npz"},
        "findings": [],
        "summary": {
            "verdict": verdict,
            "by_kind": {"label-issue": 2},
            "failed": {},
            "flagged_rows": 2,
        },
    }
    (tmp_path / "screen" / "data_screen.json").write_text(json.dumps(report))
    return tmp_path


def test_the_statement_binds_the_run_and_both_files(tmp_path: Path) -> None:
    run = _run(tmp_path)
    stmt = data_screen_statement("run-1", "screen", run)
    assert {s["name"] for s in stmt["subject"]} == {"screen/data_screen.json", "source/dataset.npz"}
    assert "pass" in recheck_data_screen(stmt, "run-1", run)
    assert "pass" in recheck_data_screen(stmt, "run-1", None)  # a bundle ships no dataset


def test_a_statement_from_another_run_is_refused(tmp_path: Path) -> None:
    stmt = data_screen_statement("run-1", "screen", _run(tmp_path))
    with pytest.raises(VerificationError, match="not run-2"):
        recheck_data_screen(stmt, "run-2", tmp_path)


def test_data_changed_after_the_screen_is_refused(tmp_path: Path) -> None:
    run = _run(tmp_path)
    stmt = data_screen_statement("run-1", "screen", run)
    np.savez(run / "source" / "dataset.npz", x_train=np.ones((4, 2)), y_train=np.arange(4))
    with pytest.raises(VerificationError, match="not the file the data screen signed"):
        recheck_data_screen(stmt, "run-1", run)


def test_a_failing_verdict_is_refused(tmp_path: Path) -> None:
    stmt = data_screen_statement("run-1", "screen", _run(tmp_path, verdict="fail"))
    with pytest.raises(VerificationError, match="verdict is 'fail'"):
        recheck_data_screen(stmt, "run-1", None)


@pytest.mark.parametrize(
    "report",
    [
        {"summary": "nope"},
        {
            "dataset": {"path": "../../etc/passwd"},
            "summary": {"verdict": "pass", "by_kind": {}, "failed": {}, "flagged_rows": 0},
        },
        {
            "dataset": {"path": "source/dataset.npz"},
            "summary": {"verdict": "great", "by_kind": {}, "failed": {}, "flagged_rows": 0},
        },
    ],
)
def test_a_hostile_report_is_a_verification_error(tmp_path: Path, report: dict) -> None:
    run = _run(tmp_path)
    (run / "screen" / "data_screen.json").write_text(json.dumps(report))
    with pytest.raises(VerificationError):
        data_screen_statement("run-1", "screen", run)


def test_gate_steps_of_a_screened_config_require_the_verdict(tmp_path: Path) -> None:
    from securesystemslib.signer import CryptoSigner

    from pipeline.config import load_config
    from pipeline.provenance.keys import PublicKey
    from pipeline.provenance.layout import LayoutPins, compile_layout

    def rules(config_path: Path, step: str) -> list[list[str]]:
        config = load_config(config_path)
        layout = compile_layout(
            config,
            functionary=PublicKey(CryptoSigner.generate_ed25519().public_key),
            pins=LayoutPins(
                pipeline=config.name, config_sha256="c" * 64, locks={}, code_sha256="d" * 64
            ),
            modules={s.kind: s.impl.module for s in config.stages},
            gates=frozenset(s.kind for s in config.stages if s.impl.gate),
        )
        return next(s for s in layout.steps if s.name == step).expected_materials

    screened = ROOT / "configs" / "digits-screened.yaml"
    assert ["REQUIRE", DATA] in rules(screened, "deploy")
    assert ["REQUIRE", "screen/data_screen.json"] in rules(screened, "train")  # train waits
    assert ["REQUIRE", DATA] not in rules(ROOT / "configs" / "digits-cnn.yaml", "deploy")
