"""Where the screen's findings surface: MLflow metrics/tag, and the model card."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.lineage import MLflowLineage
from pipeline.stage import StageContext
from stages.package import PackageParams, _screen_markdown, data_screen_summary

REPORT = {
    "summary": {
        "verdict": "warn",
        "flagged_rows": 7,
        "by_kind": {"label-issue": 5, "near-duplicate": 2},
        "detectors": {"labels": {}, "duplicates": {}},
    }
}


class FakeMlflow:
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}

    def log_metrics(self, m: dict[str, float]) -> None:
        self.metrics.update(m)

    def set_tag(self, k: str, v: str) -> None:
        self.tags[k] = v


def test_mlflow_gets_counts_and_the_verdict() -> None:
    fake = FakeMlflow()
    MLflowLineage._screen_findings(fake, REPORT)
    assert fake.metrics == {
        "screen_label_issue": 5.0,
        "screen_near_duplicate": 2.0,
        "screen_flagged_rows": 7.0,
    }
    assert list(fake.tags.values()) == ["warn"]


def test_a_hostile_report_logs_nothing_and_does_not_crash() -> None:
    fake = FakeMlflow()
    for bad in ([], {"summary": 3}, {"summary": {"by_kind": [1], "flagged_rows": "x"}}):
        MLflowLineage._screen_findings(fake, bad)
    assert fake.metrics == {}


def test_the_model_card_carries_the_screen(tmp_path: Path) -> None:
    (tmp_path / "screen").mkdir()
    (tmp_path / "screen" / "data_screen.json").write_text(json.dumps(REPORT))
    (tmp_path / "train").mkdir()
    ctx = StageContext(
        run_id="r",
        stage="package",
        params=PackageParams(),
        workdir=tmp_path / "package",
        inputs={"train": tmp_path / "train", "screen": tmp_path / "screen"},
        outputs=(),
    )
    summary = data_screen_summary(ctx)
    assert summary is not None and summary["verdict"] == "warn"
    assert summary["by_kind"] == {"label-issue": 5, "near-duplicate": 2}
    ctx.inputs.pop("screen")
    assert data_screen_summary(ctx) is None


def test_the_card_markdown_says_screened_or_not() -> None:
    assert "Not screened" in _screen_markdown({})
    screened = {"verdict": "pass", "flagged_rows": 0, "by_kind": {}, "detectors": ["labels"]}
    text = _screen_markdown({"data_screen": {**screened, "note": "heuristic"}})
    assert "Verdict **pass**" in text and "labels" in text
