"""Run a policy's detectors over a dataset and decide: the report `scan data` and the screen
stage both produce, and the verdict the gate signs."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.scan.data.interface import DataScreenError, Dataset, Detector, DetectorResult, Finding
from pipeline.scan.data.policy import ScreenPolicy

REPORT_VERSION = 1


def make_detector(name: str, policy: ScreenPolicy) -> Detector:
    """The detector a policy names, configured by it. Model-based ones import on demand."""
    if name == "labels":
        from pipeline.scan.data.labels import LabelIssueDetector

        return LabelIssueDetector()
    if name == "backdoor":
        from pipeline.scan.data.robust import RobustBackdoorDetector

        return RobustBackdoorDetector(policy.backdoor_z)
    if name == "duplicates":
        from pipeline.scan.data.duplicates import DuplicateDetector

        return DuplicateDetector(policy.near_duplicate)
    if name == "balance":
        from pipeline.scan.data.balance import BalanceDetector

        return BalanceDetector(policy.imbalance_ratio)
    if name == "outliers":
        from pipeline.scan.data.balance import OutlierDetector

        return OutlierDetector(policy.outlier_z)
    if name == "spectral":
        from pipeline.scan.data.activations import SpectralSignatureDetector

        return SpectralSignatureDetector(policy.spectral_z)
    if name == "activation-clustering":
        from pipeline.scan.data.activations import ActivationClusteringDetector

        return ActivationClusteringDetector()
    raise DataScreenError(f"unknown detector {name!r}")


@dataclass(frozen=True)
class ScreenReport:
    dataset: str
    sha256: str
    rows: int
    test_rows: int
    findings: tuple[Finding, ...]
    results: tuple[DetectorResult, ...]
    policy: ScreenPolicy
    failed_kinds: dict[str, tuple[int, int]]  # kind -> (rows found, rows that fail)
    seconds: float

    @property
    def verdict(self) -> str:
        """ "pass", "fail" (findings at a threshold, action fail) or "warn" (same, action warn)."""
        if not self.failed_kinds:
            return "pass"
        return "fail" if self.policy.action == "fail" else "warn"

    def flagged_rows(self) -> int:
        return len({(f.split, f.index) for f in self.findings})

    def to_dict(self) -> dict[str, Any]:
        by_kind = Counter(f.kind for f in self.findings)
        return {
            "version": REPORT_VERSION,
            "dataset": {
                "name": self.dataset,
                "sha256": self.sha256,
                "rows": self.rows,
                "test_rows": self.test_rows,
            },
            "findings": [f.to_dict() for f in self.findings],
            "summary": {
                "verdict": self.verdict,
                "flagged_rows": self.flagged_rows(),
                "by_kind": dict(sorted(by_kind.items())),
                "failed": {
                    k: {"rows": n, "threshold": t} for k, (n, t) in self.failed_kinds.items()
                },
                "detectors": {
                    r.detector: {
                        **r.summary,
                        "findings": len(r.findings),
                        "seconds": round(r.seconds, 3),
                    }
                    for r in self.results
                },
                "policy": self.policy.model_dump(mode="json"),
                "seconds": round(self.seconds, 3),
            },
        }


def screen(data: Dataset, policy: ScreenPolicy) -> ScreenReport:
    """Every detector the policy selects, in its order; findings sorted by row, then kind."""
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    # One BLAS thread: these problems are small, and on a shared machine many threads per
    # process oversubscribe the cores (measured: 3x slower on 2 busy cores).
    with threadpool_limits(limits=1):
        results = tuple(
            make_detector(name, policy).detect(data, policy.seed)
            for name in dict.fromkeys(policy.detectors)
        )
    findings = tuple(
        sorted(
            (f for r in results for f in r.findings),
            key=lambda f: (f.split, f.index, f.kind, f.detector),
        )
    )
    failed: dict[str, tuple[int, int]] = {}
    for kind in sorted({f.kind for f in findings}):
        rows = len({(f.split, f.index) for f in findings if f.kind == kind})
        split_rows = len(data.y_test) if kind == "leak" and data.y_test is not None else len(data.y)
        at = policy.threshold_rows(kind, split_rows)
        if at is not None and rows >= at:
            failed[kind] = (rows, at)
    return ScreenReport(
        dataset=data.name,
        sha256=data.sha256,
        rows=len(data.y),
        test_rows=0 if data.y_test is None else len(data.y_test),
        findings=findings,
        results=results,
        policy=policy,
        failed_kinds=failed,
        seconds=time.perf_counter() - t0,
    )


def render_table(report: ScreenReport, limit: int = 40) -> str:
    d = report.to_dict()
    s = d["summary"]
    lines = [
        f"{report.dataset} (sha256 {report.sha256[:12]}…): {report.rows} rows"
        + (f" + {report.test_rows} test rows" if report.test_rows else ""),
        f"verdict: {s['verdict'].upper()}; {s['flagged_rows']} row(s) flagged "
        f"in {s['seconds']:.1f}s",
    ]
    for kind, n in s["by_kind"].items():
        fail = s["failed"].get(kind)
        mark = f"  <- at/over threshold ({fail['threshold']} rows)" if fail else ""
        lines.append(f"  {kind:16} {n:6}{mark}")
    if report.findings:
        lines.append(f"{'split':5} {'index':>7}  {'kind':16} {'score':>9}  detector / detail")
        ranked = sorted(report.findings, key=lambda f: -float(np.nan_to_num(f.score)))[:limit]
        for f in sorted(ranked, key=lambda f: (f.split, f.index)):
            lines.append(
                f"{f.split:5} {f.index:7}  {f.kind:16} {f.score:9.3f}  {f.detector}"
                + (f": {f.detail}" if f.detail else "")
            )
        if len(report.findings) > limit:
            lines.append(f"... {len(report.findings) - limit} more (use --format json)")
    return "\n".join(lines)
