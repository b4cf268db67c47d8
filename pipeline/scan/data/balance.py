"""Class balance (a dataset-level finding) and outliers (rows far from every other row)."""

from __future__ import annotations

import time

import numpy as np

from pipeline.scan.data.interface import (
    IMBALANCE,
    OUTLIER,
    Dataset,
    Detector,
    DetectorResult,
    Finding,
)


class BalanceDetector(Detector):
    """A class with under `ratio` of the largest class's rows; reported on the class's rows."""

    name = "balance"
    kinds = (IMBALANCE,)

    def __init__(self, ratio: float = 0.2) -> None:
        self.ratio = ratio

    def detect(self, data: Dataset, seed: int) -> DetectorResult:
        t0 = time.perf_counter()
        counts = np.bincount(data.y, minlength=data.classes)
        largest = int(counts.max())
        small = [c for c, n in enumerate(counts) if n < self.ratio * largest]
        findings = tuple(
            Finding(
                int(i),
                IMBALANCE,
                1.0 - counts[data.y[i]] / largest,
                self.name,
                detail=f"class {data.y[i]} has {counts[data.y[i]]} rows, largest {largest}",
            )
            for i in np.flatnonzero(np.isin(data.y, small))
        )
        scores = 1.0 - counts[data.y] / largest
        summary = {
            "counts": {str(c): int(n) for c, n in enumerate(counts)},
            "underrepresented": small,
            "ratio": self.ratio,
        }
        return DetectorResult(self.name, findings, scores, summary, time.perf_counter() - t0)


class OutlierDetector(Detector):
    """Rows whose distance to their k-th nearest neighbour is a robust-z outlier overall."""

    name = "outliers"
    kinds = (OUTLIER,)

    def __init__(self, z: float = 8.0, neighbours: int = 5) -> None:
        self.z = z
        self.k = neighbours

    def detect(self, data: Dataset, seed: int) -> DetectorResult:
        from sklearn.neighbors import NearestNeighbors

        t0 = time.perf_counter()
        k = min(self.k, len(data.x) - 1)
        dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(data.x).kneighbors(data.x)
        d = dist[:, k]
        med = np.median(d)
        mad = 1.4826 * np.median(np.abs(d - med))
        z = (d - med) / mad if mad > 0 else np.zeros_like(d)
        findings = tuple(
            Finding(int(i), OUTLIER, float(z[i]), self.name) for i in np.flatnonzero(z >= self.z)
        )
        return DetectorResult(
            self.name,
            findings,
            z,
            {"z_threshold": self.z, "neighbours": k},
            time.perf_counter() - t0,
        )
