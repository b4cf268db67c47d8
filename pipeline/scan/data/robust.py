"""Backdoor and trigger poisoning by per-class robust statistics (SPECTRE-style whitening).

Within each class the rows are projected onto their top principal directions, and a
minimum-covariance-determinant estimate (which ignores up to 40% of the rows) gives a
centre and covariance the poison cannot move. A trigger shifts every poisoned row the same
way, far outside what the clean rows of the class vary by; the robust Mahalanobis distance,
as a robust z-score within the class, ranks them. It needs no trained model.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from pipeline.scan.data.interface import BACKDOOR, Dataset, Detector, DetectorResult, Finding

COMPONENTS = 10
SUPPORT = 0.6  # MCD keeps this fraction of a class: tolerates poison up to ~40% of it
DEFAULT_Z = 10.0


def robust_z(features: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, list[int]]:
    """Per-class robust z-score of each row's robust Mahalanobis distance, and the classes
    too small to estimate (their rows score NaN)."""
    from sklearn.covariance import MinCovDet

    z = np.full(len(labels), np.nan)
    skipped: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        g = features[idx] - np.median(features[idx], axis=0)
        k = min(COMPONENTS, g.shape[1], len(idx) // 5)
        if k < 1:
            skipped.append(int(c))
            continue
        _, sv, vt = np.linalg.svd(g, full_matrices=False)
        k = min(k, int(np.sum(sv > sv[0] * 1e-6)) if sv.size and sv[0] > 0 else 0)
        if k < 1:  # every row of the class is the same: nothing to be an outlier from
            z[idx] = 0.0
            continue
        p = g @ vt[:k].T
        try:
            with warnings.catch_warnings():
                # MCD warns when the support is (near) singular; the fallback below handles it
                warnings.simplefilter("ignore")
                mcd = MinCovDet(random_state=seed, support_fraction=SUPPORT).fit(p)
                d = np.sqrt(np.maximum(mcd.mahalanobis(p), 0.0))
        except (ValueError, np.linalg.LinAlgError):
            skipped.append(int(c))
            continue
        med = np.median(d)
        mad = 1.4826 * np.median(np.abs(d - med))
        z[idx] = (d - med) / mad if mad > 0 else np.where(d > med, np.inf, 0.0)
    return z, skipped


class RobustBackdoorDetector(Detector):
    name = "backdoor"
    kinds = (BACKDOOR,)

    def __init__(self, z: float = DEFAULT_Z) -> None:
        self.z = z

    def detect(self, data: Dataset, seed: int) -> DetectorResult:
        t0 = time.perf_counter()
        z, skipped = robust_z(data.x, data.y, seed)
        flagged = np.flatnonzero(np.nan_to_num(z, nan=-np.inf) >= self.z)
        findings = tuple(
            Finding(int(i), BACKDOOR, float(z[i]), self.name, detail=f"class {int(data.y[i])}")
            for i in flagged
        )
        per_class = {
            str(int(c)): int(np.sum(data.y[flagged] == c)) for c in np.unique(data.y[flagged])
        }
        summary: dict[str, object] = {
            "method": "per-class PCA + minimum covariance determinant, robust z of distance",
            "z_threshold": self.z,
            "flagged_per_class": per_class,
        }
        if skipped:
            summary["skipped_classes"] = skipped
        return DetectorResult(self.name, findings, z, summary, time.perf_counter() - t0)
