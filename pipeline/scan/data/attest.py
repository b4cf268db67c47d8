"""The data screen as a gate: its verdict as a signed Statement bound to one run, and the
second look deploy and `chainproof verify` take at it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import bounded
from pipeline.errors import VerificationError
from pipeline.hashing import sha256_file
from pipeline.provenance.chain import safe_join
from pipeline.provenance.statements import statement
from pipeline.workspace import DATA

DATA_SCREEN_PREDICATE = "https://chainproof.dev/attestation/data-screen/v1"
SCREEN_REPORT = "data_screen.json"  # what a screen stage writes (stages/screen.py)


class DataScreenRefused(VerificationError):
    """The signed data screen is missing, from another run, stale, or says fail."""


def data_screen_statement(run_id: str, stage: str, run_dir: Path) -> dict[str, Any]:
    """The verdict of screen stage `stage`'s report, bound to this run and to the digests of
    the report and the dataset it screened. The report is the stage's (hostile) output: it is
    read within the caps and only the fields needed are kept, type-checked."""
    report_name = f"{stage}/{SCREEN_REPORT}"
    report = bounded.read_json(run_dir / report_name, what="data screen report")
    try:
        summary = report["summary"]
        verdict = str(summary["verdict"])
        dataset_name = str(report["dataset"]["path"])
        by_kind = {str(k): int(v) for k, v in dict(summary["by_kind"]).items()}
        failed = {str(k): dict(v) for k, v in dict(summary["failed"]).items()}
        flagged = int(summary["flagged_rows"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataScreenRefused(
            f"{report_name} is not a data screen report ({e!r})",
            check="data screen",
            step=stage,
            artifact=report_name,
        ) from None
    if verdict not in ("pass", "warn", "fail"):
        raise DataScreenRefused(
            f"{report_name} has verdict {verdict!r}",
            check="data screen",
            step=stage,
            artifact=report_name,
        )
    dataset = safe_join(run_dir, dataset_name, check="data screen")
    subjects = {report_name: sha256_file(run_dir / report_name), dataset_name: sha256_file(dataset)}
    predicate = {
        "scanner": {"uri": "https://github.com/chainproof/chainproof#scan-data", "version": "1"},
        "run_id": run_id,
        "stage": stage,
        "verdict": verdict,
        "flagged_rows": flagged,
        "by_kind": by_kind,
        "failed": failed,
        "report": report_name,
        "dataset": dataset_name,
    }
    return statement(subjects, DATA_SCREEN_PREDICATE, predicate)


def recheck_data_screen(stmt: dict[str, Any], run_id: str | None, run_dir: Path | None) -> str:
    """Deploy's and verify's second look at the signed screen: this run's, its report and
    dataset unchanged since (when `run_dir` holds them: a release bundle ships neither), and
    not a failing verdict. Returns a one-line verdict."""
    pred = stmt.get("predicate")
    if not isinstance(pred, dict) or stmt.get("predicateType") != DATA_SCREEN_PREDICATE:
        raise DataScreenRefused(
            "the data screen Statement has no data-screen predicate",
            check="data screen",
            artifact=DATA,
        )
    if pred.get("run_id") != run_id:
        raise DataScreenRefused(
            f"the data screen Statement is for run {pred.get('run_id')!r}, not {run_id}",
            check="data screen",
            artifact=DATA,
            hint="it was copied from another run; re-run the pipeline",
        )
    subjects = stmt.get("subject", [])
    if run_dir is not None and isinstance(subjects, list):
        _check_subjects(subjects, run_dir)
    if pred.get("verdict") not in ("pass", "warn"):
        raise DataScreenRefused(
            f"the data screen's verdict is {pred.get('verdict')!r}: {pred.get('failed')}",
            check="data screen",
            artifact=DATA,
        )
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(dict(pred.get("by_kind", {})).items()))
    return f"data screened ({pred.get('stage')}): {pred['verdict']}, " + (kinds or "no findings")


def _check_subjects(subjects: list[Any], run_dir: Path) -> None:
    """Each file the screen signed is still on disk with the digest it signed."""
    for subject in subjects:
        subject = subject if isinstance(subject, dict) else {}
        digest = subject.get("digest")
        name = str(subject.get("name", ""))
        path = safe_join(run_dir, name, check="data screen")
        want = digest.get("sha256") if isinstance(digest, dict) else None
        if not path.is_file() or sha256_file(path) != want:
            raise DataScreenRefused(
                f"{name} is not the file the data screen signed",
                check="data screen",
                artifact=name,
                hint="the data changed after it was screened; re-run",
            )
