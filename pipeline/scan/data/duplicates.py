"""Exact and near duplicates within the training rows, and train rows leaked into the test set.

Near means closer than a small fraction of the typical nearest-neighbour distance, so the
rule scales with the data. A duplicate whose copies disagree on the label is also a label
problem, and the detail says so.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from pipeline.scan.data.interface import (
    DUPLICATE,
    LEAK,
    NEAR_DUPLICATE,
    Dataset,
    Detector,
    DetectorResult,
    Finding,
)

MAX_ROWS_FOR_NEIGHBOURS = 500_000


def _row_hashes(x: np.ndarray) -> list[bytes]:
    rows = np.ascontiguousarray(x, dtype=np.float64)
    return [hashlib.sha256(r.tobytes()).digest() for r in rows]


class DuplicateDetector(Detector):
    name = "duplicates"
    kinds = (DUPLICATE, NEAR_DUPLICATE, LEAK)

    def __init__(self, near: float = 0.05) -> None:
        self.near = near  # fraction of the median nearest-neighbour distance

    def detect(self, data: Dataset, seed: int) -> DetectorResult:
        from sklearn.neighbors import NearestNeighbors

        t0 = time.perf_counter()
        findings: list[Finding] = []
        scores = np.zeros(len(data.y))
        first: dict[bytes, int] = {}
        for i, h in enumerate(_row_hashes(data.x)):
            if h in first:
                j = first[h]
                conflict = " with a different label" if data.y[i] != data.y[j] else ""
                findings.append(
                    Finding(i, DUPLICATE, 1.0, self.name, detail=f"same as row {j}{conflict}")
                )
                scores[i] = 1.0
            else:
                first[h] = i
        exact = {f.index for f in findings}
        near_rows = 0
        radius = 0.0
        if 3 <= len(data.x) <= MAX_ROWS_FOR_NEIGHBOURS:
            unique = np.array(sorted(first.values()))
            nn = NearestNeighbors(n_neighbors=2).fit(data.x[unique])
            dist, ind = nn.kneighbors(data.x[unique])
            typical = float(np.median(dist[:, 1]))
            radius = self.near * typical
            for row, (d, j) in enumerate(zip(dist[:, 1], ind[:, 1], strict=True)):
                a, b = int(unique[row]), int(unique[j])
                if d <= radius and a > b and a not in exact:  # report the later of a pair
                    near_rows += 1
                    scores[a] = max(scores[a], 1.0 - d / radius if radius else 1.0)
                    findings.append(
                        Finding(
                            a,
                            NEAR_DUPLICATE,
                            float(scores[a]),
                            self.name,
                            detail=f"within {d:.4g} of row {b}",
                        )
                    )
            if data.x_test is not None and data.y_test is not None:
                dist_t, ind_t = nn.kneighbors(data.x_test, n_neighbors=1)
                for t, (d, j) in enumerate(zip(dist_t[:, 0], ind_t[:, 0], strict=True)):
                    if d <= radius:
                        findings.append(
                            Finding(
                                t,
                                LEAK,
                                1.0 - d / radius if radius else 1.0,
                                self.name,
                                split="test",
                                detail=f"test row {t} within {d:.4g} of train row {int(unique[j])}",
                            )
                        )
        summary = {
            "exact": len(exact),
            "near": near_rows,
            "leaks": sum(1 for f in findings if f.kind == LEAK),
            "near_radius": radius,
        }
        return DetectorResult(self.name, tuple(findings), scores, summary, time.perf_counter() - t0)
