"""Label issues by confident learning: cleanlab on out-of-sample class probabilities.

The probabilities come from a 5-fold cross-validated logistic regression, so no row is
judged by a model that saw its own label (cleanlab's requirement).
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from pipeline.scan.data.interface import (
    LABEL_ISSUE,
    Dataset,
    Detector,
    DetectorResult,
    Finding,
)

FOLDS = 5


def out_of_sample_probabilities(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray | None:
    """Cross-validated predict_proba of a logistic regression; None when a class is too small
    to be split into folds (every class needs two rows at least)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y)
    present = counts[counts > 0]
    folds = int(min(FOLDS, present.min()))
    if folds < 2 or len(present) < 2:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
    with warnings.catch_warnings():
        # a few more iterations change no decision here; the warning would only be noise
        warnings.simplefilter("ignore", ConvergenceWarning)
        probs = cross_val_predict(
            model,
            x,
            y,
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            method="predict_proba",
        )
    if probs.shape[1] != len(counts):  # a label with no rows: give it a zero column
        full = np.zeros((len(y), len(counts)))
        full[:, np.flatnonzero(counts)] = probs
        probs = full
    return np.asarray(probs)


class LabelIssueDetector(Detector):
    name = "labels"
    kinds = (LABEL_ISSUE,)

    def detect(self, data: Dataset, seed: int) -> DetectorResult:
        from cleanlab.filter import find_label_issues

        t0 = time.perf_counter()
        probs = out_of_sample_probabilities(data.x, data.y, seed)
        if probs is None:
            return DetectorResult(
                self.name,
                (),
                np.full(len(data.y), np.nan),
                {"skipped": "a class has fewer than 2 rows: no out-of-sample probabilities"},
                time.perf_counter() - t0,
            )
        # n_jobs=1: cleanlab forks a pool otherwise, costly here and noisy on Ctrl-C
        issues = find_label_issues(
            labels=data.y, pred_probs=probs, filter_by="prune_by_noise_rate", n_jobs=1
        )
        # self-confidence: the out-of-sample probability of the given label; 1 - it ranks rows
        scores = 1.0 - probs[np.arange(len(data.y)), data.y]
        predicted = probs.argmax(axis=1)
        findings = tuple(
            Finding(
                int(i),
                LABEL_ISSUE,
                float(scores[i]),
                self.name,
                detail=f"labelled {int(data.y[i])}, looks like {int(predicted[i])}",
            )
            for i in np.flatnonzero(issues)
        )
        return DetectorResult(
            self.name,
            findings,
            scores,
            {"method": "cleanlab prune_by_noise_rate on 5-fold logistic regression"},
            time.perf_counter() - t0,
        )
