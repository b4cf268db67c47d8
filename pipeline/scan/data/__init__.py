"""Data screening: find poisoned and mislabelled rows before they become a model.

Heuristic detectors behind one interface (`interface.Detector`): label issues (cleanlab),
backdoor triggers (per-class robust statistics; spectral signatures and activation clustering
on a trained model's penultimate layer), duplicates and train/test leaks, class balance and
outliers. `screen(load(path), policy)` is the whole screen; no detector imports TensorFlow.
"""

from __future__ import annotations

from pipeline.scan.data.dataset import load
from pipeline.scan.data.interface import (
    KINDS,
    DataFindings,
    DataScreenError,
    Dataset,
    Detector,
    DetectorResult,
    Finding,
)
from pipeline.scan.data.policy import ScreenPolicy, load_policy
from pipeline.scan.data.screen import ScreenReport, render_table, screen

__all__ = [
    "KINDS",
    "DataFindings",
    "DataScreenError",
    "Dataset",
    "Detector",
    "DetectorResult",
    "Finding",
    "ScreenPolicy",
    "ScreenReport",
    "load",
    "load_policy",
    "render_table",
    "screen",
]
