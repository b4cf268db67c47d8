"""The data-screening extension point: one `Detector` interface, its findings and its errors.

A detector reads a `Dataset` (rows exactly as given) and returns row findings plus one raw
score per row (for ROC curves in the bench), never printing and never touching the network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import Error, InputError

# The finding kinds a policy can name.
LABEL_ISSUE = "label-issue"
BACKDOOR = "backdoor"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near-duplicate"
LEAK = "leak"
OUTLIER = "outlier"
IMBALANCE = "class-imbalance"
KINDS = (LABEL_ISSUE, BACKDOOR, DUPLICATE, NEAR_DUPLICATE, LEAK, OUTLIER, IMBALANCE)


class DataScreenError(InputError):
    """A dataset or screening policy that cannot be screened (exit 2)."""


class DataFindings(Error):
    """Findings reached the policy's threshold (exit 1): the data should not become a model."""

    exit_code = 1


@dataclass(frozen=True)
class Finding:
    """One suspicious row. `index` is the row of the input's x/y (or x_train/x_test) as given."""

    index: int
    kind: str
    score: float
    detector: str
    split: str = "train"  # "train" or "test": which array `index` counts rows of
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "kind": self.kind,
            "score": round(float(self.score), 6),
            "detector": self.detector,
            "split": self.split,
        }
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class DetectorResult:
    detector: str
    findings: tuple[Finding, ...]
    scores: np.ndarray  # one per training row: higher = more suspicious (NaN where not scored)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Dataset:
    """Rows to screen: `x` flattened to (rows, features) float64, `y` integer labels 0..K-1.

    `x_test`/`y_test` are present for a split dataset (the source stage's canonical file), so
    leakage from train into test can be checked.
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    image_shape: tuple[int, ...] | None = None  # the rows' shape as stored, for reporting
    sha256: str = ""

    @property
    def classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0


class Detector(ABC):
    """One screening method. `name` is what policies and findings call it."""

    name: str = ""
    kinds: tuple[str, ...] = ()  # the kinds of finding it can report
    needs_model: bool = False  # trains a model on the data (slower; see README)

    @abstractmethod
    def detect(self, data: Dataset, seed: int) -> DetectorResult:
        """Screen `data`; deterministic for a given seed."""
